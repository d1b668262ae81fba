"""Framed pickles over the one-way pipes between the worker and a handler child.

Each message is an 8-byte big-endian length, then a pickle of builtin types.
This replaces `Connection.send`/`recv` on the hot path: those build a
ForkingPickler per message and read the length and the body with two system
calls; here a message that fits a pipe's buffer is read with one.

Limits:
- Both ends must be blocking file descriptors; a reader blocks until the
  whole message is in, as `Connection.recv` does.
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

#: Length prefix of every message: unsigned 64-bit, big-endian.
_HEADER = struct.Struct("!Q")
#: Bytes asked for by one read while the length is not known yet.
READ_CHUNK_BYTES = 64 * 1024
#: Largest message written with its header in one system call.
SMALL_MESSAGE_BYTES = 64 * 1024


def send(fd: int, message: Any) -> None:
    """Write one message to `fd`; raises OSError when the reader is gone."""
    data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    header = _HEADER.pack(len(data))
    if len(data) <= SMALL_MESSAGE_BYTES:
        whole = header + data
        written = os.write(fd, whole)
        if written < len(whole):  # only if a signal interrupted the write
            _write_all(fd, memoryview(whole)[written:])
    else:
        _write_all(fd, memoryview(header))
        _write_all(fd, memoryview(data))


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


class Reader:
    """Read messages from one pipe end, keeping any bytes read past a message."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    @property
    def has_message(self) -> bool:
        """True when a whole message is already buffered (poll would not say)."""
        buffer = self._buffer
        if len(buffer) < _HEADER.size:
            return False
        size: int = _HEADER.unpack_from(buffer)[0]
        return len(buffer) >= _HEADER.size + size

    def read(self) -> Any:
        """Block until one whole message is in and return it.

        Raises:
            EOFError: the writing end is closed (before or inside a message).
        """
        if not self._buffer:
            chunk = os.read(self.fd, READ_CHUNK_BYTES)
            if len(chunk) >= _HEADER.size:
                end = _HEADER.size + _HEADER.unpack_from(chunk)[0]
                if len(chunk) == end:
                    return pickle.loads(memoryview(chunk)[_HEADER.size :])
            if not chunk:
                raise EOFError("pipe closed")
            self._buffer += chunk
        return self._read_slowly()

    def _read_slowly(self) -> Any:
        buffer = self._buffer
        while len(buffer) < _HEADER.size:
            self._fill(buffer, READ_CHUNK_BYTES)
        end = _HEADER.size + _HEADER.unpack_from(buffer)[0]
        if len(buffer) < end:
            body = bytearray(end - _HEADER.size)
            have = len(buffer) - _HEADER.size
            body[:have] = memoryview(buffer)[_HEADER.size :]
            self._buffer = bytearray()
            self._read_into(memoryview(body)[have:])
            return pickle.loads(body)
        message = pickle.loads(buffer[_HEADER.size : end])
        del buffer[:end]
        return message

    def _fill(self, buffer: bytearray, size: int) -> None:
        chunk = os.read(self.fd, size)
        if not chunk:
            raise EOFError("pipe closed inside a message")
        buffer += chunk

    def _read_into(self, view: memoryview) -> None:
        while view:
            count = os.readv(self.fd, [view])
            if count == 0:
                raise EOFError("pipe closed inside a message")
            view = view[count:]
