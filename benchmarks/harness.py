"""The delivery-rate harness: a real broker and workers on loopback, M no-op
tasks from K client processes, and the figures that say how it went.

Latencies come from two clocks. Submit -> assign (until the broker committed
the task's first ASSIGN) and burst submit -> result are read from the
broker's rows (tasks `created_at` and `finished_at`, worker_notifications
`created_at`); serial submit -> result is timed by the client around each
`Client.call` (submit and wait in one request). Throughput counts from the
first client's first submit to the last client's last result: a client's
clock starts once it has imported the SDK and made its Client, as starting
an interpreter is not the broker's work.
"""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from benchmarks import ceilings
from benchmarks.cluster import LocalCluster
from broker.models import TASK_ASSIGNED


@dataclass(frozen=True)
class BenchConfig:
    """What to run."""

    tasks: int = 10_000
    workers: int = 2
    clients: int = 1
    mode: str = "burst"
    batch: int = 100
    durability: str = "normal"
    capacity: int = 8
    with_ceilings: bool = True


def run(
    config: BenchConfig, progress: Callable[[int, int, float], None]
) -> dict[str, Any]:
    """Run one benchmark and return its figures."""
    folder = Path(tempfile.mkdtemp(prefix="hakobu-bench-"))
    cluster = LocalCluster(folder, db_name="bench.db")
    try:
        broker = psutil.Process(_start(cluster, config))
        cpu_before = sum(broker.cpu_times()[:2])
        rss_before = broker.memory_info().rss
        results = _drive_clients(cluster.clients_endpoint, config, cluster.db, progress)
        elapsed = _window(results)
        cpu_used = sum(broker.cpu_times()[:2]) - cpu_before
        rss_after = broker.memory_info().rss
    finally:
        cluster.stop(grace_s=STOP_GRACE_S)
    rows = _read_rows(cluster.db)
    shutil.rmtree(folder, ignore_errors=True)

    accepted = sum(r["accepted"] for r in results)
    terminal = sum(1 for r in rows.values() if r["state"] in _TERMINAL)
    succeeded = sum(1 for r in rows.values() if r["state"] == "succeeded")
    assign_ms = [
        (r["assigned_at"] - r["created_at"]) * 1000
        for r in rows.values()
        if r["assigned_at"] is not None
    ]
    if config.mode == "serial":
        result_ms = [ms for r in results for ms in r["latencies_ms"]]
    else:
        result_ms = [
            (r["finished_at"] - r["created_at"]) * 1000
            for r in rows.values()
            if r["finished_at"] is not None
        ]
    figures: dict[str, Any] = {
        "config": asdict(config),
        "accepted": accepted,
        "terminal": terminal,
        "succeeded": succeeded,
        "delivery_rate": terminal / accepted if accepted else 0.0,
        "elapsed_s": round(elapsed, 3),
        "tasks_per_s": round(accepted / elapsed, 1) if elapsed else 0.0,
        "submit_to_assign_ms": _percentiles(assign_ms),
        "submit_to_result_ms": _percentiles(result_ms),
        "broker_cpu_ms_per_task": round(cpu_used * 1000 / max(accepted, 1), 4),
        "broker_rss_mb": round(rss_after / 2**20, 1),
        "broker_rss_growth_mb": round((rss_after - rss_before) / 2**20, 1),
        "timeline": _timeline(rows),
        "latency_histogram_ms": _histogram(result_ms),
    }
    if config.with_ceilings:
        found = ceilings.measure(config.durability)
        figures["ceilings"] = {
            **found,
            "ratio_to_transport": round(
                figures["tasks_per_s"] / found["transport_round_trips_per_s"], 4
            ),
            "ratio_to_store_single": round(
                figures["tasks_per_s"] / found["store_rows_per_s_single"], 4
            ),
            "ratio_to_store_batch100": round(
                figures["tasks_per_s"] / found["store_rows_per_s_batch100"], 4
            ),
        }
        p50 = figures["submit_to_result_ms"]["p50"]
        if config.mode == "serial" and p50:
            # How many bare round trips one task's submit -> result costs.
            figures["ceilings"]["serial_p50_in_round_trips"] = round(
                p50 * 1000 / found["transport_serial_round_trip_us"], 2
            )
    return figures


_TERMINAL = ("succeeded", "failed", "cancelled")
#: Seconds the broker and workers get after SIGTERM before SIGKILL.
STOP_GRACE_S = 15.0


def _start(cluster: LocalCluster, config: BenchConfig) -> int:
    """Start the broker and workers, wait for the workers; return the broker's pid."""
    broker = cluster.start_broker(
        "--durability", config.durability, "--log-level", "WARNING"
    )
    for index in range(1, config.workers + 1):
        cluster.start_worker(
            f"bench_{index:03d}",
            "--capacity",
            str(config.capacity),
            "--log-level",
            "WARNING",
        )
    cluster.wait_online(config.workers, 60)
    return broker.pid


def _drive_clients(
    endpoint: str,
    config: BenchConfig,
    db: Path,
    progress: Callable[[int, int, float], None],
) -> list[dict[str, Any]]:
    share = [config.tasks // config.clients] * config.clients
    share[0] += config.tasks - sum(share)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(config.clients) as pool:
        pending = pool.starmap_async(
            _client_job,
            [(endpoint, n, config.mode, config.batch) for n in share],
        )
        started = time.perf_counter()
        while not pending.ready():
            pending.wait(0.5)
            progress(_count_terminal(db), config.tasks, time.perf_counter() - started)
        results = pending.get()
    # The last line uses the figures' clock, not the start of the processes.
    progress(_count_terminal(db), config.tasks, _window(results))
    return results


def _window(results: list[dict[str, Any]]) -> float:
    """Seconds from the first client's first submit to the last one's last result.

    Each client starts its clock once it is imported and connected.
    """
    return max(r["ended"] for r in results) - min(r["started"] for r in results)


def _client_job(endpoint: str, count: int, mode: str, batch: int) -> dict[str, Any]:
    from sdk import Client

    latencies: list[float] = []
    with Client(endpoint, request_timeout=30.0) as client:
        # time.monotonic is one clock for every process on the machine.
        started = time.monotonic()
        if mode == "serial":
            for _ in range(count):
                # One request submits and waits (Client.call).
                submitted = time.perf_counter()
                client.call("echo", None, wait=60)
                latencies.append((time.perf_counter() - submitted) * 1000)
        elif batch > 1:
            handles = []
            for start in range(0, count, batch):
                size = min(batch, count - start)
                handles += client.submit_many([{"name": "echo"}] * size)
            client.gather(handles, timeout=300)
        else:
            client.gather([client.submit("echo", None) for _ in range(count)], 300)
        ended = time.monotonic()
    # Every submit and call above was accepted, or it raised.
    return {
        "accepted": count,
        "latencies_ms": latencies,
        "started": started,
        "ended": ended,
    }


def _count_terminal(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            row = conn.execute(
                "SELECT count(*) FROM tasks WHERE state IN (?, ?, ?)", _TERMINAL
            ).fetchone()
        return int(row[0])
    except sqlite3.Error:
        return 0


def _read_rows(db: Path) -> dict[str, dict[str, Any]]:
    # "Assigned" is when the broker committed the task's first ASSIGN (the
    # created_at of its worker_notifications row): the decision, taken in
    # the submit's own loop turn whenever a slot is free. The worker's ACK is
    # no clock for it, as a quick job's ACK travels with its RESULT.
    sql = """
        SELECT t.id, t.state, t.created_at, t.finished_at,
               (SELECT min(n.created_at) FROM worker_notifications n
                WHERE n.task_id = t.id AND n.notification_type = ?)
               AS assigned_at
        FROM tasks t
    """
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in conn.execute(sql, (TASK_ASSIGNED,))}


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)
    if len(ordered) == 1:
        only = round(ordered[0], 3)
        return {"p50": only, "p90": only, "p99": only, "max": only}
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50": round(cuts[49], 3),
        "p90": round(cuts[89], 3),
        "p99": round(cuts[98], 3),
        "max": round(ordered[-1], 3),
    }


def _timeline(rows: dict[str, dict[str, Any]]) -> list[list[float]]:
    """Return [second, tasks finished in it] pairs from the first finish on."""
    finished = sorted(r["finished_at"] for r in rows.values() if r["finished_at"])
    if not finished:
        return []
    first = finished[0]
    buckets: dict[int, int] = {}
    for at in finished:
        second = int(at - first)
        buckets[second] = buckets.get(second, 0) + 1
    return [[float(s), float(n)] for s, n in sorted(buckets.items())]


def _histogram(values: list[float]) -> list[list[float]]:
    """Return [upper edge ms, count] pairs on doubling edges from 0.125 ms."""
    edges = [0.125 * 2**i for i in range(18)]
    counts = [0] * len(edges)
    for value in values:
        for index, edge in enumerate(edges):
            if value < edge or index == len(edges) - 1:
                counts[index] += 1
                break
    return [[edge, float(n)] for edge, n in zip(edges, counts, strict=True) if n]
