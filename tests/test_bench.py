"""The benchmark script keeps working (a smoke run, not a timed test: no figure is asserted)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_benchmark_runs_every_contender() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "bench/bench.py",
            "--requests",
            "300",
            "--warm-up",
            "300",
            "--rounds",
            "2",
            "--clients",
            "2",
            "--streams",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and "contender" not in line
    ]
    names = [row[0] for row in rows]
    contenders = [
        "raw grpc.aio",
        "meshrpc (defaults)",
        "meshrpc + middleware",
        "meshrpc + tracing",
        "raw + SDK floor",
        "raw + otel contrib",
        "meshrpc production",
        "raw + prod. floor",
        "raw + lean prod.",
        "grpclib",
    ]
    assert names == contenders * 2  # both workloads, every contender
    assert all(row[2] == "1.000" for row in rows if row[0] == "raw grpc.aio")  # the baseline's own ratio
    assert all(float(row[1]) > 0 for row in rows)
    assert all(float(row[5]) > 10 for row in rows)  # each server's resident memory, in MB
    assert result.stdout.count("the SDK's own floor") == 4  # tracing and production, twice
    assert result.stdout.count("in a hot loop") == 2
    assert result.stdout.count("Each round's req/s over raw") == 2  # every round's ratio, both workloads


def test_layer_and_soak_scripts_run() -> None:
    layer = subprocess.run(
        [sys.executable, "bench/layer.py", "--calls", "300"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert layer.returncode == 0, layer.stderr
    assert "per message" in layer.stdout and "production profile" in layer.stdout
    assert "no call sampled" in layer.stdout and "sampled 10 %" in layer.stdout
    assert "one no-op middleware" in layer.stdout
    soak = subprocess.run(
        [sys.executable, "bench/soak.py", "--rpcs", "2000"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert soak.returncode == 0, soak.stdout + soak.stderr
    rows = [line for line in soak.stdout.splitlines() if line.startswith("| raw") or line.startswith("| meshrpc")]
    assert len(rows) == 2  # a line per server, with its three readings


def test_the_tables_give_each_round_s_ratio_to_raw() -> None:
    from bench.bench import round_lines

    assert (
        round_lines({"meshrpc production": [0.9, 0.95]})[-1]
        == "- meshrpc production: 0.900 0.950 (from 0.900 to 0.950)"
    )
    assert round_lines({"meshrpc production": [0.9]}) == []  # one round: no spread
