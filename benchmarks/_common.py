"""Shared by the benchmark scripts: the dense Fashion-MNIST ResNet they all start from.

``dense_resnet`` trains (or resumes training of) the model with :func:`hap.train.train` and caches it
under ``benchmarks/out/``, so every benchmark is rerunnable from nothing with one command.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import stat
import tempfile
from pathlib import Path

import torch

import hap.data
import hap.models
from hap._utils import atomic_write_text
from hap.train import TrainConfig, load_weights, train

OUT = Path(__file__).resolve().parent / "out"


def machine(threads: int | None = None) -> str:
    """The machine and the threads a benchmark runs on, for the line a document quotes.

    ``"2 cores (AMD EPYC), torch 2.13.0+cpu, 1 thread used"``: the cores are the machine's (those this
    process may run on, when fewer), the thread count the benchmark's own. Torch's current count is only a
    stand-in for the latter (what an untimed call would get): a script that times with ``threads=N`` (or
    several counts) passes ``threads``, since that, not torch's setting at the time of the call, is what
    its numbers were measured with.
    """
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    where = f"{cores} cores" + (f", {usable} usable" if usable < cores else "")
    n = torch.get_num_threads() if threads is None else threads
    if n < 1:
        raise ValueError(f"threads={n}: give the benchmark's thread count, at least 1")
    return f"{where} ({cpu}), torch {torch.__version__}, {n} thread{'' if n == 1 else 's'} used"


def dense_resnet(name: str = "resnet20", epochs: int = 30, seed: int = 0, progress: bool = True):
    """(model, data, train summary) for a ResNet trained on Fashion-MNIST for ``epochs`` epochs."""
    data = hap.data.load("fashion-mnist", seed=seed)
    model = hap.models.create(name, num_classes=data.num_classes, in_channels=data.in_channels)
    run = OUT / f"{name}-fmnist-e{epochs}-s{seed}"
    done = run / "done.json"
    if done.is_file():
        load_weights(model, run / "best.safetensors")
        return model, data, json.loads(done.read_text())
    torch.manual_seed(seed)
    cfg = TrainConfig(epochs=epochs, lr=0.1, batch_size=128, seed=seed)
    res = train(model, data, cfg, out_dir=run, resume=True, progress=progress)
    summary = {"epochs": epochs, "best_val_acc": res.best_val_acc, "best_epoch": res.best_epoch,
               "history": res.history}
    done.write_text(json.dumps(summary, indent=1))
    return model, data, summary


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="train/cache the dense Fashion-MNIST ResNet the benchmarks use")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    m, d, s = dense_resnet(a.model, a.epochs, a.seed)
    print(json.dumps({k: v for k, v in s.items() if k != "history"}))


def replace_marked_block(path: Path, body: str, marker: str) -> None:
    """Put ``body`` between the two ``marker`` lines of ``path`` (appended if absent), keeping the rest.

    Another script writes its own marked block of the same file: the file is re-read right before an
    atomic replace (under an exclusive lock in the temp directory, for writers that take it), so the
    other block is carried over as it is at that moment. The file stays world-readable (a temp file
    is created 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"hap-results-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_text() if path.is_file() else ""
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o644
        if old.count(marker) >= 2:
            pre, _, rest = old.partition(marker)
            _, _, post = rest.partition(marker)
            new = f"{pre}{marker}\n{body}\n{marker}{post}"
        else:
            sep = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
            new = f"{old}{sep}{marker}\n{body}\n{marker}\n"
        atomic_write_text(path, new)
        os.chmod(path, mode)
