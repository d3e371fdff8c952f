"""The HTTP/1.1 core's errors. Each one a client caused carries the status it is answered with.

:class:`HttpError` is what the core answers by itself (``{"error": ..., "reason": ...}``, never
an echo of the request): :class:`ProtocolError` for a request head it refuses, and
:class:`BodyError` for a request body that failed *because of the client* (stalled, too large,
malformed, cut) — a handler forwarding the body can tell these apart from upstream failures.
:class:`ResponseError` is raised to a handler whose response cannot reach the client.
"""

from __future__ import annotations

import json


class HttpError(Exception):
    """A failure the core answers with ``status`` and a JSON body naming ``error``/``reason``."""

    status = 400
    error = "bad_request"
    headers: tuple[tuple[bytes, bytes], ...] = ()  # extra response headers (Allow for 405)

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def body(self) -> bytes:
        """The JSON body: the error and reason codes only, never bytes from the request."""
        return json.dumps({"error": self.error, "reason": self.reason}).encode("ascii")


class ProtocolError(HttpError):
    """The request head is malformed or ambiguous (400): the connection is closed after it."""


class HeadTooLarge(ProtocolError):
    """Request line + headers beyond ``max_header_bytes``, or more than ``max_headers`` fields."""

    status = 431
    error = "request_header_fields_too_large"


class MethodNotAllowed(ProtocolError):
    """CONNECT and TRACE are never proxied."""

    status = 405
    error = "method_not_allowed"
    headers = ((b"Allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),)


class NotImplementedByCore(ProtocolError):
    """A method token or transfer coding the core does not implement."""

    status = 501
    error = "not_implemented"


class VersionNotSupported(ProtocolError):
    """Only HTTP/1.0 and HTTP/1.1 are spoken on this listener."""

    status = 505
    error = "http_version_not_supported"


class ExpectationFailed(ProtocolError):
    """An ``Expect`` other than ``100-continue``."""

    status = 417
    error = "expectation_failed"


class HeadTimeout(ProtocolError):
    """The request head did not arrive within ``header_timeout``."""

    status = 408
    error = "request_timeout"


class BodyError(HttpError):
    """The client's request body failed: the client's fault, never the upstream's."""


class BadBody(BodyError):
    """Invalid chunked framing or trailers."""


class BodyIncomplete(BodyError):
    """The client closed the connection before sending its whole body."""


class BodyTooLarge(BodyError):
    """More body than the request's limit (Content-Length or counted chunks)."""

    status = 413
    error = "content_too_large"


class BodyTimeout(BodyError):
    """The client stalled its body for ``body_timeout`` while the handler waited for it."""

    status = 408
    error = "request_timeout"


class ResponseError(Exception):
    """The response cannot reach the client; the connection is already cut."""


class ClientDisconnected(ResponseError, ConnectionError):
    """The client closed the connection."""


class WriteTimeout(ResponseError):
    """The client did not read for ``write_timeout`` while the response waited to be sent."""


class Refused(Exception):
    """Raised by an identity check to refuse a connection after its TLS handshake."""
