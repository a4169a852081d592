"""Fisher backends: seconds and peak memory of the hook path (``fisher_backend="hooks"``) vs ``vmap``.

Both compute the same Monte-Carlo Fisher rows (one per example: each unit's squared per-example gradient
under a sampled label); the hook path gets them from layer inputs and output gradients instead of
materialising per-example gradients. Measured on ResNet-20 (channels, 1x28x28 inputs, batch 128) and
MiniLM-L6 (heads + neurons, 128 tokens, batch 16), both at their initial / packaged weights with random
inputs: cost does not depend on what the weights learned. Each (model, backend) runs in a fresh
subprocess so that its peak memory (RSS above the level after setup, sampled every 5 ms; CUDA: peak
allocated) is its own. The rows of the two backends on the same batch are compared too.

Run: ``python benchmarks/fisher_backends.py`` (full; writes benchmarks/out/fisher_backends.json), or
``--smoke`` (tiny models, seconds, nothing written unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hap.models  # noqa: E402
from _common import OUT, machine  # noqa: E402
from hap._hf import eager_attention  # noqa: E402
from hap._utils import atomic_write_text, eval_mode  # noqa: E402
from hap.estimate.fisher import FisherSampler  # noqa: E402
from hap.estimate.reduce import UnitReducer  # noqa: E402
from hap.models.tiny import TinyConvBN  # noqa: E402
from hap.sensitivity import _discover  # noqa: E402
from hessian_engine import _RssSampler  # noqa: E402

BACKENDS = ("vmap", "hooks")


def _setup(case: str, device: str):
    """(model, loss_fn, batch, unit family) for one benchmark case."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if case in ("resnet20", "tiny-convbn"):
        if case == "resnet20":
            model, shape, n = hap.models.create("resnet20", num_classes=10, in_channels=1), (1, 28, 28), 128
        else:
            model = TinyConvBN()
            shape, n = model.input_shape, 8
        x = torch.randn(n, *shape, generator=gen)
        y = torch.randint(0, 10 if case == "resnet20" else 3, (n,), generator=gen)
        return model.to(device), F.cross_entropy, (x.to(device), y.to(device)), "channels"
    import transformers

    if case == "minilm":
        from hap.text.models import resolve_model_dir

        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            resolve_model_dir("minilm"), num_labels=2)
        n, t = 16, 128
    else:  # tiny-bert
        cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_attention_heads=4, num_hidden_layers=2,
                                      intermediate_size=32, max_position_embeddings=32, num_labels=2)
        model = transformers.BertForSequenceClassification(cfg)
        n, t = 8, 16
    ids = torch.randint(0, model.config.vocab_size, (n, t), generator=gen)
    x = {"input_ids": ids.to(device), "attention_mask": torch.ones(n, t, dtype=torch.long, device=device)}
    y = torch.randint(0, 2, (n,), generator=gen).to(device)
    return model.to(device), (lambda o, tg: F.cross_entropy(o.logits, tg)), (x, y), "heads,neurons"


def measure(case: str, backend: str, device: str, repeats: int) -> dict:
    """Seconds per example and peak memory of one backend (run in its own process)."""
    model, loss_fn, batch, family = _setup(case, device)
    example = batch[0]
    units = _discover(family, model.cpu() if device == "cpu" else model, example, ())
    named = dict(model.named_parameters())
    params = {n: named[n] for n in sorted({s.param for u in units for s in u.slices})}
    reducer = UnitReducer(units, {n: p.shape for n, p in params.items()})
    n = len(batch[1])
    with eval_mode(model), eager_attention(model):
        sampler = FisherSampler(model, loss_fn, params, reducer, backend)
        sampler(batch, 0, torch.Generator().manual_seed(0), 2)  # warm-up (allocator, vmap tracing)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        with _RssSampler() as rss:
            for r in range(repeats):
                t0 = time.perf_counter()
                rows = np.array(sampler(batch, 0, torch.Generator().manual_seed(r), n))
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss.peak_mb - rss.base_mb
    return {"case": case, "backend": sampler.backend, "examples": n, "units": len(units),
            "s_per_example": float(np.median(times)) / n, "peak_mb": float(peak), "rows": rows.tolist()}


def _child(case: str, backend: str, device: str, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--only", case, backend, "--device", device, "--repeats", str(repeats),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{case}/{backend} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models only (seconds)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings beside other jobs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON results file (default: benchmarks/out/fisher_backends.json; "
                    "none for --smoke)")
    ap.add_argument("--only", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.only:
        print(json.dumps(measure(a.only[0], a.only[1], a.device, a.repeats)))
        return
    cases = ("tiny-convbn", "tiny-bert") if a.smoke else ("resnet20", "minilm")
    results = []
    for case in cases:
        got = {b: _child(case, b, a.device, 1 if a.smoke else a.repeats, a.threads) for b in BACKENDS}
        ref, lean = np.array(got["vmap"]["rows"]), np.array(got["hooks"]["rows"])
        row = {
            "case": case, "units": got["vmap"]["units"], "examples": got["vmap"]["examples"],
            "hooks_backend": got["hooks"]["backend"],
            "vmap_s_per_example": got["vmap"]["s_per_example"], "hooks_s_per_example": got["hooks"]["s_per_example"],
            "speedup": got["vmap"]["s_per_example"] / got["hooks"]["s_per_example"],
            "vmap_peak_mb": got["vmap"]["peak_mb"], "hooks_peak_mb": got["hooks"]["peak_mb"],
            "memory_ratio": got["vmap"]["peak_mb"] / max(got["hooks"]["peak_mb"], 1e-3),
            "max_rel_diff": float(np.abs(ref - lean).max() / np.abs(ref).max()),
        }
        results.append(row)
        print(f"{case:12s} vmap {row['vmap_s_per_example'] * 1e3:8.2f} ms/ex {row['vmap_peak_mb']:8.1f} MB | "
              f"{row['hooks_backend']} {row['hooks_s_per_example'] * 1e3:8.2f} ms/ex {row['hooks_peak_mb']:8.1f} MB"
              f" | x{row['speedup']:.1f} faster, x{row['memory_ratio']:.1f} less memory, "
              f"rows differ by {row['max_rel_diff']:.1e}")
    out = a.out or (None if a.smoke else str(OUT / "fisher_backends.json"))
    if out:
        atomic_write_text(Path(out), json.dumps({"machine": machine(), "device": a.device, "results": results},
                                                indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
