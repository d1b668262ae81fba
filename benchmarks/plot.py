"""Draw a benchmark's latency histogram and throughput over time as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def check_available() -> None:
    """Exit with a clear message when matplotlib is missing; call before a run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit('plotting needs matplotlib: pip install -e ".[plot]"') from exc


def draw(figures: dict[str, Any], folder: Path) -> list[Path]:
    """Write latency.png and throughput.png into folder; return their paths."""
    check_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []

    edges = [e for e, _ in figures["latency_histogram_ms"]]
    counts = [c for _, c in figures["latency_histogram_ms"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(counts)), counts)
    ax.set_xticks(range(len(edges)), [f"<{e:g}" for e in edges], rotation=45)
    ax.set_xlabel("submit -> result (ms)")
    ax.set_ylabel("tasks")
    ax.set_title(_title(figures))
    fig.tight_layout()
    paths.append(folder / "latency.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    seconds = [s for s, _ in figures["timeline"]]
    rates = [n for _, n in figures["timeline"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(seconds, rates, marker="o")
    ax.set_xlabel("seconds since the first result")
    ax.set_ylabel("tasks ended per second")
    ax.set_title(_title(figures))
    fig.tight_layout()
    paths.append(folder / "throughput.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def _title(figures: dict[str, Any]) -> str:
    c = figures["config"]
    return (
        f"hakobu {c['mode']}: {c['tasks']} tasks, {c['workers']} workers, "
        f"{figures['tasks_per_s']:,.0f} tasks/s"
    )
