"""Bounded transports (issue 10, item 1), against real ``svidgate signer serve`` processes.

A red team exhausted the signer's descriptors with idle certificate-less TCP connections,
grew it by 214 MB with WatchKeys streams, held thousands of health streams with a certificate
authorized for nothing, and starved Verify with 3.9 MB ``claims_json`` values parsed on the event
loop. Each test here replays one attack and checks that the gateway's Verify (a grpc.aio client
with the gateway's 250 ms deadline) still answers, and that the attacker gets a bounded,
typed refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import selectors
import socket
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sign_flood import huge_claims
from signer_harness import (
    CLIENT_ID,
    Pki,
    SignerProcess,
    base_config,
    deep_merge,
    reason_of,
    rpc_error,
    signer_pb2,
    unix_stub,
    vault_keys,
)
from support.bao import BaoServer
from support.ports import free_port
from support.waiting import wait_for
from svidgate.signer.v1 import signer_pb2_grpc

DEADLINE = 0.25  # the gateway's signer.timeout default
Spawn = Callable[..., SignerProcess]


# -- helpers ------------------------------------------------------------------------------------


def write_yaml(directory: Path, data: dict[str, Any]) -> Path:
    path = directory / f"signer-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tcp_config(pki: Pki, directory: Path, port: int, **limits: Any) -> dict[str, Any]:
    crt, key = pki.files("signer")
    return deep_merge(
        base_config(directory / "s.sock", directory / "keys"),
        {
            "listen": {"tcp": f"127.0.0.1:{port}"},
            "tls": {"cert": str(crt), "key": str(key), "bundle": str(pki.bundle())},
            "limits": limits,
        },
    )


@contextlib.contextmanager
def soft_fd_limit(soft: int) -> Iterator[None]:
    """Children started inside inherit ``soft`` descriptors (the red team's 1024)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def raise_own_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def pid_of(proc: SignerProcess) -> int:
    assert proc.proc is not None
    return proc.proc.pid


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@contextlib.asynccontextmanager
async def tls_channel(pki: Pki, name: str, port: int) -> AsyncIterator[grpc.aio.Channel]:
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", pki.client_credentials(name), options=options
    ) as channel:
        yield channel


async def timed_verifies(
    stub: signer_pb2_grpc.SignerStub,
    token: str,
    count: int,
    pause: float = 0.0,
    misses: int = 0,
) -> list[float]:
    """``count`` Verify calls answered, each with the gateway's deadline; their latencies
    (seconds). Up to ``misses`` calls in all may miss the deadline and are tried again at once
    (the gateway answers such a request 503 with Retry-After); one more fails the test."""
    latencies: list[float] = []
    missed = 0
    while len(latencies) < count:
        started = time.monotonic()
        try:
            reply = await stub.Verify(
                signer_pb2.VerifyRequest(token=token, audience=["orders"]), timeout=DEADLINE
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            missed += 1
            assert missed <= misses, f"{missed} Verify calls missed the {DEADLINE} s deadline"
            continue
        latencies.append(time.monotonic() - started)
        assert reply.subject == CLIENT_ID
        await asyncio.sleep(pause)
    return latencies


async def sign_for_client(sock: Path) -> str:
    async with unix_stub(sock) as stub:
        signed = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"]))
    return str(signed.token)


def wait_all_closed(conns: list[socket.socket], deadline: float) -> float:
    """Block until the peer closed every connection; the time the last one closed."""
    selector = selectors.DefaultSelector()
    for conn in conns:
        conn.setblocking(False)
        selector.register(conn, selectors.EVENT_READ)
    remaining, last = len(conns), time.monotonic()
    while remaining:
        timeout = deadline - time.monotonic()
        assert timeout > 0, f"{remaining} idle connections are still open"
        for key, _ in selector.select(timeout):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            try:
                data = conn.recv(4096)
            except OSError:  # reset: closed as well
                data = b""
            if not data:
                selector.unregister(conn)
                remaining, last = remaining - 1, time.monotonic()
    selector.close()
    return last


# -- idle connections ----------------------------------------------------------------------------


async def test_idle_connections_without_a_certificate_do_not_starve_verify(
    pki: Pki, short_dir: Path, signer_process: Spawn
) -> None:
    """1,100 idle TCP connections (no TLS, no certificate) against a signer started with a soft
    limit of 1024 descriptors: Verify over the socket and over mTLS still answers in 250 ms, and
    every idle connection is closed when limits.handshake_timeout runs out."""
    handshake = 4.0
    port = free_port()
    config = write_yaml(short_dir, tcp_config(pki, short_dir, port, handshake_timeout="4s"))
    proc = signer_process(config)
    with soft_fd_limit(1024):
        await proc.start()
    raise_own_fd_limit(4096)
    pid = pid_of(proc)
    token = await sign_for_client(short_dir / "s.sock")
    before = open_fds(pid)

    flood_started = time.monotonic()
    idle: list[socket.socket] = []
    try:
        for _ in range(1100):
            with contextlib.suppress(OSError):  # a full backlog is part of the attack
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=1))
        with contextlib.suppress(AssertionError):  # a capped signer never gets there
            await wait_for(lambda: open_fds(pid) >= before + 1000, 3, "the idle connections")
        held = open_fds(pid) - before
        async with unix_stub(short_dir / "s.sock") as local:
            unix_latencies = await timed_verifies(local, token, 5)
        async with tls_channel(pki, "gateway", port) as channel:
            await asyncio.wait_for(channel.channel_ready(), 2)
            tcp_latencies = await timed_verifies(signer_pb2_grpc.SignerStub(channel), token, 5)
        # the calls above ran while the idle connections were held, not after their timeout
        assert time.monotonic() - flood_started < handshake, "too slow to prove anything"
        assert held >= 1000, f"the signer held only {held} of the idle connections"
        assert max(unix_latencies + tcp_latencies) < DEADLINE
        last = await asyncio.to_thread(wait_all_closed, idle, flood_started + handshake + 3)
        assert last - flood_started >= handshake - 0.5  # the handshake timeout closed them
    finally:
        for conn in idle:
            conn.close()
    log = proc.log_tail(20000)
    assert "file descriptors: soft limit 1024 -> " in log
    assert "Traceback" not in log


# -- WatchKeys streams ---------------------------------------------------------------------------


async def first_message(call: Any) -> Any:
    """The first message of a server stream, or the AioRpcError that ended it."""
    try:
        return await call.read()
    except grpc.aio.AioRpcError as exc:
        return exc


async def test_watch_streams_are_capped_per_connection_caller_and_in_total(
    pki: Pki, short_dir: Path, signer_process: Spawn
) -> None:
    """2,000 WatchKeys streams from one gateway on one channel: 4 are served, the rest get
    RESOURCE_EXHAUSTED at once, and the signer's memory stays where it was."""
    port = free_port()
    limits = {
        "watch_streams": 12,
        "watch_streams_per_caller": 10,
        "watch_streams_per_connection": 4,
    }
    proc = signer_process(write_yaml(short_dir, tcp_config(pki, short_dir, port, **limits)))
    await proc.start()
    pid = pid_of(proc)
    request = signer_pb2.WatchKeysRequest()
    async with contextlib.AsyncExitStack() as stack:
        channels = [await stack.enter_async_context(tls_channel(pki, "gateway", port))]
        stub = signer_pb2_grpc.SignerStub(channels[0])
        await stub.GetJWKS(signer_pb2.GetJWKSRequest())  # the channel is up, memory settles
        rss_before = rss_kib(pid)
        calls = [stub.WatchKeys(request) for _ in range(2000)]
        firsts = await asyncio.wait_for(asyncio.gather(*map(first_message, calls)), 60)
        served = [m for m in firsts if isinstance(m, signer_pb2.JWKS)]
        refused = [m for m in firsts if isinstance(m, grpc.aio.AioRpcError)]
        assert len(served) == 4 and len(refused) == 1996
        # beyond the slots: RESOURCE_EXHAUSTED; streams that gRPC core itself turns away while
        # the refused ones are still being torn down are HTTP/2 REFUSED_STREAM (UNAVAILABLE).
        # How many are which depends on how fast the signer tears them down (787 of 1996 were
        # RESOURCE_EXHAUSTED on a loaded host): both are immediate, typed refusals.
        exhausted = [e for e in refused if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert exhausted
        assert {e.details() for e in exhausted} == {
            "limit_exceeded: watch_streams_per_connection (4) reached"
        }
        assert await reason_of(exhausted[0]) == "limit_exceeded"
        others = {(e.code(), e.details()) for e in refused} - {
            (e.code(), e.details()) for e in exhausted
        }
        assert all(
            code == grpc.StatusCode.UNAVAILABLE and "RST_STREAM with error code 7" in details
            for code, details in others
        ), others
        rss_growth_mib = (rss_kib(pid) - rss_before) / 1024
        assert rss_growth_mib < 16, f"RSS grew by {rss_growth_mib:.1f} MiB"
        # more connections of the same caller: 10 streams per caller in all
        for _ in range(2):
            channels.append(await stack.enter_async_context(tls_channel(pki, "gateway", port)))
        more = [signer_pb2_grpc.SignerStub(c).WatchKeys(request) for c in channels[1:] * 4]
        extra = await asyncio.gather(*map(first_message, more))
        assert sum(isinstance(m, signer_pb2.JWKS) for m in extra) == 6
        assert {m.details() for m in extra if isinstance(m, grpc.aio.AioRpcError)} == {
            "limit_exceeded: watch_streams_per_caller (10) reached"
        }
        # the socket's callers count as one more caller, within the total of 12
        async with unix_stub(short_dir / "s.sock") as local:
            mine = [local.WatchKeys(request) for _ in range(3)]
            local_firsts = await asyncio.gather(*map(first_message, mine))
            assert sum(isinstance(m, signer_pb2.JWKS) for m in local_firsts) == 2
            assert [m.details() for m in local_firsts if isinstance(m, grpc.aio.AioRpcError)] == [
                "limit_exceeded: watch_streams (12) reached"
            ]
            for call in mine:
                call.cancel()
        # a stream that ends gives its slot back
        for call in calls + more:
            call.cancel()

        async def served_again() -> bool:
            return isinstance(await first_message(stub.WatchKeys(request)), signer_pb2.JWKS)

        await wait_for(served_again, 5, "a freed WatchKeys slot")
    assert "Traceback" not in proc.log_tail(20000)


async def test_health_streams_need_authorization_and_are_capped(
    pki: Pki, short_dir: Path, signer_process: Spawn
) -> None:
    """A certificate authorized for nothing gets PERMISSION_DENIED on health (it opened 3,000
    Watch streams before); an authorized caller holds at most diagnostic_streams_per_caller."""
    port = free_port()
    config = tcp_config(pki, short_dir, port, diagnostic_streams_per_caller=3)
    proc = signer_process(write_yaml(short_dir, config))
    await proc.start()
    pid = pid_of(proc)
    request = health_pb2.HealthCheckRequest(service="")
    async with tls_channel(pki, "stranger", port) as channel:
        stranger = health_pb2_grpc.HealthStub(channel)
        err = await rpc_error(stranger.Check(request))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == (
            "permission_denied: spiffe://example.org/stranger may not call Health.Check"
        )
        rss_before = rss_kib(pid)
        watches = [stranger.Watch(request) for _ in range(300)]
        firsts = await asyncio.wait_for(asyncio.gather(*map(first_message, watches)), 30)
        codes = {getattr(m, "code", lambda: None)() for m in firsts}
        # none is served: each is refused by the signer, or (300 streams opened at once on one
        # connection, above streams_per_connection) by gRPC itself with REFUSED_STREAM
        assert grpc.StatusCode.PERMISSION_DENIED in codes
        assert codes <= {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE}
        assert (rss_kib(pid) - rss_before) / 1024 < 16
    async with tls_channel(pki, "gateway", port) as channel:
        gateway = health_pb2_grpc.HealthStub(channel)
        assert (await gateway.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
        watches = [gateway.Watch(request) for _ in range(5)]
        firsts = await asyncio.gather(*map(first_message, watches))
        assert sum(isinstance(m, health_pb2.HealthCheckResponse) for m in firsts) == 3
        assert firsts[-1].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert firsts[-1].details() == ("limit_exceeded: diagnostic_streams_per_caller (3) reached")
        for call in watches:
            call.cancel()


# -- oversized requests and a Sign flood -------------------------------------------------------


async def test_oversized_sign_requests_are_refused_before_any_work(
    short_dir: Path, signer_process: Spawn
) -> None:
    """3.9 MB: gRPC's receive limit (64 KiB) answers RESOURCE_EXHAUSTED before the signer reads
    it; past limits.claims_bytes / audiences / audience_bytes: INVALID_ARGUMENT before parsing
    (the claim is not even granted: the size is what is refused)."""
    sock = short_dir / "s.sock"
    proc = signer_process(write_yaml(short_dir, base_config(sock, short_dir / "keys")))
    await proc.start()
    async with unix_stub(sock) as stub:

        def sign(**fields: Any) -> Any:
            fields.setdefault("audience", ["orders"])
            return stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, **fields), timeout=5)

        err = await rpc_error(sign(claims_json=huge_claims()))
        # gRPC core's receive limit: refused before the signer's handler ever sees the request
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Received message larger than max" in err.details()
        cases = [
            ({"claims_json": json.dumps({"role": "x" * 5000})}, "limits.claims_bytes (4096 bytes"),
            ({"audience": [f"a{i}" for i in range(17)]}, "limits.audiences (16)"),
            ({"audience": ["a" * 257]}, "limits.audience_bytes (256 bytes)"),
        ]
        for fields, words in cases:
            err = await rpc_error(sign(**fields))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, words
            assert err.details().startswith("invalid_argument: ") and words in err.details()
        granted_size = json.dumps({"role": "x" * 4000})
        err = await rpc_error(sign(claims_json=granted_size))
        assert await reason_of(err) == "claim_not_allowed"  # within the size: the policy speaks
    assert "Traceback" not in proc.log_tail(20000)


async def test_verify_answers_while_16_callers_send_huge_claims(
    short_dir: Path, signer_process: Spawn
) -> None:
    """16 callers (another process: the attacker is not the gateway) loop on 3.9 MB Sign
    requests; every one is refused by gRPC's receive limit, before the signer reads it, and
    Verify keeps answering within the gateway's 250 ms deadline throughout. A Verify that waited
    behind Sign work (the claims parsed on the event loop) missed it on nearly every call; on a
    host this busy the scheduler alone may delay one or two of the 20, which are tried again."""
    sock = short_dir / "s.sock"
    proc = signer_process(write_yaml(short_dir, base_config(sock, short_dir / "keys")))
    await proc.start()
    token = await sign_for_client(sock)
    flood = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("sign_flood.py")),
        str(sock),
        CLIENT_ID,
        "16",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert flood.stdin is not None and flood.stdout is not None
    answers: list[str] = []

    async def read_answers(out: asyncio.StreamReader) -> None:
        while line := await out.readline():
            answers.append(line.decode().strip())

    reader = asyncio.create_task(read_answers(flood.stdout))
    try:
        await wait_for(lambda: len(answers) >= 16, 30, "the flood to be under way")
        async with unix_stub(sock) as stub:
            latencies = await timed_verifies(stub, token, 20, pause=0.02, misses=2)
    finally:
        flood.stdin.close()  # the flood stops
        assert await asyncio.wait_for(flood.wait(), 30) == 0
        await reader
    print(f"Verify under the flood: p50 {statistics.median(latencies) * 1000:.1f} ms")
    assert set(answers) == {"RESOURCE_EXHAUSTED"}


async def test_sign_beyond_its_queue_is_refused_and_verify_never_waits(
    bao: BaoServer, short_dir: Path, signer_process: Spawn
) -> None:
    """Transit keys (each Sign waits for Vault): with one Sign at work and one waiting, a burst
    of 40 gets RESOURCE_EXHAUSTED for the rest, and Verify meanwhile keeps its deadline."""
    sock = short_dir / "s.sock"
    token_file = short_dir / "vault-token"
    token_file.write_text(bao.signer_token())
    token_file.chmod(0o600)  # the Vault client refuses credential files others can read
    data = deep_merge(
        base_config(sock, short_dir / "keys"),
        {
            "keys": vault_keys(bao, "vault-transit", "ES256", token_file),
            "limits": {"sign_concurrency": 1, "sign_queue": 1},
        },
    )
    proc = signer_process(write_yaml(short_dir, data))
    await proc.start()
    token = await sign_for_client(sock)
    async with unix_stub(sock) as signer, unix_stub(sock) as verifier:
        request = signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"])
        burst = [signer.Sign(request, timeout=10) for _ in range(40)]
        verifying = asyncio.create_task(timed_verifies(verifier, token, 5))
        results = await asyncio.gather(*burst, return_exceptions=True)
        latencies = await verifying
    signed = [r for r in results if isinstance(r, signer_pb2.SignResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert signed and refused and len(signed) + len(refused) == 40
    assert {e.details() for e in refused} == {"limit_exceeded: sign_queue (1) reached"}
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert max(latencies) < DEADLINE
