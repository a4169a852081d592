"""Readable results: ``report.md`` with a table and PNG plots, from the files a run directory holds.

A report is built only from saved files (``metrics.json``, ``plan.json``, ``sensitivity.json``), never
from objects in memory, so ``hap report DIR`` reproduces it later and for runs made on other machines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._utils import atomic_write_text

__all__ = ["plot_sensitivity", "plot_widths", "plot_accuracy_vs_params", "write_run_report", "write_comparison",
           "write_heads_report", "write_lm_report", "run_label", "check_same_test_set", "metric_of",
           "latency_batch_label"]


def metric_of(m: dict[str, Any]) -> str:
    """``"ppl"`` for a causal-LM run (its metrics are perplexities, ``*_ppl*``: lower is better), else ``"acc"``.

    :func:`hap.pipeline.run` names every metric by the task's (``dense_test_ppl``, ``test_ppl_oneshot``, ...
    where a classifier has ``*_acc*``), so the keys themselves say which a run holds.
    """
    return "ppl" if "dense_test_ppl" in m or "test_ppl" in m else "acc"


def latency_batch_label(m: dict[str, Any]) -> str | None:
    """The batch a run's CPU latency was timed at, as its tables print it: ``"64"`` (images) or ``"8x64"``
    (texts x tokens); ``None`` when the run records none.

    ``RunConfig.latency_batch`` sets it (8 for the text families, 64 for a CNN), so a label written from a
    constant would misname every run that changed it; the metrics record what was measured
    (``latency_batch``), and an older run without that key the config it ran with.
    """
    batch = m.get("latency_batch")
    if batch is None:
        batch = m.get("config", {}).get("latency_batch")
    if batch is None:
        return None
    return "x".join(map(str, batch)) if isinstance(batch, list | tuple) else str(batch)


def _ppl(x: Any) -> str:
    return "-" if x is None else f"{float(x):.3f}"


def _figure(figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """A figure drawn by the Agg canvas of its own: files only, matplotlib's global backend untouched."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _short(name: str) -> str:
    return name.replace("layer", "L").replace(".conv", ".c").replace("downsample", "ds")


def plot_sensitivity(sens: dict[str, Any], path: Path) -> Path:
    """Mean score per channel group (with min/max whiskers): where the network is sensitive."""
    groups: dict[str, list[float]] = {}
    for u in sens["units"]:
        groups.setdefault(u["group"], []).append(u["score"])
    names = list(groups)
    means = np.array([np.mean(groups[n]) for n in names])
    lo = means - np.array([np.min(groups[n]) for n in names])
    hi = np.array([np.max(groups[n]) for n in names]) - means
    fig, ax = _figure((max(6, 0.35 * len(names)), 4))
    ax.bar(range(len(names)), means, yerr=[lo, hi], color="tab:blue", alpha=0.8, capsize=2)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=70, fontsize=7)
    ax.set_ylabel(f"{sens['method']} score per channel")
    ax.set_title(f"sensitivity per group ({sens['method']}): mean, min..max")
    ax.set_yscale("symlog", linthresh=max(1e-6, float(np.percentile(np.abs(means) + 1e-12, 20))))
    fig.tight_layout()
    return _save(fig, path)


def plot_widths(plan: dict[str, Any], path: Path) -> Path:
    """Per-group channels kept / implanted / removed."""
    gs = [g for g in plan["groups"]]
    names = [g["name"] for g in gs]
    kept = np.array([len(g["kept"]) for g in gs])
    imp = np.array([len(g.get("implanted", [])) for g in gs])
    rem = np.array([len(g.get("removed", [])) for g in gs])
    fig, ax = _figure((max(6, 0.35 * len(names)), 4))
    x = np.arange(len(names))
    ax.bar(x, kept, label="kept", color="tab:green")
    ax.bar(x, imp, bottom=kept, label="implanted", color="tab:orange")
    ax.bar(x, rem, bottom=kept + imp, label="removed", color="lightgray")
    ax.set_xticks(x, [_short(n) for n in names], rotation=70, fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title(f"widths after pruning ({plan['method']}, {plan['allocation']}, target {plan['target']})")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_vs_params(rows: Sequence[dict[str, Any]], path: Path, key: str = "test_acc") -> Path:
    """Accuracy (``key`` a ``*_ppl`` metric: perplexity, as it is) against fraction of parameters removed, one
    line per method label (mean and std over seeds)."""
    ppl = key.endswith("_ppl")
    scale = 1 if ppl else 100
    fig, ax = _figure((6.5, 4.5))
    by: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for r in rows:
        if key not in r:
            continue
        by.setdefault(r["label"], {}).setdefault(round(r["params_removed"], 2), []).append(
            (r["params_removed"], r[key]))
    for label, pts in sorted(by.items()):
        xs = sorted(pts)
        x = [np.mean([p[0] for p in pts[k]]) * 100 for k in xs]
        y = [np.mean([p[1] for p in pts[k]]) * scale for k in xs]
        e = [np.std([p[1] for p in pts[k]]) * scale for k in xs]
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel(f"perplexity, {key} (lower is better)" if ppl else f"top-1 (%), {key}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.2f}"


def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """Method, target, allocation, implant of a run's config: a ``RunConfig`` dict or an older flat one."""
    if "sensitivity" in cfg and isinstance(cfg["sensitivity"], dict):
        plan = cfg.get("plan", {})
        return {"method": cfg["sensitivity"].get("method"), "target": cfg.get("target"),
                "allocation": plan.get("allocation"), "implant": plan.get("implant")}
    return {k: cfg.get(k) for k in ("method", "target", "allocation", "implant")}


def run_label(cfg: dict[str, Any]) -> str:
    """``method/allocation[+implant]`` of a run's config."""
    c = _settings(cfg)
    return f"{c['method']}/{c['allocation']}" + (f"+{c['implant']}" if c["implant"] else "")


def _repair_rows(m: dict[str, Any], surgery_label: str, pct: Any, key: str = "acc",
                 repaired: str = "top-1 test") -> list[str]:
    """The task's metric (``key``: ``acc`` or ``ppl``) right after surgery, and after the repair when one ran
    (with its time and memory)."""
    if not m.get("repair"):
        return [f"| {surgery_label} | | {pct(m[f'test_{key}_oneshot'])} |"]
    return [
        f"| {surgery_label} | | {pct(m[f'test_{key}_surgery'])} |",
        f"| {repaired} after repair ({m['repair']}, {m.get('repair_examples')} calibration examples, "
        f"{m['repair_s']:.1f} s, +{m.get('repair_peak_mb', 0):.0f} MB peak) | | {pct(m[f'test_{key}_oneshot'])} |",
    ]


def _test_set(m: dict[str, Any]) -> str:
    """"10000 test images (labels #ab12cd34ef56), 6000 val" ("tokens" of a causal LM: what its perplexity
    averages over) or "test set not recorded" (older runs)."""
    if "test_size" not in m:
        return "test set not recorded (a run of an older hap)"
    what = "tokens" if metric_of(m) == "ppl" else "images"
    return f"{m['test_size']} test {what} (labels #{m['test_labels_sha']}), {m.get('val_size', '?')} validation"


def check_same_test_set(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Refuse runs scored on different test sets; return the runs whose test set is not recorded.

    An accuracy is only comparable with one measured on the same images: a run made with a smaller
    test split (or another dataset) would otherwise sit in the same table without a word.

    Raises:
        ValueError: Two runs record different test-set sizes or label fingerprints.
    """
    known = {(m["test_size"], m["test_labels_sha"]): m["run"] for m in rows if "test_size" in m}
    if len(known) > 1:
        parts = ", ".join(f"{run}: {n} images #{sha}" for (n, sha), run in known.items())
        raise ValueError(f"these runs were scored on different test sets ({parts}): compare runs of the same "
                         "data and splits")
    return [m["run"] for m in rows if "test_size" not in m]


def write_run_report(run_dir: str | Path) -> Path:
    """``report.md`` + plots for one ``hap prune`` run directory (a causal LM's: :func:`write_lm_report`)."""
    d = Path(run_dir)
    m = json.loads((d / "metrics.json").read_text())
    if metric_of(m) == "ppl" and (d / "config.json").is_file():
        return write_lm_report(d)
    lines = [f"# hap run: {d.name}", ""]
    lines += ["| | dense | pruned |", "|---|---:|---:|"]
    lines.append(f"| parameters | {m['params_base']:,} | {m['params']:,} ({_pct(m['params_removed'])}% removed) |")
    lines.append(f"| MACs / image | {m['macs_base']:,} | {m['macs']:,} ({_pct(m['macs_removed'])}% removed) |")
    if "dense_test_acc" in m:
        lines.append(f"| top-1 test (%) | {_pct(m['dense_test_acc'])} | {_pct(m['test_acc'])} |")
    lines += _repair_rows(m, "top-1 test right after pruning, BN re-estimated (%)", _pct)
    batch = latency_batch_label(m)
    lines.append(f"| CPU latency, {f'batch {batch}, ' if batch else ''}1 thread (ms) | {m['latency_ms_base']:.1f} | "
                 f"{m['latency_ms']:.1f} ({m['speedup']:.2f}x) |")
    c = _settings(m.get("config", {}))
    lines += ["", f"method `{c['method']}`, target `{c['target']}`, allocation `{c['allocation']}`, "
              f"implant `{c['implant']}`; model selection on the validation split, test reported only; "
              f"{_test_set(m)}.", ""]
    if (d / "sensitivity.json").is_file():
        plot_sensitivity(json.loads((d / "sensitivity.json").read_text()), d / "sensitivity.png")
        lines += ["![per-layer sensitivity](sensitivity.png)", ""]
    if (d / "plan.json").is_file():
        plot_widths(json.loads((d / "plan.json").read_text()), d / "widths.png")
        lines += ["![per-layer widths](widths.png)", ""]
    lines += _speed_section(d)
    return atomic_write_text(d / "report.md", "\n".join(lines) + "\n")


def _speed_section(d: Path) -> list[str]:
    """The "Speed" section from the run's ``bench.json`` (written by ``hap bench``), so that regenerating
    report.md keeps it; a file that does not parse is named in the report rather than silently dropped."""
    p = d / "bench.json"
    if not p.is_file():
        return []
    from .bench import BenchResult

    try:
        return BenchResult.from_dict(json.loads(p.read_text())).markdown().rstrip("\n").splitlines() + [""]
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        return ["## Speed", "", f"bench.json could not be read ({str(e).splitlines()[0]}): rerun 'hap bench'.", ""]


def write_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """One table and an accuracy-vs-parameters plot across several runs."""
    rows = []
    for r in run_dirs:
        p = Path(r) / "metrics.json"
        if not p.is_file():
            raise FileNotFoundError(f"no metrics.json in '{r}': is it a 'hap prune' run directory?")
        m = json.loads(p.read_text())
        m["label"] = run_label(m.get("config", {}))
        m["run"] = Path(r).name
        rows.append(m)
    kinds = {metric_of(m) for m in rows}
    if len(kinds) > 1:
        lm = ", ".join(m["run"] for m in rows if metric_of(m) == "ppl")
        raise ValueError(f"runs {lm} are causal LMs measured by perplexity, the others classifiers measured by "
                         "accuracy: compare runs of the same task")
    k = kinds.pop() if kinds else "acc"
    unknown = check_same_test_set(rows)
    out = Path(out_dir)
    plot_accuracy_vs_params(rows, out / "accuracy_vs_params.png", key=f"test_{k}")
    fmt, name = (_ppl, "perplexity (lower is better)") if k == "ppl" else (_pct, "top-1 %")
    lines = ["# hap comparison", "", f"| run | method | params removed % | MACs removed % | one-shot {name} | "
             f"val {name} | test {name} | val / test n | speed-up |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        lines.append(f"| {m['run']} | {m['label']} | {_pct(m['params_removed'])} | {_pct(m['macs_removed'])} | "
                     f"{fmt(m[f'test_{k}_oneshot'])} | {fmt(m.get(f'val_{k}'))} | {fmt(m[f'test_{k}'])} | "
                     f"{m.get('val_size', '?')} / {m.get('test_size', '?')} | {m['speedup']:.2f}x |")
    same = next((_test_set(m) for m in rows if "test_size" in m), None)
    lines += ["", f"All runs scored on the same test set: {same}." if same else "", ""]
    if unknown:
        lines += [f"**Warning**: runs {', '.join(unknown)} do not record their test set (made by an older hap): "
                  "check by hand that they were scored on the same images.", ""]
    lines += ["![accuracy vs parameters](accuracy_vs_params.png)", ""]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def write_heads_report(directory: str | Path) -> Path:
    """``report.md`` of a head-pruning run from its saved files (and ``heads.png``; a causal LM's:
    :func:`write_lm_report`)."""
    d = Path(directory)
    m = json.loads((d / "metrics.json").read_text())
    if metric_of(m) == "ppl":
        return write_lm_report(d)
    cfg = json.loads((d / "config.json").read_text())
    plan = json.loads((d / "plan.json").read_text())
    sens = json.loads((d / "sensitivity.json").read_text())
    c = _settings(m["config"])
    target = ", ".join(f"{k}={v:g}" for k, v in (c["target"] or {}).items())
    sizes = cfg.get("data_info", {}).get("sizes", {})
    lines = [
        f"# Head pruning: {cfg['model']} on {cfg['data']}",
        "",
        f"Method **{c['method']}**, target {target}, {c['allocation']} allocation; "
        f"labels {', '.join(cfg.get('label_names', []))}; splits " + ", ".join(f"{k} {v}" for k, v in sizes.items())
        + ".",
        "",
        "| | dense | pruned |",
        "|---|---:|---:|",
        f"| attention heads | {m['heads_base']} | {m['heads']} ({100 * m['heads_removed']:.1f}% removed) |"
        if "heads_base" in m else f"| query heads (query slots; all {m['kv_heads']} K/V heads kept) | "
        f"{m['query_heads_base']} | {m['query_heads']} ({100 * m['query_heads_removed']:.1f}% removed) |",
        f"| parameters | {m['params_base']:,} | {m['params']:,} ({100 * m['params_removed']:.1f}% removed) |",
        f"| MACs per example ({m.get('macs_seq_len')} tokens) | {m['macs_base']:,} | {m['macs']:,} "
        f"({100 * m['macs_removed']:.1f}% removed) |",
        f"| test accuracy (dense) | {100 * m['dense_test_acc']:.2f}% | |",
        *_repair_rows(m, "test accuracy, right after pruning (%)", lambda x: f"{100 * float(x):.2f}"),
        f"| test accuracy, after {m['finetune_steps']} fine-tune steps | | {100 * m['test_acc']:.2f}% |",
        f"| CPU latency, 1 thread, batch {'x'.join(map(str, m['latency_batch']))} tokens | "
        f"{m['latency_ms_base']:.1f} ms | {m['latency_ms']:.1f} ms ({m['speedup']:.2f}x) |",
        "",
        "Heads kept per layer: " + ", ".join(
            f"{g['name'].split('.layer.')[-1].split('.')[0] if '.layer.' in g['name'] else g['name']}: "
            f"{len(g['kept'])}/{g['size']}" for g in plan["groups"]) + ".",
        "",
    ]
    return _write_text_report(d, lines, cfg, plan, sens, figure="heads per layer")


def write_lm_report(directory: str | Path) -> Path:
    """``report.md`` of a causal-LM run (``hap prune`` on a decoder LLM) from its saved files, and ``heads.png``.

    Perplexities where a classifier's report has accuracies (lower is better), the attention units (whole
    KV groups under grouped-query attention; a query-slot run: the query heads) and feed-forward neurons
    kept, and whether the run holds
    ``hf/`` (a plain ``transformers`` directory; written only when every layer kept the same widths).
    """
    d = Path(directory)
    m = json.loads((d / "metrics.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    plan = json.loads((d / "plan.json").read_text())
    sens = json.loads((d / "sensitivity.json").read_text())
    c = _settings(m["config"])
    target = ", ".join(f"{k}={v:g}" for k, v in (c["target"] or {}).items())
    info = cfg.get("data_info", {})
    rows = [
        f"| attention units (heads; whole KV groups under GQA) | {m['heads_base']} | {m['heads']} "
        f"({100 * m['heads_removed']:.1f}% removed) |" if "heads_base" in m else None,
        f"| query heads (query slots; all {m['kv_heads']} K/V heads kept) | {m['query_heads_base']} | "
        f"{m['query_heads']} ({100 * m['query_heads_removed']:.1f}% removed) |" if "query_heads_base" in m else None,
        f"| feed-forward neurons | {m['neurons_base']} | {m['neurons']} ({100 * m['neurons_removed']:.1f}% removed) |"
        if "neurons_base" in m else None,
        f"| parameters | {m['params_base']:,} | {m['params']:,} ({100 * m['params_removed']:.1f}% removed) |",
        f"| MACs per sequence ({m.get('macs_seq_len')} tokens) | {m['macs_base']:,} | {m['macs']:,} "
        f"({100 * m['macs_removed']:.1f}% removed) |",
        f"| test perplexity (dense) | {_ppl(m['dense_test_ppl'])} | |",
        *_repair_rows(m, "test perplexity, right after pruning", _ppl, key="ppl", repaired="test perplexity"),
        f"| test perplexity, after {m['finetune_steps']} fine-tune steps | | {_ppl(m['test_ppl'])} |",
        f"| CPU latency, 1 thread, batch {'x'.join(map(str, m['latency_batch']))} tokens | "
        f"{m['latency_ms_base']:.1f} ms | {m['latency_ms']:.1f} ms ({m['speedup']:.2f}x) |",
    ]
    if m.get("hf_dir"):
        hf = (f"`{m['hf_dir']}/`: the pruned model as a plain Hugging Face directory "
              f"(`AutoModelForCausalLM.from_pretrained('{m['hf_dir']}')`, no hap needed), its tokenizer beside it.")
    else:
        hf = f"No `hf/` directory: {m.get('hf_skipped') or 'not written by this run'}."
    lines = [
        f"# Causal LM pruning: {cfg['model']} on {cfg['data']}",
        "",
        f"Method **{c['method']}**, target {target}, {c['allocation']} allocation; next-token loss, perplexity "
        f"(lower is better); {info.get('seq_len', cfg.get('max_length_used'))}-token sequences per split: "
        + ", ".join(f"{k} {v}" for k, v in info.get("sizes", {}).items()) + f"; {_test_set(m)}.",
        "",
        "| | dense | pruned |",
        "|---|---:|---:|",
        *[r for r in rows if r is not None],
        "",
        hf,
        "",
        "Kept per layer: " + ", ".join(f"{g['name']}: {len(g['kept'])}/{g['size']}"
                                       + (" query slots" if g.get("kind") == "query_slot" else "")
                                       for g in plan["groups"]) + ".",
        "",
    ]
    return _write_text_report(d, lines, cfg, plan, sens, figure="units kept per layer")


def _write_text_report(d: Path, lines: list[str], cfg: dict[str, Any], plan: dict[str, Any], sens: dict[str, Any],
                       figure: str) -> Path:
    """``d/report.md`` of a text run (a classifier's or a causal LM's): ``lines`` (its title, settings and
    table), then what both kinds report alike: how the sensitivity was measured, the units kept per layer as
    ``heads.png`` (``figure``: its caption), the command that reruns it and the "Speed" section."""
    lines = [
        *lines,
        f"Sensitivity: {sens['method']}, {sens.get('samples', 0)} samples over {sens.get('batches', 0)} batch(es) "
        f"of the score split, {sens['wall_time_s']:.1f} s"
        + (f", split-half rank stability {sens['split_half']:.3f}" if sens.get("split_half") is not None else "")
        + ".",
        "",
        f"![{figure}](heads.png)",
        "",
        f"Rerun: `{cfg.get('rerun', '')}`",
        "",
    ]
    plot_widths(plan, d / "heads.png")
    lines += _speed_section(d)
    return atomic_write_text(d / "report.md", "\n".join(lines))
