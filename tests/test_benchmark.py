"""The model benchmark command (``scripts/benchmark.py``) end to end on a tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fcn.cli import benchmark_main


def test_benchmark_writes_figures_per_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    args = ["--models", "student", "--size", "64", "96", "--batch", "2", "--iters", "1", "--json", str(out)]
    assert benchmark_main(args) == 0
    table = capsys.readouterr().out
    assert "| student | 64x96 | 3.02 |" in table
    payload = json.loads(out.read_text())
    assert isinstance(payload["env"]["malloc_keeps_freed_memory"], bool)
    (r,) = payload["results"]
    assert r["model"] == "student" and r["size"] == [64, 96] and r["batch"] == 2
    assert r["throughput_ips"] > 0 and r["train_step_ms"] > 0 and r["gflops"] > 0
    assert 100 < r["peak_mem_mb"] < 20000  # the process's peak RSS in MB, not bytes or KB


def test_benchmark_unknown_model_is_one_error_line(capsys: pytest.CaptureFixture) -> None:
    assert benchmark_main(["--models", "fcn4s", "--size", "64", "96"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'fcn4s'") and "student" in err and "\n" not in err
