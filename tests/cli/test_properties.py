"""Properties of the command line (hypothesis): whatever the arguments, ``hap`` either resolves them to a
run whose options the library accepts, or exits with code 2 and one line on stderr, never a traceback;
and it gives torch's thread count back, whatever ``--threads`` said.

Nothing here computes: the data loading of ``hap prune`` is replaced by a sentinel that stops the
command once its options have been resolved and checked.
"""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import hap._utils
import hap.cli.prune
from hap.cli import main
from hap.cli.sources import TARGETS

FAST = settings(max_examples=30, deadline=None, database=None,  # small, and no example files in the tree
                suppress_health_check=[HealthCheck.function_scoped_fixture])


class _Resolved(Exception):
    """Raised instead of loading data: the options were accepted."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg


def _stop(cfg, progress):
    raise _Resolved(cfg)


def _run(argv: list[str]):
    """``(exit code, stderr, resolved RunConfig or None)`` of ``hap ARGV``; a traceback fails the test."""
    err = io.StringIO()
    cfg = None
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(hap.cli.prune, "load_source", _stop)
        mp.setattr(hap.cli.prune, "check_run_dir", lambda *a, **k: "empty")  # nothing written
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: its own errors, in hap's one-line format
            rc = e.code
        except _Resolved as r:
            rc, cfg = 0, r.cfg
    return rc, err.getvalue(), cfg


def _one_line_exit_2(rc, err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    assert lines[0].startswith("hap"), lines


def _fraction(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) and 0 < v < 1 else None


kinds = st.sampled_from(["params", "flops", "channels", "heads", "layers", "", "PARAMS"])
values = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-5, 5).map(str),
                   st.floats(0, 1).map(lambda v: f"{v:.3g}"), st.text(max_size=6), st.just("0.5"))
targets = st.one_of(st.builds(lambda k, v: f"{k}={v}", kinds, values), st.text(max_size=12))


@FAST
@given(target=targets, units=st.sampled_from(["channels", "heads", "heads,neurons"]))
def test_any_target_string_resolves_or_is_one_line(target, units, tmp_path):
    rc, err, cfg = _run(["prune", "--units", units, f"--target={target}", "--out", str(tmp_path / "o")])
    kind, _, value = target.partition("=")
    valid = kind.strip() in TARGETS[units] and _fraction(value) is not None
    event(f"valid={valid}")
    if valid:
        assert cfg is not None and cfg.target == {kind.strip(): float(value)} and cfg.problems() == [], err
    else:
        _one_line_exit_2(rc, err)


plausible = st.sampled_from(["1", "2", "4", "8", "0.5", "0.05", "0.2", "0"])  # most runs use values like these
numeric = st.one_of(plausible, plausible, plausible, st.integers(-3, 300).map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=5))
FLAGS = ["--round-to", "--max-layer-ratio", "--implant-fraction", "--tol", "--sens-batches", "--sens-batch-size",
         "--finetune-steps", "--finetune-epochs", "--repair-batches", "--bn-batches", "--max-samples", "--kd",
         "--calibration", "--max-length"]


@FAST
@given(opts=st.dictionaries(st.sampled_from(FLAGS), numeric, min_size=1, max_size=3))
def test_any_numeric_options_resolve_to_a_valid_run_or_one_line(opts, tmp_path):
    argv = ["prune", *[a for flag, v in opts.items() for a in (f"{flag}={v}",)], "--out", str(tmp_path / "o")]
    rc, err, cfg = _run(argv)
    event(f"resolved={cfg is not None}")
    if cfg is not None:
        assert cfg.problems() == [] and rc == 0, (opts, cfg.problems())
        cfg.validate()  # what the CLI accepted, the library accepts: one statement of the rules
    else:
        _one_line_exit_2(rc, err)
        if all(v.lstrip("-").isdigit() or _fraction(v) is not None for v in opts.values()) and "=" not in err:
            assert any(flag in err for flag in opts), err  # a well-typed bad value is named by its flag


@FAST
@given(n=st.one_of(st.none(), st.integers(-2, 6)), before=st.integers(1, 4), default=st.integers(1, 3))
def test_every_command_gives_torchs_thread_count_back(n, before, default, monkeypatch):
    seen = []
    monkeypatch.setattr(hap._utils, "default_threads", lambda limit=None: min(default, limit or default))
    monkeypatch.setattr("hap.cli.vision.COMMANDS", {"models": lambda args: seen.append(torch.get_num_threads()) or 0})
    torch.set_num_threads(before)
    argv = ["models"] if n is None else ["models", f"--threads={n}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    assert torch.get_num_threads() == before
    if n is not None and n < 1:
        _one_line_exit_2(rc, err.getvalue())
        assert not seen
    else:
        assert rc == 0 and seen == [n if n is not None else min(default, before)]
