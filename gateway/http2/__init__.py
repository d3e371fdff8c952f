"""The HTTP/2 core of the data plane (h2's state machine, strict request validation, flow
control end to end, abuse bounds): each stream reaches the same handler as an HTTP/1.1
request, with the same :class:`~svidgate.gateway.http1.Request` / ``Body`` / ``Responder``
shapes (:class:`H2Responder` adds trailers).
"""

from svidgate.gateway.http2.limits import H2Limits
from svidgate.gateway.http2.server import H2ServerConnection
from svidgate.gateway.http2.stream import H2Responder, StreamBody
from svidgate.gateway.http2.validate import MalformedRequest, parse_request

__all__ = [
    "H2Limits",
    "H2Responder",
    "H2ServerConnection",
    "MalformedRequest",
    "StreamBody",
    "parse_request",
]
