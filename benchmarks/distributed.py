"""Scale-out benchmark: curvature samples per second with 1 vs 2 processes, and the Fisher backends.

(a) ``hap.sensitivity(method="hap")`` (Monte-Carlo Fisher, a fixed number of samples, no early stop) on
    ResNet-20 (1x28x28 inputs, batches of 64), run by 1 process and by 2 processes (gloo on loopback, one
    torch thread each, every rank given half of the batches): samples per second of the whole estimate
    and the ratio, with a check that both ranks hold the same scores.
(b) The memory-lean Fisher against the vmap path on ResNet-20 and MiniLM: seconds and peak memory per
    backend and their ratios (``benchmarks/fisher_backends.py``, each in its own process).

Run on an idle machine: ``python benchmarks/distributed.py`` (writes benchmarks/out/distributed.json and
docs/distributed.md; ``--doc-only`` rewrites the page from the JSON), or ``--smoke`` (tiny models, under a
minute, nothing written unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fisher_backends  # noqa: E402
import hap  # noqa: E402
import hap.models  # noqa: E402
from _common import OUT, machine  # noqa: E402
from hap._utils import atomic_write_text  # noqa: E402
from hap.models.tiny import TinyConvBN  # noqa: E402


def _setup(smoke: bool, batches: int):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if smoke:
        model, shape, n = TinyConvBN(), TinyConvBN().input_shape, 16
    else:
        model, shape, n = hap.models.create("resnet20", num_classes=10, in_channels=1), (1, 28, 28), 64
    data = [(torch.randn(n, *shape, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for _ in range(batches)]
    return model, data


def _estimate(rank: int, world: int, smoke: bool, samples: int, batches: int) -> dict:
    model, data = _setup(smoke, batches)
    mine = data[rank::world]
    s = hap.sensitivity(model, F.cross_entropy, mine, method="hap", max_samples=samples, min_samples=samples,
                        stability=None, tol=0.0, progress=False)
    return {"samples": s.samples, "seconds": s.wall_time_s, "scores": s.scores.tolist(), "rank": rank}


def _entry(rank: int, world: int, port: int, smoke: bool, samples: int, batches: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(_estimate(rank, world, smoke, samples, batches)))
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(smoke: bool, samples: int, batches: int) -> dict:
    torch.set_num_threads(1)
    one = _estimate(0, 1, smoke, samples, batches)
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_entry, args=(2, _port(), smoke, samples, batches, d), nprocs=2, start_method="spawn")
        ranks = [pickle.loads(Path(d, f"rank{r}.pkl").read_bytes()) for r in range(2)]
    two_s = max(r["seconds"] for r in ranks)
    return {"samples": samples, "one_process_s": one["seconds"], "two_process_s": two_s,
            "one_samples_per_s": samples / one["seconds"], "two_samples_per_s": ranks[0]["samples"] / two_s,
            "speedup": one["seconds"] / two_s, "ranks_identical": ranks[0]["scores"] == ranks[1]["scores"],
            "cpu_cores": os.cpu_count()}


DOCS = Path(__file__).resolve().parent.parent / "docs" / "distributed.md"


def document(res: dict) -> str:
    """docs/distributed.md from the JSON this script writes."""
    tp = res["throughput"]
    lines = [
        "# Scale-out: sharded sensitivity and the memory-lean Fisher",
        "",
        f"Written by `python benchmarks/distributed.py` in {res['seconds'] / 60:.1f} min on {res['machine']} "
        f"({tp['cpu_cores']} cores seen; 1-min load average {res.get('load_before', float('nan')):.2f} when it "
        "started). No GPU was lent to the sessions that ran it: "
        "NCCL / CUDA paths are tested for device placement only.",
        "",
        "## Curvature samples per second, 1 vs 2 processes",
        "",
        f"`hap.sensitivity(method=\"hap\")` (Monte-Carlo Fisher, exactly {tp['samples']} samples, no early stop) "
        "on ResNet-20 (1x28x28, batches of 64): one process over all batches, then 2 processes (gloo on "
        "loopback, one torch thread each, each rank given half of the batches; per-unit sums all-reduced).",
        "",
        "| processes | seconds | samples / s | speed-up | every rank holds the same scores |",
        "|---:|---:|---:|---:|---|",
        f"| 1 | {tp['one_process_s']:.1f} | {tp['one_samples_per_s']:.1f} | 1.00x | - |",
        f"| 2 | {tp['two_process_s']:.1f} | {tp['two_samples_per_s']:.1f} | {tp['speedup']:.2f}x | "
        f"{'yes' if tp['ranks_identical'] else 'NO'} |",
        "",
        "## Memory-lean Fisher (hooks) against per-example gradients (vmap)",
        "",
        "Each backend in its own process, one thread; peak = resident memory above the level after setup.",
        "",
        "| model | vmap s/example | hooks s/example | speed-up | vmap peak MB | hooks peak MB | less memory | "
        "max relative difference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["fisher_backends"]:
        lines.append(f"| {r['case']} | {r['vmap']['s_per_example']:.4f} | {r['hooks']['s_per_example']:.4f} | "
                     f"{r['speedup']:.2f}x | {r['vmap']['peak_mb']:.0f} | {r['hooks']['peak_mb']:.0f} | "
                     f"{r['memory_ratio']:.2f}x | {r['max_rel_diff']:.1e} |")
    lines += ["", "Correctness (equal to one process over the union of the shards, fine-tune equal to one process, a "
              "failing rank stops the others) is tested in `tests/test_distributed.py`, not measured here.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--samples", type=int, default=None, help="Fisher samples (default 512; smoke 32)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--doc-only", action="store_true", help="rewrite docs/distributed.md from the JSON")
    a = ap.parse_args()
    if a.doc_only:
        atomic_write_text(DOCS, document(json.loads((OUT / "distributed.json").read_text())))
        print(f"wrote {DOCS}")
        return
    samples = a.samples or (32 if a.smoke else 512)
    t0 = time.perf_counter()
    load = os.getloadavg()[0]  # recorded: the 2-process ratio means something only on an otherwise idle machine
    tp = throughput(a.smoke, samples, batches=4 if a.smoke else 8)
    print(f"curvature samples/s: 1 process {tp['one_samples_per_s']:.1f}, 2 processes {tp['two_samples_per_s']:.1f} "
          f"(x{tp['speedup']:.2f}); ranks identical: {tp['ranks_identical']}")
    cases = ("tiny-convbn", "tiny-bert") if a.smoke else ("resnet20", "minilm")
    backends = []
    for case in cases:
        got = {b: fisher_backends._child(case, b, "cpu", 1 if a.smoke else 3, 1) for b in fisher_backends.BACKENDS}
        ref, lean = np.array(got["vmap"]["rows"]), np.array(got["hooks"]["rows"])
        row = {"case": case, "speedup": got["vmap"]["s_per_example"] / got["hooks"]["s_per_example"],
               "memory_ratio": got["vmap"]["peak_mb"] / max(got["hooks"]["peak_mb"], 1e-3),
               "vmap": {k: got["vmap"][k] for k in ("s_per_example", "peak_mb")},
               "hooks": {k: got["hooks"][k] for k in ("s_per_example", "peak_mb", "backend")},
               "max_rel_diff": float(np.abs(ref - lean).max() / np.abs(ref).max())}
        backends.append(row)
        print(f"{case}: hooks x{row['speedup']:.1f} faster, x{row['memory_ratio']:.1f} less peak memory than vmap "
              f"(rows differ by {row['max_rel_diff']:.1e})")
    out = a.out or (None if a.smoke else str(OUT / "distributed.json"))
    if out:
        res = {"machine": machine(), "throughput": tp, "fisher_backends": backends, "seconds": time.perf_counter() - t0,
               "load_before": load}
        atomic_write_text(Path(out), json.dumps(res, indent=1))
        print(f"wrote {out}")
        if not a.smoke and a.out is None:
            atomic_write_text(DOCS, document(res))
            print(f"wrote {DOCS}")
    elif a.smoke:
        print(document({"machine": machine(), "throughput": tp, "fisher_backends": backends,
                        "seconds": time.perf_counter() - t0, "load_before": load}))


if __name__ == "__main__":
    main()
