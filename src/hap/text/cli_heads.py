"""``hap heads``: attention-head pruning of a Hugging Face encoder (being built; see issue 5)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heads", help="prune attention heads of a local Hugging Face encoder")
    p.add_argument("--model", default="minilm", help="'minilm' (packaged) or a local model directory")
    p.add_argument("--data", default="tweets", help="'tweets' (packaged) or a CSV with text,label columns")
    p.add_argument("--target", default="heads=0.5")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("hap heads is not built yet: use the library (hap.sensitivity(units='heads'))")
