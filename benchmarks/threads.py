"""Thread counts on a shared CPU: torch's default ("before") against hap's default ("after").

torch sizes its thread pool to the machine's cores. When another process keeps one of them busy, each
parallel region waits for the thread the scheduler has not given a core, and the issue that asked for this
(issue 15) saw the sensitivity and a fine-tune epoch run 15-25x slower than with one thread. hap's default
(:func:`hap._utils.default_threads`) is the cores available to the process minus those other processes
keep busy, measured from ``/proc/stat`` when a heavy entry point starts.

In one run this script times, on ResNet-20 (an untrained zoo model: weights do not change the speed) and
packaged Fashion-MNIST,

- (a) :func:`hap.sensitivity` (the default criterion, Monte-Carlo Fisher) over a fixed number of batches
  and a fixed number of samples (no early stop), and
- (b) one fine-tune epoch (:func:`hap.train.train`) on a fixed training subset (validation on a fixed
  subset too),

each on the machine as it is ("idle": run it with nothing else busy) and with one core made busy by a
spinning subprocess the script starts and stops itself, once with torch's default thread count and once
with hap's. It prints a table of seconds and ratios and writes ``docs/threads.md`` (atomically).

Run: ``python benchmarks/threads.py`` (about 2-4 minutes on an idle 2-core machine; most of it is the
"busy, before" rows) or ``python benchmarks/threads.py --smoke`` (seconds; numbers meaningless).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TORCH_DEFAULT = torch.get_num_threads()  # before anything changes it: what torch chose for this machine

import hap  # noqa: E402
import hap._utils  # noqa: E402
import hap.data  # noqa: E402
import hap.models  # noqa: E402
from _common import machine  # noqa: E402
from hap._utils import atomic_write_text, available_cores, busy_cores, default_threads  # noqa: E402
from hap.metrics import classification_loss  # noqa: E402
from hap.train import TrainConfig, VisionTask, train  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "threads.md"
SIZES = {  # sensitivity batches x batch size, fine-tune training images, validation images, train batch
    "full": {"sens_batches": 4, "sens_batch": 64, "train": 2048, "val": 512, "batch": 128},
    "smoke": {"sens_batches": 1, "sens_batch": 8, "train": 64, "val": 32, "batch": 32},
}


class Spinner:
    """One busy core: a subprocess spinning in a loop, started and stopped (by its own handle) here."""

    def __enter__(self) -> Spinner:
        self.p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # let it be scheduled, and /proc/stat see it
        return self

    def __exit__(self, *exc: object) -> None:
        self.p.kill()
        self.p.wait()


def _hap_default() -> int:
    """What an entry point without ``threads=`` picks now (a fresh measurement, not the cached one)."""
    hap._utils._cache = None  # the measurement is reused for 5 s; each condition needs its own
    return default_threads(TORCH_DEFAULT)


def time_sensitivity(model, data, size, threads: int | None) -> float:
    n = size["sens_batches"] * size["sens_batch"]
    batches = VisionTask().sensitivity_batches(data, size["sens_batch"], size["sens_batches"], 0)
    t0 = time.perf_counter()
    hap.sensitivity(model, classification_loss, batches, progress=False, threads=threads,
                    max_batches=size["sens_batches"], min_samples=n, max_samples=n, stability=None, tol=1e-9)
    return time.perf_counter() - t0


def time_epoch(model, data, size, threads: int | None) -> float:
    m = copy.deepcopy(model)
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=size["batch"], memory_format="contiguous", seed=0)
    t0 = time.perf_counter()
    train(m, data, cfg, progress=False, threads=threads)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (numbers meaningless)")
    ap.add_argument("--out", type=Path, default=DOC, help="the markdown written (default docs/threads.md)")
    args = ap.parse_args()
    size = SIZES["smoke" if args.smoke else "full"]
    t_start = time.perf_counter()
    where = machine()
    background = busy_cores(sample_s=0.5)
    full = hap.data.load("fashion-mnist", seed=0, subset=size["train"])
    data = dataclasses.replace(full, val=full.val.subset(torch.arange(size["val"])))
    torch.manual_seed(0)
    model = hap.models.create("resnet20", num_classes=data.num_classes, in_channels=data.in_channels)
    time_sensitivity(model, data, SIZES["smoke"], 1)  # warm-up: first-call costs out of the timings
    time_epoch(model, data, SIZES["smoke"], 1)

    rows, picked = [], {}
    for load in ("idle", "one core busy"):
        with Spinner() if load != "idle" else contextlib.nullcontext():
            picked[load] = _hap_default()
            for work, fn in (("sensitivity", time_sensitivity), ("fine-tune epoch", time_epoch)):
                before = fn(model, data, size, TORCH_DEFAULT)
                hap._utils._cache = None
                after = fn(model, data, size, None)  # None: hap's default, as a library call without threads=
                rows.append({"work": work, "load": load, "before": before, "after": after,
                             "threads": f"{TORCH_DEFAULT} / {picked[load]}"})
                print(f"{work:16s} {load:14s} before ({TORCH_DEFAULT} threads) {before:7.2f} s   "
                      f"after ({picked[load]}) {after:7.2f} s   before/after {before / after:5.2f}x", flush=True)
    idle = {r["work"]: r for r in rows if r["load"] == "idle"}
    lines = [
        "# Threads on a shared CPU: torch's default vs hap's",
        "",
        f"Generated by `python benchmarks/threads.py{' --smoke' if args.smoke else ''}` (do not edit by hand; rerun "
        "the script). " + ("**Smoke run: sizes too small for the numbers to mean anything; run the full command "
                           "on an otherwise idle machine.**" if args.smoke else ""),
        "",
        f"- Command: `{shlex.join(['python', 'benchmarks/threads.py', *sys.argv[1:]])}`; "
        f"{time.perf_counter() - t_start:.0f} s in all.",
        f"- Machine: {where} (torch's default); {available_cores()} cores available to the process.",
        f"- Thread counts: before = torch's default, {TORCH_DEFAULT}; after = hap's default "
        f"(`hap._utils.default_threads`), which picked {picked['idle']} on the idle machine and "
        f"{picked['one core busy']} with one core busy.",
        f"- Load: other processes kept {background:.2f} cores busy when the script started (\"idle\" rows are only "
        "idle if that is about 0); \"one core busy\" adds one spinning process the script starts and stops.",
        f"- Work: (a) `hap.sensitivity` on ResNet-20 (1x28x28 inputs), Monte-Carlo Fisher, {size['sens_batches']} "
        f"batches of {size['sens_batch']} images, {size['sens_batches'] * size['sens_batch']} samples (no early "
        f"stop); (b) one fine-tune epoch of `hap.train.train` (SGD, batch {size['batch']}, contiguous layout) on "
        f"{size['train']} training images of packaged Fashion-MNIST, validated on {size['val']}.",
        "",
        "| work | load | threads before / after | before (s) | after (s) | before / after | vs idle (before, after) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        i = idle[r["work"]]
        lines.append(f"| {r['work']} | {r['load']} | {r['threads']} | {r['before']:.2f} | {r['after']:.2f} | "
                     f"{r['before'] / r['after']:.2f}x | {r['before'] / i['before']:.2f}x, "
                     f"{r['after'] / i['after']:.2f}x |")
    lines += ["", "\"before / after\" above 1: hap's default is faster; \"vs idle\": the slowdown the busy core "
              "causes with each default.", ""]
    atomic_write_text(args.out, "\n".join(lines))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
