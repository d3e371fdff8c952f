"""The states of one HTTP/1.1 server connection and the only transitions allowed between them,
as a table (h11's habit): readable, testable, and a wrong move is a loud bug, not a silent one.

::

    HANDSHAKE --admitted--> IDLE --bytes--> HEAD --head_done--> BUSY --keep_alive--> IDLE
        |                    |  \\_____________head_done________/  |
     refused              close (idle timeout, 4xx, drain, expiry)  close
        v                    v                                     v
     REFUSED               CLOSING ------------- lost -----------> CLOSED

    BUSY --upgrade--> TUNNEL (raw bytes relayed by the handler) --close--> CLOSING
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing, in C (hot path)

    HANDSHAKE = "handshake"  # accepted; TLS handshake running, nothing allocated yet
    REFUSED = "refused"  # the identity check or the per-identity cap refused it: aborted
    IDLE = "idle"  # waiting for the first byte of a request head
    HEAD = "head"  # part of a request head received (header_timeout runs)
    BUSY = "busy"  # one request dispatched to the handler; reading only its body
    TUNNEL = "tunnel"  # switched protocols (101): bytes go to the handler's tunnel as they are
    CLOSING = "closing"  # the last response is written; the transport is closing
    CLOSED = "closed"  # connection_lost


class Event(enum.Enum):
    __hash__ = object.__hash__

    ADMITTED = "admitted"
    REFUSE = "refuse"
    BYTES = "bytes"  # the first bytes of a head, not yet complete
    HEAD_DONE = "head_done"  # a complete, valid head was dispatched
    KEEP_ALIVE = "keep_alive"  # the response is done and the connection stays open
    UPGRADE = "upgrade"  # a 101 was sent: the connection is a byte tunnel from now on
    CLOSE = "close"
    LOST = "lost"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.HANDSHAKE, Event.ADMITTED): State.IDLE,
    (State.HANDSHAKE, Event.REFUSE): State.REFUSED,
    (State.IDLE, Event.BYTES): State.HEAD,
    (State.IDLE, Event.HEAD_DONE): State.BUSY,
    (State.HEAD, Event.HEAD_DONE): State.BUSY,
    (State.BUSY, Event.KEEP_ALIVE): State.IDLE,
    (State.BUSY, Event.UPGRADE): State.TUNNEL,
    **{(s, Event.CLOSE): State.CLOSING for s in (State.IDLE, State.HEAD, State.BUSY, State.TUNNEL)},
    (State.CLOSING, Event.CLOSE): State.CLOSING,
    **{(s, Event.LOST): State.CLOSED for s in State if s is not State.CLOSED},
}


class StateError(RuntimeError):
    """A transition the table does not allow: a bug in the core, never the client's doing."""


def transition(state: State, event: Event) -> State:
    """The state after ``event`` in ``state``; raises :class:`StateError` if not allowed."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise StateError(f"{event.value} is not allowed in state {state.value}") from None
