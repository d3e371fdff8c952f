"""Issue 13 item 2 for the signer: a real `svidgate signer serve` writes the shared schema
(``service: signer``) and one ``token_issued`` line per token it signs, with subject,
audience, kid, jti and expiry, and never the token."""

from __future__ import annotations

from pathlib import Path

import jwt
from support.logschema import read_events
from support.pki import WEB_ID
from support.signer_process import AUDIENCE, SignerProcess
from support.waiting import wait_until


def test_every_issued_token_is_logged_without_the_token(short_dir: Path) -> None:
    signer = SignerProcess.file_keys(short_dir)
    signer.start_sync()
    try:
        replies = [signer.sign_reply(WEB_ID, AUDIENCE) for _ in range(3)]

        def issued() -> list[dict[str, object]]:
            return [e for e in read_events(signer.log, "signer") if e["event"] == "token_issued"]

        wait_until(lambda: len(issued()) == 3, 10, "3 token_issued lines")
    finally:
        signer.stop()
    events = read_events(signer.log, "signer")  # every line, checked against the schema
    lines = [e for e in events if e["event"] == "token_issued"]
    for reply, line in zip(replies, lines, strict=True):
        claims = jwt.decode(reply.token, options={"verify_signature": False})
        assert line["subject"] == WEB_ID and line["audience"] == [AUDIENCE]
        assert line["kid"] == reply.kid and line["jti"] == claims["jti"]
        assert line["expiry"] == reply.expires_at == claims["exp"]
        assert line["level"] == "info"
    text = signer.log.read_text()
    for reply in replies:
        assert reply.token not in text and reply.token.split(".")[2] not in text
    assert len({line["jti"] for line in lines}) == 3
