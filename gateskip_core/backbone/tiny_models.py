"""Tiny seeded random models with a byte-level tokenizer, for fast tests.

They have the real architectures (Llama; Gemma-3 with sliding-window and global
layers, q/k norms and post-branch norms; Mistral, Qwen2 and Qwen3 with sliding windows,
q/k/v biases and q/k norms) at toy sizes, so every code path runs
in milliseconds. Their weights are random: their text is noise.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SPECIALS = ["<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<eos>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 5 special tokens, then one token per byte."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: ord(c))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        chat_template=CHAT_TEMPLATE,
    )


# Every family the walk supports has a tiny model (the family tests build each one).
TINY_FAMILIES = ("llama", "gemma3", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2", "gpt2", "gpt_neox")


def _common(vocab_size: int) -> dict:
    """The toy sizes the Llama-like families share."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )


def _llama(vocab_size: int) -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(**_common(vocab_size), attn_implementation="eager"))


def _gemma3(vocab_size: int) -> PreTrainedModel:
    config = Gemma3TextConfig(
        **_common(vocab_size),
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
        attn_implementation="eager",
    )
    return Gemma3ForCausalLM(config)


def _mistral(vocab_size: int) -> PreTrainedModel:  # sliding windows in every layer
    return MistralForCausalLM(MistralConfig(**_common(vocab_size), sliding_window=8, attn_implementation="eager"))


def _qwen(kind: str, vocab_size: int) -> PreTrainedModel:
    """Biases on q/k/v (qwen2), q/k norms (qwen3); sliding and full layers."""
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config = config_class(
        **_common(vocab_size),
        use_sliding_window=True,
        sliding_window=8,
        layer_types=layer_types,
        attn_implementation="eager",
    )
    model = model_class(config)
    if kind == "qwen2":
        with torch.no_grad():  # biases away from zero, so a test notices a dropped bias
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.normal_(0, 0.5)
    return model


def _phi3(vocab_size: int) -> PreTrainedModel:  # fused qkv and gate_up projections, partial rotary
    return Phi3ForCausalLM(Phi3Config(**_common(vocab_size), partial_rotary_factor=0.5, attn_implementation="eager"))


def _gemma2(vocab_size: int) -> PreTrainedModel:  # soft-capped attention and logits, alternating layers
    config = Gemma2Config(
        **_common(vocab_size),
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
        attn_logit_softcapping=0.02,  # tiny: the tiny model's small scores do reach the cap
        final_logit_softcapping=0.5,
        attn_implementation="eager",
    )
    return Gemma2ForCausalLM(config)


def _gpt2(vocab_size: int) -> PreTrainedModel:  # LayerNorm, learned positions, Conv1D projections, GELU MLP
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_inner=256, n_positions=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def _gpt_neox(vocab_size: int) -> PreTrainedModel:  # Pythia: parallel residual, partial rotary, fused qkv
    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=256, rotary_pct=0.25, max_position_embeddings=512, use_parallel_residual=True,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return GPTNeoXForCausalLM(config)


def _olmo2(vocab_size: int) -> PreTrainedModel:  # post-norms only, q/k norms over the whole projection
    return Olmo2ForCausalLM(Olmo2Config(**_common(vocab_size), attn_implementation="eager"))


_BUILDERS = {
    "llama": _llama,
    "gemma3": _gemma3,
    "mistral": _mistral,
    "qwen2": lambda vocab_size: _qwen("qwen2", vocab_size),
    "qwen3": lambda vocab_size: _qwen("qwen3", vocab_size),
    "phi3": _phi3,
    "gemma2": _gemma2,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "olmo2": _olmo2,
}


def build_tiny_model(kind: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A seeded random model of family `kind` (one of `TINY_FAMILIES`) and the byte tokenizer."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    model = _BUILDERS[kind](len(tokenizer))
    # Random norm weights, so a test notices if a norm is applied in the wrong place.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.float().eval(), tokenizer
