"""Callers flooding a signer with huge Sign requests, in a process of their own (an attacker is
not the gateway: its serialising and sending must not share the measuring client's event loop).

``python sign_flood.py SOCKET SUBJECT CALLERS`` starts CALLERS callers, each on its own channel
to the Unix socket SOCKET, looping on Sign with :func:`huge_claims`; it prints the status code
name of every answer, one per line, until stdin is closed."""

from __future__ import annotations

import asyncio
import sys

import grpc
import grpc.aio
from svidgate.signer.v1 import signer_pb2, signer_pb2_grpc


def huge_claims() -> str:
    """3.9 MB of JSON that takes a parser a long time: about two million numbers."""
    return '{"blob":[' + "0," * 1_950_000 + "0]}"


async def flood(socket: str, subject: str, stop: asyncio.Event) -> None:
    request = signer_pb2.SignRequest(subject=subject, audience=["o"], claims_json=huge_claims())
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        stub = signer_pb2_grpc.SignerStub(channel)  # type: ignore[no-untyped-call]
        while not stop.is_set():
            try:
                await stub.Sign(request, timeout=10)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                code = err.code()
            print(code.name, flush=True)


async def main(socket: str, subject: str, callers: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    done = loop.run_in_executor(None, sys.stdin.read)  # EOF: the test is done
    done.add_done_callback(lambda _: stop.set())
    await asyncio.gather(*(flood(socket, subject, stop) for _ in range(callers)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
