"""uvicorn's HTTP/1.1 protocol with a read deadline: slow clients cannot hold connections.

uvicorn bounds idle keep-alive connections but not a request that is being sent: a client that
sends half its headers (or its body a byte at a time, each byte cancelling the keep-alive timer)
holds a connection for as long as it likes, and 500 such clients held 500 connections
indefinitely (issue 12). Here every request must arrive whole, headers and body, within
``read_timeout_s`` of its first chance to start (the connection opening, or the previous response
ending); otherwise the client gets a JSON 408 (when no response has started) and the connection
is closed.
"""
from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

_BODY = json.dumps({"error": {"code": "request_timeout",
                              "message": "the request was not received in time"}}).encode()
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY)


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose request is not fully read in time."""

    read_timeout_s: float = 10.0
    _deadline: Any = None
    _armed_for: Any = None  # the cycle that was current when the deadline was armed (a finished one)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._armed_for and not self.cycle.more_body:
            self._disarm()  # a new request has arrived whole: the app takes it from here

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this kept-alive connection

    def _arm(self) -> None:
        self._disarm()
        self._armed_for = self.cycle
        self._deadline = self.loop.call_later(self.read_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


def deadline_protocol(read_timeout_s: float) -> type[DeadlineH11Protocol]:
    """The protocol class for uvicorn's ``http=`` with this read deadline."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"read_timeout_s": float(read_timeout_s)})
