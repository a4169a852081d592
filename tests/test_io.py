"""hap.save / hap.load: plan.json + model.safetensors, replayed on a fresh base model, no pickle."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import hap
import hap.models as zoo
from hap.implant import ImplantedConv

from ._plan_helpers import example, randomize, scores  # noqa: F401

_CACHE: dict[tuple, tuple] = {}


def _setup(implant="pointwise", seed=0):
    """(base model, input, plan, pruned and perturbed model); planned once per (implant, seed)."""
    if (implant, seed) not in _CACHE:
        _CACHE[(implant, seed)] = _build(implant, seed)
    model, x, p, small = _CACHE[(implant, seed)]
    return model, x, copy.deepcopy(p), copy.deepcopy(small)


def _build(implant, seed):
    torch.manual_seed(seed)
    model = randomize(zoo.create("resnet20", num_classes=4, in_channels=1), seed=seed)
    x = example(model, n=2, side=12)
    sens = scores(model, x)
    p = hap.plan(model, sens, hap.Target(params=0.4), implant=implant, implant_fraction=0.3, example_inputs=x[:1])
    small = hap.prune(model, p)
    with torch.no_grad():  # stand-in for fine-tuning: weights move away from the base model's
        for prm in small.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    return model, x, p, small


def _fresh():
    return zoo.create("resnet20", num_classes=4, in_channels=1)


@pytest.mark.parametrize("implant", ["pointwise", "lowrank", None])
def test_save_load_gives_identical_outputs(tmp_path, implant):
    _, x, p, small = _setup(implant)
    out_dir = hap.save(small, p, tmp_path / "pruned")
    assert sorted(f.name for f in out_dir.iterdir()) == ["model.safetensors", "plan.json"]
    base = _fresh()
    loaded = hap.load(out_dir, base)
    assert hap.model_signature(base) == p.model_signature  # the base model is not modified
    small.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert (sum(isinstance(m, ImplantedConv) for m in loaded.modules()) > 0) == (implant is not None)
    # the files are plain data: JSON and named tensors
    assert hap.PruningPlan.from_json((out_dir / "plan.json").read_text()) == p
    tensors = load_file(out_dir / "model.safetensors")
    assert set(tensors) == set(small.state_dict())


def test_load_keeps_the_state_of_bn_buffers(tmp_path):
    _, x, p, small = _setup()
    for m in small.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.add_(1.0)
    loaded = hap.load(hap.save(small, p, tmp_path), _fresh())
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), small.eval()(x))


def test_mismatched_base_model_is_refused(tmp_path):
    _, _, p, small = _setup()
    hap.save(small, p, tmp_path)
    other = zoo.create("resnet32", num_classes=4, in_channels=1)
    with pytest.raises(ValueError, match="base_model is not the architecture"):
        hap.load(tmp_path, other)
    with pytest.raises(ValueError, match="base_model is not the architecture"):
        hap.load(tmp_path, zoo.create("resnet20", num_classes=5, in_channels=1))


def test_saving_a_model_the_plan_did_not_produce_writes_nothing(tmp_path):
    model, _, p, small = _setup()
    hap.save(small, p, tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="not the result of this plan"):
        hap.save(model, p, tmp_path)  # the unpruned model
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved model"):
        hap.load(tmp_path / "nowhere", _fresh())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hap.load(tmp_path, _fresh())
    _, _, p, small = _setup()
    hap.save(small, p, tmp_path)
    (tmp_path / "plan.json").unlink()
    with pytest.raises(FileNotFoundError, match="no plan file"):
        hap.load(tmp_path, _fresh())


@pytest.mark.parametrize("cut", [0.0, 0.001, 0.5, 0.999])
def test_truncated_weights_are_a_clear_error(tmp_path, cut):
    _, _, p, small = _setup()
    hap.save(small, p, tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match="truncated or corrupted") as err:
        hap.load(tmp_path, _fresh())
    assert "\n" not in str(err.value)


def test_corrupted_plan_json_is_a_clear_error(tmp_path):
    _, _, p, small = _setup()
    hap.save(small, p, tmp_path)
    path = tmp_path / "plan.json"
    text = path.read_text()
    for bad in (text[: len(text) // 3], text.replace('"kept"', '"keep"'), "\x00\x01"):
        path.write_text(bad)
        with pytest.raises(ValueError, match="not a valid plan"):
            hap.load(tmp_path, _fresh())
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not a valid plan"):
        hap.load(tmp_path, _fresh())


def test_weights_of_another_plan_are_refused(tmp_path):
    """plan.json and model.safetensors from two different saves do not mix silently."""
    _, _, p1, small1 = _setup(seed=0)
    hap.save(small1, p1, tmp_path / "one")
    _, _, p2, small2 = _setup("lowrank", seed=1)
    hap.save(small2, p2, tmp_path / "two")
    (tmp_path / "one" / "plan.json").write_text((tmp_path / "two" / "plan.json").read_text())
    with pytest.raises(ValueError, match="another architecture"):
        hap.load(tmp_path / "one", _fresh())


def test_plan_json_is_readable(tmp_path):
    _, _, p, small = _setup()
    hap.save(small, p, tmp_path)
    d = json.loads((tmp_path / "plan.json").read_text())
    assert d["target"] == {"params": 0.4} and d["version"] == 1
    assert {"name", "size", "kept", "implanted", "removed", "implant", "note"} <= set(d["groups"][0])
    assert abs(1 - d["achieved"]["params"] / d["base"]["params"] - 0.4) <= 0.01
