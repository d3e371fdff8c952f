"""Issue 9, item 5: the verification caches are bounded by bytes, measured on real processes.

A real `svidgate gateway serve` verifies 2,000 distinct, valid, large tokens minted by a real
`svidgate signer serve` (extra claims: many short role names, the shape that costs the most
memory per token byte), each through a remote and a local JWT route. Three quarters are just
under the default ``signer.cache.max_token_bytes`` (cached, up to ``max_bytes`` per cache), a
quarter are larger (verified, never cached). The gateway's resident memory (VmRSS) may grow by
at most 64 MiB; unbounded caches grew by far more."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import aiohttp
from gateway_harness import WEB_ID, Echo, GatewayProcess, LabPki, gateway_config
from signer_lab import jwt_routes, lab_signer
from support.signer_process import SignerProcess

MiB = 1024 * 1024
TOKENS = 2000
WARM_UP = 100
CONCURRENCY = 8


def roles(seed: int, count: int) -> list[str]:
    """``count`` distinct two-letter role names (every one a separate str in the gateway)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [a + b for a, b in itertools.product(letters, repeat=2)]
    return [pairs[(seed + i) % len(pairs)] for i in range(count)]


def claims(index: int) -> dict[str, object]:
    """~3.9 KB tokens (cacheable) for three in four, ~7 KB (too large to cache) for the rest."""
    count = 520 if index % 4 else 1000
    return {"roles": roles(index, count), "n": index}


async def mint(signer: SignerProcess, indexes: range) -> list[str]:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int) -> str:
        async with limit:
            return await signer.sign_async(WEB_ID, claims=claims(index))

    return list(await asyncio.gather(*(one(i) for i in indexes)))


async def send_all(gw: GatewayProcess, tokens: list[str]) -> list[int]:
    """Every token through /jwt/remote and /jwt/local over keep-alive mTLS connections."""
    ctx = gw.pki.client_context(gw.pki.dir / "web.crt", gw.pki.dir / "web.key")
    jobs: Iterator[tuple[str, str]] = (
        (f"/jwt/{verify}/{i}", token)
        for i, token in enumerate(tokens)
        for verify in ("remote", "local")
    )
    statuses: list[int] = []
    connector = aiohttp.TCPConnector(ssl=ctx, limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for path, token in jobs:
                headers = {"Authorization": f"Bearer {token}"}
                async with session.get(f"https://127.0.0.1:{gw.port}{path}", headers=headers) as r:
                    await r.read()
                    statuses.append(r.status)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses


async def test_gateway_rss_stays_bounded_with_2000_large_tokens(
    test_pki: LabPki, echo: Echo
) -> None:
    signer = lab_signer(test_pki)
    await signer.start()
    doc = gateway_config(test_pki, echo.port)
    doc["signer"] = {"address": f"unix:{signer.socket}", "timeout": "5s"}
    doc["access_log"] = False
    jwt_routes(doc, [WEB_ID])
    gw = GatewayProcess(test_pki, doc)
    try:
        await gw.start("/readyz")
        warm = await mint(signer, range(TOKENS, TOKENS + WARM_UP))
        tokens = await mint(signer, range(TOKENS))
        small = [len(t) for i, t in enumerate(tokens) if i % 4]
        large = [len(t) for i, t in enumerate(tokens) if not i % 4]
        bounds = (min(small), max(small), min(large))
        assert 3800 <= bounds[0] <= bounds[1] <= 4096 < 6500 <= bounds[2], bounds
        assert set(await send_all(gw, warm)) == {200}
        before = gw.rss_bytes()
        assert set(await send_all(gw, tokens)) == {200}
        after = gw.rss_bytes()
        growth = after - before
        print(
            f"\ngateway VmRSS: {before / MiB:.1f} MiB after warm-up, {after / MiB:.1f} MiB after "
            f"{TOKENS} tokens x 2 routes: +{growth / MiB:.1f} MiB"
        )
        assert growth <= 64 * MiB, f"VmRSS grew by {growth / MiB:.1f} MiB"
    finally:
        gw.stop()
        if signer.running:
            signer.stop()
