"""Issue 15: every fault and bad input a user can meet, what they see, and the exit code.

Each case runs the real command (in-process, on a tiny Fashion-MNIST) or the library call, checks what
must hold (nothing lost, nothing half-written, the retry works) and records ``(what the user sees, exit
code)``. ``docs/reliability.md`` is that record: the last test fails when the document is stale;
``HAP_REGEN_DOCS=1 python -m pytest tests/cli/test_reliability.py`` rewrites it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hap.cli import main

from .conftest import write_tiny_fmnist

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


class Ctx:
    """A tiny dataset, one trained run and one pruned run, shared by the cases (copied before changing)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = write_tiny_fmnist(base / "fmnist")
        self.dense = base / "dense"
        rc, _ = self.hap("train", "--epochs", "1", "--out", self.dense)
        assert rc == 0
        self.pruned = base / "pruned"
        rc, _ = self.hap("prune", "--checkpoint", self.dense / "best.safetensors", "--method", "l1",
                         "--target", "params=0.5", "--finetune-epochs", "0", "--sens-batches", "1",
                         "--bn-batches", "1", "--out", self.pruned)
        assert rc == 0

    def fresh(self, name: str, src: Path | None = None) -> Path:
        d = self.base / name  # one name per case: the document does not depend on the order cases ran in
        if src is not None:
            shutil.copytree(src, d)
        return d

    def hap(self, *argv: object, data: bool = True, quiet: bool = True) -> tuple[int, str]:
        """Run ``hap ARGV``; returns the exit code and stderr (paths under the temp dir shown as ``RUN``)."""
        args = [str(a) for a in argv]
        if data:
            args += ["--data-root", str(self.data), "--batch-size", "32"] if args[0] == "train" else \
                ["--data-root", str(self.data)]
        if quiet:
            args.append("--no-progress")
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(args)
        return rc, err.getvalue().replace(str(self.base), "RUN")


def _line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ------------------------------------------------------------------------------------------------ cases
# each: (ctx, monkeypatch) -> (what the user sees, exit code); asserts what must hold besides


def subset_trains_on_fewer_images_only(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    out = c.fresh("subset")
    rc, _ = c.hap("train", "--epochs", "1", "--subset", "50", "--out", out)
    m = json.loads((out / "metrics.json").read_text())
    full = json.loads((c.dense / "metrics.json").read_text())
    assert (m["train_size"], m["val_size"], m["test_size"]) == (50, full["val_size"], full["test_size"])
    assert m["test_labels_sha"] == full["test_labels_sha"]
    return f"metrics.json: train_size 50, val_size {m['val_size']}, test_size {m['test_size']} (full splits)", rc


def report_refuses_different_test_sets(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    other = c.fresh("other", c.pruned)
    m = json.loads((other / "metrics.json").read_text())
    m.update(test_size=2222, test_labels_sha="0123456789ab")
    (other / "metrics.json").write_text(json.dumps(m))
    rc, err = c.hap("report", c.pruned, other, "--out", c.base / "cmp", data=False, quiet=False)
    assert not (c.base / "cmp" / "report.md").exists()
    return _line(err), rc


def kill_inside_a_checkpoint_write(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    from hap.train import checkpoint

    out = c.fresh("kill")
    real, sets = checkpoint.save_file, []

    def save(tensors, path):  # epoch 2's set dies after its first file
        if len(list(Path(path).parent.parent.glob("epoch-*"))) == 1 and Path(path).name == "last_optim.safetensors":
            raise KeyboardInterrupt
        sets.append(path)
        return real(tensors, path)

    mp.setattr(checkpoint, "save_file", save)
    rc, err = c.hap("train", "--epochs", "2", "--out", out)
    mp.undo()
    assert rc == 130 and json.loads((out / "last.json").read_text())["epoch"] == 0
    rc2, _ = c.hap("train", "--epochs", "2", "--out", out, "--resume")
    hist = json.loads((out / "last.json").read_text())["history"]
    assert rc2 == 0 and [h["epoch"] for h in hist] == [0, 1]
    return _line(err) + " → `--resume` trains epoch 2 only (exit 0)", rc


def failed_run_leftovers_block_nothing(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    out = c.fresh("leftover")
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a failed run of an older hap left
    rc, err = c.hap("train", "--epochs", "1", "--out", out)
    assert (out / "manifest.json").is_file()
    return _line(err), rc


def resume_with_nothing_checkpointed(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    out = c.fresh("nothing")
    rc, err = c.hap("train", "--epochs", "1", "--out", out, "--resume")
    return _line(err), rc


def unfinished_run_without_resume(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    out = c.fresh("unfinished", c.dense)
    (out / "manifest.json").unlink()
    (out / "metrics.json").unlink()
    rc, err = c.hap("train", "--epochs", "1", "--out", out)
    return _line(err), rc


def finished_run_without_overwrite(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    rc, err = c.hap("train", "--epochs", "1", "--out", c.dense)
    return _line(err), rc


def foreign_directory(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    out = c.fresh("foreign")
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    rc, err = c.hap("train", "--epochs", "1", "--out", out)
    return _line(err), rc


def failed_overwrite_keeps_the_old_run(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    out = c.fresh("overwrite", c.dense)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    rc, err = c.hap("train", "--epochs", "1", "--lr", "1e30", "--out", out, "--overwrite")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name in before}
    assert after == before  # config.json, metrics.json, best.safetensors, manifest.json: the old run's
    return _line(err) + "; the old run's files are untouched", rc


def options_checked_before_compute(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    import hap.cli.prune

    def boom(*a, **k):
        raise AssertionError("data loaded before the options were checked")

    mp.setattr(hap.cli.prune, "load_source", boom)
    rc, err = c.hap("prune", "--round-to", "0", "--max-layer-ratio", "2", "--out", c.fresh("opts"))
    return _line(err), rc


def implant_fraction_without_implant(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    rc, err = c.hap("prune", "--implant-fraction", "2", "--out", c.fresh("implant"))
    return _line(err), rc


def resume_with_changed_options(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    rc, err = c.hap("train", "--epochs", "1", "--lr", "0.05", "--out", c.fresh("changed", c.dense), "--resume")
    return _line(err), rc


def tampered_checkpoint(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    out = c.fresh("tampered", c.dense)
    w = out / json.loads((out / "last.json").read_text())["dir"] / "last.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"XXXX")
    rc, err = c.hap("train", "--epochs", "1", "--out", out, "--resume")
    return _line(err).split(" (truncated")[0] + " ...", rc



def tampered_plan(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    run = c.fresh("tampered-plan", c.pruned)
    plan = json.loads((run / "plan.json").read_text())
    g = next(g for g in plan["groups"] if g["removed"] and len(g["kept"]) >= len(g["removed"]))
    n = len(g["removed"])  # same counts, other units: still a valid plan, only the manifest can tell
    g["kept"], g["removed"] = sorted(g["kept"][n:] + g["removed"]), sorted(g["kept"][:n])
    (run / "plan.json").write_text(json.dumps(plan))
    rc, err = c.hap("eval", "--run", run, quiet=False)
    return _line(err).split(" (changed")[0] + " ...", rc

def out_under_a_regular_file(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    f = c.base / "a-file"
    f.write_text("x")
    rc, err = c.hap("train", "--epochs", "1", "--out", f / "run")
    return _line(err), rc


def read_only_directory(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    import hap.cli.common

    def ro(*a, dir=None, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))

    mp.setattr(hap.cli.common.tempfile, "mkstemp", ro)
    rc, err = c.hap("train", "--epochs", "1", "--out", c.fresh("ro"))
    return _line(err), rc


def disk_full_while_checkpointing(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    from hap.train import checkpoint

    def full(tensors, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    mp.setattr(checkpoint, "save_file", full)
    out = c.fresh("full")
    rc, err = c.hap("train", "--epochs", "1", "--out", out)
    assert not list(out.rglob(".*tmp"))  # no half-written temp file or directory left behind
    return _line(err).replace(err.split("'")[1], "RUN/full/checkpoints/.epoch-…tmp/last.safetensors"), rc


def debug_shows_the_traceback(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    f = c.base / "b-file"
    f.write_text("x")
    with pytest.raises(OSError):
        main(["--debug", "train", "--data-root", str(c.data), "--out", str(f / "run"), "--no-progress"])
    return "the Python traceback (the same error, unhandled)", 1


def report_on_a_training_run(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    rc, err = c.hap("report", c.dense, data=False, quiet=False)
    return _line(err), rc


def nonfinite_scores(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    import hap.models
    from hap.train import save_weights

    m = hap.models.create("resnet20", num_classes=10, in_channels=1)
    with torch.no_grad():
        m.conv1.weight[0, 0, 0, 0] = float("inf")
    ck = save_weights(m, c.base / "inf.safetensors")
    out = c.base / "inf-sens.json"
    rc, err = c.hap("sensitivity", "--checkpoint", ck, "--method", "l1", "--out", out)
    assert not out.exists()
    return _line(err), rc


def nan_metric_is_null(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    text = (c.pruned / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["sens_split_half"] is None
    return "metrics.json: `\"sens_split_half\": null` (l1 has no split-half), never `NaN`", 0


def finetune_refreshes_the_report(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    run = c.fresh("ft", c.pruned)
    old = json.loads((run / "manifest.json").read_text())["files"]
    rc, _ = c.hap("finetune", "--run", run, "--epochs", "1")
    m = json.loads((run / "metrics.json").read_text())
    assert f"{100 * m['test_acc']:.2f}" in (run / "report.md").read_text()
    new = json.loads((run / "manifest.json").read_text())["files"]
    assert new["model.safetensors"] != old["model.safetensors"] and new["report.md"] != old["report.md"]
    return "report.md shows the new accuracy; manifest.json rewritten", rc


def outputs_world_readable(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in c.pruned.iterdir() if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes
    return "every file 0644 (config, metrics, plan, weights, report, manifest)", 0


def train_zero_epochs(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    out = c.fresh("zero")
    rc, err = c.hap("train", "--epochs", "0", "--out", out)
    assert not out.exists()
    return _line(err), rc


def no_progress_redraws_in_a_log(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    rc, err = c.hap("train", "--epochs", "1", "--out", c.fresh("log"), quiet=False)
    assert "\r" not in err
    return "one line per epoch, no progress-bar redraws (stderr is not a terminal)", rc


def eval_of_a_nan_model(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    import hap.models
    from hap.train import save_weights

    m = hap.models.create("resnet20", num_classes=10, in_channels=1)
    with torch.no_grad():
        m.fc.weight.fill_(float("nan"))
    ck = save_weights(m, c.base / "nan.safetensors")
    rc, err = c.hap("eval", "--checkpoint", ck, quiet=False)
    return _line(err), rc


def threads_zero(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    rc, err = c.hap("eval", "--threads", "0", quiet=False)
    return _line(err), rc


def _library(fn: Callable[[], object]) -> tuple[str, object]:
    from hap.units import UnsupportedLayerError

    try:
        fn()
    except UnsupportedLayerError as e:
        return str(e), "UnsupportedLayerError"
    raise AssertionError("no error")


def groupnorm_units(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    import hap

    from ..units.test_unusual_layers import _gn_model

    groups = hap.channel_groups(_gn_model(), torch.randn(2, 3, 8, 8))
    sizes = {g.name: (g.size, len(g.units[0].slices[0].indices)) for g in groups}
    assert sizes == {"c1": (4, 2), "c2": (3, 2)}
    return ("GroupNorm(4, 8): 4 units of 2 channels; pruned model = masked model exactly "
            "(tests/units/test_unusual_layers.py)"), "returns"


def recurrent_layer(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    import hap

    from ..units.test_unusual_layers import _RNN

    return _library(lambda: hap.channel_groups(_RNN(torch.nn.LSTM), torch.randn(2, 5, 6), exclude=["rnn"]))


def tied_parameters(c: Ctx, mp: pytest.MonkeyPatch) -> tuple[str, object]:
    import hap

    from ..units.test_unusual_layers import _Tied

    return _library(lambda: hap.channel_groups(_Tied(), torch.randn(2, 6)))


CASES: list[tuple[str, str, Callable[[Ctx, pytest.MonkeyPatch], tuple[str, object]]]] = [
    ("1", "`hap train --subset 50`", subset_trains_on_fewer_images_only),
    ("1", "`hap report A B`, A and B scored on different test sets", report_refuses_different_test_sets),
    ("2", "`--threads 0`", threads_zero),
    ("3", "Ctrl-C / kill between two files of epoch 2's checkpoint", kill_inside_a_checkpoint_write),
    ("3", "`--resume` from a checkpoint whose file was altered", tampered_checkpoint),
    ("3", "`hap eval --run` on a run whose plan.json was edited after it finished", tampered_plan),
    ("4", "retry after a failed run (its `config.json` left behind)", failed_run_leftovers_block_nothing),
    ("4", "`--resume` where nothing was checkpointed (killed in epoch 1)", resume_with_nothing_checkpointed),
    ("4", "an unfinished run, without `--resume`", unfinished_run_without_resume),
    ("4", "a finished run, without `--overwrite`", finished_run_without_overwrite),
    ("4", "`--out` holding files hap did not write", foreign_directory),
    ("4", "`--overwrite` that fails (NaN loss)", failed_overwrite_keeps_the_old_run),
    ("4", "`hap prune --round-to 0 --max-layer-ratio 2`", options_checked_before_compute),
    ("4", "`--resume` with another `--lr`", resume_with_changed_options),
    ("5", "`--out` under a regular file", out_under_a_regular_file),
    ("5", "read-only file system", read_only_directory),
    ("5", "disk full while checkpointing", disk_full_while_checkpointing),
    ("5", "`hap --debug ...` on the same error", debug_shows_the_traceback),
    ("6", "`hap report` on a `hap train` directory", report_on_a_training_run),
    ("7", "`nn.GroupNorm` in a channel group", groupnorm_units),
    ("8", "`nn.LSTM` (also with `exclude=['rnn']`)", recurrent_layer),
    ("9", "two layers sharing one weight", tied_parameters),
    ("10", "`hap sensitivity --method l1` on a model with an inf weight", nonfinite_scores),
    ("10", "a metric without a value (split-half of l1)", nan_metric_is_null),
    ("11", "`hap finetune --run`", finetune_refreshes_the_report),
    ("11", "file permissions of a run", outputs_world_readable),
    ("11", "`hap train --epochs 0`", train_zero_epochs),
    ("11", "`--implant-fraction 2` without `--implant`", implant_fraction_without_implant),
    ("11", "progress output into a log file (`make demo > log`)", no_progress_redraws_in_a_log),
    ("11", "`hap eval` of a model with NaN weights", eval_of_a_nan_model),
]
RESULTS: dict[str, tuple[str, object]] = {}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    return Ctx(tmp_path_factory.mktemp("reliability"))


def _result(ctx: Ctx, fn: Callable[[Ctx, pytest.MonkeyPatch], tuple[str, object]]) -> tuple[str, object]:
    if fn.__name__ not in RESULTS:
        with pytest.MonkeyPatch.context() as mp:
            RESULTS[fn.__name__] = fn(ctx, mp)
    return RESULTS[fn.__name__]


EXPECTED_RC = {"subset_trains_on_fewer_images_only": 0, "kill_inside_a_checkpoint_write": 130,
               "failed_run_leftovers_block_nothing": 0, "resume_with_nothing_checkpointed": 0,
               "out_under_a_regular_file": 1, "read_only_directory": 1, "disk_full_while_checkpointing": 1,
               "debug_shows_the_traceback": 1, "nan_metric_is_null": 0, "finetune_refreshes_the_report": 0,
               "outputs_world_readable": 0, "no_progress_redraws_in_a_log": 0, "eval_of_a_nan_model": 0,
               "groupnorm_units": "returns", "recurrent_layer": "UnsupportedLayerError",
               "tied_parameters": "UnsupportedLayerError"}


@pytest.mark.parametrize("fn", [c[2] for c in CASES], ids=[c[2].__name__ for c in CASES])
def test_case(ctx: Ctx, fn: Callable[[Ctx, pytest.MonkeyPatch], tuple[str, object]]) -> None:
    seen, rc = _result(ctx, fn)
    assert rc == EXPECTED_RC.get(fn.__name__, 2), (seen, rc)


def render() -> str:
    rows = []
    for item, case, fn in CASES:
        seen, rc = RESULTS[fn.__name__]
        code = f"`{rc}`" if isinstance(rc, int) else rc
        rows.append(f"| {item} | {case} | {seen.replace('|', '/')} | {code} |")
    return "\n".join([
        "# Reliability: bad input and faults, what the user sees",
        "",
        "Generated by `tests/cli/test_reliability.py` (each row is a case it runs; the test fails when this file",
        "is stale; `HAP_REGEN_DOCS=1 python -m pytest tests/cli/test_reliability.py` rewrites it). Item numbers",
        "are those of issue 15. Exit codes: 0 success, 1 an OS error (the machine, not the input), 2 bad input,",
        "130 interrupted; library rows name the exception. `RUN` stands for the run's temporary directory.",
        "",
        "A run directory is committed by `manifest.json` (the SHA-256 of every output), written last; a",
        "checkpoint is one set of files renamed into place at once, named by `last.json` (with the files'",
        "SHA-256); a directory holding neither is a failed run's leftovers and blocks no retry.",
        "",
        "| item | case | what the user sees | exit |",
        "|---|---|---|---|",
        *rows,
        "",
    ])


def test_reliability_doc_is_current(ctx: Ctx) -> None:
    for _, _, fn in CASES:
        _result(ctx, fn)
    text = render()
    if os.environ.get("HAP_REGEN_DOCS"):
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, (
        "docs/reliability.md is stale: HAP_REGEN_DOCS=1 python -m pytest tests/cli/test_reliability.py")
