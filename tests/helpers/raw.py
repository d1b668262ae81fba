"""Bare pyzmq sockets for speaking to (or attacking) a broker directly."""

from __future__ import annotations

import zmq

from sdk import protocol


class RawSockets:
    """A context and the sockets made from it, all closed with linger 0."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.sockets: list[zmq.Socket[bytes]] = []

    def socket(
        self, kind: int, endpoint: str, identity: bytes | None = None
    ) -> zmq.Socket[bytes]:
        """Return a connected socket of `kind` with linger 0."""
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.connect(endpoint)
        self.sockets.append(sock)
        return sock

    def req(self, endpoint: str) -> zmq.Socket[bytes]:
        """Return a REQ socket, the kind `sdk.Client` uses."""
        return self.socket(zmq.REQ, endpoint)

    def dealer(self, endpoint: str, identity: bytes | None = None) -> zmq.Socket[bytes]:
        """Return a DEALER socket, the kind workers use."""
        return self.socket(zmq.DEALER, endpoint, identity)

    def recv(self, sock: zmq.Socket[bytes], timeout_s: float) -> list[bytes]:
        """Receive one message or raise AssertionError after `timeout_s`."""
        if not sock.poll(timeout_s * 1000, zmq.POLLIN):
            raise AssertionError(f"no message within {timeout_s} s")
        return sock.recv_multipart()

    def recv_or_none(
        self, sock: zmq.Socket[bytes], timeout_s: float
    ) -> list[bytes] | None:
        """Receive one message, or return None after `timeout_s`."""
        if not sock.poll(timeout_s * 1000, zmq.POLLIN):
            return None
        return sock.recv_multipart()

    def request(
        self, endpoint: str, frames: list[bytes], timeout_s: float = 5.0
    ) -> protocol.Message:
        """Send `frames` on a fresh REQ socket and decode the broker's reply."""
        sock = self.req(endpoint)
        sock.send_multipart(frames)
        reply = protocol.decode(self.recv(sock, timeout_s), protocol.CLIENT_REPLIES)
        self.discard(sock)
        return reply

    def discard(self, sock: zmq.Socket[bytes]) -> None:
        """Close one socket now."""
        sock.close(linger=0)
        self.sockets.remove(sock)

    def close(self) -> None:
        """Close every socket and the context."""
        for sock in self.sockets:
            sock.close(linger=0)
        self.sockets.clear()
        self.context.term()
