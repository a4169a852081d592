"""Training loop: resumable checkpoints that survive an interruption, BN re-estimation, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import hap.data
import hap.models
from hap.train import (
    TrainConfig,
    evaluate,
    load_weights,
    pick_memory_format,
    recalibrate_bn,
    save_weights,
    train,
)
from hap.train import checkpoint as ck_mod
from hap.train.checkpoint import read_checkpoint


class _Data:
    """A tiny in-memory dataset with the loader interface of hap.data.Dataset."""

    def __init__(self, n=64, interrupt_at=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 8, 8, generator=g)
        self.y = (self.x.mean((1, 2, 3)) > 0).long()
        self.interrupt_at = interrupt_at
        self.calls = 0

    def loader(self, split, batch_size, shuffle=False, augment=False, generator=None, drop_last=False):
        data = self

        class L:
            def __len__(self):
                return -(-len(data.x) // batch_size)

            def __iter__(self):
                for i in range(len(self)):
                    if split == "train":
                        data.calls += 1
                        if data.interrupt_at is not None and data.calls == data.interrupt_at:
                            raise KeyboardInterrupt
                    s = slice(i * batch_size, (i + 1) * batch_size)
                    yield data.x[s], data.y[s]

        return L()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2))


def test_interrupted_run_keeps_a_valid_checkpoint_and_resumes_identically(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.1, batch_size=16, augment=False, seed=0, memory_format="contiguous")
    # uninterrupted reference
    ref = _model()
    train(ref, _Data(), cfg, out_dir=tmp_path / "ref", progress=False)
    ref_last = load_weights(_model(), read_checkpoint(tmp_path / "ref").weights)
    # interrupted in the middle of epoch 2 (4 train batches per epoch): the last checkpoint is epoch 1
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_model(), _Data(interrupt_at=6), cfg, out_dir=run, progress=False)
    meta = json.loads((run / "last.json").read_text())
    assert meta["epoch"] == 0
    load_weights(_model(), read_checkpoint(run).weights)  # loads: not half-written
    assert not list(run.rglob(".*tmp"))
    # resuming gives the same final weights as the uninterrupted run
    resumed = _model()
    train(resumed, _Data(), cfg, out_dir=run, resume=True, progress=False)
    got = load_weights(_model(), read_checkpoint(run).weights)
    for a, b in zip(got.state_dict().values(), ref_last.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fail_at", [1, 2, 3, "pointer"])
def test_a_kill_inside_a_checkpoint_write_leaves_the_previous_set(tmp_path, monkeypatch, fail_at):
    """Issue 15 item 3: the files of one epoch are one set; dying between any two of them (or before the
    pointer's rename) leaves last.json naming the previous complete set, and resume ends bit-identical."""
    cfg = TrainConfig(epochs=3, lr=0.1, batch_size=16, augment=False, seed=0, memory_format="contiguous")
    ref = _model()
    train(ref, _Data(), cfg, out_dir=tmp_path / "ref", progress=False)
    run = tmp_path / "run"
    real_save, real_pointer = ck_mod.save_file, ck_mod._write_pointer
    calls = {"n": 0, "sets": 0}

    def save(tensors, path):  # epoch 2's set (index 1) dies at its fail_at-th file
        calls["n"] += 1
        if calls["sets"] == 1 and fail_at != "pointer" and calls["n"] == fail_at:
            raise KeyboardInterrupt
        return real_save(tensors, path)

    def pointer(path, meta):
        calls["sets"] += 1
        calls["n"] = 0
        if calls["sets"] == 2 and fail_at == "pointer":
            raise KeyboardInterrupt
        return real_pointer(path, meta)

    monkeypatch.setattr(ck_mod, "save_file", save)
    monkeypatch.setattr(ck_mod, "_write_pointer", pointer)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), _Data(), cfg, out_dir=run, progress=False)
    monkeypatch.undo()
    ck = read_checkpoint(run)  # checksums verified
    assert ck.meta["epoch"] == 0 and len(ck.meta["history"]) == 1
    resumed = _model()
    res = train(resumed, _Data(), cfg, out_dir=run, resume=True, progress=False)
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    for a, b in zip(resumed.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [d.name for d in (run / "checkpoints").iterdir()] == [read_checkpoint(run).directory.name]


def test_resume_with_changed_options_names_them(tmp_path):
    cfg = TrainConfig(epochs=1, lr=0.1, batch_size=16, augment=False, memory_format="contiguous")
    train(_model(), _Data(), cfg, out_dir=tmp_path, progress=False, tag={"model": "a"})
    with pytest.raises(ValueError, match=r"lr: 0\.1 -> 0\.05"):
        train(_model(), _Data(), cfg.replace(lr=0.05), out_dir=tmp_path, resume=True, progress=False,
              tag={"model": "a"})
    with pytest.raises(ValueError, match="model: 'a' -> 'b'"):
        train(_model(), _Data(), cfg, out_dir=tmp_path, resume=True, progress=False, tag={"model": "b"})


def test_a_tampered_checkpoint_is_refused(tmp_path):
    cfg = TrainConfig(epochs=1, lr=0.1, batch_size=16, augment=False, memory_format="contiguous")
    train(_model(), _Data(), cfg, out_dir=tmp_path, progress=False)
    w = read_checkpoint(tmp_path).weights
    w.write_bytes(w.read_bytes()[:-7] + b"1234567")
    with pytest.raises(ValueError, match="checksum"):
        train(_model(), _Data(), cfg, out_dir=tmp_path, resume=True, progress=False)


def test_nan_loss_is_a_clear_error():
    d = _Data()
    d.x[:] = float("nan")
    with pytest.raises(RuntimeError, match="training loss is nan"):
        train(_model(), d, TrainConfig(epochs=1, batch_size=16, augment=False), progress=False)


def test_recalibrate_bn_matches_batch_statistics():
    m = _model()
    d = _Data()
    recalibrate_bn(m, d.loader("train", 64), max_batches=1)
    bn = m[1]
    with torch.no_grad():
        h = m[0](d.x)
    torch.testing.assert_close(bn.running_mean, h.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, h.var((0, 2, 3), unbiased=True))
    assert m.training  # mode restored


def test_weights_of_another_architecture_are_refused(tmp_path):
    p = save_weights(_model(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="another architecture"):
        load_weights(hap.models.create("resnet20", num_classes=2, in_channels=1), p)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_weights(_model(), tmp_path / "bad.safetensors")


def test_evaluate_counts():
    d = _Data()
    r = evaluate(_model(), d.loader("val", 16))
    assert r["n"] == 64 and 0.0 <= r["acc"] <= 1.0


def test_fashion_mnist_training_improves_on_a_subset():
    pytest.importorskip("gzip")
    try:
        data = hap.data.load("fashion-mnist", subset=600, seed=0)
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist not installed")
    torch.manual_seed(0)
    model = hap.models.create("resnet20", num_classes=10, in_channels=1)
    before = evaluate(model, data.loader("val", 256))["acc"]
    res = train(model, data, TrainConfig(epochs=2, lr=0.05, batch_size=32), progress=False)
    assert res.best_val_acc > before + 0.2


def test_channels_last_training_matches_contiguous_and_returns_a_contiguous_model():
    results, models = {}, {}
    for fmt in ("contiguous", "channels_last"):
        m = _model()
        results[fmt] = train(m, _Data(), TrainConfig(epochs=2, lr=0.1, batch_size=16, augment=False,
                                                    memory_format=fmt), progress=False)
        models[fmt] = m
    assert results["channels_last"].memory_format == "channels_last"
    assert results["contiguous"].memory_format == "contiguous"
    conv = models["channels_last"][0].weight
    assert conv.is_contiguous()  # handed back in the layout it came in
    for a, b in zip(models["channels_last"].state_dict().values(), models["contiguous"].state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # same arithmetic up to summation order


def test_auto_memory_format_probe_leaves_the_model_untouched():
    m = _model()
    m[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    d = _Data()
    choice = pick_memory_format(m, d.x[:16], d.y[:16], reps=1)
    assert choice in ("contiguous", "channels_last")
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in m.parameters())
    assert pick_memory_format(nn.Linear(4, 2), torch.randn(3, 4), torch.tensor([0, 1, 0])) == "contiguous"
    res = train(_model(), _Data(), TrainConfig(epochs=1, batch_size=16, augment=False), progress=False)
    assert res.memory_format in ("contiguous", "channels_last")


def test_unknown_memory_format_is_a_clear_error():
    with pytest.raises(ValueError, match="memory_format must be one of"):
        train(_model(), _Data(), TrainConfig(epochs=1, memory_format="nhwc"), progress=False)
