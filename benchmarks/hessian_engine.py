"""Engine benchmark: cost of one Hutchinson sample and ranking stability per second, side by side.

Measured in one run on ResNet-20 / Fashion-MNIST (batch 128, model in eval mode):

(a) our engine: one Rademacher vector over ALL unit parameters, one HVP, every unit reduced from it;
(b) a per-layer loop: one HVP per layer per sample (what calling a per-layer trace estimator such as
    PyHessian's once per layer does), on the same first-order graph;
(c) a plain gradient (forward + backward), the unit of cost.

Then, for each estimator variant, the split-half rank stability of the unit *scores* reached after a
fixed wall-time budget, so variants are compared per second of compute, not per sample. Peak memory
of each variant is the peak RSS of a fresh subprocess running only that variant.

Run: ``python benchmarks/hessian_engine.py`` (trains/caches the dense model first if needed; use
``--epochs`` to pick which cached model, ``--budget`` for the seconds per variant). ``--cost-only`` measures
just the cost table ((c) gradient, (a) Hutchinson sample, Fisher per example, timed in alternation in one
process, wall and CPU time) in a minute or two and writes it to ``--out`` (default
``benchmarks/out/hessian_engine_cost.json``, and then its table into a marked block at the end of
docs/engine.md, which the full run keeps).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hap  # noqa: E402
import hap.data  # noqa: E402
import hap.models  # noqa: E402
from _common import OUT, dense_resnet, machine, replace_marked_block  # noqa: E402
from hap.estimate.fisher import FisherSampler  # noqa: E402
from hap.estimate.hutchinson import _HVP, _probes, _rademacher, estimate_traces  # noqa: E402
from hap.estimate.reduce import UnitReducer  # noqa: E402
from hap.estimate.stats import SampleStats, spearman  # noqa: E402
from hap.train import load_weights  # noqa: E402

VARIANTS = {
    "global (1 vector/product)": dict(probe="global", vectors_per_product=1),
    "global, 4 vectors/product (batched)": dict(probe="global", vectors_per_product=4),
    "partitioned, 4 partitions": dict(probe="partitioned", partitions=4),
    "partitioned, 16 partitions": dict(probe="partitioned", partitions=16),
    "fisher (per-example, sampled labels)": dict(curvature="fisher"),
    "global, functorch backend": dict(probe="global", backend="functorch"),
}


def _setup(epochs: int, n_batches: int, batch: int = 128, checkpoint: str | None = None):
    if checkpoint is not None:  # any ResNet-20 weights, e.g. a run still training (for a quick look)
        data = hap.data.load("fashion-mnist", seed=0)
        model = hap.models.create("resnet20", num_classes=10, in_channels=1)
        load_weights(model, checkpoint)
        summary = {"best_val_acc": float("nan"), "checkpoint": checkpoint}
    else:
        model, data, summary = dense_resnet("resnet20", epochs=epochs, progress=False)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i, b in enumerate(data.loader("train", batch, shuffle=True, generator=gen)):
        if i >= n_batches:
            break
        batches.append(b)
    units = hap.flatten_units(hap.channel_groups(model, batches[0][0]))
    return model, data, summary, batches, units


def _time(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def _probe_setup(model, batches, units):
    """What both cost tables time on: the units' parameters, their shapes and reducer, the first batch, a
    seeded generator."""
    named = dict(model.named_parameters())
    names = sorted({s.param for u in units for s in u.slices})
    params = {n: named[n] for n in names}
    shapes = {n: p.shape for n, p in params.items()}
    return names, params, shapes, UnitReducer(units, shapes), batches[0], torch.Generator().manual_seed(0)


def cost_per_sample(model, batches, units, repeats: int, per_batch: int, layer_samples: int = 2) -> dict[str, float]:
    names, params, shapes, reducer, (x, y), gen = _probe_setup(model, batches, units)
    model.eval()

    def grad_only():
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, list(params.values()))

    def engine(backend: str, k: int = 1):
        def run():
            hvp = _HVP(model, F.cross_entropy, params, (x, y), 0, backend)
            for _ in range(per_batch // k):
                v = _probes(shapes, k, gen, torch.float32, x.device)  # as estimate_traces draws them
                if k == 1:
                    v = {n: t[0] for n, t in v.items()}
                    hv = hvp(v, batched=False)
                    reducer({n: v[n] * hv[n] for n in names})
                else:
                    hv = hvp(v, batched=True)
                    reducer({n: v[n] * hv[n] for n in names}, batched=True)

        return run

    layers: dict[str, list[str]] = {}
    for n in names:
        layers.setdefault(n.rsplit(".", 1)[0], []).append(n)

    def per_layer(full: bool):
        """One HVP per layer per sample on the same first-order graph. ``full``: as PyHessian's
        ``hessian_vector_product`` does, differentiate w.r.t. all parameters with the vector zero outside
        the layer; otherwise only w.r.t. the layer's own parameters (a cheaper variant PyHessian lacks)."""

        def run():
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            gmap = dict(zip(names, grads, strict=True))
            for _ in range(layer_samples):
                for lnames in layers.values():
                    if full:
                        v = {n: torch.zeros(shapes[n]) for n in names}
                        for n in lnames:
                            v[n] = _rademacher(shapes[n], gen, torch.float32)
                        hv = torch.autograd.grad(grads, list(params.values()), grad_outputs=[v[n] for n in names],
                                                 retain_graph=True)
                        hv = dict(zip(names, hv, strict=True))
                        reducer({n: v[n] * hv[n] for n in lnames})
                    else:
                        v = [_rademacher(shapes[n], gen, torch.float32) for n in lnames]
                        hv = torch.autograd.grad([gmap[n] for n in lnames], [params[n] for n in lnames],
                                                 grad_outputs=v, retain_graph=True)
                        reducer({n: vi * h for n, vi, h in zip(lnames, v, hv, strict=True)})

        return run

    t_grad = _time(grad_only, repeats)
    t_a = _time(engine("double_backward"), repeats) / per_batch
    t_a4 = _time(engine("double_backward", k=4), repeats) / per_batch
    t_a_f = _time(engine("functorch"), max(1, repeats // 2)) / per_batch
    t_b = _time(per_layer(full=True), 1, warmup=False) / layer_samples  # 86 HVPs: already warm
    t_b_own = _time(per_layer(full=False), 1, warmup=False) / layer_samples
    return {"grad_s": t_grad, "engine_s": t_a, "engine_batched4_s": t_a4, "engine_functorch_s": t_a_f,
            "per_layer_s": t_b, "per_layer_own_params_s": t_b_own,
            "layers": len(layers), "units": len(units), "params_in_units": sum(p.numel() for p in params.values())}


def cost_table(model, batches, units, repeats: int, per_batch: int = 8) -> dict:
    """Cost of (c) one gradient, (a) one Hutchinson sample and the Fisher per example, timed in alternation.

    Each repeat runs the three once, one after the other, so that a load that comes and goes (other jobs
    on the machine) falls on all of them alike; the ratios are the medians of the per-repeat ratios. Wall
    time and this process's CPU time are both recorded: with one torch thread the CPU time is the
    compute itself, which other processes inflate less than the wall clock (they still share caches and
    memory bandwidth). (a) is one visit of a batch as the engine runs it (the first-order graph, then
    ``per_batch`` probe vectors: draw, product, reduction into units, recording), divided by
    ``per_batch``; the Fisher is the engine's sampler (sampled labels, per-example rows of every unit)
    on the same batch of ``B`` examples, divided by ``B``, and compared with the gradient per example
    (the batch gradient divided by ``B``).
    """
    names, params, shapes, reducer, (x, y), gen = _probe_setup(model, batches, units)
    stats = SampleStats(len(units))  # rebuilt every round: each summarises one visit's rows
    sampler = FisherSampler(model, F.cross_entropy, params, reducer)
    model.eval()

    def grad_only():
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, list(params.values()))

    def sample():  # the loop of estimate_traces for one visit (global probe, one vector per product)
        hvp = _HVP(model, F.cross_entropy, params, (x, y), 0, "double_backward")
        for _ in range(per_batch):
            v = {n: t[0] for n, t in _probes(shapes, 1, gen, torch.float32, x.device).items()}
            hv = hvp(v, batched=False)
            for row in reducer({n: v[n] * hv[n] for n in names}).numpy()[None]:
                stats.add(row)
        stats.summary(None)  # the stopping rule's check after each visit

    def fisher():
        for row in sampler((x, y), 0, gen, len(y)):
            stats.add(row)
        stats.summary(None)

    jobs = {"grad": (grad_only, 1), "sample": (sample, per_batch), "fisher": (fisher, len(y))}
    wall: dict[str, list[float]] = {k: [] for k in jobs}
    cpu: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(repeats + 1):  # the first round warms up and is dropped
        for k, (fn, per) in jobs.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            if r:
                wall[k].append((time.perf_counter() - t) / per)
                cpu[k].append((time.process_time() - c) / per)
        stats = SampleStats(len(units))
    n = len(y)
    out: dict = {"repeats": repeats, "per_batch": per_batch, "examples": n, "fisher_backend": sampler.backend,
                 "units": len(units), "load_before": os.getloadavg()[0]}
    for clock, ts in (("wall", wall), ("cpu", cpu)):
        g, a, f = (np.array(ts[k]) for k in ("grad", "sample", "fisher"))
        out[clock] = {"grad_ms": 1e3 * float(np.median(g)), "sample_ms": 1e3 * float(np.median(a)),
                      "fisher_per_example_ms": 1e3 * float(np.median(f)),
                      "sample_over_grad": float(np.median(a / g)),
                      "fisher_over_grad_per_example": float(np.median(f / (g / n)))}
    return out


DOCS_ENGINE = Path(__file__).resolve().parent.parent / "docs" / "engine.md"


def _cost_only(a, model, units, batches) -> None:
    load = os.getloadavg()[0]
    c = cost_table(model, batches, units, a.repeats)
    c.update(machine=machine(), load_avg_1min_before=load, load_avg_1min_after=os.getloadavg()[0],
             command=f"python benchmarks/hessian_engine.py {' '.join(sys.argv[1:])}")
    del c["load_before"]
    w, p = c["wall"], c["cpu"]
    table = "\n".join([
        "## Cost per sample, timed in alternation (`--cost-only`)", "",
        f"Command: `python benchmarks/hessian_engine.py --cost-only{' --repeats ' + str(a.repeats)}`. ResNet-20, "
        f"batch {c['examples']}, {c['per_batch']} vectors per visit, the three jobs run one after the other in each "
        f"of {c['repeats']} repeats, ratios = medians of the per-repeat ratios ({machine()}; 1-min load average "
        f"{load:.2f} before, {c['load_avg_1min_after']:.2f} after). This supersedes the cost table above, whose "
        "gradient and sample were timed at different moments.", "",
        "| estimator | wall ms | CPU ms | ratio (wall) | ratio (CPU) |",
        "|---|---:|---:|---:|---:|",
        f"| (c) plain gradient (forward + backward) | {w['grad_ms']:.1f} | {p['grad_ms']:.1f} | 1.00 x (c) | "
        "1.00 x (c) |",
        f"| (a) one Hutchinson sample (double backward) | {w['sample_ms']:.1f} | {p['sample_ms']:.1f} | "
        f"{w['sample_over_grad']:.2f} x (c) | {p['sample_over_grad']:.2f} x (c) |",
        f"| Fisher ({c['fisher_backend']}), per example | {w['fisher_per_example_ms']:.2f} | "
        f"{p['fisher_per_example_ms']:.2f} | {w['fisher_over_grad_per_example']:.2f} x (c)/B | "
        f"{p['fisher_over_grad_per_example']:.2f} x (c)/B |"])
    print(table)
    out = Path(a.out) if a.out else OUT / "hessian_engine_cost.json"
    hap._utils.atomic_write_text(out, json.dumps(c, indent=1) + "\n")
    print(f"written: {out}")
    if not a.out:  # the default run is the documented one
        replace_marked_block(DOCS_ENGINE, table, "<!-- engine-cost -->")
        print(f"written: {DOCS_ENGINE}")


def stability(model, batches, units, variant: dict, budget: float, seed: int) -> dict:
    named = dict(model.named_parameters())
    shapes = {s.param: named[s.param].shape for u in units for s in u.slices}
    red = UnitReducer(units, shapes)
    weight = (red({n: named[n].detach() ** 2 for n in shapes}) / red.counts()).numpy()
    est = estimate_traces(model, F.cross_entropy, batches, units, max_samples=10**6, min_samples=8,
                          stability=None, tol=0.0, samples_per_batch=8, max_batches=len(batches),
                          score_weight=weight, seed=seed, progress=False, max_seconds=budget, **variant)
    hist = est.history
    at = {}
    for frac in (0.25, 0.5, 1.0):
        t = budget * frac
        rows = [h for h in hist if h[1] <= t * 1.05]
        at[f"{t:.0f}s"] = rows[-1][2] if rows else float("nan")
    neg = float(np.mean(est.trace < 0))
    return {"samples": est.samples, "seconds": est.wall_time_s, "split_half": est.split_half,
            "split_half_at": at, "negative_fraction": neg, "median_rel_se": est.median_rel_se,
            "trace": est.trace.tolist(), "count": est.samples_per_unit.tolist(), "weight": weight.tolist()}


class _RssSampler:
    """Peak resident memory above the level at entry, sampled every 5 ms from /proc (ru_maxrss cannot
    separate the estimate's peak from the data loading that came before it)."""

    def __enter__(self):
        import threading

        self.base_mb = self.peak_mb = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def peak_memory(variant: str, epochs: int, checkpoint: str | None) -> float:
    extra = (["--checkpoint", checkpoint] if checkpoint else []) + ["--threads", str(torch.get_num_threads())]
    out = subprocess.run([sys.executable, __file__, "--epochs", str(epochs), "--only-memory", variant, *extra],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15, help="which cached dense ResNet-20 (trained if missing)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of estimation per variant")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings beside other jobs)")
    ap.add_argument("--checkpoint", default=None, help="use these ResNet-20 weights instead of the cached model")
    ap.add_argument("--only-memory", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cost-only", action="store_true",
                    help="measure only the cost table (gradient, Hutchinson sample, Fisher) and write it to --out")
    ap.add_argument("--out", default=None,
                    help="where --cost-only writes its JSON (default benchmarks/out/hessian_engine_cost.json)")
    a = ap.parse_args()
    if a.out and not a.cost_only:
        ap.error("--out applies to --cost-only; the full run writes docs/engine.md and benchmarks/out/")
    torch.set_num_threads(a.threads)
    model, data, summary, batches, units = _setup(a.epochs, 1 if a.cost_only else a.batches, checkpoint=a.checkpoint)
    if a.cost_only:
        _cost_only(a, model, units, batches)
        return
    if a.only_memory is not None:
        with _RssSampler() as rss:
            stability(model, batches, units, VARIANTS[a.only_memory], budget=10.0, seed=0)
        print(rss.peak_mb - rss.base_mb)
        return
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    what = a.checkpoint or f"{a.epochs} epochs"
    say("# Hessian engine benchmark")
    say()
    say(f"Command: `python benchmarks/hessian_engine.py {' '.join(sys.argv[1:])}`. Machine: {machine()}.")
    say(f"Model: ResNet-20 on Fashion-MNIST ({what}, val top-1 {summary['best_val_acc']:.4f}), {len(units)} "
        f"channel units, batches of 128 training images, model in eval mode.")
    say()
    c = cost_per_sample(model, batches, units, a.repeats, per_batch=8)
    g = c["grad_s"]
    say("## Cost of one Hutchinson sample")
    say()
    say("8 probe vectors per visit of a batch (the first-order graph is built once per visit and counted); "
        f"median of {a.repeats} repeats (the per-layer loops: one timed run of 2 samples).")
    say()
    say("| estimator | ms per sample | ratio |")
    say("|---|---:|---:|")
    say(f"| (c) plain gradient (forward + backward) | {g * 1e3:.1f} | 1.00 x (c) |")
    say(f"| (a) ours: one vector over all units, one HVP (double backward) | {c['engine_s'] * 1e3:.1f} | "
        f"{c['engine_s'] / g:.2f} x (c) |")
    say(f"| (a4) ours, 4 vectors per vectorised product | {c['engine_batched4_s'] * 1e3:.1f} | "
        f"{c['engine_batched4_s'] / g:.2f} x (c) |")
    say(f"| (a') ours, functorch `jvp(grad)` backend | {c['engine_functorch_s'] * 1e3:.1f} | "
        f"{c['engine_functorch_s'] / g:.2f} x (c) |")
    say(f"| (b) per-layer loop, PyHessian-style ({c['layers']} layers: full HVP, vector zero outside the layer) | "
        f"{c['per_layer_s'] * 1e3:.1f} | (b)/(a) = {c['per_layer_s'] / c['engine_s']:.1f} |")
    say(f"| (b') per-layer loop, HVP w.r.t. the layer's own parameters only | {c['per_layer_own_params_s'] * 1e3:.1f} "
        f"| (b')/(a) = {c['per_layer_own_params_s'] / c['engine_s']:.1f} |")
    say()
    say(f"## Ranking stability per second ({a.budget:.0f} s of estimation per variant, {a.seeds} seeds)")
    say()
    say("Split-half rank correlation (Spearman) of the unit scores `Tr/n * ||w||^2`, from the even vs the odd "
        "samples, after 25%, 50% and 100% of the budget (mean ± std over seeds). 'agreement' is the Spearman "
        "correlation of the variant's final scores with the scores from the pooled samples of all *other* "
        "Hessian variants (leave-one-out), i.e. whether it ranks like the Hessian does. '+MB' is the peak "
        "resident memory above the level before estimation, in a fresh process.")
    say()
    fr = [f"{a.budget * f:.0f} s" for f in (0.25, 0.5, 1.0)]
    say(f"| variant | samples | split-half @{fr[0]} | @{fr[1]} | @{fr[2]} | agreement | negative traces | +MB |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for name, v in VARIANTS.items():
        runs = [stability(model, batches, units, v, a.budget, seed=s) for s in range(a.seeds)]
        rows[name] = {"runs": runs, "peak_rss_mb": peak_memory(name, a.epochs, a.checkpoint)}
    weight = np.array(rows[next(iter(rows))]["runs"][0]["weight"])
    hess = [n for n in rows if "fisher" not in n]
    for name, row in rows.items():
        runs = row["runs"]
        others = [r for n in hess if n != name for r in rows[n]["runs"]]
        num = sum(np.nan_to_num(np.array(r["trace"])) * np.array(r["count"]) for r in others)
        den = sum(np.array(r["count"]) for r in others)
        ref = num / np.maximum(den, 1) * weight
        agree = [spearman(np.array(r["trace"]) * weight, ref) for r in runs]
        ats = np.array([[r["split_half_at"][k] for k in r["split_half_at"]] for r in runs])
        mean, sd = np.nanmean(ats, 0), np.nanstd(ats, 0)
        row["agreement"] = agree
        say(f"| {name} | {np.mean([r['samples'] for r in runs]):.0f} | "
            + " | ".join(f"{m:.3f} ± {s_:.3f}" for m, s_ in zip(mean, sd, strict=True))
            + f" | {np.mean(agree):.3f} | {100 * np.mean([r['negative_fraction'] for r in runs]):.0f}% | "
            f"{row['peak_rss_mb']:.0f} |")
    say()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "hessian_engine.json").write_text(json.dumps({"machine": machine(), "cost": c, "stability": rows,
                                                          "budget_s": a.budget}, indent=1, default=float))
    doc = DOCS_ENGINE
    old = doc.read_text() if doc.is_file() else ""
    kept = old[old.index("<!-- engine-cost -->"):] if "<!-- engine-cost -->" in old else ""  # --cost-only's block
    hap._utils.atomic_write_text(doc, "\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
    print(f"written: {doc} and {OUT / 'hessian_engine.json'}")


if __name__ == "__main__":
    main()
