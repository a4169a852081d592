"""``hap bench`` and ``hap export``: what a pruned run is worth at deployment, and a file to deploy.

Both read a run directory the way ``hap eval`` does (the zoo model rebuilt for the run's data, the plan
replayed, the weights loaded; a head-pruning run through :func:`hap.text.load_run`) and take their inputs
from the plan's recorded example shape, so neither needs the training data beyond its shape and labels.
``hap bench`` writes ``bench.json`` into the run and puts a "Speed" section into its ``report.md``; both
files are written atomically and the run's manifest is updated to their new checksums.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import MANIFEST, UserError, verify_run, write_json

__all__ = ["add_deploy_parsers", "cmd_bench", "cmd_export", "load_run_model", "COMMANDS"]

EXAMPLES = {
    "bench": """example:
  hap bench runs/hap-p70 --baseline runs/dense                 # dense training run (or its best.safetensors)
  hap bench runs/hap-p70 --baseline runs/l1-p50 --threads 4 --batch-sizes 1 32
  hap bench runs/hap-p70 --baseline runs/dense --fold-bn --channels-last   # as deployed for inference""",
    "export": """example:
  hap export runs/hap-p70 --format onnx                        # runs/hap-p70/model.onnx
  hap export runs/hap-p70 --format torch.export --out deploy/hap-p70.pt2""",
}
SPEED_HEADER = "## Speed"


def add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and ``export`` (their defaults come from :func:`hap.bench.bench`)."""
    from ..export import FORMATS

    fmt = argparse.RawDescriptionHelpFormatter
    b = sub.add_parser("bench", help="CPU latency, throughput and peak memory of a run (vs a dense baseline)",
                       epilog=EXAMPLES["bench"], formatter_class=fmt)
    b.add_argument("run", help="a directory written by 'hap prune' / 'hap heads'")
    b.add_argument("--baseline", default=None,
                   help="dense model to time in alternation: a 'hap train' run, its .safetensors, or another run")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads for the timing (default: 1)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64],
                   help="latency batch first, throughput batch last (default: 1 64)")
    b.add_argument("--repeats", type=int, default=None, help="timed rounds per model and batch size")
    b.add_argument("--channels-last", action="store_true",
                   help="time both models in torch.channels_last (NHWC) memory format")
    b.add_argument("--fold-bn", action="store_true",
                   help="time both models with BatchNorm folded into the preceding conv/linear (hap.fold_batchnorm)")
    e = sub.add_parser("export", help="write a run's model as ONNX or a torch.export program, checked",
                       epilog=EXAMPLES["export"], formatter_class=fmt)
    e.add_argument("run", help="a directory written by 'hap prune' / 'hap heads'")
    e.add_argument("--format", required=True, choices=list(FORMATS))
    e.add_argument("--out", default=None, help="output file (default: RUN/model.onnx or RUN/model.pt2)")
    e.add_argument("--no-check", action="store_true", help="skip running the file against PyTorch")


def _example_inputs(plan: Any) -> Any:
    """The plan's batch-1 example; an attention mask of ones (the recorded spec rebuilds integers as zeros,
    and an all-padding mask is not an input anyone deploys for)."""
    import torch

    x = plan.example_inputs()
    if isinstance(x, dict) and "attention_mask" in x:
        x = {**x, "attention_mask": torch.ones_like(x["attention_mask"])}
    return x


def _vision_base(cfg: dict[str, Any]):
    """A fresh zoo model of the run's architecture, sized for its data (classes and input channels)."""
    import hap.data
    import hap.models

    opts = cfg.get("data_options") or {}
    root = opts.get("data_root", cfg.get("data_root"))
    try:
        data = hap.data.load(cfg.get("data", "fashion-mnist"), root=root, seed=cfg.get("seed", 0))
        return hap.models.create(cfg["model"], num_classes=data.num_classes, in_channels=data.in_channels)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(f"cannot rebuild the run's model: {e}") from e


def load_run_model(path: str | Path) -> tuple[Any, Any, str]:
    """``(model in eval mode, batch-1 example inputs or None, kind)`` of a run directory or checkpoint.

    ``kind`` is ``"pruned"`` (a 'hap prune'/'hap heads' run), ``"dense"`` (a 'hap train' run directory
    or its ``best.safetensors``; example ``None``: use the pruned run's).

    Raises:
        UserError: Not something hap wrote, or its files are missing.
    """
    from ..io import load
    from ..planning import PruningPlan

    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        run, ck = p.parent, p
    elif p.is_dir() and not (p / "plan.json").is_file() and (p / "best.safetensors").is_file():
        run, ck = p, p / "best.safetensors"
    elif p.is_dir() and (p / "plan.json").is_file():
        verify_run(p, ["plan.json", "model.safetensors", "config.json"])
        plan = PruningPlan.load(p / "plan.json")
        if (p / "base" / "config.json").is_file():
            from ..text.run import load_run

            model = load_run(p)[0]
        else:
            if not (p / "config.json").is_file():
                raise UserError(f"'{p}' has a plan.json but no config.json: give a directory written by 'hap prune'")
            model = load(p, _vision_base(json.loads((p / "config.json").read_text())))
        return model.eval(), _example_inputs(plan), "pruned"
    else:
        raise UserError(f"'{p}' is neither a run directory (plan.json, or a 'hap train' run) nor a .safetensors "
                        "checkpoint")
    from ..train import load_weights

    if not (run / "config.json").is_file():
        raise UserError(f"no config.json beside '{ck}': cannot tell its architecture (give the 'hap train' run)")
    model = _vision_base(json.loads((run / "config.json").read_text()))
    load_weights(model, str(ck))
    return model.eval(), None, "dense"


def _with_speed_section(report: str, section: str) -> str:
    """``report`` with its "Speed" section replaced (up to the next ``## `` heading) or appended."""
    lines = report.splitlines()
    if SPEED_HEADER in lines:
        i = lines.index(SPEED_HEADER)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        lines = lines[:i] + section.rstrip("\n").splitlines() + [""] + lines[j:]
        return "\n".join(lines).rstrip("\n") + "\n"
    return report.rstrip("\n") + ("\n\n" if report.strip() else "") + section.rstrip("\n") + "\n"


def _update_manifest(run: Path, names: list[str]) -> None:
    """Record the new checksums of ``names`` in a committed run's manifest (a stale checksum reads as a
    corrupted file); an uncommitted run has no manifest to update."""
    from ..train.checkpoint import sha256_file

    mf = run / MANIFEST
    if not mf.is_file():
        return
    m = json.loads(mf.read_text())
    m.setdefault("files", {}).update({n: sha256_file(run / n) for n in names if (run / n).is_file()})
    write_json(mf, m)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time the run's model (and the baseline, alternating); write bench.json and the report's Speed."""
    from .._utils import atomic_write_text
    from ..bench import bench

    run = Path(args.run)
    if not (run / "plan.json").is_file():
        raise UserError(f"'{run}' holds no plan.json: give a directory written by 'hap prune' or 'hap heads'")
    if args.threads is None or args.threads < 1 or min(args.batch_sizes) < 1:
        raise UserError("--threads and --batch-sizes must be 1 or more")
    model, x, _ = load_run_model(run)
    base = None
    if args.baseline:
        base, _, _ = load_run_model(args.baseline)
    kw: dict[str, Any] = {"repeats": args.repeats} if args.repeats else {}
    kw |= {"channels_last": bool(getattr(args, "channels_last", False)),
           "fold_bn": bool(getattr(args, "fold_bn", False))}
    try:
        res = bench(model, x, baseline=base, batch_sizes=tuple(args.batch_sizes), threads=args.threads, **kw)
    except ValueError as e:  # --fold-bn on a model torch.fx cannot trace
        raise UserError(str(e).splitlines()[0]) from e
    except RuntimeError as e:  # e.g. a baseline whose input shape differs from the run's
        raise UserError(f"benchmark failed: {str(e).splitlines()[0]} (is --baseline the same task?)") from e
    d = res.to_dict() | {"run": str(run), "baseline_path": args.baseline}
    write_json(run / "bench.json", d)
    report = run / "report.md"
    old = report.read_text() if report.is_file() else ""
    atomic_write_text(report, _with_speed_section(old, res.markdown()))
    _update_manifest(run, ["bench.json", "report.md"])
    for b in res.batch_sizes:
        line = f"batch {b}: {res.pruned[b].median_ms:.2f} ms (IQR {res.pruned[b].iqr_ms:.2f})"
        if res.baseline:
            line += f", dense {res.baseline[b].median_ms:.2f} ms: {res.speedup[b]:.2f}x"
        print(line)
    print(f"{res.threads} thread(s); peak forward memory "
          + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in res.peak_bytes.items()))
    print(f"written: {run / 'bench.json'}, {report}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export the run's model (dynamic batch), checked against PyTorch at batch 1 and 3."""
    from ..export import export

    run = Path(args.run)
    if not (run / "plan.json").is_file():
        raise UserError(f"'{run}' holds no plan.json: give a directory written by 'hap prune' or 'hap heads'")
    out = Path(args.out) if args.out else run / ("model.onnx" if args.format == "onnx" else "model.pt2")
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory: give a file name")
    model, x, _ = load_run_model(run)
    export(model, x, out, format=args.format, check=not args.no_check)
    print(f"written: {out}" + ("" if args.no_check else " (outputs match PyTorch at batch 1 and 3)"))
    return 0


COMMANDS = {"bench": cmd_bench, "export": cmd_export}
