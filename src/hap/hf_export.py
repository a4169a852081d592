"""Write a pruned Hugging Face model as a directory plain ``transformers`` loads: ``save_pretrained`` with the
new sizes in ``config.json``.

:func:`hap.save` / :func:`hap.load` store any pruned model (any width in any layer) as a plan and weights, but
loading needs ``hap``. A Hugging Face config has *one* value per size for every layer (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size`` / ``n_inner``), so a pruned model can be described by its
config only when every layer kept the same widths: plan with ``allocation="even"`` (the uniform ratio,
stopped only where every layer of a kind has the same width; whole KV groups under GQA, see
:mod:`hap.units.decoder`). Then :func:`save_pretrained` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` (or the model's own ``Auto*`` class) loads with no hap
installed; otherwise it says which layers differ.

The sizes written: ``num_attention_heads`` (query heads), ``num_key_value_heads`` (when the config has it),
``head_dim`` (explicit: ``hidden_size / num_attention_heads`` no longer holds), ``intermediate_size`` or
GPT-2's ``n_inner``. Before anything is written, the model class is instantiated from the new config on the
``meta`` device and its parameter shapes compared with the pruned model's: an architecture whose modules
derive a size the config cannot carry (GPT-2 and BERT compute the head width as ``hidden / heads``, so they
cannot lose heads in a config) is refused with the parameters that would not fit.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._utils import atomic_write_text, first_line, model_signature
from .planning.types import PruningPlan

__all__ = ["save_pretrained", "uniform_sizes"]


def _layer_widths(model: nn.Module) -> tuple[list[tuple[str, int, int, int]], list[tuple[str, int, str]]]:
    """``[(attention block, query heads, KV heads, head_dim)]`` and ``[(MLP block, width, style)]``."""
    from .units.heads import attention_layouts
    from .units.neurons import mlp_layouts

    try:
        att = [(lay.name, lay.query_heads, lay.num_heads, lay.kv_size or lay.head_size)
               for lay in attention_layouts(model)]
    except ValueError:
        att = []
    try:
        mlp = [(lay.name, lay.width, lay.adapter.style) for lay in mlp_layouts(model)]
    except ValueError:
        mlp = []
    return att, mlp


def uniform_sizes(model: nn.Module) -> dict[str, int]:
    """The config sizes of a model whose layers all have the same widths.

    Returns:
        ``{"num_attention_heads", "num_key_value_heads", "head_dim"}`` (attention found) and
        ``{"intermediate_size"}`` (feed-forward found), the latter named ``n_inner`` for GPT-2.

    Raises:
        ValueError: Widths differ between layers (named), or a layer has no heads / no neurons left.
    """
    att, mlp = _layer_widths(model)
    out: dict[str, int] = {}
    if att:
        kinds = {(q, kv, d) for _, q, kv, d in att}
        if len(kinds) > 1:
            desc = ", ".join(f"'{n}' {q} query / {kv} KV heads" for n, q, kv, _ in att[:6])
            raise ValueError(
                f"attention widths differ per layer ({desc}): a Hugging Face config has one head count for every "
                "layer; plan with allocation='even' for a from_pretrained directory, or keep this model with "
                "hap.save / hap.load (any widths)"
            )
        ((q, kv, d),) = kinds
        if q == 0:
            raise ValueError("every layer lost all its attention heads: a Hugging Face config cannot describe that")
        out.update(num_attention_heads=q, num_key_value_heads=kv, head_dim=d)
    if mlp:
        widths = {w for _, w, _ in mlp}
        if len(widths) > 1:
            desc = ", ".join(f"'{n}' {w}" for n, w, _ in mlp[:6])
            raise ValueError(
                f"feed-forward widths differ per layer ({desc}): a Hugging Face config has one intermediate size "
                "for every layer; plan with allocation='even' for a from_pretrained directory, or keep this "
                "model with hap.save / hap.load (any widths)"
            )
        (w,) = widths
        if w == 0:
            raise ValueError("every feed-forward block lost all its neurons: a Hugging Face config cannot say that")
        out["n_inner" if mlp[0][2] == "gpt2" else "intermediate_size"] = w
    return out


def _new_config(model: nn.Module, sizes: dict[str, int]) -> Any:
    cfg = copy.deepcopy(model.config)
    if "num_attention_heads" in sizes:
        cfg.num_attention_heads = sizes["num_attention_heads"]
        if hasattr(cfg, "num_key_value_heads"):
            cfg.num_key_value_heads = sizes["num_key_value_heads"]
        cfg.head_dim = sizes["head_dim"]
    for key in ("intermediate_size", "n_inner"):
        if key in sizes:
            setattr(cfg, key, sizes[key])
    return cfg


def _check_rebuilds(model: nn.Module, cfg: Any) -> None:
    """The model class built from ``cfg`` must have exactly the pruned model's parameter shapes."""
    try:
        with torch.device("meta"):
            fresh = type(model)(cfg)
    except ValueError as e:  # e.g. GPT-2: "embed_dim must be divisible by num_heads"
        raise ValueError(
            f"{type(model).__name__} cannot be built from the pruned sizes ({first_line(e)}): this architecture "
            "derives a size its config cannot carry; keep the model with hap.save / hap.load"
        ) from e
    want = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    got = {n: tuple(p.shape) for n, p in fresh.state_dict().items()}
    bad = sorted(n for n in want.keys() & got.keys() if want[n] != got[n])
    missing = sorted(want.keys() ^ got.keys())
    if bad or missing:
        first = bad[0] if bad else missing[0]
        detail = f"'{first}' is {want.get(first)} here but {got.get(first)} when built from the config"
        raise ValueError(
            f"{type(model).__name__} built from the new config.json does not have the pruned shapes ({detail}; "
            f"{len(bad) + len(missing)} parameters differ): this architecture derives a size its config cannot "
            "carry (e.g. GPT-2 computes the head width as n_embd / n_head, so it cannot lose heads in a config); "
            "keep the model with hap.save / hap.load"
        )


def save_pretrained(model: nn.Module, plan: PruningPlan | None, directory: str | os.PathLike[str],
                    tokenizer: Any = None) -> Path:
    """Write ``model`` (pruned with a uniform plan) as a Hugging Face directory that
    ``transformers.AutoModel*.from_pretrained`` loads without hap.

    Args:
        model: ``hap.prune(base, plan)`` of a Hugging Face ``PreTrainedModel`` (possibly trained further).
        plan: The plan that made it (checked against the model; written beside as ``plan.json`` for the
            record, which ``from_pretrained`` ignores), or None.
        directory: Created if missing. Written in a temporary sibling directory and renamed into place, so
            an interrupted call leaves no half-written model; an existing directory is replaced.
        tokenizer: Saved into the directory too when given.

    Returns:
        The directory.

    Raises:
        ValueError: Not a Hugging Face model, not the result of ``plan``, widths that differ between layers
            (the message names them: use ``allocation="even"`` or :func:`hap.save`), or an architecture
            whose config cannot carry the pruned sizes.
    """
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        raise ValueError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel: save it with hap.save")
    if plan is not None and plan.pruned_signature is not None and model_signature(model) != plan.pruned_signature:
        raise ValueError("this model is not the result of this plan: pass the model hap.prune(base, plan) returned")
    cfg = _new_config(model, uniform_sizes(model))
    _check_rebuilds(model, cfg)
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".tmp", dir=d.parent))
    old = model.config
    try:
        model.config = cfg
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            atomic_write_text(tmp / "plan.json", plan.to_json())
        if d.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".old", dir=d.parent))
            os.replace(d, trash / d.name)
            os.replace(tmp, d)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.config = old
    return d
