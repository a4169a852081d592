"""``hap prune`` on a local causal-LM directory: a tiny random Llama (GQA 4/2) with a word-level tokenizer
that has no pad token, pruned end to end; perplexities in the metrics and the report, ``hf/`` loading with
plain transformers to the logits of ``hap.load``, and the one-line errors."""

from __future__ import annotations

import json
import math
import shlex

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import hap  # noqa: E402
from hap.cli import main  # noqa: E402
from hap.cli.prune import rerun_command  # noqa: E402
from hap.cli.sources import detect_task  # noqa: E402
from hap.pipeline import RunConfig  # noqa: E402
from hap.text import load_run  # noqa: E402
from hap.text.lm_data import load_lm_texts, pack_texts  # noqa: E402
from hap.train import CausalLMTask  # noqa: E402

from .._tiny_llm import VOCAB, make_decoder  # noqa: E402
from ..text.conftest import WORDS, save_model_dir, write_csv  # noqa: E402

EOS = "<|endoftext|>"
FAST = ["--finetune-steps", "2", "--max-samples", "4", "--sens-batches", "2", "--sens-batch-size", "2",
        "--max-length", "16", "--no-progress", "--threads", "1"]


def make_lm_tokenizer():
    """A word-level fast tokenizer over the test words, EOS but no pad token (as Llama's and GPT-2's)."""
    vocab = {w: i for i, w in enumerate(["<unk>", EOS, *WORDS])}
    assert len(vocab) <= VOCAB
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=EOS)


@pytest.fixture
def llama_dir(tmp_path):
    d = tmp_path / "llama"
    make_decoder("llama").save_pretrained(d)
    make_lm_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def texts(tmp_path):
    return write_csv(tmp_path / "texts.csv", n=90)


def _prune(llama_dir, texts, out, *extra):
    return main(["prune", "--units", "heads,neurons", "--model", str(llama_dir), "--data", str(texts),
                 "--target", "params=0.4", "--tol", "0.15", "--allocation", "even", "--out", str(out), *FAST,
                 *extra])


def test_a_causal_lm_prunes_end_to_end_with_perplexities_and_a_plain_hf_directory(llama_dir, texts, tmp_path):
    out = tmp_path / "run"
    assert _prune(llama_dir, texts, out) == 0
    m = json.loads((out / "metrics.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    for k in ("dense_test_ppl", "dense_val_ppl", "test_ppl_oneshot", "val_ppl_oneshot", "test_ppl", "val_ppl"):
        assert math.isfinite(m[k]) and m[k] > 1.0, k
    assert not any(k.endswith("_acc") or "_acc_" in k for k in m)  # a perplexity is never reported as accuracy
    assert m["finetune_steps"] == 2 and m["heads"] < m["heads_base"] and m["neurons"] < m["neurons_base"]
    assert cfg["data_options"]["task"] == "causal-lm" and cfg["max_length_used"] == 16
    assert m["hf_dir"] == "hf" and "hf_skipped" not in m

    # the reported perplexity is the saved model's, on the packed test split rebuilt from the inputs
    skeleton = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(out / "base"))
    model = hap.load(out, skeleton).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "base")
    reloaded, _, names = load_run(out)  # hap.text.load_run knows a causal-LM run from its base/config.json
    assert isinstance(reloaded, transformers.LlamaForCausalLM) and names == []
    assert tok.pad_token == EOS  # set from EOS: the task needs one, and the saved tokenizer keeps it
    data = pack_texts(load_lm_texts(str(texts), sizes={"train": 4000, "val": 500, "score": 512, "test": 1000}),
                      tok, 16)
    assert CausalLMTask(tok, max_length=16).metric_value(model, data, "test") == pytest.approx(m["test_ppl"],
                                                                                              rel=1e-9)
    # hf/ loads with plain transformers to the same logits as hap.load of the run
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ids = data.rows["test"][:2]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(hf(input_ids=ids).logits, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, rtol=0, atol=0)
    assert transformers.AutoTokenizer.from_pretrained(out / "hf")(WORDS[0])["input_ids"] == tok(WORDS[0])["input_ids"]
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert "hf/model.safetensors" in manifest and "hf/config.json" in manifest

    report = (out / "report.md").read_text()
    assert "test perplexity (dense)" in report and f"{m['test_ppl']:.3f}" in report and "accuracy" not in report
    assert "`hf/`" in report and (out / "heads.png").is_file()
    assert main(["report", str(out)]) == 0  # hap report regenerates the same perplexity report
    assert (out / "report.md").read_text() == report

    rerun = shlex.split(cfg["rerun"])
    assert rerun[:4] == ["hap", "prune", "--units", "heads,neurons"] and "--classes" not in rerun
    for flag, value in (("--task", "causal-lm"), ("--allocation", "even"), ("--tol", "0.15"),
                        ("--sens-batches", "2"), ("--sens-batch-size", "2")):
        assert rerun[rerun.index(flag) + 1] == value, flag
    again = tmp_path / "again"  # the rerun command repeats the run: the same plan and perplexities
    assert main([*rerun[1:rerun.index("--out")], "--out", str(again), "--no-progress", "--threads", "1"]) == 0
    m2 = json.loads((again / "metrics.json").read_text())
    plans = [json.loads((d / "plan.json").read_text())["groups"] for d in (out, again)]
    assert plans[0] == plans[1]
    for k in ("dense_test_ppl", "test_ppl_oneshot", "test_ppl", "test_labels_sha"):
        assert m2[k] == m[k], k


def test_per_layer_widths_skip_hf_with_the_reason(llama_dir, texts, tmp_path):
    out = tmp_path / "run"
    (out / "hf").mkdir(parents=True)  # a failed earlier run's hf/ is a leftover, and must not survive
    (out / "hf" / "config.json").write_text("{}")
    assert _prune(llama_dir, texts, out, "--allocation", "global", "--rank-by", "score_per_param") == 0
    m = json.loads((out / "metrics.json").read_text())
    heads = [g for g in json.loads((out / "plan.json").read_text())["groups"] if g["kind"] == "head"]
    assert len({len(g["kept"]) for g in heads}) > 1  # the global ranking kept different head counts per layer
    assert m["hf_dir"] is None and "differ per layer" in m["hf_skipped"] and not (out / "hf").exists()
    assert m["hf_skipped"] in (out / "report.md").read_text()


def test_query_slots_take_a_heads_target_counting_query_heads(llama_dir, texts, tmp_path):
    """``--units query_slots --target heads=0.5``: half of the query heads go (one slot of each layer's two),
    every K/V head stays."""
    out = tmp_path / "run"
    assert main(["prune", "--units", "query_slots", "--model", str(llama_dir), "--data", str(texts),
                 "--target", "heads=0.5", "--out", str(out), *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["query_heads_base"] == 8 and m["query_heads"] == 4 and m["kv_heads"] == 4
    assert json.loads((out / "plan.json").read_text())["target"] == {"heads": 0.5}


@pytest.mark.parametrize("target, tol", [("0.2", "0.15"), ("0.4", "0.1")])
def test_query_slots_prune_a_gqa_lm_end_to_end_with_query_heads_and_hf(llama_dir, texts, tmp_path, capsys,
                                                                        target, tol):
    """``--units query_slots,neurons``: query head j of every KV group (K/V kept) with the FFN neurons; the
    metrics count query heads (KV heads x slots kept), and the even plan's ``hf/`` loads in transformers.

    At 20% the scores may spend the budget on neurons alone; at 40% +- 10% they cannot (every layer keeps a
    neuron, so the neurons are at most 2 x 23 x 96 = 29% of the 15k parameters): slots go too."""
    out = tmp_path / "run"
    assert main(["prune", "--units", "query_slots,neurons", "--model", str(llama_dir), "--data", str(texts),
                 "--target", f"params={target}", "--tol", tol, "--allocation", "even", "--out", str(out),
                 *FAST]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    for k in ("dense_test_ppl", "test_ppl_oneshot", "test_ppl", "val_ppl"):
        assert math.isfinite(m[k]) and m[k] > 1.0, k
    slots = [g for g in plan["groups"] if g["kind"] == "query_slot"]
    assert slots and not any(g["kind"] == "head" for g in plan["groups"]) and "heads_base" not in m
    assert m["params_removed"] == pytest.approx(float(target), abs=float(tol))

    skeleton = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(out / "base"))
    model = hap.load(out, skeleton).eval()
    attn = [layer.self_attn for layer in model.model.layers]
    n_kv = [a.k_proj.out_features // a.head_dim for a in attn]
    assert n_kv == [2, 2]  # K/V untouched
    # the counts are the saved model's query heads, and the dense model's (4 per layer)
    assert m["query_heads"] == sum(a.q_proj.out_features // a.head_dim for a in attn) <= m["query_heads_base"] == 8
    assert m["query_heads"] < 8 or target == "0.2"
    assert m["query_heads_per_layer"] == {g["name"]: 2 * len(g["kept"]) for g in slots} and m["kv_heads"] == 4
    assert m["query_heads_removed"] == pytest.approx(1 - m["query_heads"] / 8)
    assert f"query heads 8 -> {m['query_heads']}" in printed

    report = (out / "report.md").read_text()
    assert f"| query heads (query slots; all 4 K/V heads kept) | 8 | {m['query_heads']} " in report
    assert f"{m['test_ppl']:.3f}" in report and "query slots" in report.split("Kept per layer:")[1]
    assert m["hf_dir"] == "hf" and "`hf/`" in report
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    assert hf.config.num_attention_heads * len(attn) == m["query_heads"] and hf.config.num_key_value_heads == 2
    ids = torch.arange(1, 11).view(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-10, atol=1e-10)
    rerun = shlex.split(json.loads((out / "config.json").read_text())["rerun"])
    assert rerun[:4] == ["hap", "prune", "--units", "query_slots,neurons"]
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == report
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--threads", "1"]) == 0  # hap.text.load_run replays the slots
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["ppl"] == pytest.approx(m["test_ppl"], rel=1e-9) and got["params"] == m["params"]


@pytest.mark.parametrize("units, arch, needle", [
    ("query_slots", "gpt2", "'transformer.h.0.attn' is 'gpt2' attention"),  # fused Q|K|V, no GQA
    ("query_slots,neurons", "gpt2", "'transformer.h.0.attn' is 'gpt2' attention"),
    ("query_slots", "bert", "'bert.encoder.layer.0.attention' is"),  # an encoder classifier, refused before training
])
def test_query_slots_on_a_model_without_gqa_is_one_line_naming_heads(tmp_path, texts, capsys, units, arch, needle):
    d = tmp_path / arch
    if arch == "bert":
        save_model_dir(d)
    else:
        make_decoder(arch).save_pretrained(d)
        make_lm_tokenizer().save_pretrained(d)
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["prune", "--units", units, "--model", str(d), "--data", str(texts), "--target", "params=0.1",
                 "--out", str(tmp_path / "r"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"hap prune: error: --units {units}: "), err
    assert needle in err
    assert err.endswith(f"pass --units {units.replace('query_slots', 'heads')} (whole heads; KV groups under GQA)")
    assert not any((tmp_path / "r").iterdir())  # refused right after loading: nothing written


def test_query_slots_on_multi_head_attention_name_heads():
    """A Llama with as many KV heads as query heads has one slot per layer: none could ever be removed."""
    from hap.cli.common import UserError
    from hap.cli.sources import check_units

    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=8)
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(UserError, match=r"one query head per KV head.*: pass --units heads,neurons \(whole"):
        check_units("query_slots,neurons", model)
    check_units("heads,neurons", model)  # other families are not asked


def test_query_slots_refuse_a_channels_target(llama_dir, texts, tmp_path, capsys):
    assert main(["prune", "--units", "query_slots", "--model", str(llama_dir), "--data", str(texts),
                 "--target", "channels=0.5", "--out", str(tmp_path / "r"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "channels" in err and "heads" in err and not (tmp_path / "r").exists()


def test_the_task_is_read_from_the_directory_and_can_be_overridden(llama_dir, tmp_path):
    assert detect_task(str(llama_dir)) == "causal-lm"
    cfg_path = llama_dir / "config.json"
    c = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**c, "architectures": ["LlamaForSequenceClassification"]}))
    assert detect_task(str(llama_dir)) == "classification"
    cfg_path.write_text(json.dumps({k: v for k, v in c.items() if k != "architectures"}))
    assert detect_task(str(llama_dir)) == "causal-lm"  # no architecture named: a decoder model_type
    assert detect_task("minilm") == "classification" and detect_task(str(tmp_path / "nothing")) == "classification"


@pytest.mark.parametrize("args, needle", [
    (["--units", "channels"], "is a causal LM, whose units are attention heads"),
    (["--units", "heads,neurons", "--task", "causal-lm", "--model", "meta-llama/Llama-3.2-1B"],
     "not a local model directory and hap downloads nothing"),
    (["--units", "heads,neurons", "--model", "meta-llama/Llama-3.2-1B"], "hap downloads nothing"),  # task: auto
])
def test_errors_are_one_line_exit_2(llama_dir, texts, tmp_path, capsys, args, needle):
    argv = ["prune", "--model", str(llama_dir), "--data", str(texts), "--out", str(tmp_path / "r"), *FAST, *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("hap prune: error:")


def test_too_little_text_for_one_sequence_is_refused(llama_dir, tmp_path, capsys):
    small = write_csv(tmp_path / "few.csv", n=20)  # 2 test texts: fewer tokens than one 16-token sequence
    assert main(["prune", "--units", "heads", "--model", str(llama_dir), "--data", str(small),
                 "--target", "heads=0.5", "--out", str(tmp_path / "r"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "fewer than one sequence of 16" in err and len(err.splitlines()) == 1


def test_rerun_spells_non_default_device_and_fisher_backend():
    cfg = RunConfig.for_units("heads,neurons", device="cpu", data="tweets", model="m",
                              data_options={"task": "causal-lm"})
    cfg = cfg.replace(sensitivity=cfg.sensitivity.replace(fisher_backend="vmap"))
    parts = shlex.split(rerun_command(cfg, tmp := __import__("pathlib").Path("o")))
    assert parts[parts.index("--device") + 1] == "cpu" and parts[parts.index("--fisher-backend") + 1] == "vmap"
    assert parts[parts.index("--task") + 1] == "causal-lm" and parts[-2:] == ["--out", str(tmp)]
    default = shlex.split(rerun_command(RunConfig.for_units("heads,neurons", model="m", data="tweets"), tmp))
    assert "--device" not in default and "--fisher-backend" not in default and "--task" not in default


def test_eval_and_finetune_of_a_causal_lm_run(llama_dir, texts, tmp_path, capsys):
    """``hap eval --run`` gives a causal-LM run's test perplexity (the one in its metrics), ``hap finetune``
    trains it further with the next-token loss and replaces model, ``hf/``, metrics, report and manifest."""
    from hap.cli.common import verify_run

    out = tmp_path / "run"
    assert _prune(llama_dir, texts, out) == 0
    m = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--threads", "1"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["split"] == "test" and got["ppl"] == pytest.approx(m["test_ppl"], rel=1e-9)
    assert got["tokens"] == m["test_size"] and got["params"] == m["params"]

    assert main(["finetune", "--run", str(out), "--epochs", "1", "--lr", "1e-3", "--no-progress",
                 "--threads", "1"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m2 = json.loads((out / "metrics.json").read_text())
    extra = m2["extra_finetune"][-1]
    assert line["steps"] == extra["steps"] > 0 and extra["lr"] == 1e-3
    assert m2["finetune_steps"] == m["finetune_steps"] + extra["steps"]
    assert m2["test_ppl"] == line["test_ppl"] != m["test_ppl"] and m2["test_labels_sha"] == m["test_labels_sha"]
    verify_run(out)  # the manifest covers the new files
    # the saved model is the fine-tuned one: its perplexity is the one reported, and hf/ holds the same weights
    assert main(["eval", "--run", str(out), "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] == pytest.approx(m2["test_ppl"],
                                                                                                 rel=1e-9)
    reloaded, _, _ = load_run(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    ids = torch.arange(1, 9).view(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, reloaded(input_ids=ids).logits, rtol=1e-10, atol=1e-10)
    report = (out / "report.md").read_text()
    assert f"after {m2['finetune_steps']} fine-tune steps | | {m2['test_ppl']:.3f}" in report


def test_a_text_run_refuses_zoo_options_and_an_empty_budget(llama_dir, texts, tmp_path, capsys):
    out = tmp_path / "run"
    assert _prune(llama_dir, texts, out) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--data", "cifar10"]) == 2
    assert main(["finetune", "--run", str(out), "--epochs", "0", "--no-progress"]) == 2
    assert main(["finetune", "--run", str(out), "--lr", "-1", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"hap eval: error: '{out}' is a text run, which reads its own model and data: drop --data",
        "hap finetune: error: this fine-tune has no step to take (--epochs 0, or the run's own budget of 0 steps): "
        "give --epochs 1 or more",
        "hap finetune: error: --lr -1.0: must be > 0"]
