"""Shared by the benchmark scripts: the dense Fashion-MNIST ResNet they all start from.

``dense_resnet`` trains (or resumes training of) the model with :func:`hap.finetune.train` and caches it
under ``benchmarks/out/``, so every benchmark is rerunnable from nothing with one command.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

import hap.data
import hap.models
from hap.finetune import TrainConfig, load_weights, train

OUT = Path(__file__).resolve().parent / "out"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


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
