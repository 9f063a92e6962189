"""A raw HTTP/2 gRPC client (the h2 package): sends the bytes a hostile client would.

grpc's own clients refuse to send what these tests need (newlines and escapes in
header values, header-only streams left open), so the frames are written by hand.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import h2.config
import h2.connection
import h2.events


def grpc_frame(message: bytes) -> bytes:
    return struct.pack(">?I", False, len(message)) + message


class RawClient:
    """One HTTP/2 connection to 127.0.0.1:``port``, with prior knowledge, as gRPC uses it."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self._flush()
        self.headers: dict[int, dict[bytes, bytes]] = {}
        self.ended: set[int] = set()

    def _flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def open(self, path: str, extra: list[tuple[bytes, bytes]] = (), body: bytes | None = None) -> int:  # type: ignore[assignment]
        """Open a stream; with ``body``, send it as one gRPC message and end the stream."""
        stream = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"127.0.0.1"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *extra,
        ]
        self.conn.send_headers(stream, headers, end_stream=False)
        if body is not None:
            self.conn.send_data(stream, grpc_frame(body), end_stream=True)
        self._flush()
        return stream

    def wait(self, stream: int) -> dict[bytes, bytes]:
        """Read until ``stream`` ends; its response headers and trailers, merged."""
        while stream not in self.ended:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            for event in self.conn.receive_data(data):
                self._on(event)
            self._flush()
        return self.headers.get(stream, {})

    def _on(self, event: Any) -> None:
        if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            self.headers.setdefault(event.stream_id, {}).update(dict(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
            self.ended.add(event.stream_id)

    def close(self) -> None:
        self.sock.close()
