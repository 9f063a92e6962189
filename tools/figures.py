"""The docs' figures, each drawn from a real run: ``python tools/figures.py rollout|lifecycle``.

    rollout    the Envoy rolling update of tests/test_rollout.py, with and without the
               drain delay: calls per 100 ms per replica, failed calls, SIGTERM, D, D+G
    lifecycle  a real `meshrpc serve` with a slow RPC across SIGTERM: readiness, liveness,
               accepting and in flight over t0 .. D .. D+G
    (the performance chart is written by `python bench/bench.py --write-doc`)

Each SVG's caption names the date, the machine and the command that made it.  Figures
are made again by their command, never edited by hand.  ``--tiny`` makes a quick one
(the test suite's check that each generator still runs) into ``--out``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIGURES = ROOT / "docs" / "figures"


def caption(command: str) -> str:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {model}, Python {platform.python_version()}; "
        f"made by: {command}"
    )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("svg")  # no display, and the same output everywhere
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "meshrpc", "svg.fonttype": "none", "font.size": 9})  # stable ids, text as text
    return plt


def _save(fig: Any, path: Path, text: str) -> None:
    fig.text(0.01, 0.005, text, fontsize=7, color="#555555", ha="left", va="bottom")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata={"Date": None})
    print(path)


def performance(tables: Sequence[tuple[str, Sequence[tuple[str, float, float]]]], path: Path, command: str) -> None:
    """Bars of each contender's ratio to raw grpc.aio (requests/s and CPU per RPC), per workload."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 0.42 * len(tables[0][1]) + 1.6), squeeze=False)
    for ax, (workload, rows) in zip(axes[0], tables, strict=True):
        names = [name for name, _, _ in rows][::-1]
        rps = [r for _, r, _ in rows][::-1]
        cpu = [c for _, _, c in rows][::-1]
        y = range(len(names))
        ax.barh([i + 0.2 for i in y], rps, height=0.38, label="requests/s vs raw (higher is better)", color="#2b6cb0")
        ax.barh([i - 0.2 for i in y], cpu, height=0.38, label="CPU per RPC vs raw (lower is better)", color="#dd8452")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(list(y), names)
        ax.set_title(workload)
        ax.set_xlabel("ratio to raw grpc.aio in the same run")
        for i, (r, c) in enumerate(zip(rps, cpu, strict=True)):
            ax.text(r + 0.01, i + 0.2, f"{r:.2f}", va="center", fontsize=7)
            ax.text(c + 0.01, i - 0.2, f"{c:.2f}", va="center", fontsize=7)
    axes[0][0].legend(loc="lower left", bbox_to_anchor=(0, 1.08), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path, caption(command))
