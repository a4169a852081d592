"""Fault injection: ``hap train`` and ``hap prune`` SIGKILLed at random moments (seeded, a bounded number of
times, real subprocesses), each time retried with ``--resume``, end with weights bit-identical to an
uninterrupted run's.

What makes that hold: a checkpoint set is renamed into place whole and named by ``last.json`` last
(:mod:`hap.train.checkpoint`), every epoch's data order depends only on ``(seed, epoch)``, and the arithmetic
is the same (one thread, here given explicitly; a resumed run without ``--threads`` reuses the count it
started with: conv gradients differ in the last bits between thread counts, so only an equal count is
bit-identical). A kill before the first checkpoint leaves leftovers only, which block no retry.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ..cli.conftest import write_tiny_fmnist

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMEOUT = 180  # per subprocess: a hang fails the test instead of the suite
TRAIN = ["--epochs", "3", "--batch-size", "32", "--memory-format", "contiguous", "--threads", "1", "--seed", "3"]


def _start(args: list[object], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hap.cli", *map(str, args), "--no-progress"], cwd=cwd, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("a hap subprocess hung")
    return p.returncode, err


def _timed_run(args: list[object], out: Path, cwd: Path) -> float:
    """Run to completion; returns the seconds from the run directory's creation (options checked, imports
    done) to the end: the window the kills are drawn in."""
    p = _start(args, cwd)
    while not out.exists() and p.poll() is None:
        time.sleep(0.005)
    t0 = time.monotonic()
    rc, err = _finish(p)
    assert rc == 0, err
    return time.monotonic() - t0


def _kill_and_resume(args: list[object], out: Path, cwd: Path, window: float, kills: int, seed: int) -> list[str]:
    """Start ``args`` (with ``--resume`` from the second start on) ``kills`` times, SIGKILL each at a seeded
    random moment of ``window`` after its run directory exists (or as soon as a checkpoint set is being
    written, for one of them), then once more to the end. Returns what each kill hit."""
    rng = random.Random(seed)
    hits = []
    for k in range(kills):
        p = _start([*args, *(["--resume"] if k else [])], cwd)
        while not out.exists() and p.poll() is None:
            time.sleep(0.002)
        in_write = k == kills - 1  # the last kill aims at the inside of a checkpoint write
        deadline = time.monotonic() + (window if in_write else rng.uniform(0.05, 0.85) * window)
        while p.poll() is None and time.monotonic() < deadline:
            if in_write and any(out.glob("**/checkpoints/.epoch-*.tmp")):
                break
            time.sleep(0.001)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            hits.append("checkpoint" if in_write and any(out.glob("**/checkpoints/.epoch-*.tmp")) else "killed")
        else:
            hits.append("finished")
        rc, err = _finish(p)
        assert rc in (-signal.SIGKILL, 0), err  # killed, or done before the kill: never a failure of its own
    rc, err = _finish(_start([*args, "--resume"], cwd))
    assert rc == 0, err  # the retry is never blocked
    return hits


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # bit for bit


def _history(run: Path, key: str = "history") -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((run / "last.json").read_text())[key]]


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """The uninterrupted reference training run: (base dir, run dir, kill window in seconds)."""
    base = tmp_path_factory.mktemp("kill")
    data = write_tiny_fmnist(base / "fmnist")
    ref = base / "ref"
    window = _timed_run(["train", *TRAIN, "--data-root", data, "--out", ref], ref, base)
    return base, ref, window


def test_train_killed_at_random_moments_resumes_bit_identically(dense):
    base, ref, window = dense
    out = base / "killed"
    hits = _kill_and_resume(["train", *TRAIN, "--data-root", base / "fmnist", "--out", out], out, base, window,
                            kills=3, seed=15)
    assert hits.count("finished") < len(hits), hits  # at least one kill landed inside the run
    print("train kills:", hits)
    _same_tensors(out / "best.safetensors", ref / "best.safetensors")
    assert _history(out) == _history(ref)
    m, r = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert (m["best_val_acc"], m["best_epoch"], m["test_acc"]) == (r["best_val_acc"], r["best_epoch"], r["test_acc"])


def test_prune_killed_at_random_moments_retries_to_the_same_result(dense):
    from hap.pipeline import RunConfig

    base, ref_dense, _ = dense
    cfg = RunConfig.for_units("channels", latency_rounds=1, latency_repeats=1, latency_batch=8, bn_batches=1,
                              repair_batches=1, sens_batch_size=32, checkpoint=str(ref_dense / "best.safetensors"),
                              data_options={"data_root": str(base / "fmnist")})
    cfg = cfg.replace(sensitivity=cfg.sensitivity.replace(method="l1", max_batches=1),
                      finetune=cfg.finetune.replace(epochs=2, batch_size=32, memory_format="contiguous"))
    (base / "prune.json").write_text(json.dumps(cfg.to_dict()))
    args = ["prune", "--config", base / "prune.json", "--threads", "1"]
    ref = base / "pref"
    window = _timed_run([*args, "--out", ref], ref, base)
    out = base / "pkilled"
    hits = _kill_and_resume([*args, "--out", out], out, base, window, kills=2, seed=16)
    assert hits.count("finished") < len(hits), hits
    print("prune kills:", hits)
    _same_tensors(out / "model.safetensors", ref / "model.safetensors")
    assert (out / "plan.json").read_text() == (ref / "plan.json").read_text()
    m, r = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert m["test_acc"] == r["test_acc"] and m["finetune_steps"] == r["finetune_steps"]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in m["finetune_history"]] == \
        [{k: v for k, v in h.items() if k != "seconds"} for h in r["finetune_history"]]


def test_a_resumed_run_keeps_the_thread_count_it_started_with(tmp_path, monkeypatch):
    """Bit-identity needs the same arithmetic: without ``threads=`` a resume uses the recorded count (and gives
    the caller's back); an explicit ``threads=`` wins."""
    from hap.train import TrainConfig, train

    from .test_loop import _Data, _model

    cfg = TrainConfig(epochs=2, lr=0.1, batch_size=16, augment=False, seed=0, memory_format="contiguous")
    with pytest.raises(KeyboardInterrupt):
        train(_model(), _Data(interrupt_at=6), cfg, out_dir=tmp_path, progress=False, threads=2)
    assert json.loads((tmp_path / "last.json").read_text())["threads"] == 2
    seen: list[int] = []
    real = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: (seen.append(torch.get_num_threads()),
                                                                     real(self, x))[1])
    torch.set_num_threads(1)
    train(_model(), _Data(), cfg, out_dir=tmp_path, resume=True, progress=False)
    assert seen and set(seen) == {2} and torch.get_num_threads() == 1
    with pytest.raises(KeyboardInterrupt):
        train(_model(), _Data(interrupt_at=6), cfg, out_dir=tmp_path / "b", progress=False, threads=2)
    seen.clear()
    train(_model(), _Data(), cfg, out_dir=tmp_path / "b", resume=True, progress=False, threads=1)
    assert seen and set(seen) == {1}  # given explicitly: it wins
