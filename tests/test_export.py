"""hap.export: ONNX and torch.export files reproduce PyTorch at other batch sizes than the traced one,
implants and pruned encoders included; failures leave no file behind."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hap
from hap.implant import ImplantedConv

ex = importlib.import_module("hap.export")  # the module (``hap.export`` itself is the function)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BatchNorm matters
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def implanted_cnn() -> tuple[nn.Module, torch.Tensor]:
    model, x = tiny_cnn(1), torch.randn(4, 1, 10, 10)
    sens = hap.sensitivity(model, F.cross_entropy, [(x, torch.tensor([0, 1, 2, 0]))], method="l1", progress=False)
    plan = hap.plan(model, sens, hap.Target(channels=0.5), implant="pointwise", implant_fraction=0.5,
                    example_inputs=x[:1])
    small = hap.prune(model, plan).eval()
    assert any(isinstance(m, ImplantedConv) for m in small.modules())
    return small, x[:2]


def pruned_bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    pytest.importorskip("transformers")
    from .text.conftest import make_bert

    model = make_bert()
    ids = torch.randint(5, 25, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}

    def loss(out, y):
        return F.cross_entropy(out.logits, y)

    sens = hap.sensitivity(model, loss, [(inputs, torch.tensor([0, 1]))], units="heads", method="l1", progress=False)
    small = hap.prune(model, hap.plan(model, sens, hap.Target(heads=0.5))).eval()
    return small, inputs


def _model(kind: str):
    if kind == "cnn":
        return tiny_cnn(), torch.randn(2, 1, 10, 10)
    return implanted_cnn() if kind == "implanted" else pruned_bert()


def _outputs(model, inputs) -> list[np.ndarray]:
    with torch.no_grad():
        out = hap._utils.call_model(model, inputs)
    return [t.numpy() for t in ex._flat(out)]


@pytest.mark.parametrize("kind", ["cnn", "implanted", "bert"])
@pytest.mark.parametrize("fmt", ["onnx", "torch.export"])
def test_round_trip_at_other_batch_sizes(tmp_path, kind, fmt):
    model, x = _model(kind)
    path = ex.export(model, x, tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'pt2'}", format=fmt)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    for n in (2, 5):  # neither the traced example's batch nor the export-time check's (1, 3)
        xi = ex.check_batches(x, n, seed=10 + n)
        want = _outputs(model, xi)
        if fmt == "onnx":
            import onnxruntime as ort

            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feed = ({k: v.numpy() for k, v in xi.items()} if isinstance(xi, dict)
                    else {sess.get_inputs()[0].name: xi.numpy()})
            got = sess.run(None, feed)
        else:
            prog = torch.export.load(str(path)).module()  # no hap needed to run it: plain ATen ops
            got = _outputs(prog, xi)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.shape[0] == n
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_batch_one_example_still_exports_a_dynamic_batch(tmp_path):
    model = tiny_cnn()
    path = ex.export(model, torch.randn(1, 1, 8, 8), tmp_path / "m.pt2", format="torch.export")
    out = torch.export.load(str(path)).module()(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 3)


def test_unknown_format_is_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'tflite'.*onnx, torch.export"):
        ex.export(tiny_cnn(), torch.randn(2, 1, 8, 8), tmp_path / "m.tfl", format="tflite")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["onnx", "torch.export"])
def test_failed_check_leaves_no_file(tmp_path, monkeypatch, fmt):
    runner = "_run_onnx" if fmt == "onnx" else "_run_program"
    real = getattr(ex, runner)
    monkeypatch.setattr(ex, runner, lambda p, x: [np.asarray(o) + 1e-2 for o in real(p, x)])
    model = tiny_cnn()
    training = model.train()  # the caller's mode comes back even on failure
    with pytest.raises(ValueError, match=r"export check failed \(.*batch 1\): output 0 differs"):
        ex.export(training, torch.randn(2, 1, 8, 8), tmp_path / "m.out", format=fmt)
    assert not list(tmp_path.iterdir()) and model.training


def test_tracer_failure_suggests_the_other_format(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("data-dependent control flow\nsecond line")

    monkeypatch.setattr(torch.export, "export", boom)
    with pytest.raises(ValueError) as info:
        ex.export(tiny_cnn(), torch.randn(2, 1, 8, 8), tmp_path / "m.pt2", format="torch.export")
    msg = str(info.value)
    assert msg.startswith("export failed: RuntimeError: data-dependent control flow") and "try --format onnx" in msg
    assert "\n" not in msg and not list(tmp_path.iterdir())
