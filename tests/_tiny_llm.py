"""Tiny random-init decoder LLMs (Llama with GQA 4/2, Qwen2, Mistral, GPT-2) and a ViT, shared by the tests.

Two layers, width 32, float64, eval mode: every forward is a few milliseconds, so masked-vs-pruned checks are
exact to round-off and each test takes well under a second.
"""

from __future__ import annotations

import torch
import torch.nn as nn

DECODERS = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 61


def make_decoder(arch: str, seed: int = 0, inter: int = 24) -> nn.Module:
    """A 2-layer causal LM: Llama with 4 query / 2 KV heads (head_dim 8), Qwen2 (Q/K/V biases, 4/2),
    Mistral (4/1: multi-query), GPT-2 (4 heads, n_inner=``inter``)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=inter, max_position_embeddings=32, initializer_range=0.3,
                  tie_word_embeddings=False)
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, attention_bias=True, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=1, sliding_window=None, **common)
        model = transformers.MistralForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=inter,
                                      n_positions=32, initializer_range=0.3, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, tie_word_embeddings=False)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # non-zero biases, so a bias that is dropped or kept wrongly shows
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.3)
    return model.double().eval()


def make_vit(seed: int = 0, inter: int = 24, labels: int = 3) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=inter, num_labels=labels,
                                 initializer_range=0.3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg).double().eval()


def token_batch(seed: int = 0, n: int = 3, t: int = 9, pad: bool = True) -> dict[str, torch.Tensor]:
    """Token ids and an attention mask (the first row right-padded by 3 when ``pad``)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=gen)
    mask = torch.ones(n, t, dtype=torch.long)
    if pad:
        mask[0, t - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module, x: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(**x) if isinstance(x, dict) else model(x)).logits
