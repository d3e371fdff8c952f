"""A lean, bounded HTTP/1.1 server core for the data plane (strict parsing on llhttp, one
request at a time per connection, every resource a peer can hold limited).

The pipeline sees a narrow interface: an async ``handler(conn, request, body, responder)``
per request, with :class:`ConnectionInfo` (the caller's per-connection object), the frozen
:class:`Request`, the :class:`Body` reader and the :class:`Responder`. Accepting, the TLS
handshake and admission live in :mod:`svidgate.gateway.listener`.
"""

from svidgate.gateway.http1.body import Body
from svidgate.gateway.http1.errors import (
    BadBody,
    BodyError,
    BodyIncomplete,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    HttpError,
    ProtocolError,
    Refused,
    ResponseError,
    WriteTimeout,
)
from svidgate.gateway.http1.limits import Counters, Limits
from svidgate.gateway.http1.message import Admission, ConnectionInfo, Request
from svidgate.gateway.http1.protocol import H1Connection, Handler
from svidgate.gateway.http1.respond import Responder
from svidgate.gateway.http1.state import State

__all__ = [
    "Admission",
    "BadBody",
    "Body",
    "BodyError",
    "BodyIncomplete",
    "BodyTimeout",
    "BodyTooLarge",
    "ClientDisconnected",
    "ConnectionInfo",
    "Counters",
    "H1Connection",
    "Handler",
    "HttpError",
    "Limits",
    "ProtocolError",
    "Refused",
    "Request",
    "Responder",
    "ResponseError",
    "State",
    "WriteTimeout",
]
