"""``--plot``: throughput against tasks in flight, one line per system (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from .workloads import Row


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    systems = list(dict.fromkeys(r.system for r in rows))
    for system in systems:
        points = sorted(
            (r.in_flight, r.throughput_tps)
            for r in rows
            if r.system == system
            and r.workload == "throughput"
            and r.payload_bytes == 100
            and r.throughput_tps is not None
        )
        if points:
            (line,) = ax.plot(
                [p[0] for p in points], [p[1] for p in points], marker="o", label=system
            )
            color = line.get_color()
        else:
            color = None
        for r in rows:
            if r.system == system and r.workload == "map" and r.throughput_tps is not None:
                ax.plot(
                    [r.in_flight],
                    [r.throughput_tps],
                    marker="*",
                    markersize=13,
                    linestyle="none",
                    color=color,
                    label=f"{system} map/group of {r.tasks:,}",
                )
    ax.set_xscale("log")
    ticks = sorted({r.in_flight for r in rows if r.throughput_tps is not None})
    if ticks:
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("tasks in flight (log scale; map/group: the whole batch)")
    ax.set_ylabel("tasks/s (100-byte echo, answer awaited)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
