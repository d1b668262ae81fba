"""`hakobu bench`: run the delivery-rate harness and show its figures."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.markup import escape

from benchmarks.harness import BenchConfig, run


def literal(text: str) -> str:
    """Return help text that shows as written: rich markup would eat "[plot]"."""
    return escape(text) if getattr(typer.core, "HAS_RICH", True) else text


def bench_command(
    tasks: Annotated[int, typer.Option(min=1, help="Tasks to push (M).")] = 10_000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (N).")] = 2,
    clients: Annotated[
        int, typer.Option(min=1, help="Client processes submitting (K).")
    ] = 1,
    mode: Annotated[
        str,
        typer.Option(
            help="burst: submit everything, then collect; "
            "serial: one task at a time, each submitted and awaited in one "
            "request (Client.call)."
        ),
    ] = "burst",
    batch: Annotated[
        int,
        typer.Option(
            min=1,
            help="Tasks per submit request in burst mode (submit_many); 1 sends "
            "one request per task, which one round trip each bounds.",
        ),
    ] = 100,
    durability: Annotated[
        str,
        typer.Option(help="SQLite synchronous for broker and ceiling: normal|full."),
    ] = "normal",
    capacity: Annotated[
        int,
        typer.Option(
            min=1,
            help="Capacity of each worker: handler processes, so tasks in flight.",
        ),
    ] = 8,
    ceilings: Annotated[
        bool,
        typer.Option(help="Also measure the bare transport and store ceilings."),
    ] = True,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the figures as one JSON object: stdout holds only that "
            "object; progress and notes go to stderr.",
        ),
    ] = False,
    save: Annotated[
        Path | None, typer.Option(help="Write the figures as JSON to this file.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help=literal(
                "Draw latency.png and throughput.png into this folder "
                '(needs matplotlib: pip install -e ".[plot]").'
            )
        ),
    ] = None,
) -> None:
    """Measure delivery rate, throughput and latency against bare ceilings."""
    if mode not in ("burst", "serial"):
        raise typer.BadParameter("choose burst or serial", param_hint="--mode")
    if durability not in ("normal", "full"):
        raise typer.BadParameter("choose normal or full", param_hint="--durability")
    config = BenchConfig(
        tasks=tasks,
        workers=workers,
        clients=clients,
        mode=mode,
        # Serial mode sends one task per request whatever --batch says.
        batch=batch if mode == "burst" else 1,
        durability=durability,
        capacity=capacity,
        with_ceilings=ceilings,
    )
    if plot is not None:
        from benchmarks.plot import check_available

        check_available()  # before the run, not after it
    # SIGTERM unwinds like Ctrl-C, so the harness stops what it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    figures = run(config, _progress)
    sys.stderr.write("\n")
    if save is not None:
        save.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    if plot is not None:
        from benchmarks.plot import draw

        for path in draw(figures, plot):
            typer.echo(f"wrote {path}", err=True)
    if as_json:
        typer.echo(json.dumps(figures))
    else:
        _show(figures)
    if figures["delivery_rate"] < 1.0:
        raise typer.Exit(1)


def _progress(done: int, total: int, elapsed_s: float) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    rate = done / elapsed_s if elapsed_s else 0.0
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(f"\r[{bar}] {done}/{total} ended  {rate:,.0f} tasks/s  ")
    sys.stderr.flush()


def _show(figures: dict[str, Any]) -> None:
    config = figures["config"]
    batch = f"batch {config['batch']}, " if config["mode"] == "burst" else ""
    typer.echo(
        f"{config['tasks']} no-op tasks, {config['workers']} workers x "
        f"{config['capacity']}, {config['clients']} client(s), mode {config['mode']}, "
        f"{batch}durability {config['durability']}"
    )
    typer.echo(
        f"delivery rate    {figures['delivery_rate'] * 100:.2f}%  "
        f"({figures['terminal']}/{figures['accepted']} accepted tasks ended)"
    )
    typer.echo(f"throughput       {figures['tasks_per_s']:,.0f} tasks/s")
    for key, label in (
        ("submit_to_assign_ms", "submit->assign"),
        ("submit_to_result_ms", "submit->result"),
    ):
        p = figures[key]
        typer.echo(
            f"{label:16} p50 {_ms(p['p50'])}  p90 {_ms(p['p90'])}  p99 {_ms(p['p99'])}"
        )
    typer.echo(f"broker CPU       {figures['broker_cpu_ms_per_task']:.3f} ms/task")
    typer.echo(f"broker RSS       {figures['broker_rss_mb']:.1f} MB")
    found = figures.get("ceilings")
    if found:
        typer.echo(
            f"ceilings         transport {found['transport_round_trips_per_s']:,.0f}"
            f" round trips/s (hakobu x{found['ratio_to_transport']:.3f}), "
            f"store {found['store_rows_per_s_single']:,.0f} rows/s one commit each "
            f"(x{found['ratio_to_store_single']:.3f}), "
            f"{found['store_rows_per_s_batch100']:,.0f} rows/s batched "
            f"(x{found['ratio_to_store_batch100']:.3f})"
        )
        typer.echo(
            f"                 one bare request/reply round trip "
            f"{found['transport_serial_round_trip_us']:,.0f} us"
            + (
                f" (serial submit->result p50 = "
                f"{found['serial_p50_in_round_trips']:.1f} round trips)"
                if "serial_p50_in_round_trips" in found
                else ""
            )
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"
