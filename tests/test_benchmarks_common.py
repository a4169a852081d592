"""benchmarks/_common.py ``machine()``: the machine's cores and the benchmark's own thread count, told apart."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_machine_names_the_cores_and_the_threads_the_benchmark_uses(common, monkeypatch):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # torch's setting at the time of the call is not what a threads=4 run used
        line = common.machine(threads=4)
        assert line.startswith(f"{os.cpu_count()} cores") and line.endswith(", 4 threads used")
        assert f"torch {torch.__version__}" in line
        assert common.machine().endswith(", 1 thread used")  # not given: torch's count (singular)
    finally:
        torch.set_num_threads(saved)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert re.match(r"8 cores, 1 usable \(", common.machine(threads=1))  # a process pinned to fewer cores says so
    with pytest.raises(ValueError, match="threads=0"):
        common.machine(threads=0)
