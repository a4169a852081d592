"""``hap`` command line: one command, one subcommand per pipeline stage, ``prune`` for every unit family.

Every error a user can cause (bad name, missing file, wrong checkpoint, NaN loss) ends the program with
one line on stderr and exit code 2, never a traceback; an OS error (read-only or full disk, a path under
a regular file) one line naming the path and the fix, exit code 1 (``hap --debug CMD`` shows the
traceback instead). Files are written atomically and a run directory is committed by its manifest, so an
interrupted run leaves the previous outputs intact and a failed one blocks no retry.
``--threads N`` (every command) sets torch's CPU threads for the
command only; without it a command uses :func:`hap._utils.default_threads` (the cores other processes leave
free: torch's own default oversubscribes a shared machine, 15-25x slower with one of two cores busy);
``HF_HUB_OFFLINE=1`` is set for the command only: both are restored when it returns.
Option defaults come from the config dataclasses (:class:`hap.pipeline.RunConfig`, :class:`hap.train.TrainConfig`,
:class:`hap.config.SensitivityConfig`, :class:`hap.config.PlanConfig`), method choices from :mod:`hap.criteria`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import NoReturn

from .common import THREADS_HELP, UserError, offline

__all__ = ["main", "build_parser", "UserError"]


class _Parser(argparse.ArgumentParser):
    """argparse with hap's error format: one line on stderr and exit code 2, as every other bad input
    (argparse prints the whole usage first, which buries the line that says what is wrong)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .deploy import add_deploy_parsers
    from .prune import add_heads_parser, add_prune_parser
    from .vision import add_parsers

    ap = _Parser(prog="hap", description="Hessian-Aware Pruning with Neural Implant")
    ap.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    sub = ap.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    add_prune_parser(sub)
    add_heads_parser(sub)
    add_deploy_parsers(sub)
    for p in sub.choices.values():
        if not any("--threads" in a.option_strings for a in p._actions):
            p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return ap


@contextlib.contextmanager
def _torchrun(args: argparse.Namespace) -> Iterator[None]:
    """Under ``torchrun`` (``WORLD_SIZE > 1``): join the process group (gloo on CPU, NCCL on GPUs), rank 0
    alone prints and writes (:func:`hap.distributed.rank0_outputs`), and the group is left at the end.

    ``--resume`` is rank 0's: it alone holds the run directory, so it alone inspects it (run state,
    ``sensitivity.json``, the checkpoint) and hands every rank what a resume reads (the checkpoint through
    :func:`hap.train.train`, the scores through the command). The other ranks run as a fresh run in their
    scratch directory (``args.resume`` off: nothing of theirs to resume, and no note about it) and never
    write into the real one.
    """
    from .. import distributed as hd

    if not hd.init_from_env():
        yield
        return
    try:
        with hd.rank0_outputs(getattr(args, "out", None)) as out:
            if getattr(args, "out", None) is not None:
                args.out = out
            if not hd.is_main():
                if hasattr(args, "no_progress"):
                    args.no_progress = True
                if getattr(args, "resume", False):
                    args.resume = False  # rank 0 decides and shares what it resumes from
            with hd.collective_errors():  # a rank that fails makes the others stop, not wait
                yield
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from .._utils import first_line, threads
    from .common import os_error_line
    from .deploy import COMMANDS as DEPLOY
    from .prune import cmd_prune
    from .vision import COMMANDS

    commands = {**COMMANDS, "prune": cmd_prune, "heads": cmd_prune, **DEPLOY}
    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print(f"hap {args.command}: error: --threads {args.threads}: give at least 1", file=sys.stderr)
        return 2
    try:
        with threads(args.threads), offline(), _torchrun(args):
            return commands[args.command](args)
    except (UserError, ValueError, FileNotFoundError, RuntimeError, NotImplementedError) as e:
        if args.debug:
            raise
        print(f"hap {args.command}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: read-only or full disk, a path under a regular file
        if args.debug:
            raise
        print(f"hap {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hap {args.command}: interrupted; completed epochs are checkpointed (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
