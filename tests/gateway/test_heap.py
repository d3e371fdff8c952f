"""The heap trimmer: glibc's malloc_trim once a burst of connections is over, not per close."""

from __future__ import annotations

import asyncio

from svidgate.gateway.heap import _MALLOC_TRIM, HeapTrimmer


def test_trims_once_after_a_burst_ends_and_not_for_a_few_closes() -> None:
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    async def scenario() -> None:
        trimmer = HeapTrimmer(asyncio.get_running_loop(), drop=100, quiet=0.05, trim=trim)
        for n in range(1, 121):
            trimmer.opened(n)
        for n in range(119, 100, -1):  # 20 closed: below the drop
            trimmer.closed(n)
        await asyncio.sleep(0.2)
        assert calls == []
        for n in range(100, -1, -1):  # the burst is over: one trim, however many closes
            trimmer.closed(n)
        await asyncio.sleep(0.2)
        assert calls == [0]
        assert trimmer.trims == 1
        for n in range(1, 301):  # the next burst: measured from what was open at the trim
            trimmer.opened(n)
        for n in range(299, 150, -1):
            trimmer.closed(n)
        await asyncio.sleep(0.2)
        assert calls == [0, 0]

    asyncio.run(scenario())


def test_glibc_malloc_trim_is_found_and_callable() -> None:
    # The gateway's images and CI run on glibc; a missing symbol would silently keep bursts' memory.
    assert _MALLOC_TRIM is not None
    assert _MALLOC_TRIM(0) in (0, 1)
