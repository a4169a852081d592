"""hap on torch.distributed: 2 CPU processes with gloo on loopback, compared with one process.

Each scenario spawns its ranks (``torch.multiprocessing``, spawn start method), every rank writes what it
got (or the error it raised) to a file, and the parent compares; the whole launch is bounded by a
timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import hap
from hap import distributed as hd

from ._plan_helpers import randomize
from .conftest import make_tiny

WORLD = 2
TIMEOUT_S = 90.0  # the whole launch (interpreter starts included); a collective waits at most 30 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(r: int, world: int, port: int, scenario: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=r, world_size=world, timeout=datetime.timedelta(seconds=30))
    try:
        result: Any = ("ok", SCENARIOS[scenario](r, world))
    except BaseException as e:  # the parent inspects every rank's outcome
        result = ("error", type(e).__name__, str(e), traceback.format_exc())
    Path(out, f"rank{r}.pkl").write_bytes(pickle.dumps(result))
    dist.destroy_process_group()


def launch(scenario: str, tmp_path: Path, world: int = WORLD) -> list[Any]:
    """Run ``scenario`` on ``world`` ranks; every rank's outcome, in rank order."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), scenario, str(tmp_path)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"scenario {scenario!r} did not finish within {TIMEOUT_S} s (a rank hangs)")
    return [pickle.loads(Path(tmp_path, f"rank{r}.pkl").read_bytes()) for r in range(world)]


def _ok(outcomes: list[Any]) -> list[Any]:
    for r, o in enumerate(outcomes):
        assert o[0] == "ok", f"rank {r} raised {o[1]}: {o[2]}\n{o[3]}"
    return [o[1] for o in outcomes]


# ----------------------------------------------------------------------------------------------------
# scenarios (run inside the ranks; also called in-process, without a process group, for the reference)


def _vision_shards(world: int):
    model, x, y = make_tiny("convbn", n=24)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 24, 4)]
    return model, [batches[r::world] for r in range(world)]


def _estimates(r: int, world: int) -> dict[str, Any]:
    model, shards = _vision_shards(world)
    mine = shards[r] if world > 1 else [b for s in shards for b in s]
    out: dict[str, Any] = {}
    for method in ("taylor", "obd", "l1"):
        out[method] = hap.sensitivity(model, F.cross_entropy, mine, method=method, progress=False)
    out["hap"] = hap.sensitivity(model, F.cross_entropy, mine, method="hap", progress=False, max_samples=20,
                                 min_samples=6, stability=None, tol=0.0)
    out["hap-hessian"] = hap.sensitivity(model, F.cross_entropy, mine, method="hap-hessian", progress=False,
                                         max_samples=9, min_samples=9, samples_per_batch=2)
    out["stopped"] = hap.sensitivity(model, F.cross_entropy, mine, method="hap", progress=False, max_samples=400,
                                     min_samples=4, stability=0.3, tol=0.0)
    from .text.conftest import make_bert

    bert = make_bert()
    gen = torch.Generator().manual_seed(0)
    texts = [({"input_ids": torch.randint(0, 25, (3, 6), generator=gen), "attention_mask": torch.ones(3, 6,
              dtype=torch.long)}, torch.randint(0, 2, (3,), generator=gen)) for _ in range(4)]
    out["michel"] = hap.sensitivity(bert, lambda o, t: F.cross_entropy(o.logits, t),
                                    texts[r::world] if world > 1 else texts, units="heads", method="michel",
                                    progress=False)
    out["hap"].save(Path(os.environ["HAP_TEST_OUT"], f"sens-rank{r}.json"))  # only rank 0 writes
    return out


def _raises(r: int, world: int) -> dict[str, Any]:
    model, shards = _vision_shards(world)
    mine = list(shards[r])
    if r == 1:  # rank 1's data make the loss NaN: it raises inside the estimate, between two collectives
        mine[1] = (torch.full_like(mine[1][0], float("nan")), mine[1][1])
    out: dict[str, Any] = {}
    for method, kw in (("taylor", {}), ("hap", dict(max_samples=40, stability=None, tol=0.0))):
        try:
            hap.sensitivity(model, F.cross_entropy, mine, method=method, progress=False, **kw)
            out[method] = "returned"
        except BaseException as e:
            out[method] = f"{type(e).__name__}: {e}"
    return out


def _repair(r: int, world: int) -> dict[str, Any]:
    from hap.models.tiny import TinyConvBN

    torch.manual_seed(0)
    original = randomize(TinyConvBN().double().eval())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, *original.input_shape, generator=gen, dtype=torch.float64)
    batches = [(x[i : i + 4], torch.zeros(4, dtype=torch.long)) for i in range(0, 16, 4)]
    sens = hap.sensitivity(original, F.cross_entropy, batches[:1], method="l1", progress=False)
    plan = hap.plan(original, sens, hap.Target(params=0.5), allocation="uniform", example_inputs=x[:1], tol=0.25)
    small = hap.prune(original, plan)
    pruned = {k: v.clone() for k, v in small.state_dict().items()}
    report = hap.repair(small, original, batches[r::world] if world > 1 else batches, plan=plan, progress=False)
    return {"state": {k: v.clone() for k, v in small.state_dict().items()}, "pruned": pruned,
            "rows": {k: v.rows for k, v in report.layers.items()}}


class _Shuffled:
    """An in-memory dataset with hap.data.Dataset's ``loader``: shuffled by the generator, no augmentation;
    ``interrupt_at``: a KeyboardInterrupt when that many training batches have been served."""

    def __init__(self, n: int = 40, interrupt_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g, dtype=torch.float64)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long()
        self.interrupt_at = interrupt_at
        self.served = 0

    def loader(self, split, batch_size, shuffle=False, augment=False, generator=None, drop_last=False):
        x, y = (self.x, self.y) if split == "train" else (self.x[:16], self.y[:16])
        order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
        stop = len(x) - len(x) % batch_size if drop_last else len(x)
        data = self

        class Batches:
            def __len__(self) -> int:
                return -(-stop // batch_size)

            def __iter__(self):
                for i in range(0, stop, batch_size):
                    if split == "train":
                        data.served += 1
                        if data.served == data.interrupt_at:
                            raise KeyboardInterrupt
                    yield x[order[i : i + batch_size]], y[order[i : i + batch_size]]

        return Batches()


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


def _train(r: int, world: int) -> dict[str, Any]:
    from hap.train import TextTask, TrainConfig, train
    from hap.train.checkpoint import read_checkpoint

    out: dict[str, Any] = {}
    root = Path(os.environ["HAP_TEST_OUT"], f"train-w{world}")
    # batch 10 of 40 examples: 4 steps an epoch; interrupted in the second epoch, resumed from the checkpoint
    # of the first (written by rank 0 alone, read by every rank)
    cfg = TrainConfig(steps=10, batch_size=10, lr=0.1, seed=3, memory_format="contiguous")
    model = _mlp(r)  # a different init on every rank: DDP must start all ranks from rank 0's weights
    try:
        train(model, _Shuffled(interrupt_at=6), cfg, out_dir=root, progress=False)
    except KeyboardInterrupt:
        out["interrupted_at"] = read_checkpoint(root).meta["step"]
    out["written"] = sorted(p.name for p in root.iterdir())
    model = _mlp(r)
    res = train(model, _Shuffled(), cfg, out_dir=root, resume=True, progress=False)
    out["vision"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["history"] = res.history
    out["steps"] = res.steps
    from hap.text import load_text_data, load_text_model

    from .text.conftest import save_model_dir, write_csv

    text = root / "text"
    if r == 0:  # transformers' save_pretrained writes on rank 0 only, so rank 0 makes the files, all read them
        text.mkdir(parents=True, exist_ok=True)
        write_csv(text / "d.csv", n=60)
        save_model_dir(text / "enc", classifier=False)
    hd.barrier()
    data = load_text_data(str(text / "d.csv"), fractions={"train": 0.6, "val": 0.2, "score": 0.0, "test": 0.2})
    tm = load_text_model(text / "enc", data.label_names)
    train(tm.model, data, TrainConfig(steps=3, lr=1e-3, batch_size=7, seed=0), task=TextTask(tm.tokenizer),
          progress=False)
    out["text"] = {k: v.clone() for k, v in tm.model.state_dict().items()}
    # a whole pass: its last global batch has 1 row (36 = 5 * 7 + 1), so rank 0's share of it is empty and
    # it trains on a stand-in row of weight 0 (every DDP rank must step)
    tm = load_text_model(text / "enc", data.label_names)
    res = train(tm.model, data, TrainConfig(epochs=1.0, lr=1e-3, batch_size=7, seed=0), task=TextTask(tm.tokenizer),
                progress=False)
    out["text_short"] = {k: v.clone() for k, v in tm.model.state_dict().items()}
    out["text_short_steps"] = (data.sizes()["train"], res.steps)
    return out


def _images(n: int = 40) -> hap.data.Dataset:
    """A tiny in-memory :class:`hap.data.Dataset` (8x8 grey images): its loader shards itself."""
    from hap.data import Dataset, Split

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n + 16, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = (x[:, 0, :4].float().mean((1, 2)) > x[:, 0, 4:].float().mean((1, 2))).long()
    stats = dict(mean=(0.5,), std=(0.29,))
    return Dataset("tiny", Split(x[:n], y[:n], **stats), Split(x[n:], y[n:], **stats), Split(x[n:], y[n:], **stats),
                   2, 1, (0.5,), (0.29,), ("a", "b"), (8, 8))


class _StopAt(torch.nn.Module):
    """A conv net without BatchNorm (DDP then equals one process) that raises KeyboardInterrupt at its
    ``stop_at``-th training forward: every rank is interrupted at the same step."""

    def __init__(self, seed: int, stop_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                       torch.nn.Linear(4 * 6 * 6, 2))
        self.stop_at, self.calls = stop_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.stop_at:
                raise KeyboardInterrupt
        return self.net(x)


RESUME_CFG = dict(epochs=2, batch_size=9, lr=0.05, seed=1, augment=True, memory_format="contiguous")


def _resume(r: int, world: int) -> dict[str, Any]:
    """hap.data's self-sharding loader (augmented, 9 rows a batch: 5 + 4 on two ranks) under DDP, and a
    2-epoch run interrupted after its first epoch's checkpoint, resumed the way ``hap ... --resume`` does
    under torchrun: rank 0 with the run directory and ``resume=True``, the other ranks with a scratch
    directory and ``resume=False`` (rank 0's checkpoint is every rank's)."""
    import tempfile

    from hap.train import TrainConfig, train

    cfg = TrainConfig(**RESUME_CFG)
    root = Path(os.environ["HAP_TEST_OUT"], f"resume-w{world}")
    out: dict[str, Any] = {}
    model = _StopAt(r)
    train(model, _images(), cfg, out_dir=root / "whole" if r == 0 else None, progress=False)
    out["whole"] = {k: v.clone() for k, v in model.net.state_dict().items()}
    if world == 1:
        return out
    scratch = Path(tempfile.mkdtemp(prefix=f"hap-test-rank{r}-"))
    run = root / "run" if r == 0 else scratch / "run"
    try:
        train(_StopAt(r, stop_at=40 // 9 + 1), _images(), cfg, out_dir=run, progress=False)
    except KeyboardInterrupt:
        out["interrupted"] = True
    from hap.train.checkpoint import read_checkpoint

    out["checkpoint_epoch"] = read_checkpoint(root / "run").meta["epoch"] if r == 0 else None
    model = _StopAt(100 + r)  # another init: every weight must come from the checkpoint
    res = train(model, _images(), cfg, out_dir=run, resume=r == 0, progress=False)
    out["resumed"] = {k: v.clone() for k, v in model.net.state_dict().items()}
    out["resumed_steps"] = res.steps
    out["scratch_files"] = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*") if p.is_file())
    return out


def _lm_texts(path: Path, n: int = 40) -> Path:
    """A CSV of ``n`` texts of 1 to 9 words (so padded batches whose rows predict unequal token counts)."""
    import csv

    from .text.conftest import WORDS

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("text", "label"))
        for i in range(n):
            w.writerow((" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + (i * 7) % 9)), ("a", "b")[i % 2]))
    return path


def _lm(r: int, world: int, kd: bool = False) -> dict[str, Any]:
    """A tiny Llama fine-tuned on padded texts of unequal lengths (batch 7: rows 3 + 4 on two ranks): the
    loss is a mean over predicted tokens, so each rank's loss weight must be its share of the tokens. With
    ``kd``, half of the loss is distillation from another tiny Llama (also a mean over predicted tokens)."""
    import tempfile

    from hap.text import load_text_data
    from hap.train import CausalLMTask, TrainConfig, train

    from ._tiny_llm import make_decoder
    from .text.conftest import make_tokenizer

    class Recording(CausalLMTask):
        def loss_weight(self, targets: Any, share: float) -> float:
            w = super().loss_weight(targets, share)
            self.weights.append((share, w))
            return w

    root = Path(tempfile.mkdtemp(prefix=f"hap-test-lm-rank{r}-"))  # every rank its own copy of the inputs
    data = load_text_data(str(_lm_texts(root / "d.csv")), fractions={"train": 0.7, "val": 0.1, "score": 0.0,
                                                                      "test": 0.2})
    task = Recording(make_tokenizer(root / "tok"), max_length=16)
    task.weights = []
    model = make_decoder("llama", seed=r)  # another init per rank: DDP starts every rank from rank 0's
    cfg = TrainConfig(steps=4, lr=1e-2, batch_size=7, seed=0, warmup=0.0, kd_alpha=0.5 if kd else 0.0)
    teacher = make_decoder("llama", seed=11).eval() if kd else None
    train(model, data, cfg, task=task, teacher=teacher, progress=False)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "weights": task.weights}


def _all(r: int, world: int) -> dict[str, Any]:
    """Every scenario in one launch (starting interpreters is most of the cost); a scenario that raises
    is recorded and the next one still runs (a collective error leaves the group usable)."""
    out: dict[str, Any] = {}
    for name, fn in SCENARIOS.items():
        if name == "all":
            continue
        try:
            out[name] = ("ok", fn(r, world))
        except BaseException as e:
            out[name] = ("error", type(e).__name__, str(e), traceback.format_exc())
    return out


SCENARIOS = {"estimates": _estimates, "raises": _raises, "repair": _repair, "train": _train, "resume": _resume,
             "lm": _lm, "lm_kd": lambda r, world: _lm(r, world, kd=True), "all": _all}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[Any]]:
    """Each scenario's outcome on every rank, from one launch of ``WORLD`` ranks."""
    out = tmp_path_factory.mktemp("dist")
    old = os.environ.get("HAP_TEST_OUT")
    os.environ["HAP_TEST_OUT"] = str(out)  # inherited by the spawned ranks
    try:
        per_rank = _ok(launch("all", out))
    finally:
        if old is None:
            os.environ.pop("HAP_TEST_OUT")
        else:
            os.environ["HAP_TEST_OUT"] = old
    return {name: [per_rank[r][name] for r in range(WORLD)] for name in per_rank[0]} | {"_dir": out}


# ----------------------------------------------------------------------------------------------------
# tests


def test_helpers_are_the_identity_without_a_process_group():
    assert not hd.is_distributed() and hd.rank() == 0 and hd.world_size() == 1 and hd.is_main()
    a = np.arange(3.0)
    assert hd.all_reduce_sum(a) is a and hd.all_reduce_sum(2) == 2 and hd.broadcast_object({"k": 1}) == {"k": 1}
    assert hd.on_main(lambda: 5) == 5
    assert not hd.init_from_env()  # WORLD_SIZE unset: one process, nothing initialised
    with pytest.raises(ValueError, match="boom"), hd.collective_errors():
        raise ValueError("boom")


def test_sharded_estimates_equal_one_process_over_the_union(ranks, tmp_path, monkeypatch):
    out = ranks["_dir"]
    ranks = _ok(ranks["estimates"])
    monkeypatch.setenv("HAP_TEST_OUT", str(tmp_path))
    one = _estimates(0, 1)
    for method in ("taylor", "obd", "l1", "michel"):
        for r in range(WORLD):
            np.testing.assert_allclose(ranks[r][method].scores, one[method].scores, rtol=1e-5, atol=1e-12,
                                       err_msg=f"{method}, rank {r}")
    assert ranks[0]["taylor"].batches == one["taylor"].batches == 6
    for method in ("hap", "hap-hessian", "stopped"):
        a, b = ranks[0][method], ranks[1][method]
        np.testing.assert_array_equal(a.scores, b.scores, err_msg=method)  # bit-identical on every rank
        assert [u.trace_se for u in a.units] == [u.trace_se for u in b.units]
        assert (a.samples, a.batches, a.converged, a.stop_reason) == (b.samples, b.batches, b.converged,
                                                                       b.stop_reason)
        assert a.split_half == b.split_half or (np.isnan(a.split_half) and np.isnan(b.split_half))
        assert a.settings["world_size"] == WORLD
    assert ranks[0]["hap"].samples == one["hap"].samples == 20  # max_samples counts the samples of all ranks
    assert ranks[0]["hap-hessian"].samples == 9
    stopped = ranks[0]["stopped"]
    assert stopped.converged and "stability" in stopped.stop_reason and stopped.samples < 400
    # statistically equivalent to one process: the Fisher traces agree within their standard errors
    t2 = np.array([u.trace for u in ranks[0]["hap"].units])
    t1 = np.array([u.trace for u in one["hap"].units])
    se = np.hypot([u.trace_se for u in ranks[0]["hap"].units], [u.trace_se for u in one["hap"].units])
    assert np.median(np.abs(t2 - t1) / se) < 2.0
    assert (out / "sens-rank0.json").is_file() and not (out / "sens-rank1.json").exists()
    assert hap.Sensitivity.load(out / "sens-rank0.json").scores.tolist() == ranks[1]["hap"].scores.tolist()


def test_a_raising_rank_makes_the_others_exit_with_a_clear_error(ranks):
    r0, r1 = _ok(ranks["raises"])
    for method in ("taylor", "hap"):
        assert r1[method].startswith("RuntimeError") and "loss is nan" in r1[method]
        assert r0[method].startswith("PeerError"), r0[method]
        assert "rank 1" in r0[method] and "loss is nan" in r0[method]
    # and the group is still usable: the scenarios after this one ran (a hang would have failed the launch)
    assert ranks["repair"][0][0] == "ok"


def test_sharded_repair_equals_one_process(ranks):
    ranks = _ok(ranks["repair"])
    one = _repair(0, 1)
    assert ranks[0]["rows"] == ranks[1]["rows"] == one["rows"]
    for r in range(WORLD):
        for k, v in one["state"].items():
            torch.testing.assert_close(ranks[r]["state"][k], v, rtol=1e-9, atol=1e-12, msg=f"rank {r}: {k}")
    assert any(not torch.equal(v, one["pruned"][k]) for k, v in one["state"].items())  # repair did something


def test_ddp_fine_tuning_equals_one_process_with_the_same_global_batch(ranks, tmp_path, monkeypatch):
    two = _ok(ranks["train"])
    monkeypatch.setenv("HAP_TEST_OUT", str(tmp_path))
    one = _train(0, 1)
    assert one["text_short_steps"] == two[0]["text_short_steps"] == (36, 6)
    for key in ("vision", "text", "text_short"):
        for r in range(WORLD):
            for k, v in one[key].items():
                if k.endswith("attention.self.key.bias"):
                    continue  # its true gradient is exactly 0 (softmax ignores it): Adam scales rounding noise to lr
                text = key != "vision"
                torch.testing.assert_close(two[r][key][k], v, rtol=1e-6 if text else 1e-9,
                                           atol=1e-7 if text else 1e-12, msg=f"{key}, rank {r}: {k}")
    assert two[0]["interrupted_at"] == two[1]["interrupted_at"] == one["interrupted_at"] == 4
    assert "last.json" in two[0]["written"] and two[0]["steps"] == one["steps"] == 10
    def strip(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert strip(two[0]["history"]) == strip(two[1]["history"])
    for h2, h1 in zip(two[0]["history"], one["history"], strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-9)  # losses summed over the ranks
        assert h2["val_acc"] == h1["val_acc"]
    # and the interrupted + resumed run follows the uninterrupted one
    from hap.train import TrainConfig, train

    model = _mlp(0)
    train(model, _Shuffled(), TrainConfig(steps=10, batch_size=10, lr=0.1, seed=3, memory_format="contiguous"),
          progress=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(one["vision"][k], v, rtol=1e-12, atol=1e-14)


def test_causal_lm_ddp_weights_each_rank_by_its_tokens_and_equals_one_process(ranks):
    """Padded rows of unequal lengths: rank r's loss weight is ``W t_r / T`` (its predicted tokens), not
    ``W n_r / n`` (its rows), and the two ranks' fine-tune gives one process's weights."""
    two = _ok(ranks["lm"])
    one = _lm(0, 1)
    assert all(w == share == 1.0 for share, w in one["weights"])  # one process: no factor
    per_step = list(zip(two[0]["weights"], two[1]["weights"], strict=True))
    assert len(per_step) == 4
    for (s0, w0), (s1, w1) in per_step:
        assert s0 + s1 == pytest.approx(WORLD) and w0 + w1 == pytest.approx(WORLD)  # the factors average to 1
    assert any(abs(w0 - s0) > 0.05 for (s0, w0), _ in per_step)  # tokens, not rows, decided the weights
    for r in range(WORLD):
        for k, v in one["state"].items():
            if k.endswith("k_proj.bias"):
                continue  # its true gradient is exactly 0 (softmax ignores it): Adam scales rounding noise to lr
            torch.testing.assert_close(two[r]["state"][k], v, rtol=1e-7, atol=1e-9, msg=f"rank {r}: {k}")
    assert any(not torch.equal(v, make_llama_state()[k]) for k, v in one["state"].items())  # it trained


def test_causal_lm_distillation_under_ddp_equals_one_process(ranks):
    """Distillation of a causal LM averages over the predicted tokens (padding excluded), like its loss, so the
    token loss weights make a two-rank fine-tune with ``kd_alpha`` one process's."""
    two = _ok(ranks["lm_kd"])
    one = _lm(0, 1, kd=True)
    plain = _lm(0, 1)
    assert any(not torch.equal(v, plain["state"][k]) for k, v in one["state"].items())  # the teacher counted
    for r in range(WORLD):
        for k, v in one["state"].items():
            if k.endswith("k_proj.bias"):
                continue  # zero true gradient (see the test above)
            torch.testing.assert_close(two[r]["state"][k], v, rtol=1e-7, atol=1e-9, msg=f"rank {r}: {k}")


def make_llama_state() -> dict[str, torch.Tensor]:
    from ._tiny_llm import make_decoder

    return make_decoder("llama", seed=0).state_dict()


def test_self_sharding_vision_loader_under_ddp_equals_one_process(ranks, tmp_path, monkeypatch):
    two = _ok(ranks["resume"])
    monkeypatch.setenv("HAP_TEST_OUT", str(tmp_path))
    one = _resume(0, 1)
    for r in range(WORLD):
        for k, v in one["whole"].items():
            torch.testing.assert_close(two[r]["whole"][k], v, rtol=1e-5, atol=1e-6, msg=f"rank {r}: {k}")
    assert any(not torch.equal(v, _StopAt(0).net.state_dict()[k]) for k, v in one["whole"].items())  # it trained


def test_resume_under_ddp_with_scratch_dirs_follows_the_uninterrupted_run(ranks):
    two = _ok(ranks["resume"])
    assert two[0]["interrupted"] and two[1]["interrupted"] and two[0]["checkpoint_epoch"] == 0
    for r in range(WORLD):
        assert two[r]["resumed_steps"] == 2 * (40 // 9)
        for k, v in two[0]["whole"].items():
            torch.testing.assert_close(two[r]["resumed"][k], v, rtol=1e-6, atol=1e-7, msg=f"rank {r}: {k}")
    assert two[1]["scratch_files"] == []  # rank 1 never writes: rank 0 alone holds the run
    assert (ranks["_dir"] / "resume-w2" / "run" / "best.safetensors").is_file()


# -- each rank loads only its rows (no processes: a rank's loaders are built under a faked shard)


def _vision_batches(world: int, r: int, monkeypatch, epoch: int = 1) -> tuple[list[Any], list[int]]:
    import hap.data.batches as batches_mod
    from hap.train import TrainConfig, VisionTask

    loaded: list[int] = []
    real = batches_mod.to_float
    monkeypatch.setattr(batches_mod, "to_float", lambda x: (loaded.append(len(x)), real(x))[1])
    cfg = VisionTask().resolve(TrainConfig(**RESUME_CFG))
    with hd._as_shard(r, world):
        batches = VisionTask().train_batches(_images(), cfg, epoch)
        out = list(batches)
    assert len(batches) == 40 // 9 and (hd.loader_shard(batches) is not None) == (world > 1)
    monkeypatch.setattr(batches_mod, "to_float", real)
    return out, loaded


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_loads_and_augments_only_its_rows_of_the_vision_batch(world, monkeypatch):
    one, loaded_one = _vision_batches(1, 0, monkeypatch)
    assert loaded_one == [9] * len(one)
    shards = [_vision_batches(world, r, monkeypatch) for r in range(world)]
    for r, (batches, loaded) in enumerate(shards):
        lo, hi = hd.GlobalBatchShard(r, world).bounds(9)
        assert loaded == [hi - lo] * len(one)  # indexed and converted: its rows only, ~9 / world
        assert [len(y) for _, y in batches] == loaded
    for b, (x, y) in enumerate(one):  # the union, in rank order, is one process's batch, augmentation included
        torch.testing.assert_close(torch.cat([s[0][b][0] for s in shards]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([s[0][b][1] for s in shards]), y)
    # the loss weights W n_r / n average to 1: the DDP mean of the gradients is the global batch's
    assert sum(hd.GlobalBatchShard(r, world).weight(9) for r in range(world)) == pytest.approx(world)


def test_augment_draws_then_applies_exactly_as_the_one_call_recipe():
    """Drawing a global batch's parameters apart from applying them changes no draw: a run resumed across
    this split (or one process against W ranks) sees the same augmented images."""
    from hap.data.transforms import Augment, random_crop, random_hflip

    x = torch.rand(9, 3, 8, 8)
    for pad, flip in ((4, True), (0, True), (2, False)):
        g = torch.Generator().manual_seed(5)
        expected = random_crop(x, pad, g)
        expected = random_hflip(expected, g) if flip else expected
        aug = Augment(pad, flip)
        assert torch.equal(aug(x, torch.Generator().manual_seed(5)), expected)
        draws = aug.draw(9, torch.Generator().manual_seed(5))
        assert torch.equal(torch.cat([aug.apply(x[:4], draws.rows(0, 4)), aug.apply(x[4:], draws.rows(4, 9))]),
                           expected)


def test_a_custom_augmentation_is_drawn_on_the_whole_batch_and_cut(monkeypatch):
    from hap.data import Augment

    class Noisy(Augment):
        def __call__(self, x, generator=None):
            return x + torch.rand(x.shape, generator=generator)

    def batches(r: int, world: int) -> list[Any]:
        with hd._as_shard(r, world):
            return list(_images().loader("train", 9, shuffle=True, augment=Noisy(),
                                         generator=torch.Generator().manual_seed(3), drop_last=True,
                                         shard=hd.GlobalBatchShard.current()))

    one, parts = batches(0, 1), [batches(r, 2) for r in range(2)]
    for b, (x, _) in enumerate(one):
        assert torch.equal(torch.cat([p[b][0] for p in parts]), x)


class _CountingTokenizer:
    """A tokenizer that records how many texts each call tokenizes."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, []
        self.model_input_names = inner.model_input_names
        self.pad_token = inner.pad_token

    def __call__(self, texts, **kw):
        self.calls.append(len(texts))
        return self.inner(texts, **kw)


@pytest.mark.parametrize("task_name", ["text", "causal-lm"])
def test_each_rank_tokenizes_only_its_rows_of_the_text_batch(task_name, tmp_path):
    from hap.text import load_text_data
    from hap.train import CausalLMTask, TextTask, TrainConfig

    from .text.conftest import make_tokenizer, write_csv

    write_csv(tmp_path / "d.csv", n=60)
    data = load_text_data(str(tmp_path / "d.csv"), fractions={"train": 0.6, "val": 0.2, "score": 0.0, "test": 0.2})
    n_train = data.sizes()["train"]
    tok = make_tokenizer(tmp_path / "tok")
    cfg = TrainConfig(batch_size=7, seed=2, epochs=1.0)

    def rows(r: int, world: int) -> tuple[list[list[list[int]]], list[torch.Tensor], list[int], Any]:
        counting = _CountingTokenizer(tok)
        task = (TextTask if task_name == "text" else CausalLMTask)(counting)
        with hd._as_shard(r, world):
            loader = task.train_batches(data, task.resolve(cfg), 1)
            batches = list(loader)
        unpadded = [[ids[m.bool()].tolist() for ids, m in zip(x["input_ids"], x["attention_mask"], strict=True)]
                    for x, _ in batches]
        return unpadded, [y for _, y in batches], counting.calls, loader

    one_ids, one_y, one_calls, _ = rows(0, 1)
    sizes = [min(7, n_train - 7 * b) for b in range(len(one_y))]
    assert one_calls == sizes and sizes[-1] < 7  # a short last batch: n not a multiple of W
    parts = [rows(r, 2) for r in range(2)]
    shards = [hd.GlobalBatchShard(r, 2) for r in range(2)]
    for r, (_, _, calls, loader) in enumerate(parts):
        # tokenized: its rows only (or one stand-in row of weight 0 where its share of the last one is empty)
        assert calls == [max(1, shards[r].bounds(n)[1] - shards[r].bounds(n)[0]) for n in sizes]
        assert [loader.global_batch_rows(b) for b in range(len(sizes))] == sizes
    for b, n in enumerate(sizes):  # the ranks' rows of weight > 0 are the same texts, in one process's order
        kept = [r for r in range(2) if shards[r].weight(n) > 0]
        assert sum((parts[r][0][b] for r in kept), []) == one_ids[b]
        if task_name == "text":
            assert torch.equal(torch.cat([parts[r][1][b] for r in kept]), one_y[b])
    if sizes[-1] == 1:
        assert shards[0].weight(1) == 0 and parts[0][0][-1] == parts[1][0][-1]  # rank 0's stand-in: the last row


def test_shard_batch_still_cuts_a_whole_batch_for_loaders_that_do_not_shard():
    x, y = torch.arange(7.0).view(7, 1), torch.arange(7)
    got = []
    for r in range(2):
        with hd._as_shard(r, 2):
            got.append(hd.shard_batch({"x": x, "k": 3}, y))
    assert torch.equal(torch.cat([g[1] for g in got]), y) and got[0][0]["k"] == 3
    assert [g[2] for g in got] == [2 * 3 / 7, 2 * 4 / 7]
    assert hd.shard_batch(x, y) == (x, y, 1.0)  # one process: the batch itself
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        hd.GlobalBatchShard(2, 2)


@pytest.mark.slow
def test_cli_prune_under_torchrun_writes_one_run_equal_to_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m hap.cli prune``: one table, one run directory (rank 0's), and the
    taylor sensitivity of one process over the same batches (~40 s on 2 cores)."""
    import json
    import subprocess
    import sys

    import hap.models
    from hap.cli import main
    from hap.train import save_weights

    from .cli.conftest import write_tiny_fmnist

    fm = write_tiny_fmnist(tmp_path / "fm")
    ck = save_weights(hap.models.create("resnet20", num_classes=10, in_channels=1), tmp_path / "dense.safetensors")
    common = ["prune", "--data-root", str(fm), "--checkpoint", str(ck), "--method", "taylor", "--target",
              "params=0.5", "--finetune-epochs", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HAP_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "hap.cli", *common, "--out", str(tmp_path / "two")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("before / after") == 1 and r.stdout.count("written:") == 1
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "sensitivity.json").read_text())
    one = json.loads((tmp_path / "one" / "sensitivity.json").read_text())
    assert two["settings"]["world_size"] == 2 and two["batches"] == one["batches"]
    np.testing.assert_allclose([u["score"] for u in two["units"]], [u["score"] for u in one["units"]], rtol=1e-5)
    assert (tmp_path / "two" / "manifest.json").is_file() and (tmp_path / "two" / "model.safetensors").is_file()
    # --resume under torchrun: rank 0 inspects the run directory and shares its scores and checkpoint (an
    # unfinished run: its manifest removed, the fine-tune's checkpoint and sensitivity.json kept)
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "two" / "model.safetensors"))
    (tmp_path / "two" / "manifest.json").unlink()
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing to resume" not in r.stderr and r.stdout.count("written:") == 1
    assert (tmp_path / "two" / "manifest.json").is_file()
    after = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    resumed = json.loads((tmp_path / "two" / "sensitivity.json").read_text())
    assert [u["score"] for u in resumed["units"]] == [u["score"] for u in two["units"]]  # loaded, not recomputed


@pytest.mark.slow
def test_cli_train_under_torchrun_interrupted_then_resumed_equals_the_uninterrupted_run(tmp_path):
    """``torchrun ... hap train --epochs 3``, interrupted (SIGINT) once an epoch is checkpointed, then
    ``--resume``: the kept weights are those of the uninterrupted 2-rank run (~2 min on 2 cores)."""
    import json
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from .cli.conftest import write_tiny_fmnist

    fm = write_tiny_fmnist(tmp_path / "fm")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HAP_DIST_TIMEOUT": "30"}

    def cmd(out: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port()), "-m", "hap.cli", "train", "--data-root", str(fm), "--epochs", "3", "--batch-size",
                "32", "--threads", "1", "--no-progress", "--out", str(tmp_path / out), *extra]

    r = subprocess.run(cmd("ref"), capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    part = tmp_path / "part"
    p = subprocess.Popen(cmd("part"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while p.poll() is None and not (part / "last.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)  # torchrun and both ranks, as Ctrl-C in a terminal
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    interrupted = not (part / "manifest.json").is_file()
    epoch = json.loads((part / "last.json").read_text())["epoch"]
    r = subprocess.run(cmd("part", "--resume"), capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing to resume" not in r.stderr  # the other rank's scratch directory is not inspected
    print(f"interrupted: {interrupted}, after epoch {epoch}")  # (-s) a run that beat the SIGINT is resumed too
    ref, got = load_file(str(tmp_path / "ref" / "best.safetensors")), load_file(str(part / "best.safetensors"))
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)
    history = json.loads((part / "last.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert not [q for q in part.rglob("*") if "hap-rank" in q.name]  # no scratch output of rank 1 in the run
