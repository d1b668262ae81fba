"""Framed messages over the pipes between the worker and its handler children."""

from __future__ import annotations

import os
import threading

import pytest

from worker import pipe


@pytest.fixture
def fds():
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass


def test_small_messages_round_trip(fds):
    read_fd, write_fd = fds
    reader = pipe.Reader(read_fd)
    for message in [("ok", "t1", 1, b"\xc0"), None, ("hello", 7, ["e"])]:
        pipe.send(write_fd, message)
        assert reader.read() == message
        assert not reader.has_message


def test_two_messages_read_at_once_are_both_returned(fds):
    # Given two messages waiting in the pipe before anything is read
    read_fd, write_fd = fds
    pipe.send(write_fd, ("a", 1))
    pipe.send(write_fd, ("b", 2))
    reader = pipe.Reader(read_fd)

    # When one is read, the other is kept and reported without a poll
    assert reader.read() == ("a", 1)
    assert reader.has_message

    # Then it comes next
    assert reader.read() == ("b", 2)
    assert not reader.has_message


def test_message_larger_than_the_pipe_buffer(fds):
    # Given a writer that blocks until the reader drains the pipe
    read_fd, write_fd = fds
    big = ("ok", "t1", 1, os.urandom(3 * 1024 * 1024 + 5))
    writer = threading.Thread(target=pipe.send, args=(write_fd, big))
    writer.start()

    # When it is read, then it arrives whole, and so does the next one
    reader = pipe.Reader(read_fd)
    assert reader.read() == big
    writer.join(10.0)
    pipe.send(write_fd, "next")
    assert reader.read() == "next"


def test_closed_writer_is_eof_also_inside_a_message(fds):
    read_fd, write_fd = fds
    reader = pipe.Reader(read_fd)
    os.write(write_fd, b"\0\0\0\0\0\0\0\x10abc")
    os.close(write_fd)
    with pytest.raises(EOFError):
        reader.read()
    with pytest.raises(EOFError):
        pipe.Reader(read_fd).read()
