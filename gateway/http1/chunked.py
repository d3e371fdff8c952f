"""The chunked transfer coding of request bodies (RFC 9112 section 7.1), decoded strictly and
byte-exact: the decoder says how many input bytes the body took, so a pipelined request after
it starts exactly where the body ended.

Refused (:class:`BadBody`): chunk sizes that are not 1-16 hex digits (``0x``, signs, spaces,
overflow), chunk extensions outside the RFC grammar, a missing CRLF after chunk data, bare LF
or CR, obs-fold or malformed trailer fields, and trailer sections larger than the head limit.
Trailer fields are checked and discarded.
"""

from __future__ import annotations

import re

from svidgate.gateway.http1.errors import BadBody

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = rb"[" + _TCHAR + rb"]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_EXT = rb"[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?"
_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:" + _EXT + rb")*")
_FIELD_LINE = re.compile(_TOKEN + rb":[\t \x21-\x7e\x80-\xff]*")
MAX_SIZE_LINE = 4096  # a chunk-size line (with extensions) longer than this is refused

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Feed raw bytes, get decoded chunks and the count of bytes the body used."""

    __slots__ = ("_line", "_max_trailer_bytes", "_remaining", "_state", "_trailer_bytes")

    def __init__(self, max_trailer_bytes: int) -> None:
        self._state = _SIZE
        self._remaining = 0  # chunk-data bytes left (DATA) or CRLF bytes left (DATA_END)
        self._line = b""  # a partial size or trailer line
        self._trailer_bytes = 0
        self._max_trailer_bytes = max_trailer_bytes

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """(decoded chunks, bytes of ``data`` used). Stops at the end of the body; raises
        :class:`BadBody` on any framing error."""
        chunks: list[bytes] = []
        pos = 0
        end = len(data)
        while pos < end and self._state != _DONE:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                chunks.append(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state, self._remaining = _DATA_END, 2
            elif state == _DATA_END:
                pos = self._data_end(data, pos)
            else:
                pos = self._line_step(data, pos)
        return chunks, pos

    def _data_end(self, data: bytes, pos: int) -> int:
        """The CRLF after chunk data, possibly split over two reads."""
        expected = b"\r\n"[2 - self._remaining]
        if data[pos] != expected:
            raise BadBody("bad_chunk_framing")
        self._remaining -= 1
        if not self._remaining:
            self._state = _SIZE
        return pos + 1

    def _line_step(self, data: bytes, pos: int) -> int:
        """Consume up to one complete size or trailer line; returns the new position."""
        lf = data.find(b"\n", pos)
        stop = len(data) if lf < 0 else lf + 1
        line = self._line + data[pos:stop]
        limit = MAX_SIZE_LINE if self._state == _SIZE else self._max_trailer_bytes
        if len(line) > limit + 2:
            raise BadBody("chunk_line_too_long" if self._state == _SIZE else "trailers_too_large")
        if lf < 0:
            self._line = line
            return stop
        self._line = b""
        if len(line) < 2 or line[-2] != 0x0D:
            raise BadBody("bare_lf")
        if self._state == _SIZE:
            self._size_line(line[:-2])
        else:
            self._trailer_line(line[:-2])
        return stop

    def _size_line(self, line: bytes) -> None:
        match = _SIZE_LINE.fullmatch(line)
        if match is None:
            raise BadBody("bad_chunk_size")
        size = int(match.group(1), 16)
        if size:
            self._state, self._remaining = _DATA, size
        else:
            self._state = _TRAILER

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self._state = _DONE
            return
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > self._max_trailer_bytes:
            raise BadBody("trailers_too_large")
        if _FIELD_LINE.fullmatch(line) is None:
            raise BadBody("bad_trailer")
