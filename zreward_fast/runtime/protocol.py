"""uvicorn's HTTP/1.1 protocol with a read deadline: slow clients cannot hold connections.

uvicorn bounds idle keep-alive connections but not a request that is being sent: a client that
sends half its headers (or its body a byte at a time, each byte cancelling the keep-alive timer)
holds a connection for as long as it likes, and 500 such clients held 500 connections
indefinitely (issue 12). Here every request must arrive whole, headers and body, within
``read_timeout_s`` of the connection opening or, on a kept-alive connection, of the next request's
first byte; otherwise the client gets a JSON 408 (when part of a request came) and the connection is
closed. An idle kept-alive connection is left to uvicorn's keep-alive timer: closing it on the read
deadline raced a client reusing it (the server closed with the client's new request unread, and
the client got a connection reset; CI saw it).
"""
from __future__ import annotations

import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_BODY = json.dumps({"error": {"code": "request_timeout",
                              "message": "the request was not received in time"}}).encode()
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose request is not fully read in time."""

    read_timeout_s: float = 10.0
    _deadline: Any = None
    _idle = False  # a response completed and no byte of the next request has come
    _got_bytes = False  # bytes came since the deadline was armed (else the close is silent)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._idle:  # the next request's first byte: its deadline starts now
            self._idle = False
            self._arm()
        self._got_bytes = self._got_bytes or bool(data)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is h11.DONE:
            self._disarm()  # the request has arrived whole: the app takes it from here

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self._idle = True  # uvicorn's keep-alive timer bounds the wait for the next request
        elif self.conn.their_state is not h11.DONE:
            self._arm()  # a pipelined request is partly here already

    def _arm(self) -> None:
        self._disarm()
        self._got_bytes = False
        self._deadline = self.loop.call_later(self.read_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._got_bytes and self.conn.our_state is h11.IDLE:  # part of a request came, no response started
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def deadline_protocol(read_timeout_s: float) -> type[DeadlineH11Protocol]:
    """The protocol class for uvicorn's ``http=`` with this read deadline."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"read_timeout_s": float(read_timeout_s)})
