"""The baselines hakobu is judged against, measured in the same run.

- transport: a bare pyzmq ROUTER/DEALER round trip, pipelined, no store;
  and one REQ round trip at a time to an echo ROUTER in another process
  (what one synchronous request costs before any work is done);
- store: a bare SQLite insert-and-commit loop with the broker's pragmas,
  one commit per row and one commit per batch of rows.
"""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import statistics
import tempfile
import threading
import time

import zmq

#: Messages the transport ceiling keeps in flight at once.
PIPELINE_DEPTH = 1000
#: Milliseconds without a reply after which the transport ceiling gives up.
STALL_MS = 10_000


def transport_round_trips_per_s(count: int = 50_000) -> float:
    """Return ROUTER/DEALER round trips per second over tcp loopback."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    for sock in (router, dealer):
        # No high-water mark: a ROUTER drops what its peer's queue cannot hold.
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")

    def echo() -> None:
        for _ in range(count):
            router.send_multipart(router.recv_multipart())

    thread = threading.Thread(target=echo, daemon=True)
    started = time.perf_counter()
    thread.start()
    sent = received = 0
    body = [b"HKB1", b"ASSIGN", b"x" * 64]
    while received < count:
        while sent < count and sent - received < PIPELINE_DEPTH:
            dealer.send_multipart(body)
            sent += 1
        if not dealer.poll(STALL_MS):
            raise RuntimeError(f"transport ceiling stalled after {received} replies")
        dealer.recv_multipart()
        received += 1
    elapsed = time.perf_counter() - started
    thread.join(5)
    dealer.close(0)
    router.close(0)
    ctx.term()
    return count / elapsed


def serial_round_trip_us(count: int = 2_000) -> float:
    """Return the median microseconds of one REQ round trip to another process."""
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    port = req.bind_to_random_port("tcp://127.0.0.1")
    echo = multiprocessing.get_context("spawn").Process(
        target=_echo, args=(port, count + 1), daemon=True
    )
    echo.start()
    times = []
    try:
        for _ in range(count + 1):
            started = time.perf_counter()
            req.send(b"x" * 64)
            if not req.poll(STALL_MS):
                raise RuntimeError("serial round trip ceiling got no reply")
            req.recv()
            times.append(time.perf_counter() - started)
    finally:
        echo.join(5)
        if echo.is_alive():
            echo.kill()
        req.close(0)
        ctx.term()
    return statistics.median(times[1:]) * 1e6


def _echo(port: int, count: int) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 1000)
    router.connect(f"tcp://127.0.0.1:{port}")
    for _ in range(count):
        router.send_multipart(router.recv_multipart())
    router.close()
    ctx.term()


def store_rows_per_s(durability: str, count: int = 20_000, batch: int = 1) -> float:
    """Return rows per second inserted and committed `batch` rows at a time."""
    folder = tempfile.mkdtemp(prefix="hakobu-ceiling-")
    path = os.path.join(folder, "ceiling.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=wal")
    db.execute(f"PRAGMA synchronous={'full' if durability == 'full' else 'normal'}")
    db.execute("CREATE TABLE t (id TEXT PRIMARY KEY, name TEXT, payload BLOB, at REAL)")
    rows = [(f"{i:032x}", "noop", b"\xc0", time.time()) for i in range(count)]
    started = time.perf_counter()
    for start in range(0, count, batch):
        db.execute("BEGIN")
        db.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", rows[start : start + batch])
        db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    db.close()
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
    os.rmdir(folder)
    return count / elapsed


def measure(durability: str) -> dict[str, float]:
    """Measure every ceiling once."""
    return {
        "transport_round_trips_per_s": round(transport_round_trips_per_s(), 1),
        "transport_serial_round_trip_us": round(serial_round_trip_us(), 1),
        "store_rows_per_s_single": round(store_rows_per_s(durability, 5_000, 1), 1),
        "store_rows_per_s_batch100": round(
            store_rows_per_s(durability, 50_000, 100), 1
        ),
    }
