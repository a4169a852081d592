"""hap's thread-count default (:func:`hap._utils.default_threads`) under mocked machines, and the
``threads`` context / ``@uses_threads`` entry points that apply and restore it."""

from __future__ import annotations

import inspect

import pytest
import torch

import hap
import hap._utils as u
from hap.pipeline import run
from hap.repair import repair
from hap.train import train


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake machine: ``set(cores=..., busy=..., quota=...)`` fixes affinity, the other processes' load
    per core (as /proc/stat ticks over one sample) and the cgroup quota; this process uses no CPU."""
    stat = tmp_path / "stat"
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(u, "_STAT", stat)
    monkeypatch.setattr(u, "_CPU_MAX", cpu_max)
    monkeypatch.setattr(u, "_cache", None)
    monkeypatch.setattr(u.time, "sleep", lambda s: None)
    monkeypatch.setattr(u, "_self_cpu_s", lambda: 0.0)
    state = {"reads": 0}

    def set_(cores: int, busy: list[float] | None = None, quota: str | None = None) -> None:
        monkeypatch.setattr(u.os, "sched_getaffinity", lambda pid: set(range(cores)))
        busy = busy or [0.0] * cores
        state.update(busy=busy)
        if quota is not None:
            cpu_max.write_text(quota)

    def core_times() -> dict[int, tuple[int, int]]:
        # each read advances every core by 100 ticks, busy for its share of them
        state["reads"] += 1
        k = state["reads"]
        return {i: (int(round(100 * b * k)), 100 * k) for i, b in enumerate(state["busy"])}

    monkeypatch.setattr(u, "_core_times", core_times)
    set_.state = state  # type: ignore[attr-defined]
    return set_


@pytest.mark.parametrize(("cores", "busy", "expected"), [
    (2, [0.0, 0.0], 2),     # idle: every core
    (2, [1.0, 0.0], 1),     # one core spinning elsewhere: the case
    (2, [1.0, 1.0], 1),     # everything busy: still one thread
    (4, [0.3, 0.1, 0.0, 0.0], 4),  # under half a core of load is not a busy core
    (4, [0.3, 0.3, 0.0, 0.0], 3),  # two 30% cores add up to more than half a core
    (8, [1.0] * 3 + [0.0] * 5, 5),
])
def test_default_threads_is_the_cores_others_leave_free(machine, cores, busy, expected):
    torch.set_num_threads(cores)
    machine(cores, busy)
    assert u.busy_cores() == pytest.approx(sum(busy), abs=0.02)
    assert u.default_threads() == expected


def test_default_threads_is_capped_by_torchs_setting_and_the_cgroup_quota(machine):
    machine(8, quota="200000 100000")  # a container allowed two CPUs of an 8-core host
    assert u.available_cores() == 2
    assert u.default_threads(limit=8) == 2
    assert u.default_threads(limit=1) == 1
    machine(8, quota="max 100000")
    u._cache = None
    assert u.available_cores() == 8 and u.default_threads(limit=3) == 3


def test_one_thread_needs_no_measurement_and_a_measurement_is_reused(machine):
    machine(4, [1.0, 0.0, 0.0, 0.0])
    assert u.default_threads(limit=1) == 1
    assert machine.state["reads"] == 0  # limit 1: nothing sampled
    assert u.default_threads(limit=4) == 3
    reads = machine.state["reads"]
    assert u.default_threads(limit=4) == 3 and machine.state["reads"] == reads  # cached


def test_own_cpu_time_is_not_counted_as_another_process(machine, monkeypatch):
    machine(2, [1.0, 0.0])
    clock = iter([0.0, 0.05])  # this process burnt one core for the whole 0.05 s sample
    monkeypatch.setattr(u, "_self_cpu_s", lambda: next(clock))
    assert u.busy_cores(sample_s=0.05) == pytest.approx(0.0, abs=0.02)


def test_without_proc_stat_the_load_average_stands_in(monkeypatch, tmp_path):
    monkeypatch.setattr(u, "_STAT", tmp_path / "missing")
    monkeypatch.setattr(u, "_CPU_MAX", tmp_path / "missing-too")
    monkeypatch.setattr(u, "_cache", None)
    monkeypatch.setattr(u.time, "sleep", lambda s: None)
    monkeypatch.setattr(u.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(u.os, "getloadavg", lambda: (2.2, 1.0, 0.5))
    assert u.busy_cores() == pytest.approx(2.2)
    assert u.default_threads(limit=4) == 2
    monkeypatch.setattr(u.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    u._cache = None
    assert u.busy_cores() == 4.0 and u.default_threads(limit=4) == 1


def test_threads_context_applies_restores_and_nests(monkeypatch):
    monkeypatch.setattr(u, "default_threads", lambda limit=None: 2)
    torch.set_num_threads(3)
    with u.threads() as n:
        assert n == 2 and torch.get_num_threads() == 2
        with u.threads() as inner:  # inside a hap context: the outer count stays
            assert inner == 2 and torch.get_num_threads() == 2
        with u.threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 3
    with pytest.raises(RuntimeError), u.threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 3 and u._depth == 0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            u.threads(bad)


@pytest.mark.parametrize("fn", [hap.sensitivity, repair, train, run], ids=lambda f: f.__name__)
def test_heavy_entry_points_take_threads(fn):
    p = inspect.signature(fn).parameters["threads"]
    assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None


def test_an_entry_point_runs_under_its_count_and_restores_it():
    import torch.nn.functional as F

    from .conftest import make_tiny

    model, x, y = make_tiny("mlp")
    seen = []
    torch.set_num_threads(3)
    orig = model.forward
    model.forward = lambda *a: (seen.append(torch.get_num_threads()), orig(*a))[1]
    hap.sensitivity(model, F.cross_entropy, [(x, y)], method="l1", progress=False, threads=2)
    hap.sensitivity(model, F.cross_entropy, [(x, y)], method="taylor", progress=False, threads=2)
    assert seen and set(seen) == {2} and torch.get_num_threads() == 3
    with pytest.raises(ValueError, match="positive integer"):
        hap.sensitivity(model, F.cross_entropy, [(x, y)], method="l1", progress=False, threads=0)
    assert torch.get_num_threads() == 3


def test_uses_threads_needs_the_keyword():
    with pytest.raises(TypeError, match="threads"):
        u.uses_threads(lambda x: x)
