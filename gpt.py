"""gpt.py: the GPT-2 model every stage of this project stands on, then what the stages share.

Sections 1 to 5 are GPT-2, the whole model a learner studies, to be read top to bottom:

1. configuration   `GPTConfig`, `GPT_CONFIGS` (the four released sizes)
2. the model       `CausalSelfAttention`, `MLP`, `TransformerBlock`, `GPTModel`, `next_token_loss`
3. LoRA            `LoRALinear`, `add_lora`, `merge_lora`
4. generation      `KVCache`, `sample_next_token`, `generate_stream`, `generate`
5. tokenizer       `Tokenizer`, `get_tokenizer`, `text_to_token_ids`, `token_ids_to_text`
6. other families  the same decoder with parts exchanged (Llama, Qwen3, Mistral, Phi, Gemma 3)

The toolbox the stages share follows: files, `load` (a model and its tokenizer from any
source, a GGUF file too), checkpoints, `export_hf` and `export_gguf`, and the plumbing of a run.

The model follows OpenAI's GPT-2 release (Radford et al., 2019, "Language Models are Unsupervised
Multitask Learners") and names its parameters as Hugging Face's `GPT2LMHeadModel` does (`wte`, `wpe`,
`h.N.attn.c_attn`, ...), so loading the released weights is a loop; the other families use Hugging
Face's names for the same reason. `test_all.py` checks their logits against `transformers` to 1e-4.
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import mmap
import os
import random
import re
import signal
import struct
import sys
import threading
import time
import unicodedata
import zipfile
import zlib
from pathlib import Path

import requests
import tiktoken
import tiktoken.load
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------

EOT_ID = 50256  # id of <|endoftext|>, the last token of GPT-2's vocabulary of 50257


@dataclasses.dataclass
class GPTConfig:
    """Hyperparameters of a GPT-2 model (section 6's `LlamaConfig` adds the Llama family's switches).

    vocab_size:     number of token ids (50257 for GPT-2's byte-pair encoding)
    context_length: longest sequence the model reads, in tokens (position embeddings)
    emb_dim:        embedding dimension, the width of every hidden state
    n_heads:        attention heads per layer; emb_dim must be divisible by n_heads
    n_layers:       number of transformer blocks
    drop_rate:      dropout probability on embeddings, attention and residual branches (0.0: none)
    qkv_bias:       whether the query/key/value projections have a bias; None: yes for GPT-2
    norm_eps:       epsilon of the layer norms (1e-5 in GPT-2)
    tie_embeddings: whether the output head shares the token embedding's weight (GPT-2: yes)
    family:         "gpt2" (`GPTModel`); `LlamaConfig` sets "llama" (`LlamaModel`)
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    family: str = "gpt2"

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.family != "gpt2" and type(self) is GPTConfig:
            raise ValueError(f"GPTConfig is GPT-2's; family {self.family!r} takes a LlamaConfig (section 6)")
        if self.qkv_bias is None:
            self.qkv_bias = self.family == "gpt2"
        if self.family == "gpt2" and self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")


# The four released sizes (GPT-2 paper, table 2; names as on the Hugging Face Hub).
GPT_CONFIGS = {
    "gpt2": GPTConfig(emb_dim=768, n_layers=12, n_heads=12),  # 124M parameters
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
}


# ----------------------------------------------------------------------------------------
# 2. The model
# ----------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and the past.

    One fused linear layer computes queries, keys and values (`c_attn`, as in GPT-2), and
    `torch.nn.functional.scaled_dot_product_attention` computes softmax(QK^T/sqrt(d))V
    without materialising the attention matrix where a fused kernel exists.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.drop_rate = cfg.drop_rate
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, kv_cache=None, layer=0):
        """x: float [batch, seq_len, emb_dim] -> float [batch, seq_len, emb_dim].

        With a `KVCache` (section 4), x holds the positions after the `kv_cache.length` cached
        ones; this layer's keys and values are appended to the cache at index `layer`.
        """
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)

        start = 0
        if kv_cache is not None:
            start = kv_cache.length
            k, v = kv_cache.update(layer, k, v)  # (B, nh, start + T, hd)
        y = causal_attention(q, k, v, start, self.drop_rate if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh * hd): heads side by side
        return self.resid_drop(self.c_proj(y))


def causal_attention(q, k, v, start, dropout_p):
    """softmax(QK^T / sqrt(d)) V where query i, at position start + i, sees keys 0 .. start + i.

    q: [batch, heads, T, head_dim]; k, v: [batch, heads, start + T, head_dim] -> like q.
    """
    T = q.shape[2]
    # One query (a decoding step) may see every key: no mask. Several queries after
    # cached ones: query i sits at position start + i and may see keys 0 .. start + i.
    mask = None
    is_causal = T > 1 and start == 0
    if T > 1 and start > 0:
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear(d, 4d) -> GELU -> Linear(4d, d)."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 uses the tanh approximation
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        """x: float [batch, seq_len, emb_dim] -> same shape."""
        return self.drop(self.c_proj(self.gelu(self.c_fc(x))))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (GPT-2, section 2.3)."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)  # 1e-5 in the released GPT-2
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, kv_cache=None, layer=0):
        """x: float [batch, seq_len, emb_dim] -> same shape."""
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPTModel(nn.Module):
    """GPT-2: token and position embeddings, `n_layers` transformer blocks, a final
    LayerNorm and a language-model head that shares its weight with the token embedding.

    Parameter names follow the GPT-2 release (`wte`, `wpe`, `h`, `ln_f`) so that
    `load_weights_into` (section 8) can copy the released tensors by name.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)  # token embeddings
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)  # learned absolute position embeddings
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    # The linear layers whose outputs are added to the residual stream.
    RESIDUAL_PROJECTIONS = ("c_proj.weight",)
    # The linear layers of each block that LoRA adapts (section 3).
    LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

    def tie_weights(self):
        """Share the token embedding with the head: tied input/output embeddings, as released."""
        self.lm_head.weight = self.wte.weight

    def init_weights(self):
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, scaled residual projections."""
        self.apply(self._init_weights)
        # Residual projections add up over 2 * n_layers branches; scale them by 1/sqrt(2 * n_layers)
        # so that the residual stream's variance does not grow with depth (GPT-2 paper, section 2.3).
        for name, param in self.named_parameters():
            if name.endswith(self.RESIDUAL_PROJECTIONS):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # 0.02 as in GPT-2's code (nanoGPT's too)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx, start=0):
        """Token ids [batch, seq_len] at positions start.. -> float [batch, seq_len, emb_dim].

        Raises ValueError when start + seq_len exceeds the context length.
        """
        T = idx.shape[1]
        check_context_length(start + T, self.cfg)
        pos = torch.arange(start, start + T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def forward(self, idx, kv_cache=None):
        """Token ids: LongTensor [batch, seq_len] -> logits: float [batch, seq_len, vocab_size].

        With a `KVCache`, idx holds only the new positions; their keys and values are
        added to the cache, so each new token costs one position, not the whole prefix.
        Raises ValueError when the sequence (cached positions included) is longer than
        the context length.
        """
        start = kv_cache.length if kv_cache is not None else 0
        x = self.embed(idx, start)
        for layer, block in enumerate(self.h):
            x = block(x, kv_cache, layer)
        if kv_cache is not None:  # every layer wrote at the same positions: advance once, after the last
            kv_cache.length += idx.shape[1]
        return self.lm_head(self.ln_f(x))


def next_token_loss(logits, targets, reduction="mean"):
    """Cross-entropy of next-token prediction, the loss of pretraining and instruction tuning.

    logits: float [batch, seq_len, vocab_size]; targets: LongTensor [batch, seq_len], the
    inputs shifted left by one, -100 where nothing is to be learned (padding, a masked
    prompt). -> a float32 scalar: the mean over the targets that count, or their sum with
    reduction="sum" (nats). bfloat16 logits are upcast first: a log-softmax over 50,257
    tokens needs float32's precision.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction)


def check_context_length(length, cfg):
    """Raise ValueError when a sequence of `length` tokens is longer than the context length."""
    if length > cfg.context_length:
        raise ValueError(f"sequence of {length} tokens is longer than the model's context length "
                         f"({cfg.context_length}); crop the input to its last {cfg.context_length} tokens")


def build_model(cfg):
    """A new model with random weights: `GPTModel` for family "gpt2", `LlamaModel` for "llama"."""
    return LlamaModel(cfg) if cfg.family == "llama" else GPTModel(cfg)


def count_parameters(model, trainable_only=False):
    """Number of distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if not trainable_only or p.requires_grad)


# ----------------------------------------------------------------------------------------
# 3. Low-rank adapters (LoRA)
# ----------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + b + (alpha / rank) * B A x.

    A: [rank, in_features], random; B: [out_features, rank], zeros, so training starts
    from exactly the wrapped layer's output (Hu et al., 2021, "LoRA: Low-Rank Adaptation
    of Large Language Models", section 4.1).
    """

    def __init__(self, linear, rank, alpha):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.linear = linear
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, **like))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = alpha / rank

    def forward(self, x):
        """x: float [..., in_features] -> float [..., out_features]."""
        return self.linear(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling


def lora_targets(model):
    """Yield (parent module, attribute name) of each linear layer LoRA adapts (`LORA_TARGETS`)."""
    for block in model.h:
        for target in model.LORA_TARGETS:
            parent_name, child_name = target.split(".")
            yield getattr(block, parent_name), child_name


def add_lora(model, rank=8, alpha=16):
    """Freeze every parameter of model, then wrap the attention and MLP linear layers of
    each transformer block in `LoRALinear`, whose adapters are the only trainable
    parameters. Unfreeze anything else that should train (a new head, say) afterwards.
    Returns the model (changed in place)."""
    model.requires_grad_(False)
    for parent, name in lora_targets(model):
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold each `LoRALinear` back into a plain nn.Linear (W <- W + (alpha / rank) B A), so
    that the model has its own parameter names again and saves as a plain checkpoint.
    Returns the model (changed in place)."""
    for parent, name in lora_targets(model):
        layer = getattr(parent, name)
        if isinstance(layer, LoRALinear):
            layer.linear.weight += (layer.lora_b @ layer.lora_a) * layer.scaling
            setattr(parent, name, layer.linear)
    return model


# ----------------------------------------------------------------------------------------
# 4. Generation
# ----------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the positions a model has already read, one pair per layer.

    Buffers [batch, n_heads (n_kv_heads in the Llama family), max_length, head_dim] are
    allocated on first use; `length` counts the positions filled, and the model advances it
    after each forward pass. max_length: the context length, or fewer positions when fewer
    will be read (a long context's buffers take gigabytes). Source: `past` in GPT-2's own
    sampling code (openai/gpt-2 src/model.py), here in preallocated buffers.
    """

    def __init__(self, cfg, max_length=None):
        self.max_length = min(max_length or cfg.context_length, cfg.context_length)
        self.keys = [None] * cfg.n_layers
        self.values = [None] * cfg.n_layers
        self.length = 0

    def update(self, layer, k, v):
        """Append k, v: [batch, n_heads, T, head_dim] at `length`; return all keys and
        values so far, [batch, n_heads, length + T, head_dim]. Raises ValueError when they
        do not fit in max_length positions."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KVCache holds {self.max_length} positions, {end} were asked for: make a larger one")
        if self.keys[layer] is None:
            B, nh, _, hd = k.shape
            self.keys[layer] = k.new_empty(B, nh, self.max_length, hd)
            self.values[layer] = v.new_empty(B, nh, self.max_length, hd)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits: float [batch, vocab_size] -> LongTensor [batch].

    temperature 0 means greedy (argmax). Otherwise the logits are divided by the
    temperature, cut to the `top_k` most likely tokens and to the smallest set whose
    probabilities add up to at least `top_p` (nucleus sampling, Holtzman et al., 2019,
    "The Curious Case of Neural Text Degeneration"), then sampled.
    top_p = 0 keeps only the most likely token. Raises ValueError for a negative temperature,
    top_k < 1 or top_p outside [0, 1].
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
        drop_sorted = before >= top_p  # they already reach top_p
        drop_sorted[:, 0] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def window_start(length, context_length):
    """First position of the window a model reads when a sequence has `length` tokens.

    Past the context length the window moves forward by half the context length, not by one
    token: with absolute position embeddings every move invalidates the KV cache, which is
    then rebuilt once per half-window instead of once per token (section 6: Llama too).
    """
    if length <= context_length:
        return 0
    step = max(1, context_length // 2)
    return math.ceil((length - context_length) / step) * step


@torch.no_grad()
def generate_stream(
    model, idx, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None, eot_id=None, generator=None, use_cache=True
):
    """Yield new tokens one at a time: LongTensor [batch] per step.

    idx: LongTensor [batch, seq_len], the prompt. Stops after `max_new_tokens` tokens, or
    once every row has produced `eot_id` (a row that finished early repeats `eot_id`).
    Sampling options as in `sample_next_token`. With `use_cache` each step reads one new
    position through a `KVCache`; without, it re-reads the window (slower, same tokens).
    Raises ValueError for an empty prompt.
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"prompt must be a LongTensor [batch, seq_len] with seq_len >= 1, got {tuple(idx.shape)}")
    was_training = model.training
    model.eval()
    ctx = model.cfg.context_length
    tokens = idx
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache = None
    cache_start = None  # the window's first position when the cache was filled
    try:
        for _ in range(max_new_tokens):
            start = window_start(tokens.shape[1], ctx)
            if not use_cache:
                logits = model(tokens[:, start:])
            elif start != cache_start:  # first step, or the window moved: (re)fill the cache
                cache, cache_start = KVCache(model.cfg, tokens.shape[1] - start + max_new_tokens), start
                logits = model(tokens[:, start:], kv_cache=cache)
            else:
                logits = model(tokens[:, -1:], kv_cache=cache)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
            if eot_id is not None:
                next_token = next_token.masked_fill(finished, eot_id)
                finished |= next_token == eot_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            yield next_token
            if eot_id is not None and finished.all():
                break
    finally:
        model.train(was_training)


def generate(model, idx, max_new_tokens, *, seed=None, on_token=None, **options):
    """Continue the prompt idx: LongTensor [batch, seq_len] -> [batch, seq_len + n_new].

    Greedy by default (temperature 0); `seed` makes sampling reproducible; `on_token(token:
    LongTensor [batch])` is called for each new token, for streaming. Other options as in
    `generate_stream`; the output ends with `eot_id` when generation stopped there.
    Raises ValueError when both `seed` and `generator` are given.
    """
    if seed is not None and "generator" in options:
        raise ValueError("give generate() a seed or a generator, not both")
    if seed is not None:
        options["generator"] = torch.Generator(device=idx.device).manual_seed(seed)
    new_tokens = []
    for token in generate_stream(model, idx, max_new_tokens, **options):
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
    if not new_tokens:
        return idx
    return torch.cat([idx, torch.stack(new_tokens, dim=1)], dim=1)


# ----------------------------------------------------------------------------------------
# 5. Tokenizer
# ----------------------------------------------------------------------------------------

# GPT-2's tokenizer is byte-level byte-pair encoding (BPE): a regular expression cuts the text
# into pieces (words with their leading space, numbers, punctuation, runs of spaces), each piece
# becomes its UTF-8 bytes, and the adjacent pair that ranks lowest in the merge list is merged,
# again and again, until no pair is in the list. tiktoken runs it fast.
# One rule for special tokens, everywhere: text that spells one, such as "<|endoftext|>" or
# SmolLM2's "<|im_start|>", IS that token, as in transformers and llama.cpp.


class Tokenizer(tiktoken.Encoding):
    """A model's tokenizer: a tiktoken byte-pair Encoding, plus what tiktoken leaves to the caller.
    For GPT-2 only eot_id matters; the other fields serve section 6's tokenizers.

    eot_id:  the end-of-text token (ends documents and answers, pads batches); `eot_token` too
    bos_id:  the begin token its configuration names (GPT-2: <|endoftext|>), or None
    add_bos: whether a whole text starts with bos_id, as Llama 3's <|begin_of_text|> (`encode`)
    nfc:     apply Unicode NFC normalisation before encoding (Qwen's normalizer)
    missing: ids of stand-ins for bytes the vocabulary lacks; `encode` drops them, as the reference
    files:   {file name: text} of the Hugging Face tokenizer files it was read from ({} for GPT-2);
             checkpoints and exports carry them whole (`state`), never a path
    """

    def __init__(self, *, eot_id, bos_id=None, add_bos=False, nfc=False, missing=(), files=None, **encoding):
        super().__init__(**encoding)
        self.eot_id, self.bos_id, self.add_bos, self.nfc = eot_id, bos_id, add_bos, nfc
        self.missing, self.files, self.warned = frozenset(missing), dict(files or {}), False

    eot_token = property(lambda self: self.eot_id)
    n_vocab = property(lambda self: self.max_token_value + 1 - len(self.missing))  # without the stand-ins

    def encode(self, text, bos=False):
        """Text -> list of ids. Text that spells a special token is that token. bos=True: `text`
        is a whole text (a prompt, a message, a document), which starts with bos_id when the
        tokenizer adds one (`add_bos`); pieces of a text are encoded without."""
        text = unicodedata.normalize("NFC", text) if self.nfc else text
        ids = super().encode(text, allowed_special="all")
        if self.missing and not self.missing.isdisjoint(ids):
            if not self.warned:
                print(f"warning: {self.name}: characters whose bytes are not in the vocabulary are dropped",
                      file=sys.stderr)
                self.warned = True
            ids = [i for i in ids if i not in self.missing]
        return [self.bos_id] + ids if bos and self.add_bos else ids

    def state(self):
        """What a checkpoint stores to rebuild this tokenizer (`tokenizer_from_state`): its content."""
        return {"files": self.files} if self.files else {"name": "gpt2"}

    # Pickled (for DataLoader workers) with its own fields: tiktoken's __setstate__ passes the
    # state to __init__ as keyword arguments, which takes them.
    def __getstate__(self):
        extra = dict(eot_id=self.eot_id, bos_id=self.bos_id, add_bos=self.add_bos, nfc=self.nfc,
                     missing=self.missing, files=self.files)
        return {**super().__getstate__(), **extra}


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """GPT-2's tokenizer: tiktoken's "gpt2" byte-pair encoding (50257 tokens), as a `Tokenizer`.
    tiktoken downloads its two files once and caches them (TIKTOKEN_CACHE_DIR: a folder that
    holds them, such as testdata/tiktoken_cache). RuntimeError when neither cached nor downloadable."""
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except requests.RequestException as e:
        raise RuntimeError(
            f"cannot download tiktoken's GPT-2 vocabulary files ({e.__class__.__name__}): connect once, or set "
            "TIKTOKEN_CACHE_DIR to a folder holding them (this repository's testdata/tiktoken_cache has them)"
        ) from None
    # tiktoken has no public accessor for an Encoding's tables: they are copied into our subclass.
    return Tokenizer(name="gpt2", pat_str=encoding._pat_str, mergeable_ranks=encoding._mergeable_ranks,
                     special_tokens=encoding._special_tokens, eot_id=EOT_ID, bos_id=EOT_ID)


def text_to_token_ids(text, device=None, tokenizer=None):
    """A whole text -> LongTensor [1, n_tokens], with GPT-2's tokenizer unless another is given
    (see `Tokenizer.encode`: special-token text is the token; Llama 3's begin token first)."""
    tokenizer = tokenizer or get_tokenizer()
    return torch.tensor(tokenizer.encode(text, bos=True), dtype=torch.long, device=device).unsqueeze(0)


def token_ids_to_text(token_ids, tokenizer=None):
    """Token ids (LongTensor [n] or [1, n], or a list of ints) -> text, with GPT-2's tokenizer
    unless another is given. Ids past the tokenizer's last one (a model may have more embedding
    rows than tokens: Qwen3 151,936 for 151,669) have no text and are left out."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.reshape(-1).tolist()
    tokenizer = tokenizer or get_tokenizer()
    return tokenizer.decode([i for i in token_ids if i <= tokenizer.max_token_value])


# ----------------------------------------------------------------------------------------
# 6. The other families: the same decoder with parts exchanged (Llama, Qwen3, Mistral, Phi, Gemma 3)
# ----------------------------------------------------------------------------------------

# Llama 3.2, SmolLM2 and Qwen3 keep GPT-2's pre-norm decoder and change its parts:
# RMSNorm for LayerNorm, rotary position embeddings for the position table, a SwiGLU
# feed-forward layer, fewer key/value heads than query heads, and (Qwen3) a norm on the
# queries and keys. Mistral, Phi and Gemma 3 are the same decoder with a few more switches.
# The classes follow, named as Hugging Face's `LlamaForCausalLM` names its parameters
# (`embed_tokens`, `layers.N.self_attn.q_proj`, ...), so that loading the released weights
# is a loop, as for GPT-2. The tokenizers follow the model.
#
# Generation past the context length moves the window as for GPT-2 (`window_start`): a window
# sliding one token at a time would drop the first tokens, which these models use as
# "attention sinks" (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks").


@dataclasses.dataclass
class LlamaConfig(GPTConfig):
    """GPTConfig with the family's switches:

    n_kv_heads    key/value heads, each shared by n_heads / n_kv_heads query heads (GQA); None: n_heads
    head_dim      width of one head; None: emb_dim / n_heads (Qwen3-0.6B: 128 with 16 heads of 1024)
    hidden_dim    hidden size of the feed-forward layer; None: 4 * emb_dim
    rope_theta    base of the rotary position frequencies
    rope_scaling  Llama 3's frequency scaling (factor, low_/high_freq_factor, original_max_position_embeddings)
    qk_norm       RMSNorm on each head's queries and keys before the rotation (Qwen3, Gemma 3)
    out_bias, mlp_bias   biases on the attention output and on the feed-forward projections
    sliding_window   query i sees keys i - sliding_window < j <= i only (Mistral, Phi-3, Gemma 3;
                  Beltagy et al., 2020, "Longformer"); None: all keys up to i
    global_every  Gemma 3: every global_every-th layer sees all keys, the others the window
    local_rope_theta  Gemma 3: the rotary base of the windowed layers
    rotary_fraction   Phi: rotary positions on this first fraction of each head only
    query_scale   Gemma 3: scores divided by sqrt(query_scale), not sqrt(head_dim)
    model_type    config.json's: "phi" turns the block into Phi's, "gemma3_text" into Gemma's;
                  the export writes it back (None: "qwen3" with qk_norm, else "llama")
    """

    family: str = "llama"
    n_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    qk_norm: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    global_every: int | None = None
    local_rope_theta: float | None = None
    rotary_fraction: float = 1.0
    query_scale: float | None = None
    model_type: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.head_dim is None and self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


def config_from_dict(config):
    """The GPTConfig or LlamaConfig that dataclasses.asdict gave (checkpoints store it), by its family."""
    return (LlamaConfig if config.get("family") == "llama" else GPTConfig)(**config)


# The presets: the sizes in each model's config.json on the Hugging Face Hub (hidden_size,
# intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
# max_position_embeddings, rope_theta, rope_scaling, rms_norm_eps, tie_word_embeddings).
LLAMA_CONFIGS = {
    "HuggingFaceTB/SmolLM2-135M": LlamaConfig(  # 135M parameters, Apache-2.0
        vocab_size=49152, context_length=8192, emb_dim=576, n_heads=9, n_kv_heads=3, n_layers=30,
        hidden_dim=1536, rope_theta=100000.0,
    ),
    "HuggingFaceTB/SmolLM2-360M": LlamaConfig(  # 362M, Apache-2.0
        vocab_size=49152, context_length=8192, emb_dim=960, n_heads=15, n_kv_heads=5, n_layers=32,
        hidden_dim=2560, rope_theta=100000.0,
    ),
    "Qwen/Qwen3-0.6B-Base": LlamaConfig(  # 596M (440M without the embedding), Apache-2.0
        vocab_size=151936, context_length=32768, emb_dim=1024, n_heads=16, n_kv_heads=8, n_layers=28,
        head_dim=128, hidden_dim=3072, rope_theta=1000000.0, norm_eps=1e-6, qk_norm=True,
    ),
    "meta-llama/Llama-3.2-1B": LlamaConfig(  # 1236M, Llama 3.2 Community License, gated
        vocab_size=128256, context_length=131072, emb_dim=2048, n_heads=32, n_kv_heads=8, n_layers=16,
        head_dim=64, hidden_dim=8192, rope_theta=500000.0,
        rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "mistralai/Mistral-7B-v0.1": LlamaConfig(  # 7242M, Apache-2.0
        model_type="mistral", vocab_size=32000, context_length=32768, emb_dim=4096, n_heads=32,
        n_kv_heads=8, n_layers=32, hidden_dim=14336, sliding_window=4096, tie_embeddings=False,
    ),
    "microsoft/phi-1_5": LlamaConfig(  # 1418M, MIT
        model_type="phi", vocab_size=51200, context_length=2048, emb_dim=2048, n_heads=32,
        hidden_dim=8192, n_layers=24, rotary_fraction=0.5, qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=False,
    ),
    "microsoft/phi-2": LlamaConfig(  # 2780M, MIT
        model_type="phi", vocab_size=51200, context_length=2048, emb_dim=2560, n_heads=32,
        hidden_dim=10240, n_layers=32, rotary_fraction=0.4, qkv_bias=True, out_bias=True, mlp_bias=True,
        tie_embeddings=False,
    ),
    "microsoft/Phi-3-mini-4k-instruct": LlamaConfig(  # 3821M, MIT
        model_type="phi3", vocab_size=32064, context_length=4096, emb_dim=3072, n_heads=32,
        n_kv_heads=32, n_layers=32, hidden_dim=8192, sliding_window=2047, tie_embeddings=False,
    ),
    "google/gemma-3-270m": LlamaConfig(  # 268M, Gemma licence, gated
        model_type="gemma3_text", vocab_size=262144, context_length=32768, emb_dim=640, n_heads=4,
        n_kv_heads=1, head_dim=256, n_layers=18, hidden_dim=2048, norm_eps=1e-6, qk_norm=True, rope_theta=1e6,
        sliding_window=512, global_every=6, local_rope_theta=10000.0, query_scale=256,
    ),
    "google/gemma-3-1b-pt": LlamaConfig(  # 1000M, Gemma licence, gated
        model_type="gemma3_text", vocab_size=262144, context_length=32768, emb_dim=1152, n_heads=4,
        n_kv_heads=1, head_dim=256, n_layers=26, hidden_dim=6912, norm_eps=1e-6, qk_norm=True, rope_theta=1e6,
        sliding_window=512, global_every=6, local_rope_theta=10000.0, query_scale=256,
    ),
}
MODEL_CONFIGS = {**GPT_CONFIGS, **LLAMA_CONFIGS}  # every preset name (pretrain.py --size)


class RMSNorm(nn.Module):
    """Llama family: x / sqrt(mean(x^2) + eps) * weight, LayerNorm without the mean and the shift (Zhang and
    Sennrich, 2019, "Root Mean Square Layer Normalization"), in float32 as the reference. Gemma
    (`plus_one`) stores weight - 1 and scales by 1 + weight before casting back."""

    def __init__(self, dim, eps, plus_one=False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))
        self.eps, self.plus_one = eps, plus_one

    def forward(self, x):
        """x: float [..., dim] -> same shape and dtype."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


def family_norm(cfg, dim=None):
    """The block's norm: Phi's LayerNorm, Gemma's RMSNorm with 1 + weight, else Llama's RMSNorm."""
    if cfg.model_type == "phi":
        return nn.LayerNorm(dim or cfg.emb_dim, eps=cfg.norm_eps)
    return RMSNorm(dim or cfg.emb_dim, cfg.norm_eps, plus_one=cfg.model_type == "gemma3_text")


def rope_frequencies(cfg, head_dim, device=None, theta=None):
    """Rotation speeds of rotary position embeddings -> float32 [head_dim / 2], radians per position.

    Pair i of a head turns by theta^(-2i / head_dim) per position (Su et al., 2021, "RoFormer";
    theta: cfg.rope_theta unless given). Llama 3 (`cfg.rope_scaling`) slows the slow pairs down
    by `factor`, so that positions past the original training length turn them no further than
    training did, keeps the fast ones and blends in between (Meta's llama-models `apply_scaling`).
    """
    freqs = 1.0 / ((theta or cfg.rope_theta) ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if cfg.rope_scaling is None:
        return freqs
    factor = cfg.rope_scaling["factor"]
    low, high = cfg.rope_scaling["low_freq_factor"], cfg.rope_scaling["high_freq_factor"]
    old_length = cfg.rope_scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / freqs
    scaled = torch.where(wavelength > old_length / low, freqs / factor, freqs)  # slow pairs: slowed down
    smooth = (old_length / wavelength - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    in_between = (wavelength >= old_length / high) & (wavelength <= old_length / low)
    return torch.where(in_between, blended, scaled)


def apply_rope(x, cos, sin):
    """Rotate queries or keys x: [batch, heads, T, head_dim] by their positions' angles (cos, sin:
    [T, rotary dims]), on the first rotary dims only (Phi; the others pass). Hugging Face pairs
    dimension i with i + dims / 2 (`rotate_half`), not with its neighbour as RoFormer writes it."""
    dims = cos.shape[-1]
    x, rest = x[..., :dims], x[..., dims:]
    rotated = torch.cat([-x[..., dims // 2 :], x[..., : dims // 2]], dim=-1)  # rotate_half
    return torch.cat([x * cos + rotated * sin, rest], dim=-1)


def window_cache_update(kv_cache, layer, k, v, window):
    """A sliding-window layer's cache: append k, v [batch, kv_heads, T, head_dim] and keep only the
    last `window` positions, so memory stays flat however long generation runs -> (keys, values:
    the kept ones then k, v; LongTensor of their positions)."""
    end = kv_cache.length + k.shape[2]  # positions seen after this step: 0 .. end - 1
    if kv_cache.keys[layer] is not None:
        k = torch.cat([kv_cache.keys[layer], k], dim=2)
        v = torch.cat([kv_cache.values[layer], v], dim=2)
    kv_cache.keys[layer], kv_cache.values[layer] = k[:, :, -window:], v[:, :, -window:]
    return k, v, torch.arange(end - k.shape[2], end, device=k.device)


class LlamaAttention(nn.Module):
    """Llama family: causal self-attention with rotary positions and grouped-query attention.

    Separate `q_proj`, `k_proj`, `v_proj`, `o_proj` (GPT-2 fuses q, k, v); n_kv_heads key/value heads, each
    read by n_heads / n_kv_heads query heads (Ainslie et al., 2023, "GQA"), so the KV cache is that much
    smaller. Layer `layer` sees `cfg.sliding_window` keys unless it is one of Gemma 3's global layers.
    """

    def __init__(self, cfg, layer=0):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.head_dim or cfg.emb_dim // cfg.n_heads
        self.rotary_dim = int(self.head_dim * cfg.rotary_fraction)
        is_global = cfg.global_every is not None and (layer + 1) % cfg.global_every == 0
        self.window = None if is_global else cfg.sliding_window
        self.theta = cfg.local_rope_theta if self.window and cfg.local_rope_theta else cfg.rope_theta
        self.scale = cfg.query_scale**-0.5 if cfg.query_scale else None  # None: 1 / sqrt(head_dim)
        self.drop_rate = cfg.drop_rate
        self.q_proj = nn.Linear(cfg.emb_dim, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.emb_dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.emb_dim, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.emb_dim, bias=cfg.out_bias)
        if cfg.qk_norm:  # Qwen3, Gemma 3: each head's queries and keys normalised before the rotation
            self.q_norm = family_norm(cfg, self.head_dim)
            self.k_norm = family_norm(cfg, self.head_dim)
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, kv_cache=None, layer=0):
        """x: float [batch, seq_len, emb_dim] -> same shape; the cache as in `CausalSelfAttention`."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)

        start = kv_cache.length if kv_cache is not None else 0
        # Angles of positions start .. start + T - 1, computed in float32 (as the reference
        # does) in every layer: a few small operations that keep a block callable as block(x).
        positions = torch.arange(start, start + T, device=x.device)
        angles = positions[:, None].float() * rope_frequencies(self.cfg, self.rotary_dim, x.device, self.theta)
        angles = torch.cat([angles, angles], dim=-1)  # (T, rotary dims): pair i with i + dims / 2
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        key_positions = torch.arange(start + T, device=x.device)
        if kv_cache is not None and self.window:
            k, v, key_positions = window_cache_update(kv_cache, layer, k, v, self.window)
        elif kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, n_kv_heads, start + T, hd): cached once per kv head
        repeats = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)  # (B, nh, keys, hd)
        dropout = self.drop_rate if self.training else 0.0
        if self.window is None and self.scale is None:
            y = causal_attention(q, k, v, start, dropout)
        else:  # New: the mask says which keys each query sees: itself, the past, within the window
            seen = key_positions[None, :] <= positions[:, None]  # (T, keys)
            if self.window:
                seen &= key_positions[None, :] > positions[:, None] - self.window
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, dropout_p=dropout, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # heads side by side
        return self.resid_drop(self.o_proj(y))


class SwiGLU(nn.Module):
    """Llama family feed-forward layer: down(silu(gate(x)) * up(x)), a gated unit in place of
    GPT-2's Linear -> GELU -> Linear (Shazeer, 2020, "GLU Variants Improve Transformer");
    GeGLU (tanh GELU for silu) in Gemma."""

    def __init__(self, cfg):
        super().__init__()
        hidden_dim = cfg.hidden_dim or 4 * cfg.emb_dim
        self.gate_proj = nn.Linear(cfg.emb_dim, hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.emb_dim, hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(hidden_dim, cfg.emb_dim, bias=cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.drop_rate)
        gelu = functools.partial(F.gelu, approximate="tanh")
        self.activation = gelu if cfg.model_type == "gemma3_text" else F.silu

    def forward(self, x):
        """x: float [batch, seq_len, emb_dim] -> same shape."""
        return self.drop(self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x)))


class PhiMLP(nn.Module):
    """Phi's feed-forward layer: fc2(gelu(fc1(x))) with tanh GELU, GPT-2's MLP under Phi's names."""

    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.emb_dim, cfg.hidden_dim or 4 * cfg.emb_dim, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.hidden_dim or 4 * cfg.emb_dim, cfg.emb_dim, bias=cfg.mlp_bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        """x: float [batch, seq_len, emb_dim] -> same shape."""
        return self.drop(self.fc2(self.gelu(self.fc1(x))))


class LlamaBlock(nn.Module):
    """Llama family block: x + attn(norm(x)), then x + mlp(norm(x)), as GPT-2's with RMSNorm.
    Phi: x + attn(ln(x)) + mlp(ln(x)), both off one LayerNorm (GPT-J's parallel block).
    Gemma 3: a norm after each branch too, four in all."""

    def __init__(self, cfg, layer=0):
        super().__init__()
        self.model_type = cfg.model_type
        self.input_layernorm = family_norm(cfg)
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = PhiMLP(cfg) if cfg.model_type == "phi" else SwiGLU(cfg)
        if cfg.model_type != "phi":
            self.post_attention_layernorm = family_norm(cfg)
        if cfg.model_type == "gemma3_text":
            self.pre_feedforward_layernorm = family_norm(cfg)
            self.post_feedforward_layernorm = family_norm(cfg)

    def forward(self, x, kv_cache=None, layer=0):
        """x: float [batch, seq_len, emb_dim] -> same shape."""
        h = self.input_layernorm(x)
        if self.model_type == "phi":
            return x + self.self_attn(h, kv_cache, layer) + self.mlp(h)
        if self.model_type == "gemma3_text":
            x = x + self.post_attention_layernorm(self.self_attn(h, kv_cache, layer))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(h, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(GPTModel):
    """Llama family: token embedding, `n_layers` LlamaBlocks, a final norm and a head, tied to the embedding
    or not (`cfg.tie_embeddings`; Phi's untied head has a bias); no position table. Parameters are named as
    Hugging Face's Llama names them without `model.`; `wte`, `h` and `ln_f` name the same parts as GPT-2 does,
    so that the stage scripts run on both. `forward` is GPT-2's: embed, blocks, final norm, head."""

    RESIDUAL_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "fc2.weight")

    def __init__(self, cfg):
        nn.Module.__init__(self)  # GPTModel's parts are replaced, not extended
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.layers = nn.ModuleList(LlamaBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = family_norm(cfg)
        head_bias = cfg.model_type == "phi" and not cfg.tie_embeddings
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=head_bias)
        # LoRA adapts every linear layer of each block, as Dettmers et al., 2023 ("QLoRA") advise.
        self.LORA_TARGETS = tuple(n for n, m in self.layers[0].named_modules() if isinstance(m, nn.Linear))
        self.tie_weights()
        self.init_weights()

    wte = property(lambda self: self.embed_tokens)
    h = property(lambda self: self.layers)
    ln_f = property(lambda self: self.norm)

    def tie_weights(self):
        """Share the token embedding with the head when the config says so."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, idx, start=0):
        """Token ids [batch, seq_len] -> float [batch, seq_len, emb_dim]: the token embeddings
        alone (positions enter each attention layer); Gemma's times sqrt(emb_dim) in their own
        dtype. Raises ValueError past the context length."""
        check_context_length(start + idx.shape[1], self.cfg)
        x = self.embed_tokens(idx)
        if self.cfg.model_type == "gemma3_text":
            x = x * torch.tensor(self.cfg.emb_dim**0.5, dtype=x.dtype)
        return self.drop(x)


# Phi names two of Llama's parameters otherwise; Phi-3 packs q, k, v and gate, up into one matrix each.
PHI_NAMES = {"self_attn.dense.": "self_attn.o_proj.", "final_layernorm.": "norm."}
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def llama_layout(tensors, cfg):
    """Tensors of a Phi or Phi-3 file (names without `model.`) under Llama's names, in place: Phi's
    renamed, Phi-3's packed matrices split into views (nothing is copied)."""
    head_dim = cfg.head_dim or cfg.emb_dim // cfg.n_heads
    sizes = {"qkv_proj": [cfg.n_heads * head_dim] + 2 * [(cfg.n_kv_heads or cfg.n_heads) * head_dim]}
    for name in list(tensors) if cfg.model_type in ("phi", "phi3") else ():
        tensor = tensors.pop(name)
        for theirs, ours in PHI_NAMES.items() if cfg.model_type == "phi" else ():
            name = re.sub(rf"\b{re.escape(theirs)}", ours, name)
        packed = name.split(".")[-2]
        if packed in PACKED:
            parts = tensor.split(sizes[packed]) if packed in sizes else tensor.chunk(2)
            tensors.update({name.replace(packed, part_name): part for part_name, part in zip(PACKED[packed], parts)})
        else:
            tensors[name] = tensor


def hub_layout(tensors, cfg):
    """Our tensors {name: tensor} under the names of cfg's transformers class: `llama_layout` undone."""
    for theirs, ours in PHI_NAMES.items() if cfg.model_type == "phi" else ():
        tensors = {re.sub(rf"\b{re.escape(ours)}", theirs, name): tensor for name, tensor in tensors.items()}
    for packed, parts in PACKED.items() if cfg.model_type == "phi3" else ():
        for name in [name for name in tensors if name.endswith(f"{parts[0]}.weight")]:
            tensors[name.replace(parts[0], packed)] = torch.cat([tensors.pop(name.replace(parts[0], p)) for p in parts])
    return tensors


# --- The family's tokenizers: a tiktoken Encoding from a Hugging Face tokenizer.json -----
# SmolLM2, Qwen3 and Llama 3 use byte-level BPE as GPT-2 does: the same algorithm with
# another vocabulary, merge list and pre-tokenizer. tiktoken can run them when the merged
# tokens' ids follow the merge order (tiktoken merges by id, the reference by merge list).

# The regular expression of GPT-2's pre-tokenizer (`ByteLevel` with use_regex in tokenizers).
GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# SmolLM2: `Digits` (each number character alone), then GPT-2's expression, as one; whitespace before a digit
# stays whole, as Digits cut there: "a  12 b" -> "a", "  ", "1", "2", " b" (GPT-2: "a", " ", " 12", " b").
DIGITS_SPLIT_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"


def byte_level_alphabet():
    """GPT-2's table byte -> printable character in which byte-level BPE vocabularies write their tokens: the
    188 printable bytes stand for themselves, the other 68 for chr(256 + n) in byte order (space "Ġ", newline
    "Ċ"). Source: openai/gpt-2 src/encoder.py, `bytes_to_unicode`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def split_pattern(pre_tokenizer, source):
    """The pre-tokenizer of a tokenizer.json (a dict) as one regular expression for tiktoken: GPT-2's
    `ByteLevel`, `Digits` + `ByteLevel` (SmolLM2) or `Split` by an expression + `ByteLevel` (Qwen3, Llama 3).
    Raises ValueError naming `source` for anything else: it would not split text the same way."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    kinds = [step.get("type") for step in steps]
    last = steps[-1] if steps else {}
    if kinds and kinds[-1] == "ByteLevel" and not last.get("add_prefix_space"):
        if kinds == ["ByteLevel"] and last.get("use_regex", True):
            return GPT2_SPLIT_PATTERN
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
            return DIGITS_SPLIT_PATTERN
        split = steps[0]
        if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True) and "Regex" in split.get("pattern", {}):
            if split.get("behavior") == "Isolated" and not split.get("invert"):
                return split["pattern"]["Regex"]
    raise ValueError(f"{source}: pre-tokenizer {kinds or None} cannot be written as one tiktoken expression")


def special_token_text(entry):
    """A token of tokenizer_config.json (a string, or older files' {"content": ...}) -> its text."""
    return entry.get("content") if isinstance(entry, dict) else entry


def tokenizer_from_files(files, source):
    """A model's `Tokenizer` from the text of its Hugging Face tokenizer files.

    files: {file name: text}: tokenizer.json (byte-level or SentencePiece-style BPE), with
    tokenizer_config.json (end and begin tokens; else one of `END_TOKENS` ends texts) and
    whatever else the model has (special_tokens_map.json, chat_template.jinja), all kept in
    `Tokenizer.files`; or GPT-2's vocab.json (and merges.txt), as GPT-2 exports hold it. A
    tokenizer that is GPT-2's, by its vocabulary, is `get_tokenizer()`.
    Vocabulary and merges become tiktoken's ranks (`bpe_ranks`, `sentencepiece_tokenizer`), added
    tokens its special tokens, the pre-tokenizer its expression (`split_pattern`); the
    post-processor's begin token sets `add_bos`. Raises ValueError naming `source` for what
    tiktoken cannot run exactly: another model than BPE, another normalizer, merged ids out of
    merge order; FileNotFoundError without tokenizer.json or GPT-2's vocab.json.
    """
    if "tokenizer.json" not in files:
        vocab = parse_json(files["vocab.json"], f"{source} vocab.json") if "vocab.json" in files else None
        if vocab is not None and vocab == json.loads(hf_tokenizer_files(get_tokenizer())["vocab.json"]):
            return get_tokenizer()
        raise FileNotFoundError(f"{source}: no tokenizer.json (nor GPT-2's vocab.json): the model's tokenizer is "
                                "missing; copy its tokenizer.json beside the weights")
    tokenizer_json = parse_json(files["tokenizer.json"], f"{source} tokenizer.json")
    config = parse_json(files.get("tokenizer_config.json", "{}"), f"{source} tokenizer_config.json")
    bpe = tokenizer_json.get("model") or {}  # the tokenizer model: BPE
    if bpe.get("type") != "BPE" or bpe.get("continuing_subword_prefix"):
        raise ValueError(f"{source}: not a BPE tokenizer (model {bpe.get('type')!r}); tiktoken cannot run it")
    special = {token["content"]: token["id"] for token in tokenizer_json.get("added_tokens", [])}
    eot_text = special_token_text(config.get("eos_token")) or next((t for t in END_TOKENS if t in special), None)
    if eot_text not in special:
        raise ValueError(f"{source}: no end-of-text token {eot_text!r} among the added tokens")
    prepended = _prepended_token(tokenizer_json.get("post_processor"), source)
    settings = dict(name=str(source), special_tokens=special, eot_id=special[eot_text], files=files,
                    bos_id=special.get(special_token_text(config.get("bos_token")), prepended),
                    add_bos=prepended is not None)
    if bpe.get("byte_fallback"):
        return sentencepiece_tokenizer(tokenizer_json, source, **settings)
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"{source}: normalizer {normalizer!r} is not supported (only NFC)")
    pattern = split_pattern(tokenizer_json.get("pre_tokenizer"), source)
    ranks = bpe_ranks(bpe, special, source)
    if pattern == GPT2_SPLIT_PATTERN and special == {"<|endoftext|>": EOT_ID} \
            and ranks == get_tokenizer()._mergeable_ranks:  # tiktoken's files read only for a likely GPT-2
        return get_tokenizer()
    top = max([*ranks.values(), *special.values()])
    lacking = [byte for byte in range(256) if bytes([byte]) not in ranks]
    ranks.update({bytes([byte]): top + 1 + n for n, byte in enumerate(lacking)})  # stand-ins, dropped by encode
    settings.update(pat_str=pattern, mergeable_ranks=ranks)
    if any(a != b and a in b for a in special for b in special):  # CodeGen's (Phi's) runs of spaces and tabs
        return PieceTokenizer(**settings)
    return Tokenizer(**settings, nfc=normalizer == "NFC", missing=range(top + 1, top + 1 + len(lacking)))


def merge_pairs(merges):
    """tokenizer.json's merges, "left right" strings or (newer files) [left, right] lists -> pairs."""
    return [merge.split(" ") if isinstance(merge, str) else merge for merge in merges]


def bpe_ranks(bpe, special, source):
    """tokenizer.json's BPE model (a dict) -> tiktoken's ranks {token bytes: id}: the 256 bytes
    and each merge's result, ids as ranks. tiktoken merges by rank, the reference by merge
    order, so the ids must follow the merge order. special: the added tokens {text: id}.
    Raises ValueError naming `source` when they do not, or a merge's token is not in the vocabulary."""
    byte_of = {char: byte for byte, char in byte_level_alphabet().items()}
    vocab = bpe["vocab"]
    try:
        ranks = {bytes([byte_of[char]]): vocab[char] for char in byte_of if char in vocab}
        previous = -1
        for left, right in merge_pairs(bpe["merges"]):
            token_id = vocab[left + right]
            # Equal ids are one token made from another split: files converted from tiktoken
            # (Llama 3, Qwen) list every split of a token, one after the other.
            if token_id < previous:  # tiktoken would apply this merge before the one with `previous`
                raise ValueError(
                    f"{source}: merge {left!r} + {right!r} makes id {token_id}, below the previous merge's "
                    f"{previous}: ids do not follow the merge order, tiktoken cannot reproduce this tokenizer"
                )
            ranks[bytes(byte_of[char] for char in left + right)] = previous = token_id
        if bpe.get("ignore_merges"):  # Llama 3: a piece that is a whole token becomes it, as in tiktoken
            tokens = {token: i for token, i in vocab.items() if i not in special.values()}
            ranks.update({bytes(byte_of[char] for char in token): i for token, i in tokens.items()})
    except KeyError as e:
        raise ValueError(f"{source}: token or character {e} of the merges is not in the byte-level "
                         "vocabulary") from None
    return ranks


def _prepended_token(post_processor, source):
    """Id of the special token the post-processor puts before a text (Llama 3), or None.
    Raises ValueError when it adds tokens after the text (not supported)."""
    processors = (post_processor or {}).get("processors", [post_processor] if post_processor else [])
    for processor in processors:
        if processor.get("type") == "TemplateProcessing":
            template = [next(iter(piece)) for piece in processor["single"]]  # "SpecialToken" or "Sequence"
            if "SpecialToken" in template[1:]:
                raise ValueError(f"{source}: the post-processor adds tokens after the text; not supported")
            if template[0] == "SpecialToken":
                return processor["special_tokens"][processor["single"][0]["SpecialToken"]["id"]]["ids"][0]
    return None


def tokenizer_from_state(state):
    """The `Tokenizer` a checkpoint carries (`Tokenizer.state`). Checkpoints without one
    (written before tokenizers travelled with them) hold GPT-2's."""
    if isinstance(state, dict) and state.get("files"):
        return tokenizer_from_files(state["files"], "the checkpoint's tokenizer")
    if state in (None, "gpt2") or state == {"name": "gpt2"}:
        return get_tokenizer()
    raise ValueError(f"the checkpoint names its tokenizer by a path ({state!r}), which may have moved: "
                     "train it again with this version, which stores the tokenizer itself")


# --- SentencePiece-style tokenizer.json (Llama 2, Mistral, Phi-3, Gemma 3) ----------------
# SentencePiece's BPE writes a space as "▁" (U+2581), puts one before the text (most models),
# merges characters, not bytes, and spells a character missing from the vocabulary as its UTF-8
# bytes, tokens <0x00> .. <0xFF> (byte_fallback). tiktoken runs it on the tokens' text with "▁"
# as a space when its ranks are the merge order: the bytes (each a character of the vocabulary,
# else its byte token), the longer characters, then each merge's result. The ids do not follow
# that order (Llama 2's characters come last), so `PieceTokenizer` maps ranks to ids.

# Texts end with the first of these a tokenizer has, unless tokenizer_config.json names another.
END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class PieceTokenizer(Tokenizer):
    """A `Tokenizer` that cuts the text at its added tokens itself, the longest first as the reference
    does (tiktoken tries overlapping ones, such as CodeGen's runs of spaces, in no set order), and maps
    tiktoken's ranks to the vocabulary's ids (`ids`: rank -> id; None: the same).

    prefix: where the reference puts a space before a piece of text between added tokens:
    "prepend" (Llama 2's normalizer: before each), "always" (Metaspace: before each that does not
    start with one), "first" (Metaspace: the first only), or None. `decode` keeps that space
    (transformers strips it), so that a continuation decodes with the space before it.
    pieces: {id: bytes} of tokens that no rank stands for (SentencePiece's byte tokens).
    """

    def __init__(self, *, special_tokens, ids=None, prefix=None, pieces=None, **settings):
        super().__init__(special_tokens={}, **settings)
        self.added, self.ids, self.prefix = special_tokens, ids, prefix
        self.cut = re.compile("(" + "|".join(map(re.escape, sorted(special_tokens, key=len, reverse=True))) + ")")
        self.pieces = {ids[rank] if ids else rank: text for text, rank in self._mergeable_ranks.items()}
        self.pieces.update({**(pieces or {}), **{i: text.encode() for text, i in special_tokens.items()}})
        self.max_token_value = max(self.pieces)

    def __reduce__(self):  # pickled (for DataLoader workers) as its files
        return tokenizer_from_files, (self.files, self.name)

    def encode(self, text, bos=False):
        """As `Tokenizer.encode`."""
        ids = []
        text = text.replace("\u2581", " ") if self.ids else text  # SentencePiece: "▁" is a space
        for n, piece in enumerate(self.cut.split(text) if self.added else [text]):
            if n % 2:  # an added token
                ids.append(self.added[piece])
            elif piece:
                space = {"prepend": True, "always": piece[0] != " ", "first": n == 0 and piece[0] != " "}
                ranks = self.encode_ordinary(" " * space.get(self.prefix, False) + piece)
                ids += [self.ids[rank] for rank in ranks] if self.ids else ranks
        return [self.bos_id] + ids if bos and self.add_bos else ids

    def decode(self, tokens, errors="replace"):
        """Ids -> text."""
        return b"".join(self.pieces[i] for i in tokens).decode("utf-8", errors=errors)

    def encode_single_token(self, text):
        """The id of an added token's text."""
        return self.added[text]


def sentencepiece_tokenizer(tokenizer_json, source, **settings):
    """A SentencePiece-style BPE tokenizer.json (a dict: "▁" for spaces, byte_fallback) as a
    `PieceTokenizer` (see above); settings as `tokenizer_from_files` makes them. Raises ValueError
    naming `source` for a normalizer or pre-tokenizer other than Llama 2's, Metaspace or Gemma's."""
    vocab, merges = tokenizer_json["model"]["vocab"], tokenizer_json["model"]["merges"]
    normalizer = tokenizer_json.get("normalizer") or {}
    steps = [step["type"] for step in normalizer.get("normalizers", [normalizer] if normalizer else [])]
    pre = tokenizer_json.get("pre_tokenizer") or {}  # Gemma's Split(" ") after the Replace splits nothing
    if steps not in ([], ["Replace"], ["Prepend", "Replace"]) or pre.get("type") not in (None, "Metaspace", "Split") \
            or (pre.get("type") == "Split" and steps != ["Replace"]):
        raise ValueError(f"{source}: normalizer {steps} with pre-tokenizer {pre.get('type')!r} is not supported "
                         "(Llama 2's, Metaspace or Gemma's)")
    scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space") else None)
    prefix = "prepend" if steps[:1] == ["Prepend"] else {"always": "always", "first": "first"}.get(scheme)

    def text_of(token):
        return token.replace("\u2581", " ").encode()

    byte_tokens = {byte: vocab.get(f"<0x{byte:02X}>") for byte in range(256)}
    ranks, ids = {}, []
    for byte in range(256):  # a character of the vocabulary, else its byte token (byte_fallback)
        char = "\u2581" if byte == 32 else chr(byte) if byte < 128 else None
        ranks[bytes([byte])] = byte
        ids.append(vocab.get(char, byte_tokens[byte]))
    characters = [token for token in vocab if len(token) == 1 and len(text_of(token)) > 1]
    for token in characters + ["".join(pair) for pair in merge_pairs(merges)]:
        if text_of(token) not in ranks:
            ranks[text_of(token)] = len(ids)
            ids.append(vocab[token])
    if None in ids:
        raise ValueError(f"{source}: byte {ids.index(None)} has neither a character nor a byte token")
    if pre.get("split"):  # Metaspace cuts before each space
        pattern = r" [^ ]*|[^ ]+"
    elif all(re.fullmatch(rb" *[^ ]*", text) for text in ranks):  # no token spans a space after a character:
        pattern = r" *[^ ]+| +"  # cut there, the same ids and far faster than the text as one piece
    else:
        pattern = r"[\s\S]+"
    pieces = {i: text_of(token) for token, i in vocab.items()}
    pieces.update({i: bytes([byte]) for byte, i in byte_tokens.items() if i is not None})
    return PieceTokenizer(pat_str=pattern, mergeable_ranks=ranks, ids=ids, prefix=prefix, pieces=pieces, **settings)


# ----------------------------------------------------------------------------------------
# 7. Files: downloads, atomic writes, plots
# ----------------------------------------------------------------------------------------


def cache_dir():
    """Folder for downloaded weights and data: $GPT_CACHE_DIR, else ~/.cache/gpt2-lifecycle."""
    return Path(os.environ.get("GPT_CACHE_DIR") or Path.home() / ".cache" / "gpt2-lifecycle")


def format_duration(seconds):
    """Seconds -> "1h02m", "3m05s" or "42s", for ETAs and wall times."""
    minutes, seconds = divmod(int(max(0, seconds)), 60)
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def atomic_write_bytes(path, data):
    """Write data (bytes, or a function that writes to the open file, as torch.save does) to path
    through a temporary file and a rename: readers never see a half-written file, and on a full
    disk the previous one stays. Raises OSError naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk (torch.save's writer raises RuntimeError), a folder there, ...
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed (is the disk full?)"
        raise OSError(f"cannot write {path}: {reason} (a file that was there is kept as it was)") from None
    finally:
        with contextlib.suppress(OSError):  # no temporary file, or none can be there (a file where a folder goes)
            tmp.unlink()


def write_json(path, obj):
    """Write obj as indented UTF-8 JSON to path, atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")


def existing_file(path, flag):
    """Path(path) of a file (or a pipe such as <(...)); else FileNotFoundError "FLAG PATH: no such file"."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        raise FileNotFoundError(f"{flag} {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    return path


def decode_utf8(raw, source):
    """Bytes of a text file -> str without a byte-order mark (Windows editors write one); ValueError
    naming `source`, the byte offset and the line of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # not "utf-8-sig": offsets count the mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{source}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                         f"(line {line}); save it as UTF-8") from None


def parse_json(text, source):
    """json.loads(text), with ValueError naming `source` (flag and file) for text that is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{source}: JSON nested too deeply to read") from None


def read_text(path, source):
    """A UTF-8 text file -> str (`decode_utf8`). Raises FileNotFoundError or ValueError naming `source` and the file."""
    path = existing_file(path, source)
    return decode_utf8(path.read_bytes(), f"{source} {path}")


def read_json(path, source):
    """A UTF-8 JSON file, parsed. Raises FileNotFoundError or ValueError naming `source` and the file."""
    return parse_json(read_text(path, source), f"{source} {path}")


# --- Downloads: checked, then renamed into place whole ----------------------------------
#
# A download counts only once checked: files this project names by a pinned size and SHA-256,
# the Hub's large files by the SHA-256 it announces, its small ones by a parse. A wrong hash
# catches a cut file, a web page sent instead and a bad resumed range alike. Each process and
# thread writes its own temporary file, renamed into place: torchrun ranks need no lock.


def verify_file(path, *, size=None, sha256=None, member=None, check=None):
    """Raise ValueError naming the file when `check(path)` (a parse) raises it, or when the size (bytes)
    or SHA-256 (hex) of the file, or of its zip member `member` (a zip made anew differs while its
    member does not), differ from those given."""
    if check is not None:
        check(path)
    if size is None and sha256 is None:
        return
    what = path if member is None else f"{path} (member {member})"
    digest, actual_size = hashlib.sha256(), 0
    try:
        with zipfile.ZipFile(path).open(member) if member else open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                actual_size += len(chunk)
    except (OSError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{what}: not the expected file ({e})") from None
    if size is not None and actual_size != size:
        raise ValueError(f"{what}: {actual_size} bytes, expected {size}")
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        raise ValueError(f"{what}: SHA-256 {digest.hexdigest()}, expected {sha256}")


def download_file(url, dest, *, headers=None, quiet=False, retries=3, timeout=30, **checks):
    """Download url to dest, checked by `verify_file(**checks)` -> dest as a Path (as it is when there:
    only a checked file is renamed there). A cut, a timeout or a lost connection resumes with an HTTP
    Range request, up to `retries` attempts of `timeout` seconds per read; `headers`: an access token.
    Raises RuntimeError naming the URL; whatever fails, Ctrl-C included, deletes the temporary file."""
    dest = Path(dest)
    if dest.is_file():
        return dest  # nothing is written: a read-only cache works too
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.tmp{os.getpid()}.{threading.get_ident()}.part")
    try:
        for attempt in range(1, retries + 1):
            have = part.stat().st_size if part.exists() else 0
            resume = {"Range": f"bytes={have}-"} if have else {}  # after a break: only the bytes missing
            try:
                with requests.get(url, headers={**(headers or {}), **resume}, stream=True, timeout=timeout) as r:
                    if r.status_code not in (200, 206):
                        raise RuntimeError(f"download of {url} failed: HTTP {r.status_code} {r.reason}")
                    have = have if r.status_code == 206 else 0  # 200: the whole file again
                    total = have + int(r.headers.get("Content-Length", 0))
                    done, started = have, time.time()
                    with open(part, "ab" if have else "wb") as f:
                        for chunk in r.iter_content(chunk_size=1 << 16):  # a body cut short raises
                            done += f.write(chunk)
                            if not quiet:
                                left = f" of {total / 1e6:.1f} MB, ETA {eta(started, done - have, total - have)}"
                                show_progress(f"downloading {dest.name}: {done / 1e6:.1f}{left if total else ' MB'}")
                break
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                if attempt == retries:
                    raise RuntimeError(f"download of {url} failed after {attempt} attempts ({type(e).__name__}: "
                                       f"{e}); run again later") from None
            except requests.RequestException as e:  # a redirect loop, not a URL, ...: no attempt can help
                raise RuntimeError(f"download of {url} failed: {type(e).__name__}: {e}") from None
        try:
            verify_file(part, **checks)
        except ValueError as e:  # named as dest: the temporary name means nothing to the reader
            raise RuntimeError(f"download of {url} is corrupt or not the expected file: "
                               f"{str(e).replace(str(part), str(dest))}; deleted, run again") from None
        os.replace(part, dest)
        return dest
    finally:
        part.unlink(missing_ok=True)


def fetch_dataset(urls, filename, *, flag="--data", quiet=False, **checks):
    """Path of a data file in <cache>/data/<hash of urls[0]>/<filename>, downloaded once from the
    first of `urls` (mirrors) that works, checked as `verify_file(**checks)`. Raises RuntimeError
    naming every URL tried and the `flag` that takes a local copy instead."""
    dest = cache_dir() / "data" / hashlib.sha256(urls[0].encode()).hexdigest()[:12] / filename
    errors = []
    for url in urls:
        try:
            return download_file(url, dest, quiet=quiet, **checks)
        except RuntimeError as e:
            errors.append(str(e))
    raise RuntimeError(f'could not download {filename}: offline? Give a copy of it with {flag} PATH (README, "Offline '
                       f'use"). Tried: {"; ".join(errors)}')


def plot_curves(path, panels, xlabel):
    """Save line plots side by side as a PNG -> its path, or None (with a note) without matplotlib.
    panels: {panel title: {series label: (x values, y values)}}."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no plot: pip install matplotlib to get {Path(path).name})")
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend()
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------
# 8. Pretrained weights: safetensors reader, GPT-2 and Llama-family loaders
# ----------------------------------------------------------------------------------------

# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """Read a .safetensors file -> {name: tensor}, each a view of a private (copy-on-write) memory
    mapping of its own bytes: no memory is used until they are touched, and dropping it frees them.
    The format: an 8-byte little-endian length N, N bytes of JSON giving each name its "dtype",
    "shape" and "data_offsets" [begin, end] (from the end of the header), then the raw bytes. Raises
    ValueError naming the file and the first problem of a truncated or malformed one."""
    path = Path(path)
    file_size = path.stat().st_size
    tensors = {}
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            data_start = 8 + header_len
            if data_start > file_size:
                raise ValueError(f"a header of {header_len} bytes runs past the end of the {file_size}-byte file")
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)  # free-form strings, not a tensor
            for name, info in header.items():
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise ValueError(f"tensor {name!r}: unknown dtype {info['dtype']!r}")
                dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
                numel = math.prod(shape)
                if min(shape, default=0) < 0 or not 0 <= begin == end - numel * dtype.itemsize \
                        or data_start + end > file_size:  # the one bounds check: a cut file fails it too
                    raise ValueError(f"tensor {name!r}: {info['dtype']} {shape} at data offsets [{begin}, {end}] "
                                     f"does not fit in the {file_size - data_start} data bytes (truncated?)")
                if numel == 0:
                    tensors[name] = torch.empty(shape, dtype=dtype)
                    continue
                start = data_start + begin
                page = start - start % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
                region = mmap.mmap(f.fileno(), start + end - begin - page, offset=page, access=mmap.ACCESS_COPY)
                tensors[name] = torch.frombuffer(region, dtype=dtype, count=numel, offset=start - page).view(shape)
    except (struct.error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a complete safetensors file ({e}); download or export it again") from None
    return tensors


def hub_file(repo, filename, *, quiet=False, missing_ok=False, cached_only=False):
    """Path of `filename` of the Hub model `repo` ("owner/model"): in the Hugging Face cache, else in
    ours (<cache>/<repo>/, GPT-2's sizes in <cache>/<size>/), else downloaded from $HF_ENDPOINT (default
    huggingface.co) with the token in $HF_TOKEN and checked: a large (LFS) file by the SHA-256 the Hub
    announces, a .json or .safetensors file by a parse. None for a file the Hub lacks when missing_ok,
    or one not on disk when cached_only. Raises RuntimeError offline, for a gated model, as `download_file`."""
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    model = Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub") / f"models--{repo.replace('/', '--')}"
    ref = model / "refs" / "main"  # the main branch's snapshot: the revision downloaded below (resolve/main)
    snapshot = model / "snapshots" / ref.read_text().strip() / filename if ref.is_file() else None
    dest = cache_dir() / repo.removeprefix("openai-community/") / filename
    local = next((path for path in (snapshot, dest) if path is not None and path.is_file()), None)
    if local or cached_only:
        return local
    parse = {".safetensors": read_safetensors, ".json": functools.partial(read_json, source="Hub file")}
    checks = {"check": parse.get(Path(filename).suffix)}
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{repo}/resolve/main/{filename}"
    headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else {}
    try:
        head = requests.head(url, headers=headers, allow_redirects=False, timeout=30)
    except requests.RequestException as e:
        raise RuntimeError(f"cannot reach {url} ({e.__class__.__name__}). Offline? Give --model a model folder or a "
                           f".safetensors or GGUF file instead of {repo!r} (README, \"Offline use\"), or set "
                           "HF_ENDPOINT to a mirror") from None
    if head.status_code in (401, 403):
        token = "HF_TOKEN is set, but its account has no access yet" if headers else "HF_TOKEN is not set"
        raise RuntimeError(f"{repo} is gated (HTTP {head.status_code}; {token}): accept its licence on "
                           f"https://huggingface.co/{repo} while logged in, then set HF_TOKEN to an access token of "
                           "that account (https://huggingface.co/settings/tokens)")
    if head.status_code == 404 and missing_ok:
        return None
    if head.status_code >= 400:
        raise RuntimeError(f"download of {url} failed: HTTP {head.status_code} {head.reason}")
    if "X-Linked-Etag" in head.headers:  # an LFS file: its etag is its SHA-256
        checks["sha256"] = head.headers["X-Linked-Etag"].strip('"')
    return download_file(url, dest, headers=headers, quiet=quiet, **checks)


# --- config.json: the settings that change what a model computes ---------------------------
#
# Each table maps such a setting to (test of its value, what this implementation supports): a file
# asking for anything else is refused, not loaded as a model that computes other logits. An absent
# key means transformers' default, which is implemented; other keys (dropout, ...) are ignored.


def _is(*values):
    """Test that a value is one of `values`, compared by type too (JSON's true is not 1)."""
    return lambda value: any(type(value) is type(v) and value == v for v in values)


# config.json's sizes -> GPTConfig's fields, each a positive integer (`check_sizes`); written by `hf_config`.
GPT2_SIZES = {"vocab_size": "vocab_size", "n_positions": "context_length", "n_embd": "emb_dim", "n_head": "n_heads",
              "n_layer": "n_layers"}
HUB_SIZES = {"vocab_size": "vocab_size", "max_position_embeddings": "context_length", "hidden_size": "emb_dim",
             "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers", "intermediate_size": "hidden_dim"}
POSITIVE_NUMBER = (lambda value: type(value) in (int, float) and math.isfinite(value) and value > 0,
                   "a finite number > 0")
POSITIVE_OR_NULL = (lambda value: value is None or (type(value) is int and value > 0), "null or a positive integer")
GPT2_SETTINGS = {
    "activation_function": (_is("gelu_new", "gelu_pytorch_tanh"),
                            "'gelu_new' or 'gelu_pytorch_tanh', GELU's tanh approximation"),
    "layer_norm_epsilon": POSITIVE_NUMBER,
    "scale_attn_weights": (_is(True), "true, scores divided by the square root of the head size"),
    "scale_attn_by_inverse_layer_idx": (_is(False), "false"),
    "reorder_and_upcast_attn": (_is(False), "false"),
    "add_cross_attention": (_is(False), "false, a decoder only"),
    "tie_word_embeddings": (_is(True), "true, the head is the token embedding"),
}
# config.json's model_type -> (its class in transformers, the switches it turns on beyond Llama's layout)
HUB_MODEL_TYPES = {
    "llama": ("LlamaForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {"qk_norm": True}),
    "mistral": ("MistralForCausalLM", {}),
    "phi3": ("Phi3ForCausalLM", {}),
    "phi": ("PhiForCausalLM", {"qkv_bias": True, "out_bias": True, "mlp_bias": True}),
    "gemma3_text": ("Gemma3ForCausalLM", {"qk_norm": True}),
}
# The family's settings; sizes, biases, windows and rotary bases are read by `config_from_json`.
# pretraining_tp only sliced the same products.
LLAMA_SETTINGS = {
    "rms_norm_eps": POSITIVE_NUMBER,
    "layer_norm_eps": POSITIVE_NUMBER,
    "rope_theta": POSITIVE_NUMBER,
    "head_dim": POSITIVE_OR_NULL,
    "sliding_window": POSITIVE_OR_NULL,
    "use_sliding_window": (_is(False), "false, every layer attends to the whole context"),
    "qk_layernorm": (_is(False), "false"),
    "final_logit_softcapping": (_is(None), "null"),
    "attn_logit_softcapping": (_is(None), "null"),
    "use_bidirectional_attention": (_is(False), "false"),
}
# ... and of its rotary positions, in rope_parameters (transformers 5, with rope_theta) or
# rope_scaling (transformers 4, which called rope_type type).
ROPE_SETTINGS = {
    "rope_type": (_is("default", "llama3"), "'default' or 'llama3'"),
    "type": (_is("default", "llama3"), "'default' or 'llama3'"),
    "rope_theta": POSITIVE_NUMBER,
    "factor": POSITIVE_NUMBER,
    "low_freq_factor": POSITIVE_NUMBER,
    "high_freq_factor": POSITIVE_NUMBER,
    "original_max_position_embeddings": POSITIVE_NUMBER,
    "partial_rotary_factor": POSITIVE_NUMBER,
}
# The feed-forward layer's activation each model type computes: silu (SwiGLU) unless named here.
ACTIVATIONS = {"phi": ("gelu_new", "gelu_pytorch_tanh"), "gemma3_text": ("gelu_pytorch_tanh",)}


def check_settings(config_json, settings, prefix=""):
    """Raise ValueError naming the key, its value and what is supported for the first key of
    `settings` whose value in config_json fails its test; `prefix` names the dict the keys are in."""
    for key, (test, supported) in settings.items():
        if key in config_json and not test(config_json[key]):
            raise ValueError(f"{prefix}{key} = {config_json[key]!r} is not supported "
                             f"(this implementation: {supported})")


def check_sizes(config_json, keys):
    """Raise ValueError naming the first of `keys` whose value in config_json is not a positive integer."""
    for key in keys:
        value = config_json.get(key)
        if type(value) is not int or value < 1:  # not isinstance: JSON's true is an int too
            raise ValueError(f"{key!r} must be a positive integer, got {value!r}")


def config_from_json(config_json):
    """GPTConfig of a transformers config.json (a dict): GPT-2's, else the Llama family's (`config_from_hub`).
    Raises ValueError naming the key of a bad size or of a setting this implementation does not have."""
    if not isinstance(config_json, dict):
        raise ValueError(f"a {type(config_json).__name__}, not a JSON object")
    if config_json.get("model_type") != "gpt2":
        return config_from_hub(config_json)
    check_sizes(config_json, GPT2_SIZES)
    hidden = 4 * config_json["n_embd"]  # the MLP's width, n_inner, is GPT-2's: null means this
    check_settings(config_json, {**GPT2_SETTINGS, "n_inner": (_is(None, hidden), f"null or 4 * n_embd = {hidden}")})
    sizes = {field: config_json[key] for key, field in GPT2_SIZES.items()}
    return GPTConfig(**sizes, norm_eps=float(config_json.get("layer_norm_epsilon", 1e-5)))


def config_from_hub(config_json):
    """GPTConfig of the config.json (a dict) of a Llama (Llama 3.2, SmolLM2), Qwen3, Mistral, Phi, Phi-3
    or Gemma 3 model, in transformers 4's spelling or 5's (rope_parameters, per layer type for Gemma 3).
    Raises ValueError (KeyError: a rope_scaling entry missing) naming a bad size or unsupported setting."""
    model_type = config_json.get("model_type")
    if model_type not in HUB_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: gpt2, {', '.join(HUB_MODEL_TYPES)}")
    check_sizes(config_json, HUB_SIZES)
    check_settings(config_json, LLAMA_SETTINGS)
    activation = config_json.get("hidden_act", config_json.get("hidden_activation", "silu"))
    if activation not in ACTIVATIONS.get(model_type, ("silu",)):
        raise ValueError(f"hidden_act = {activation!r} is not supported (this implementation: "
                         f"{' or '.join(ACTIVATIONS.get(model_type, ('silu',)))} for {model_type})")
    parameters = config_json.get("rope_parameters") or {}
    local = parameters.get("sliding_attention", {})  # Gemma 3's windowed layers, in transformers 5
    ropes = {"rope_parameters": parameters.get("full_attention", parameters),
             "rope_scaling": config_json.get("rope_scaling") or {}}
    for key, settings in ropes.items():
        check_settings(settings, ROPE_SETTINGS, prefix=f"{key}.")
    rope = {**ropes["rope_parameters"], **ropes["rope_scaling"]}  # as transformers 5 reads a file with both
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling_keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    window = config_json.get("sliding_window")
    attention_bias = bool(config_json.get("attention_bias", False))
    layer_types = config_json.get("layer_types") or ["full_attention" if window is None else "sliding_attention"]
    pattern = config_json.get("sliding_window_pattern")  # Gemma 3 in transformers 4.50 to 4.52
    global_every = pattern or (layer_types.index("full_attention") + 1 if "sliding_attention" in layer_types
                               and "full_attention" in layer_types else None)
    cfg = LlamaConfig(
        model_type=None if model_type in ("llama", "qwen3") else model_type,
        **{field: config_json[key] for key, field in HUB_SIZES.items()},
        n_kv_heads=config_json.get("num_key_value_heads"),
        head_dim=config_json.get("head_dim"),
        rope_theta=float(rope.get("rope_theta", config_json.get("rope_theta", 10000.0))),  # 0 is refused above
        rope_scaling={key: rope[key] for key in scaling_keys} if rope_type == "llama3" else None,
        norm_eps=float(config_json.get("rms_norm_eps", config_json.get("layer_norm_eps", 1e-6))),
        tie_embeddings=bool(config_json.get("tie_word_embeddings", model_type == "gemma3_text")),
        sliding_window=window if "sliding_attention" in layer_types or pattern else None,
        global_every=global_every,
        local_rope_theta=config_json.get("rope_local_base_freq", local.get("rope_theta")),
        rotary_fraction=rope.get("partial_rotary_factor", config_json.get("partial_rotary_factor", 1.0)),
        query_scale=config_json.get("query_pre_attn_scalar"),
        **{"qkv_bias": attention_bias, "out_bias": attention_bias, "mlp_bias": bool(config_json.get("mlp_bias")),
           **HUB_MODEL_TYPES[model_type][1]},
    )
    if config_json.get("layer_types") and config_json["layer_types"] != hub_layer_types(cfg):
        raise ValueError(f"layer_types = {config_json['layer_types']} is not supported (this implementation: "
                         "'full_attention' in every layer, or in every n-th and 'sliding_attention' in the others)")
    return cfg


def hub_layer_types(cfg):
    """config.json's layer_types for cfg: which layers see all keys, which the sliding window."""
    is_global = [cfg.global_every is not None and (i + 1) % cfg.global_every == 0 for i in range(cfg.n_layers)]
    return ["full_attention" if g or cfg.sliding_window is None else "sliding_attention" for g in is_global]


def hub_config(cfg):
    """config.json of the transformers class of a Llama-family GPTConfig (`HUB_MODEL_TYPES`) -> dict
    in transformers 4's spelling, which transformers 5 reads too (`config_from_hub` reads it back).
    Raises ValueError for biases the class cannot express."""
    if cfg.qkv_bias != cfg.out_bias or (cfg.qk_norm and cfg.mlp_bias):
        raise ValueError("this model's biases have no Llama or Qwen3 config.json: attention_bias is one switch "
                         "for the q, k, v and o projections, and Qwen3 has no MLP biases")
    model_type = cfg.model_type or ("qwen3" if cfg.qk_norm else "llama")
    activation = ACTIVATIONS.get(model_type, ("silu",))[0]
    config = {
        "architectures": [HUB_MODEL_TYPES[model_type][0]],
        "model_type": model_type,
        **{key: getattr(cfg, field) for key, field in HUB_SIZES.items()},
        "intermediate_size": cfg.hidden_dim or 4 * cfg.emb_dim,  # hidden_dim None: 4 * emb_dim
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.head_dim or cfg.emb_dim // cfg.n_heads,
        "hidden_activation" if model_type == "gemma3_text" else "hidden_act": activation,  # as each class names them
        "layer_norm_eps" if model_type == "phi" else "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": {"rope_type": "llama3", **cfg.rope_scaling} if cfg.rope_scaling else None,
        "partial_rotary_factor": cfg.rotary_fraction,
        "attention_bias": cfg.qkv_bias,
        **({} if cfg.qk_norm else {"mlp_bias": cfg.mlp_bias}),
        "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": cfg.sliding_window,
        "pad_token_id": None,  # not Phi-3's default 32000: the tokenizer's ids follow
    }
    if model_type == "gemma3_text":
        config.update(query_pre_attn_scalar=cfg.query_scale, rope_local_base_freq=cfg.local_rope_theta,
                      layer_types=hub_layer_types(cfg))
    return config


# --- Weights into a model: strict, each tensor copied once ------------------------------

# Keys of the released files that hold no parameters of ours: GPT-2's causal-mask buffers (we build
# the mask on the fly), rotary frequencies older Llama files stored (we compute them), a tied head.
_IGNORED_KEYS = re.compile(r"(h\.\d+\.attn\.(bias|masked_bias)|layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
                           r"|lm_head\.weight)")
# GPT-2's reference implementation stores these as Conv1D weights, [in_features, out_features].
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def empty_model(cfg):
    """Model of cfg (`build_model`) on the meta device: placeholder parameters without memory or values,
    for a loader to assign tensors to. Its random init is skipped: on the meta device normal_ costs a second."""
    normal = nn.init.normal_
    nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        with torch.device("meta"):
            return build_model(cfg)
    finally:
        nn.init.normal_ = normal


def load_weights_into(model, tensors, *, device="cpu", dtype=torch.float32, source="weights"):
    """Put tensors named as released (GPT-2's without `transformer.`, the Llama family's without
    `model.`) into model, which may be on the meta device. Each is copied once, to `device` in
    `dtype`, and becomes the parameter; `tensors` is consumed, so a memory-mapped file leaves memory
    one tensor at a time. Strict: raises ValueError listing every missing, unexpected or mis-shaped
    tensor, before anything is copied, and naming a tensor that holds NaN or infinite values."""
    gpt2 = model.cfg.family == "gpt2"
    transposed = _TRANSPOSED if gpt2 else ()
    tied = model.lm_head.weight is model.wte.weight
    params = {name: p for name, p in model.state_dict(keep_vars=True).items()
              if not (tied and name == "lm_head.weight")}
    # the file's shapes in our layout
    shapes = {name: t.shape[::-1] if name.endswith(transposed) else t.shape for name, t in tensors.items()}
    problems = {
        "missing": sorted(set(params) - set(tensors)),
        "unexpected": sorted(k for k in tensors if k not in params and not _IGNORED_KEYS.fullmatch(k)),
        "wrong shape": [f"{name}: file {tuple(tensors[name].shape)}, model {tuple(param.shape)}"
                        for name, param in params.items() if name in shapes and shapes[name] != param.shape],
    }
    if any(problems.values()):  # a whole model's names would fill screens: the first ten show the mistake
        lines = [f"{kind}: {'; '.join(names[:10])}" + (f" ... ({len(names)} in all)" if len(names) > 10 else "")
                 for kind, names in problems.items() if names]
        family = "GPT-2" if gpt2 else "Llama-family"
        raise ValueError(f"{source} do not fit the {family} model:\n  " + "\n  ".join(lines))
    state = {}
    for name, param in params.items():
        tensor = tensors.pop(name).to(device=device, dtype=dtype, copy=True)
        if not torch.isfinite(tensor).all():  # a corrupt file: bytes changed after the download was checked
            raise ValueError(f"{source}: {name} holds NaN or infinite values: the file is corrupt; delete it "
                             "and download or export it again")
        # nn.Linear wants [out, in]; the release stores [in, out]. `.t()` is that as a view:
        # the memory keeps the release's layout, in which x @ W reads the weights in order
        # (measured about 1.2x faster greedy decoding on a CPU than a transposed copy).
        state[name] = tensor.t() if name.endswith(transposed) else tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assigning untied them


# --- One loader: a model and its tokenizer from any source ------------------------------

# The tokenizer files a model carries along: read, kept in `Tokenizer.files`, exported as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def load(source="gpt2", *, device="cpu", dtype=torch.float32, quiet=False, language_model=False):
    """Load a model and its tokenizer -> (model in eval mode on `device` in `dtype`, `Tokenizer`).
    source: a released GPT-2 size ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") or a Hugging Face
    Hub name "owner/model" (both downloaded once; a gated model needs HF_TOKEN), a model folder as
    `save_pretrained` or `export_hf` writes it or a .safetensors file in one, a GGUF file or
    "ollama:NAME[:TAG]" (section 8b), or a checkpoint of this project (any other file). Raises
    FileNotFoundError, ValueError naming a file that does not fit (or a classifier, when `language_model`),
    RuntimeError for a failed download."""
    path, gguf = Path(source), gguf_file(source)
    if gguf is not None:
        tensors, config_json, tokenizer_files = gguf_model_parts(gguf, dtype)
        model = model_from_tensors(tensors, config_json, gguf, device=device, dtype=dtype)
        tokenizer = tokenizer_from_files(tokenizer_files, gguf)
    elif path.is_file() and path.suffix != ".safetensors":
        checkpoint = load_checkpoint(path)
        model = model_from_checkpoint(checkpoint, device=device, dtype=dtype)
        tokenizer = tokenizer_from_state(checkpoint.get("tokenizer"))
    else:
        config_json, weight_paths, tokenizer_files = model_files(source, quiet=quiet)
        tensors = {}
        for weight_path in weight_paths:
            tensors.update(read_safetensors(weight_path))
        model = model_from_tensors(tensors, config_json, source, device=device, dtype=dtype)
        tokenizer = get_tokenizer() if not tokenizer_files and model.cfg.family == "gpt2" \
            else tokenizer_from_files(tokenizer_files, source)
    if language_model and hasattr(model, "labels"):  # its 2 outputs would pass for 2 tokens
        raise ValueError(f"{source} is a classifier, not a language model: use it with `python finetune_classify.py "
                         f"--checkpoint {source} --classify TEXT`")
    check_vocabulary(model, source, tokenizer)
    return model, tokenizer


def check_vocabulary(model, source, tokenizer):
    """Raise ValueError when tokenizer can produce ids that model has no embedding for."""
    if model.cfg.vocab_size < tokenizer.n_vocab:  # a larger vocabulary (padded to 50304, say) is fine
        which = f"the tokenizer {tokenizer.name}" if tokenizer.files else "the GPT-2 tokenizer"  # GPT-2's has no files
        raise ValueError(f"{source}: the model's vocabulary has {model.cfg.vocab_size} tokens, but {which} uses "
                         f"{tokenizer.n_vocab}: use a model trained with {which}")


def model_files(source, *, quiet=False):
    """A model's files -> (config.json as a dict, [safetensors paths], {tokenizer file: text}) of a folder,
    a .safetensors file, a released GPT-2 size (its config: GPT_CONFIGS') or a Hub name "owner/model",
    downloading what is missing. FileNotFoundError: none of these, or no weights or config.json."""
    path, name = Path(source), str(source)
    if path.is_dir() or (path.suffix == ".safetensors" and path.is_file()):
        folder = path if path.is_dir() else path.parent
        index = folder / "model.safetensors.index.json"
        if path.is_file() or (folder / "model.safetensors").is_file():
            weight_paths = [path if path.is_file() else folder / "model.safetensors"]
        elif index.is_file():
            weight_paths = [folder / shard for shard in shard_names(index)]
        else:
            raise FileNotFoundError(f"{folder} holds no model: neither model.safetensors nor {index.name}")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} holds no config.json: put the model's config.json beside its weights")
        names = TOKENIZER_FILES if (folder / "tokenizer.json").is_file() else ("vocab.json",)  # GPT-2's own
        files = {file: decode_utf8((folder / file).read_bytes(), folder / file)
                 for file in names if (folder / file).is_file()}
        return read_json(folder / "config.json", "model config"), weight_paths, files
    if name in GPT_CONFIGS:
        weights = hub_file(f"openai-community/{name}", "model.safetensors", quiet=quiet)
        return hf_config(GPT_CONFIGS[name]), [weights], {}
    if not re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", name) or Path(name.split("/")[0]).is_dir() \
            or path.suffix in (".pt", ".safetensors", ".gguf"):  # a local path that is not there
        raise FileNotFoundError(f"no such file or model {name!r}: a model is a released GPT-2 size "
                                f"({', '.join(GPT_CONFIGS)}), a Hub name owner/model, a model folder, a .safetensors "
                                "or .gguf file, ollama:NAME[:TAG] or a checkpoint of this project")
    config_json = read_json(hub_file(name, "config.json", quiet=quiet), "model config")
    index = hub_file(name, "model.safetensors.index.json", cached_only=True)  # sharded and on disk: no request
    single = None if index else hub_file(name, "model.safetensors", quiet=quiet, missing_ok=True)
    index = index or (None if single else hub_file(name, "model.safetensors.index.json", quiet=quiet))
    weight_paths = [single] if single else [hub_file(name, shard, quiet=quiet) for shard in shard_names(index)]
    return config_json, weight_paths, hub_tokenizer_files(name, quiet=quiet)


def shard_names(index):
    """The weight files a model.safetensors.index.json lists, in order."""
    return sorted(set(read_json(index, "weights index")["weight_map"].values()))


def hub_tokenizer_files(repo, *, quiet=False):
    """{file name: text} of the TOKENIZER_FILES a Hub model has. Once its tokenizer.json is on disk,
    the Hub is not asked for the others: a cached model loads offline."""
    cached = hub_file(repo, "tokenizer.json", cached_only=True) is not None
    paths = [hub_file(repo, name, quiet=quiet, missing_ok=True, cached_only=cached) for name in TOKENIZER_FILES]
    return {path.name: decode_utf8(path.read_bytes(), path) for path in paths if path}


def model_from_tensors(tensors, config_json, source, *, device="cpu", dtype=torch.float32):
    """Model in eval mode of tensors named as transformers saves them and their config.json (a dict);
    a ...ForSequenceClassification's `score` becomes a classifier head. Consumes `tensors`. Raises
    ValueError naming `source` for a model this project lacks or tensors that do not fit."""
    for name in list(tensors):  # renamed in place: the loader drops each tensor from this dict once copied
        tensors[name.removeprefix("transformer.").removeprefix("model.")] = tensors.pop(name)
    if isinstance(config_json, dict) and not config_json.get("model_type") and "wte.weight" in tensors:
        config_json = {**config_json, "model_type": "gpt2"}  # GPT-2's files from before config.json named it
    score = tensors.pop("score.weight", None)  # a ...ForSequenceClassification: `score` is its head
    try:
        cfg = config_from_json(config_json)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{source} config.json: {e}") from None
    if cfg.family != "gpt2":
        llama_layout(tensors, cfg)  # Phi's names, Phi-3's packed matrices
    model = empty_model(dataclasses.replace(cfg, tie_embeddings=True) if score is not None else cfg)
    weights = f"{source}: its weights at {dtype.itemsize} bytes each"
    check_memory(count_parameters(model) * dtype.itemsize, device, weights)
    load_weights_into(model, tensors, device=device, dtype=dtype, source=str(source))
    if score is not None:  # no language-model head to load: the classifier's takes its place
        labels = config_json.get("id2label") or {}
        add_classifier_head(model, [labels.get(str(i), f"LABEL_{i}") for i in range(score.shape[0])], bias=False)
        model.lm_head.weight = nn.Parameter(score.to(device=device, dtype=dtype))
    return model.eval()


def add_classifier_head(model, labels, bias=True):
    """Replace the language-model head by a random nn.Linear(emb_dim, len(labels)), a classifier
    (finetune_classify.py); the class names travel with the model as `model.labels`."""
    model.lm_head = nn.Linear(model.cfg.emb_dim, len(labels), bias=bias).to(model.wte.weight.device)
    model.labels = list(labels)
    return model


# ----------------------------------------------------------------------------------------
# 8b. GGUF: the files of llama.cpp and Ollama
# ----------------------------------------------------------------------------------------

# GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) holds a whole model in one
# file: b"GGUF", a version, metadata (the config, the tokenizer, the chat template) and a table
# of tensors, whose bytes follow, aligned. Most tensors are quantized: blocks of 32 or 256
# values that share a scale (and an offset), each value in 4 to 8 bits. A GGUF file is read
# into the three parts a Hugging Face folder holds (tensors under transformers' names, a
# config.json, tokenizer files), which section 8 then loads like any other model; a model is
# written from the same three parts (section 10's `hf_tensors` and `hf_config`).

# Metadata value types -> struct formats (8 is a string, 9 an array)
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# ggml's tensor types, by id (ggml.h, enum ggml_type; Q4_2 and Q4_3 are gone but keep their ids)
GGML_TYPES = ("F32 F16 Q4_0 Q4_1 Q4_2 Q4_3 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ2_XXS IQ2_XS "
              "IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ2_S IQ4_XS I8 I16 I32 I64 F64 IQ1_M BF16").split()


def _half(blocks, start):
    """The float16 at byte `start` of each block (uint8 [n, bytes]) -> float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _fields(data, bits, width):
    """Bytes (uint8 [n, k]) -> their `bits`-wide fields, uint8 [n, k * 8 / bits], in ggml's order: in each run
    of `width` bytes, the lowest field of every byte, then the next (4 bits, width 16: 16 low nibbles, 16 high)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8).view(1, 1, -1, 1)
    return ((data.reshape(len(data), -1, 1, width) >> shifts) & (2**bits - 1)).reshape(len(data), -1)


def _q5(blocks, start):
    """5-bit values of Q5_0/Q5_1: 32 high bits at `start`, then 16 bytes of low nibbles -> uint8 [n, 32]."""
    return _fields(blocks[:, start + 4:], 4, 16) | _fields(blocks[:, start:start + 4], 1, 1) << 4


def _q4_k(blocks):
    """Q4_K: two float16 factors (bytes 0 and 2), 8 scales and 8 minimums of 6 bits (4-15), 256 4-bit values.
    Bytes 4-7 (d) and 8-11 (m) hold scales and minimums 0-3 in their low 6 bits; 4-7 are the nibbles of
    bytes 12-15 (`high`) under the top 2 bits of d and m."""
    d, m, high = blocks[:, 4:16].reshape(-1, 3, 4).unbind(1)
    scales = _half(blocks, 0) * torch.cat([d & 63, (high & 15) | (d >> 2 & 48)], 1)
    minimums = _half(blocks, 2) * torch.cat([m & 63, (high >> 4) | (m >> 2 & 48)], 1)
    return scales.unsqueeze(-1) * _fields(blocks[:, 16:], 4, 32).view(-1, 8, 32) - minimums.unsqueeze(-1)


def _q6_k(blocks):
    """Q6_K: 4 low bits per value (bytes 0-127), 2 high bits (128-191), 16 signed 8-bit scales, a float16."""
    values = (_fields(blocks[:, :128], 4, 64) | _fields(blocks[:, 128:192], 2, 32) << 4).to(torch.int8) - 32
    scales = _half(blocks, 208) * blocks[:, 192:208].view(torch.int8)
    return scales.unsqueeze(-1) * values.view(-1, 16, 16)


# The tensor types read here -> (values per block, bytes per block, unpack: blocks uint8 [n, bytes]
# -> values float32 [n, values per block]), computed as ggml-quants.c and the `gguf` package do.
# Q4_0 is a float16 scale d and 32 4-bit values q, each d * (q - 8); Q4_1 adds a float16 offset m,
# d * q + m; Q5 holds one more bit per value, Q8_0 8 bits; the K types share float16 factors per
# 256 values, which scale 16 (or 8) smaller scales (and minimums) of 6 to 8 bits.
GGUF_BLOCKS = {
    "F32": (1, 4, lambda blocks: blocks.view(torch.float32)),
    "F16": (1, 2, lambda blocks: blocks.view(torch.float16).float()),
    "BF16": (1, 2, lambda blocks: blocks.view(torch.bfloat16).float()),
    "Q8_0": (32, 34, lambda blocks: blocks[:, 2:].contiguous().view(torch.int8) * _half(blocks, 0)),
    "Q4_0": (32, 18, lambda blocks: _half(blocks, 0) * (_fields(blocks[:, 2:], 4, 16).to(torch.int8) - 8)),
    "Q4_1": (32, 20, lambda blocks: _half(blocks, 0) * _fields(blocks[:, 4:], 4, 16) + _half(blocks, 2)),
    "Q5_0": (32, 22, lambda blocks: _half(blocks, 0) * (_q5(blocks, 2).to(torch.int8) - 16)),
    "Q5_1": (32, 24, lambda blocks: _half(blocks, 0) * _q5(blocks, 4) + _half(blocks, 2)),
    "Q4_K": (256, 144, _q4_k),
    "Q6_K": (256, 210, _q6_k),
}


def dequantize(kind, shape, data):
    """A tensor of `read_gguf` (a GGUF_BLOCKS type, its shape, bytes uint8 [n]) -> float32 values of that shape."""
    _, block_bytes, unpack = GGUF_BLOCKS[kind]
    return unpack(data.view(-1, block_bytes)).reshape(shape)


def read_gguf(path):
    """Read a GGUF file (version 2 or 3) -> (metadata {key: value}, {tensor name: (type, shape, bytes)}): a
    GGUF_BLOCKS type, torch's order of dimensions, a uint8 view of a private memory mapping of the file. Raises
    FileNotFoundError, or ValueError naming the file: not GGUF, another version, truncated, malformed."""
    path = Path(path)
    with open(path, "rb") as f:
        # ACCESS_COPY: torch.frombuffer needs a writable buffer; writes stay private, never reach the file
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(f.fileno()).st_size else b""
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (it starts with {bytes(data[:4])!r}, not b'GGUF')")
    position = 4

    def take(fmt):  # the next values of the struct format `fmt`, little-endian
        nonlocal position
        values = struct.unpack_from("<" + fmt, data, position)
        position += struct.calcsize("<" + fmt)
        return values

    def values(kind, count):  # `count` metadata values of type `kind`
        if kind == 8:  # a string: its length in bytes, then UTF-8
            return [str(take(f"{take('Q')[0]}s")[0], "utf-8") for _ in range(count)]
        if kind == 9:  # an array: the type of its items, their count, the items
            return [values(*take("IQ")) for _ in range(count)]
        if kind not in GGUF_SCALARS:
            raise ValueError(f"{path}: not a well-formed GGUF file (a metadata value of unknown type {kind})")
        return list(take(f"{count}{GGUF_SCALARS[kind]}"))

    try:
        (version,) = take("I")
        if version not in (2, 3):  # 1 had 32-bit counts; a big-endian file reads as 33554432 or 50331648
            raise ValueError(f"{path}: GGUF version {version}; versions 2 and 3, little-endian, are read: "
                             "convert the model again with a recent llama.cpp")
        n_tensors, n_keys = take("QQ")
        metadata = {}
        for _ in range(n_keys):  # a key, the type of its value, the value
            [key] = values(8, 1)
            [metadata[key]] = values(take("I")[0], 1)
        infos = []
        for _ in range(n_tensors):  # a name, its number of dimensions, the dimensions, its type, its offset
            [name], (n_dims,) = values(8, 1), take("I")
            infos.append((name, take(f"{n_dims}Q"), *take("IQ")))
    except struct.error:
        raise ValueError(f"{path}: not a complete GGUF file (it ends inside its header: truncated?)") from None
    except (UnicodeDecodeError, OverflowError) as e:
        raise ValueError(f"{path}: not a well-formed GGUF file ({e.__class__.__name__}: {e})") from None
    alignment = metadata.get("general.alignment", 32)  # the tensor data starts at the next multiple of it
    return metadata, gguf_tensor_table(path, data, infos, data_start=-(-position // alignment) * alignment)


def gguf_tensor_table(path, data, infos, data_start):
    """The tensors of `read_gguf` from their infos (name, dimensions, type id, offset from data_start).
    Raises ValueError naming the tensor for a type GGUF_BLOCKS lacks or data past the end of the file."""
    buffer = torch.frombuffer(data, dtype=torch.uint8)
    tensors = {}
    for name, dims, kind, offset in infos:
        kind = GGML_TYPES[kind] if kind < len(GGML_TYPES) else f"type {kind}"
        if kind not in GGUF_BLOCKS:
            raise ValueError(f"{path}: tensor {name!r} is {kind}, a type this project does not read (it reads "
                             f"{', '.join(GGUF_BLOCKS)}): requantize the model with llama-quantize "
                             "--allow-requantize to Q4_K_M or Q8_0")
        per_block, block_bytes, _ = GGUF_BLOCKS[kind]
        start, size = data_start + offset, math.prod(dims) // per_block * block_bytes
        if (dims and dims[0] % per_block) or start + size > len(data):
            raise ValueError(f"{path}: tensor {name!r} ({kind}, {list(dims)}) at byte {start} does not fit in the "
                             f"{len(data)}-byte file (truncated?)")
        tensors[name] = (kind, dims[::-1], buffer[start:start + size])
    return tensors


# The architectures read and written. general.architecture -> config.json's model_type, where they differ:
GGUF_MODEL_TYPES = {"phi2": "phi", "gemma3": "gemma3_text"}
# llama.cpp's tensor names -> transformers' (without `transformer.` or `model.`), as gguf-py's
# tensor_mapping.py maps them: "blk.N.<name>" is "h.N.<ours>" for GPT-2, "layers.N.<ours>" for the others.
_LLAMA_TENSORS = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
                  "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                  "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                  "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
                  "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GGUF_TENSOR_NAMES = {
    "gpt2": {"token_embd": "wte", "position_embd": "wpe", "output_norm": "ln_f", "output": "lm_head",
             "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
             "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    "llama": _LLAMA_TENSORS,
    "qwen3": _LLAMA_TENSORS,
    "phi2": {**_LLAMA_TENSORS, "attn_output": "self_attn.dense", "output_norm": "final_layernorm",
             "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2", "attn_qkv": "self_attn.qkv_proj"},  # older files pack q, k, v
    "phi3": {**_LLAMA_TENSORS, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # packed in one
    "gemma3": {**_LLAMA_TENSORS, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
}
# metadata "<architecture>.<key>" -> config.json key
_LLAMA_KEYS = {"context_length": "max_position_embeddings", "embedding_length": "hidden_size",
               "feed_forward_length": "intermediate_size", "block_count": "num_hidden_layers",
               "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
               "attention.key_length": "head_dim", "rope.freq_base": "rope_theta",
               "attention.sliding_window": "sliding_window", "attention.layer_norm_rms_epsilon": "rms_norm_eps"}
GGUF_CONFIG_KEYS = {
    "gpt2": {"context_length": "n_positions", "embedding_length": "n_embd", "feed_forward_length": "n_inner",
             "block_count": "n_layer", "attention.head_count": "n_head",
             "attention.layer_norm_epsilon": "layer_norm_epsilon"},
    **dict.fromkeys(("llama", "qwen3", "phi3", "gemma3"), _LLAMA_KEYS),
    "phi2": {**_LLAMA_KEYS, "attention.layer_norm_epsilon": "layer_norm_eps"},  # Phi's LayerNorm
}
# What llama.cpp assumes of an architecture rather than reads (llama-model.cpp), as config.json settings
GGUF_ASSUMED = {"phi2": {"hidden_act": "gelu_new"},
                "gemma3": {"hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6,
                           "rope_local_base_freq": 10000.0}}
# tokenizer.ggml.pre, llama.cpp's name of a byte-level pre-tokenizer -> its expression (`split_pattern`)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = {"gpt-2": GPT2_SPLIT_PATTERN, "smollm": DIGITS_SPLIT_PATTERN, "qwen2": _QWEN2_SPLIT,
                       "llama-bpe": _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")}
# Llama 3's rope scaling as Meta released it (Llama 3.1, 3.2) but for its factor: llama.cpp keeps
# not the settings but the factor by which each frequency is divided (`rope_factors`)
LLAMA3_ROPE_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_factors(cfg, head_dim):
    """How much Llama 3's rope scaling (cfg.rope_scaling) slows each rotary frequency down -> float32
    [head_dim / 2], llama.cpp's tensor rope_freqs.weight."""
    return rope_frequencies(dataclasses.replace(cfg, rope_scaling=None), head_dim) / rope_frequencies(cfg, head_dim)


def gguf_layout(tensor, arch, part, config, to_gguf=False):
    """A tensor `part` (llama.cpp's name: attn_q, ffn_norm, ...) of a model (config.json dict) as llama.cpp
    stores it -> as transformers does, or back (to_gguf). GPT-2's Conv1D matrices are [in, out], ggml's
    [out, in]; Gemma 3's norms are stored as 1 + w; Hugging Face's Llama rotates dimension i of a head with
    i + head_dim / 2, llama.cpp's with its neighbour, so llama.cpp's converter interleaves the two halves
    of each head's query and key rows (convert_hf_to_gguf.py, LlamaModel.permute; llama only)."""
    if arch == "gpt2" and part in ("attn_qkv", "attn_output", "ffn_up", "ffn_down") and tensor.dim() == 2:
        return tensor.t()
    if arch == "gemma3" and part.endswith("norm"):
        return tensor + 1 if to_gguf else tensor - 1
    if arch == "llama" and part in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if part == "attn_q" else \
            config.get("num_key_value_heads", config["num_attention_heads"])
        halves = (heads, 2, -1) if to_gguf else (heads, -1, 2)
        return tensor.reshape(*halves, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)
    return tensor


def gguf_config(metadata, entries):
    """config.json (a dict) of a GGUF file's model: its metadata (GGUF_CONFIG_KEYS), what llama.cpp assumes
    (GGUF_ASSUMED), what its tensors (`read_gguf`'s) show: vocabulary, biases, an untied head, Llama 3's rope
    scaling (rope_freqs.weight, taken out of `entries`). Raises ValueError for what it does not read."""
    arch = metadata.get("general.architecture")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")  # linear, yarn: positions computed otherwise
    if arch not in GGUF_TENSOR_NAMES or scaling != "none":
        raise ValueError(f"architecture {arch!r} with rope scaling {scaling!r} is not supported; this "
                         f"project reads {', '.join(GGUF_TENSOR_NAMES)} without rope scaling")
    config = {hf: metadata[f"{arch}.{key}"] for key, hf in GGUF_CONFIG_KEYS[arch].items()
              if f"{arch}.{key}" in metadata}
    embedding = entries.get("token_embd.weight", (None, [None]))
    config.update(model_type=GGUF_MODEL_TYPES.get(arch, arch), vocab_size=embedding[1][0], **GGUF_ASSUMED.get(arch, {}))
    if arch == "gpt2":
        return config
    check_sizes(config, ("hidden_size", "num_attention_heads"))  # the head size follows from them
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    config.update(tie_word_embeddings="output.weight" not in entries, attention_bias="blk.0.attn_q.bias" in entries,
                  mlp_bias="blk.0.ffn_down.bias" in entries,
                  sliding_window=config.get("sliding_window") or None,  # llama.cpp's converter writes none as 0
                  partial_rotary_factor=metadata.get(f"{arch}.rope.dimension_count", head_dim) / head_dim)
    if arch == "gemma3":  # llama.cpp scales scores by the head size, Gemma 3 27B's (62 layers) by width / heads
        config["query_pre_attn_scalar"] = head_dim if config.get("num_hidden_layers") != 62 \
            else config["hidden_size"] // config["num_attention_heads"]
    if "rope_freqs.weight" in entries:  # Llama 3.1 and 3.2: the factors of Meta's scaling give its settings back
        factors = dequantize(*entries.pop("rope_freqs.weight"))
        scaling = {"factor": float(factors.max()), **LLAMA3_ROPE_SCALING}
        cfg = LlamaConfig(rope_theta=config.get("rope_theta", 10000.0), rope_scaling=scaling)
        if not torch.allclose(rope_factors(cfg, 2 * len(factors)), factors, rtol=1e-5, atol=0):
            raise ValueError(f"rope_freqs.weight is not Llama 3's rope scaling with {LLAMA3_ROPE_SCALING}, "
                             "the one rope scaling this project reads")
        config["rope_scaling"] = {"rope_type": "llama3", **scaling}
    return config


def gguf_model_parts(path, dtype=torch.float32):
    """A GGUF file -> (tensors {transformers' name: tensor in dtype}, config.json dict, tokenizer files {name:
    text}) as a model folder holds them, llama.cpp's layout undone (`gguf_layout`). Raises ValueError naming
    the file as `read_gguf` and `gguf_config` do, or for weights larger than the machine's memory."""
    metadata, entries = read_gguf(path)
    try:
        config = gguf_config(metadata, entries)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    arch = metadata["general.architecture"]
    names = GGUF_TENSOR_NAMES[arch]
    n_values = sum(math.prod(shape) for _, shape, _ in entries.values())
    check_memory(n_values * dtype.itemsize, "cpu", f"{path}: its weights at {dtype.itemsize} bytes each")
    tensors = {}
    for name, (kind, shape, data) in entries.items():
        tensor = dequantize(kind, shape, data)
        match = re.fullmatch(r"(blk\.(\d+)\.)?(\w+)\.(weight|bias)", name)
        if match and match[3] in names:  # others keep their name: the loader lists them as unexpected
            block = f"{'h' if arch == 'gpt2' else 'layers'}.{match[2]}." if match[1] else ""
            name = f"{block}{names[match[3]]}.{match[4]}"
            tensor = gguf_layout(tensor, arch, match[3], config)
        tensors[name] = tensor.to(dtype)
    return tensors, config, gguf_tokenizer_files(metadata, path)


# tokenizer.json's byte-level steps, and its decoder of SentencePiece-style tokens (for transformers)
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_PIECE_DECODER = {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                   {"type": "ByteFallback"}, {"type": "Fuse"}]}


def gguf_tokenizer_files(metadata, source):
    """The tokenizer in a GGUF file's metadata -> Hugging Face tokenizer files {name: text} for
    `tokenizer_from_files`: byte-level BPE ("gpt2": tokens, merges, a pre-tokenizer of GGUF_PRE_TOKENIZERS)
    or SentencePiece-style BPE ("llama": tokens and scores; llama.cpp merges the two pieces that make the
    best-scored token, so the merges are every cut of each token, best first). Control and user-defined
    tokens are the added tokens. Raises ValueError naming `source` for another tokenizer."""
    model, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "default")
    if model != "llama" and (model != "gpt2" or pre not in GGUF_PRE_TOKENIZERS):
        raise ValueError(f"{source}: tokenizer {model!r} with pre-tokenizer {pre!r} is not supported; this project "
                         "reads SentencePiece-style BPE ('llama') and byte-level BPE ('gpt2') with the "
                         f"pre-tokenizers {', '.join(GGUF_PRE_TOKENIZERS)}")
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    kinds = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))  # 1: normal, 3: control, 4: user-defined
    plain = dict.fromkeys(("single_word", "lstrip", "rstrip", "normalized"), False)
    added = [{"id": i, "content": token, "special": kind == 3, **plain}
             for i, (token, kind) in enumerate(zip(tokens, kinds)) if kind in (3, 4)]
    config = {f"{name}_token": tokens[metadata[f"tokenizer.ggml.{key}_token_id"]]
              for key, name in (("bos", "bos"), ("eos", "eos"), ("padding", "pad"), ("unknown", "unk"))
              if metadata.get(f"tokenizer.ggml.{key}_token_id", len(tokens)) < len(tokens)}
    vocab = {token: i for i, token in enumerate(tokens)}
    if model == "llama":
        normal = {token for token, kind in zip(tokens, kinds) if kind == 1}
        scores = metadata.get("tokenizer.ggml.scores", [0.0] * len(tokens))
        merges = []
        for token, _ in sorted(zip(tokens, scores), key=lambda pair: -pair[1]):  # stable: equal scores in id order
            if token in normal:
                merges += [[token[:n], token[n:]] for n in range(1, len(token)) if {token[:n], token[n:]} <= normal]
        steps = [{"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
        if metadata.get("tokenizer.ggml.add_space_prefix", True):  # a space before each piece of text (Llama 2)
            steps.insert(0, {"type": "Prepend", "prepend": "\u2581"})
        parts = {"normalizer": {"type": "Sequence", "normalizers": steps}, "decoder": _PIECE_DECODER}
        bpe = {"merges": merges, "byte_fallback": True}
    else:
        split = {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZERS[pre]}, "behavior": "Isolated",
                 "invert": False}
        parts = {"normalizer": {"type": "NFC"} if pre == "qwen2" else None, "decoder": _BYTE_LEVEL,
                 "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, _BYTE_LEVEL]}}
        bpe = {"merges": metadata.get("tokenizer.ggml.merges", []), "ignore_merges": pre == "llama-bpe"}
    tokenizer_json = {"added_tokens": added, **parts, "model": {"type": "BPE", "vocab": vocab, **bpe}}
    bos = config.get("bos_token")
    if metadata.get("tokenizer.ggml.add_bos_token", model == "llama") and bos:  # a text starts with the begin token
        single = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
        tokenizer_json["post_processor"] = {"type": "TemplateProcessing", "single": single, "pair": single + single[1:],
                                            "special_tokens": {bos: {"id": bos, "ids": [tokens.index(bos)]}}}
    files = {"tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False),
             "tokenizer_config.json": json.dumps(config)}
    if "tokenizer.chat_template" in metadata:
        files["chat_template.jinja"] = metadata["tokenizer.chat_template"]
    return files


def ollama_model(name):
    """Path of the GGUF file of the Ollama model "NAME[:TAG]" (TAG "latest" unless given; NAME may be
    "namespace/model"): the blob its manifest names as the model layer, in $OLLAMA_MODELS, else ~/.ollama/models,
    else /usr/share/ollama/.ollama/models. Raises FileNotFoundError naming what is missing and what to do."""
    model, _, tag = name.partition(":")
    tag = tag or "latest"
    name = f"{model}:{tag}"
    folders = [Path(os.environ["OLLAMA_MODELS"])] if os.environ.get("OLLAMA_MODELS") else \
        [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]
    folder = next((f for f in folders if f.is_dir()), folders[0])
    manifest = folder / "manifests" / "registry.ollama.ai" / ("" if "/" in model else "library") / model / tag
    if not manifest.is_file():
        raise FileNotFoundError(f"no Ollama model {name} in {folder} ({manifest} is missing): run `ollama pull "
                                f"{name}`, or set OLLAMA_MODELS to Ollama's models folder")
    layers = read_json(manifest, "Ollama manifest").get("layers", [])
    digests = [layer.get("digest", "") for layer in layers
               if layer.get("mediaType") == "application/vnd.ollama.image.model"]
    blob = folder / "blobs" / (digests[0].replace(":", "-") if digests else "")
    if not digests or not blob.is_file():
        raise FileNotFoundError(f"{manifest}: the blob of its model layer, {blob}, is missing: run `ollama pull "
                                f"{name}`")
    return blob


def gguf_file(source):
    """The GGUF file a model source names -> Path, or None: "ollama:NAME[:TAG]" (`ollama_model`), a
    .gguf file, or a file that starts as GGUF files do (Ollama's blobs have no suffix)."""
    if str(source).startswith("ollama:"):
        return ollama_model(str(source).removeprefix("ollama:"))
    path = Path(source)
    if path.is_file():
        with open(path, "rb") as f:
            if path.suffix == ".gguf" or f.read(4) == b"GGUF":
                return path
    return None


# --- Chat formats: an instruct model answers well in the format it was tuned on ------------

# A marker of a chat template -> (the text before a user's message, after it: the assistant's turn begins)
CHAT_FORMATS = {
    "<|im_start|>": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),  # ChatML: SmolLM2, Qwen
    "<|start_header_id|>": ("<|start_header_id|>user<|end_header_id|>\n\n",
                            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),  # Llama 3
    "<start_of_turn>": ("<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n"),  # Gemma
    "<|user|>": ("<|user|>\n", "<|end|>\n<|assistant|>\n"),  # Phi-3
}


def chat_template(tokenizer):
    """A `Tokenizer`'s chat template: chat_template.jinja, or tokenizer_config.json's entry -> text ("": none)."""
    config = json.loads(tokenizer.files.get("tokenizer_config.json", "{}"))
    return tokenizer.files.get("chat_template.jinja") or config.get("chat_template") or ""


def chat_prompt(tokenizer, message):
    """A user's message as the one turn of a chat -> (prompt text, id of the end-of-turn token, which ends an
    instruct model's answer), in the format of the model's chat template, chosen by its markers (CHAT_FORMATS),
    not run (no Jinja, no default system prompt). Raises ValueError for a template of none of these formats."""
    template = chat_template(tokenizer)
    for marker, (before, after) in CHAT_FORMATS.items():
        if marker in template:
            return before + message + after, tokenizer.encode(after)[0]  # the user's turn ends as answers do
    what = "has no chat template" if not template else "has a chat template of none of the formats known here"
    raise ValueError(f"{tokenizer.name} {what} (ChatML, Llama 3, Gemma, Phi-3): give the prompt as plain text")


# --- Writing GGUF: a model for llama.cpp and Ollama ----------------------------------------

# --gguf-type -> (the ggml type of the matrices, general.file_type: llama.cpp's LLAMA_FTYPE_ALL_F32,
# _MOSTLY_F16, _MOSTLY_BF16, _MOSTLY_Q8_0). Vectors (norms, biases) stay F32, as llama.cpp keeps them.
GGUF_FILE_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7)}
# The Ollama Modelfile written beside an export: the Alpaca prompt of finetune_instruct.py
MODELFILE = '''FROM ./{file}
TEMPLATE """Below is an instruction that describes a task. Write a response that appropriately completes the request.

### Instruction:
{{{{ .Prompt }}}}

### Response:
"""
PARAMETER stop "{stop}"
'''


def quantize_q8_0(weight):
    """A tensor whose last dimension is a multiple of 32 -> its Q8_0 blocks as bytes (uint8 [n * 34]),
    bit for bit as ggml-quants.c: per 32 values a float16 scale d = max |x| / 127 and round(x / d) in int8."""
    blocks = weight.float().reshape(-1, 32)
    scale = blocks.abs().amax(1, keepdim=True) / 127
    scaled = blocks * torch.where(scale == 0, 0, 1 / scale)
    values = (scaled + scaled.sign() / 2).to(torch.int8)  # C's roundf: halves away from 0 (the cast truncates)
    return torch.cat([scale.half().view(torch.uint8), values.view(torch.uint8)], 1).reshape(-1)


def _gguf_value(value, int_kind=4):
    """A metadata value -> (its GGUF type, its bytes): str, bool, int (uint32; int32 in arrays),
    float (float32), or a list of one of these."""
    if isinstance(value, str):
        data = value.encode("utf-8")
        return 8, struct.pack("<Q", len(data)) + data
    if isinstance(value, list):
        kind = _gguf_value(value[0], 5)[0]
        return 9, struct.pack("<IQ", kind, len(value)) + b"".join(_gguf_value(item, 5)[1] for item in value)
    kind = 7 if isinstance(value, bool) else int_kind if isinstance(value, int) else 6
    return kind, struct.pack("<" + GGUF_SCALARS[kind], value)


def gguf_tokenizer_metadata(tokenizer, vocab_size, name):
    """A `Tokenizer` as llama.cpp reads it -> {key: value}: byte-level BPE as "gpt2" (tokens, merges, the
    pre-tokenizer's name) or SentencePiece-style as "llama" (tokens scored by merge order), token types, named
    tokens, chat template. Raises ValueError naming `name` for a pre-tokenizer or space llama.cpp would not make."""
    files = hf_tokenizer_files(tokenizer)
    if "tokenizer.json" in files:
        tokenizer_json = json.loads(files["tokenizer.json"])
        bpe, added = tokenizer_json["model"], tokenizer_json.get("added_tokens", [])
    else:  # GPT-2's vocab.json and merges.txt (its first line is a version comment)
        merges = files["merges.txt"].decode("utf-8").split("\n")[1:-1]
        bpe = {"vocab": json.loads(files["vocab.json"]), "merges": merges}
        added = [{"id": tokenizer.eot_id, "content": "<|endoftext|>"}]
    tokens = {i: text for text, i in bpe["vocab"].items()} | {token["id"]: token["content"] for token in added}
    special = {token["id"]: token.get("special", True) for token in added}
    merges = merge_pairs(bpe["merges"])
    if bpe.get("byte_fallback"):
        if tokenizer.prefix not in ("prepend", None):
            raise ValueError(f"{name}: its tokenizer puts a space before text as Metaspace does ({tokenizer.prefix!r}),"
                             " which llama.cpp does not: it puts one before every piece of text (Llama 2) or none")
        rank = {token: n for n, token in enumerate(dict.fromkeys("".join(merge) for merge in merges))}
        style = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                 "tokenizer.ggml.scores": [float(-rank.get(tokens.get(i), len(rank))) for i in range(vocab_size)],
                 "tokenizer.ggml.add_space_prefix": tokenizer.prefix == "prepend"}
    else:
        pattern = tokenizer._pat_str if tokenizer.files else GPT2_SPLIT_PATTERN  # no files: tiktoken's GPT-2
        pre = {value: key for key, value in GGUF_PRE_TOKENIZERS.items()}.get(pattern)
        if pre is None:
            raise ValueError(f"{name}: its tokenizer's pre-tokenizer is none of llama.cpp's "
                             f"{', '.join(GGUF_PRE_TOKENIZERS)}")
        style = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                 "tokenizer.ggml.merges": [" ".join(merge) for merge in merges]}
    # llama.cpp's token types: 1 normal, 3 control, 4 user-defined, 5 unused (an id without a token), 6 byte
    types = {i: 6 if bpe.get("byte_fallback") and re.fullmatch(r"<0x[0-9A-F]{2}>", text) else 1
             for i, text in tokens.items()}
    types.update({i: 3 if control else 4 for i, control in special.items()})
    settings = files["tokenizer_config.json"]  # a dict: the named tokens (pad, unk)
    by_text = {text: i for i, text in tokens.items()}
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eot_id}
    for key, hf in (("padding", "pad"), ("unknown", "unk")):
        ids[key] = by_text.get(special_token_text(settings.get(f"{hf}_token")))
    template = chat_template(tokenizer)
    return {
        **style,
        # ids without a token (a vocabulary padded to a round size) get a name, as llama.cpp's converter does
        "tokenizer.ggml.tokens": [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)],
        "tokenizer.ggml.token_type": [types.get(i, 5) for i in range(vocab_size)],
        "tokenizer.ggml.add_bos_token": tokenizer.add_bos,
        **{f"tokenizer.ggml.{key}_token_id": i for key, i in ids.items() if i is not None},
        **({"tokenizer.chat_template": template} if template else {}),
    }


def gguf_contents(model, tokenizer, gguf_type, name):
    """A model and its `Tokenizer` as llama.cpp reads them -> (metadata {key: value}, tensors [(name, type,
    shape, bytes uint8)]): the config (GGUF_CONFIG_KEYS), the tokenizer, the weights under llama.cpp's names in
    its layout, matrices in the type of `gguf_type` (GGUF_FILE_TYPES), vectors F32. Raises ValueError naming
    `name` for a classifier, a model type without a GGUF architecture, or as `gguf_tokenizer_metadata`."""
    cfg, config = model.cfg, {"n_inner": 4 * model.cfg.emb_dim, **hf_config(model.cfg)}
    arch = {hf: arch for arch, hf in GGUF_MODEL_TYPES.items()}.get(config["model_type"], config["model_type"])
    if hasattr(model, "labels"):
        raise ValueError(f"{name} is a classifier: a GGUF file holds a language model")
    if arch not in GGUF_TENSOR_NAMES:
        raise ValueError(f"{name}: a {arch} model has no GGUF writer here (it writes {', '.join(GGUF_TENSOR_NAMES)})")
    # checked first: a tokenizer llama.cpp cannot read is refused before any weight is converted
    tokenizer_metadata = gguf_tokenizer_metadata(tokenizer, cfg.vocab_size, name)
    kind, file_type = GGUF_FILE_TYPES[gguf_type]
    metadata = {"general.architecture": arch, "general.name": str(name), "general.file_type": file_type,
                f"{arch}.vocab_size": cfg.vocab_size}
    metadata.update({f"{arch}.{key}": config[hf] for key, hf in GGUF_CONFIG_KEYS[arch].items()
                     if config.get(hf) is not None})
    if arch != "gpt2":  # the head size, and the rotary dimensions (Phi: the first part of a head)
        metadata[f"{arch}.attention.value_length"] = config["head_dim"]
        metadata[f"{arch}.rope.dimension_count"] = int(config["head_dim"] * cfg.rotary_fraction)
    names = {ours: theirs for theirs, ours in GGUF_TENSOR_NAMES[arch].items()}
    tensors = []
    for hf_name, tensor in hf_tensors(model, torch.float32).items():
        layer, part, suffix = re.fullmatch(r"(?:(?:h|layers)\.(\d+)\.)?(.+)\.(weight|bias)",
                                           hf_name.removeprefix("transformer.").removeprefix("model.")).groups()
        tensor = gguf_layout(tensor, arch, names[part], config, to_gguf=True)
        target = "F32" if tensor.dim() == 1 else kind if kind != "Q8_0" or tensor.shape[-1] % 32 == 0 else "F16"
        data = quantize_q8_0(tensor) if target == "Q8_0" else \
            tensor.to(SAFETENSORS_DTYPES[target]).contiguous().view(torch.uint8).reshape(-1)
        block = f"blk.{layer}." if layer else ""
        tensors.append((f"{block}{names[part]}.{suffix}", target, tensor.shape, data))
    if arch == "llama" and cfg.rope_scaling:  # Llama 3's, as llama.cpp's converter writes it
        factors = rope_factors(cfg, config["head_dim"])
        tensors.append(("rope_freqs.weight", "F32", factors.shape, factors.view(torch.uint8)))
    return {**metadata, **tokenizer_metadata}, tensors


def export_gguf(model, tokenizer, path, gguf_type="f16", name="model", overwrite=False):
    """Write a model and its `Tokenizer` as a GGUF file (version 3) for llama.cpp and Ollama, with an Ollama
    Modelfile beside it, each atomically -> the Modelfile's path. Raises ValueError for a folder `path`, as
    `claim_run_folder` (unless `overwrite`) and `gguf_contents` do, or naming each setting llama.cpp would read
    otherwise (what it assumes)."""
    path = Path(path)
    if path.is_dir():  # --export-hf takes a folder, --export-gguf a file
        raise ValueError(f"{path} is a folder: give a GGUF file's name, such as {path / 'model.gguf'}")
    modelfile = path.with_suffix(".Modelfile")  # model.gguf -> model.Modelfile: one per export in a folder
    claim_run_folder(path.parent, [path.name, modelfile.name], overwrite=overwrite, resumable=False)
    metadata, tensors = gguf_contents(model, tokenizer, gguf_type, name)
    try:  # the file read back must give this model
        config = gguf_config(metadata, {tensor[0]: tensor[1:] for tensor in tensors})
        read = config_from_json(config)
        expected, got = (hf_config(dataclasses.replace(cfg, drop_rate=0.0)) for cfg in (model.cfg, read))
        wrong = [f"{key} {got.get(key)!r} for its {value!r}" for key, value in expected.items()
                 if got.get(key) != value]
        if wrong:
            raise ValueError(f"llama.cpp would read {'; '.join(wrong)}")
    except ValueError as e:
        raise ValueError(f"{name}: a GGUF file cannot hold this model ({e}): export it with --export-hf "
                         "instead") from None

    def write(f):
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
        for key, value in metadata.items():
            value_kind, data = _gguf_value(value)
            f.write(_gguf_value(key)[1] + struct.pack("<I", value_kind) + data)
        offset = 0
        for tensor_name, tensor_kind, shape, data in tensors:  # dimensions innermost first, data 32-byte aligned
            f.write(_gguf_value(tensor_name)[1] + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape[::-1],
                                                               GGML_TYPES.index(tensor_kind), offset))
            offset += -(-len(data) // 32) * 32
        for *_, data in tensors:
            f.write(b"\0" * (-f.tell() % 32))  # the data starts aligned, and each tensor in it
            f.write(data.numpy())

    atomic_write_bytes(path, write)
    atomic_write_bytes(modelfile, MODELFILE.format(file=path.name, stop=tokenizer.decode([tokenizer.eot_id])).encode())
    return modelfile


# ----------------------------------------------------------------------------------------
# 9. Checkpoints of this project
# ----------------------------------------------------------------------------------------


def save_checkpoint(path, model, tokenizer, **extra):
    """Save a model whole, atomically: config, weights (of the plain model inside DDP's `module` and
    torch.compile's `_orig_mod`), its tokenizer by content (`Tokenizer.state`), a classifier's class
    names and `extra` entries (optimizer state, step, ...: what torch.load's weights_only reads)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    labels = {"labels": model.labels} if hasattr(model, "labels") else {}
    whole = {"config": dataclasses.asdict(model.cfg), "model": model.state_dict(), "tokenizer": tokenizer.state()}
    atomic_write_bytes(path, lambda f: torch.save({**whole, **labels, **extra}, f))


def load_checkpoint(path):
    """Read a checkpoint of `save_checkpoint` -> dict on the CPU (weights_only: safely). ValueError: another file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch.load raises many kinds for a file it cannot read
        checkpoint = None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"{path}: not a .safetensors file or a checkpoint of this project (or a damaged one)")
    return checkpoint


def model_from_checkpoint(checkpoint, *, device="cpu", dtype=torch.float32):
    """The model of a `load_checkpoint` dict (a classifier when it has class names), in eval mode.
    Raises ValueError naming each tensor that does not fit the config."""
    model = empty_model(config_from_dict(checkpoint["config"]))
    if "labels" in checkpoint:
        add_classifier_head(model, checkpoint["labels"], bias="lm_head.bias" in checkpoint["model"])
    try:
        model.load_state_dict(checkpoint["model"], assign=True)
    except RuntimeError as e:  # torch names each missing, unexpected or mis-shaped tensor on a line
        problems = "; ".join(line.strip() for line in str(e).splitlines()[1:])
        raise ValueError(f"checkpoint weights do not fit the model of its config: {problems}") from None
    if "labels" not in checkpoint:
        model.tie_weights()  # assigning untied them: the head uses the token embedding
    return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------
# 10. Export to the Hugging Face format
# ----------------------------------------------------------------------------------------


def export_hf(model_or_source, folder, *, tokenizer=None, dtype=None, overwrite=False, max_length=None):
    """Write a model (with its `Tokenizer`, None: GPT-2's), or whatever `load` loads, as a folder that transformers'
    AutoModelForCausalLM and AutoTokenizer read (`load` too) -> its Path: config.json, generation_config.json,
    model.safetensors in `dtype` (default: the weights' own), the tokenizer's files (model_max_length: max_length,
    default the context length). A classifier becomes a ...ForSequenceClassification (`classifier_tensors`). The
    folder is claimed (`claim_run_folder`), each file written atomically, the weights last."""
    run_files = ("model.safetensors", "config.json", "generation_config.json", "vocab.json", "merges.txt",
                 *TOKENIZER_FILES)
    folder = claim_run_folder(folder, run_files, overwrite=overwrite, resumable=False)
    if not isinstance(model_or_source, nn.Module):
        model_or_source, tokenizer = load(model_or_source, dtype=dtype or torch.float32)
    model, tokenizer = model_or_source, tokenizer or get_tokenizer()
    dtype = dtype or model.wte.weight.dtype
    dtype_name = str(dtype).removeprefix("torch.")
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.eot_id}
    config = {**hf_config(model.cfg), "torch_dtype": dtype_name, "dtype": dtype_name, **ids}  # transformers 4, 5
    tensors = hf_tensors(model, dtype)
    settings = {"model_max_length": max_length or model.cfg.context_length}
    if hasattr(model, "labels"):
        family = config["architectures"][0].removesuffix("LMHeadModel").removesuffix("ForCausalLM")
        family += "Text" if config["model_type"] == "gemma3_text" else ""  # Gemma3For... is the multimodal one
        config.update(architectures=[family + "ForSequenceClassification"], id2label=dict(enumerate(model.labels)),
                      label2id={name: i for i, name in enumerate(model.labels)})
        tensors.update(classifier_tensors(model, dtype))
        settings["pad_token"] = tokenizer.decode([tokenizer.eot_id])
    files = {"config.json": config, "generation_config.json": ids, **hf_tokenizer_files(tokenizer, **settings),
             "model.safetensors": lambda f: write_safetensors(f, tensors, {"format": "pt"})}
    for name, content in files.items():  # the weights last: a folder cut short holds no model
        (write_json if isinstance(content, dict) else atomic_write_bytes)(folder / name, content)
    return folder


def hf_config(cfg):
    """config.json of transformers' GPT2LMHeadModel, or of the Llama family's class (`hub_config`),
    for a GPTConfig -> dict (`load` reads it back)."""
    if cfg.family != "gpt2":
        return hub_config(cfg)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        **{key: getattr(cfg, field) for key, field in GPT2_SIZES.items()},
        "activation_function": "gelu_new",  # transformers' name for the tanh approximation of GELU
        "layer_norm_epsilon": cfg.norm_eps,
        **dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), cfg.drop_rate),
        "tie_word_embeddings": True,
    }


def hf_tensors(model, dtype):
    """A model's weights under transformers' names -> {name: tensor in dtype}, LoRA merged into a copy,
    with no tied or classifier head. GPT-2: `transformer.` names, the Conv1D weights as released ([in,
    out]), a zero query/key/value bias if it has none (transformers' always has). Llama: `model.` names."""
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        model = merge_lora(copy.deepcopy(model))
    gpt2 = model.cfg.family == "gpt2"
    prefix = "transformer." if gpt2 else "model."
    untied_head = model.cfg.family == "llama" and not model.cfg.tie_embeddings and not hasattr(model, "labels")
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("lm_head."):
            if untied_head:
                tensors[name] = tensor.to(dtype)
            continue
        tensors[prefix + name] = (tensor.t() if gpt2 and name.endswith(_TRANSPOSED) else tensor).to(dtype)
        if gpt2 and name.endswith("attn.c_attn.weight") and not model.cfg.qkv_bias:  # GPT-2's Conv1D always has one
            tensors[prefix + name.replace("weight", "bias")] = tensor.new_zeros(len(tensor), dtype=dtype)
    return tensors if gpt2 else hub_layout(tensors, model.cfg)  # Phi's names, Phi-3's packed matrices


def classifier_tensors(model, dtype):
    """A classifier's head as transformers' ...ForSequenceClassification holds it -> {name: tensor}:
    `score.weight`, which has no bias. GPT-2's head bias b is carried exactly: ln_f feeds only
    the head, so adding W⁺b (pseudo-inverse of the head weight W [n_classes, emb_dim] times b)
    to ln_f's bias gives W (h + W⁺b) = W h + b. Raises ValueError when W has rank below n_classes."""
    tensors = {"score.weight": model.lm_head.weight.detach().to(dtype)}
    if model.lm_head.bias is not None:
        weight, bias = model.lm_head.weight.detach().double().cpu(), model.lm_head.bias.detach().double().cpu()
        shift = torch.linalg.pinv(weight) @ bias  # W⁺b: [emb_dim]
        if not torch.allclose(weight @ shift, bias, rtol=1e-6, atol=1e-6):
            raise ValueError(f"the head's weight has rank below {len(bias)}: its bias cannot be moved into ln_f")
        tensors["transformer.ln_f.bias"] = (model.ln_f.bias.detach().double().cpu() + shift).to(dtype)
    return tensors


def hf_tokenizer_files(tokenizer, **settings):
    """A `Tokenizer` as the files transformers reads -> {file name: bytes, or a dict for JSON}: those it was read
    from (`Tokenizer.files`) or GPT-2's (OpenAI's encoder.json and vocab.bpe from tiktoken's cache, checked by
    SHA-256), and tokenizer_config.json with `settings` (model_max_length, pad_token)."""
    end_of_text = tokenizer.decode([tokenizer.eot_id])
    if tokenizer.files:
        files = {name: text.encode("utf-8") for name, text in tokenizer.files.items()}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": end_of_text,
                  **json.loads(tokenizer.files.get("tokenizer_config.json", "{}"))}
    else:
        get_tokenizer()  # says what to do when the files are neither cached nor downloadable
        url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
        files = {
            "vocab.json": tiktoken.load.read_file_cached(
                url + "encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
            "merges.txt": tiktoken.load.read_file_cached(
                url + "vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
        }
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": end_of_text, "eos_token": end_of_text,
                  "unk_token": end_of_text, "add_prefix_space": False}  # " Hi" and "Hi" differ, as in tiktoken
    return {**files, "tokenizer_config.json": {**config, **settings}}


def write_safetensors(f, tensors, metadata=None):
    """Write {name: tensor} to the open binary file f as safetensors (see `read_safetensors`), with
    `__metadata__` (a dict of strings) when given, the header padded to 8 bytes as the reference's."""
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        header[name] = {"dtype": dtype_names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
    for tensor in tensors.values():
        data = bytearray(tensor.nbytes)  # torch has no bytes(tensor)
        if data:  # torch.frombuffer refuses an empty buffer
            flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # row-major
            torch.frombuffer(data, dtype=torch.uint8).copy_(flat)
        f.write(data)


# ----------------------------------------------------------------------------------------
# 11. Running a stage: flags, run folders, progress, errors
# ----------------------------------------------------------------------------------------


def _checked_number(convert, low, high, requirement):
    """An argparse `type=`: the flag's text through `convert`, refused unless in [low, high] (NaN never
    is): "argument --flag: must be <requirement>, got 'text'", exit status 2."""

    def parse(text):
        with contextlib.suppress(ValueError):  # not a number: refused below
            value = convert(text)
            if low <= value <= high:
                return value
        raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")

    return parse


# The four ranges of flags, declared with the flag: `type=gpt.positive_int`.
positive_int = _checked_number(int, 1, 2**63 - 1, "an integer >= 1")  # below 2**63: torch's seed range
non_negative_int = _checked_number(int, 0, 2**63 - 1, "an integer >= 0")
non_negative_float = _checked_number(float, 0, sys.float_info.max, "a finite number >= 0")
fraction = _checked_number(float, 0, 1, "a number in [0, 1]")

# --dtype: the type of autocast's forward pass in training (the weights stay float32), else of the weights.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after a flag's help, but not an on/off flag's, one without a default, nor
    one that says it itself."""

    def _get_help_string(self, action):
        said = action.nargs == 0 or action.default is None or "(default" in action.help
        return action.help if said else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with each flag's default in --help, and errors in one line, "prog: error: ... (see
    --help)", exit status 2 (not the usage block first)."""

    def __init__(self, **options):
        super().__init__(formatter_class=_HelpFormatter, **options)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag_name(setting):
    """The command-line flag of a setting: "batch_size" -> "--batch-size"."""
    return "--" + setting.replace("_", "-")


# The flags that mean the same in every script, declared once: name -> add_argument's options.
FLAGS = {
    "model": dict(default="gpt2", help="weights and tokenizer to start from: gpt2 (to gpt2-xl), a Llama-family Hub "
                  "name or folder, a .safetensors or GGUF file, ollama:NAME[:TAG], or a checkpoint of this project"),
    "max_length": dict(type=positive_int, help="cut each example to this many tokens (default: the context length)"),
    "drop_rate": dict(type=fraction, default=0.0, help="dropout probability while training"),
    "lora": dict(action="store_true", help="train low-rank adapters (LoRA) in every block instead of its weights"),
    "lora_rank": dict(type=positive_int, default=16, help="rank of the LoRA adapters"),
    "lora_alpha": dict(type=non_negative_float, default=16.0, help="LoRA updates are scaled by LORA_ALPHA / rank"),
    "epochs": dict(type=positive_int, help="passes over the training data"),
    "max_steps": dict(type=positive_int, help="optimizer steps in all (default: as many as --epochs make)"),
    "batch_size": dict(type=positive_int, default=8, help="sequences per batch (per process, when several train)"),
    "lr": dict(type=non_negative_float, default=5e-5, help="AdamW's learning rate (the peak of a schedule)"),
    "weight_decay": dict(type=non_negative_float, default=0.1, help="AdamW's weight decay of matrices"),
    "seed": dict(type=non_negative_int, default=123, help="random seed: the same seed, the same run"),
    "log_every": dict(type=positive_int, default=5, help="steps between progress lines"),
    "eval_every": dict(type=positive_int, help="steps between loss measurements (and saves of what the stage keeps)"),
    "eval_batches": dict(type=non_negative_int, default=5, help="batches of each split per measurement (0: all)"),
    "keep_last": dict(action="store_true", help="keep the last weights, not those that did best on validation"),
    "max_new_tokens": dict(type=non_negative_int, help="the most tokens to generate"),
    "temperature": dict(type=non_negative_float, default=0.0, help="0: greedy; above: sampling, more random"),
    "top_k": dict(type=positive_int, help="sample from the TOP_K likeliest tokens only (default: all)"),
    "top_p": dict(type=fraction, help="sample from the fewest tokens that reach probability TOP_P (default: all)"),
    "out_dir": dict(metavar="FOLDER", help="folder of the run's files"),
    "resume": dict(action="store_true", help="continue the run in --out-dir from its last save, with its settings"),
    "overwrite": dict(action="store_true", help="replace an earlier run or export in the same place"),
    "cache_dir": dict(default=cache_dir, metavar="FOLDER", help="folder of downloads and of token files"),
    "device": dict(default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps"),
    "dtype": dict(choices=list(DTYPES), default="float32", help="precision: of autocast in training (weights stay "
                  "float32; float16 needs loss scaling: refused), of the weights in generating, measuring, exporting"),
}


def add_flags(group, *names, **defaults):
    """Add the flags `names` of FLAGS to an argparse parser or group, with `defaults` ({name: (value, why)},
    for a default that differs between the scripts) in place of the table's: `add_flags(train, "lr",
    lr=(1e-3, "new weights"))` helps with "(default: 0.001, new weights)"."""
    for name in names:
        options = dict(FLAGS[name])
        if name in defaults:
            options["default"], why = defaults[name]
            options["help"] += f" (default: {why})" if options["default"] is None else f" (default: %(default)s, {why})"
        if callable(options.get("default")):  # --cache-dir: the folder GPT_CACHE_DIR names at this moment
            options["default"] = str(options["default"]())
        group.add_argument(flag_name(name), **options)


def pick_device(name="auto"):
    """"auto" -> cuda when there is a CUDA GPU, else mps (Apple's), else cpu -> torch.device. Raises
    ValueError for a name torch does not know or a device this machine lacks."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if not {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(device.type, True):
        raise ValueError(f"--device {name}: this machine has no {device.type} device; use --device cpu")
    return device


def given_flags(parser, argv=None):
    """The settings that argv (default: sys.argv[1:]) gives explicitly, even at their default -> dict."""
    unset = argparse.Namespace(**{action.dest: None for action in parser._actions})  # argparse sets no default there
    return {name: value for name, value in vars(parser.parse_args(argv, unset)).items() if value is not None}


def refuse_flags(parser, argv, settings, mode):
    """Exit 2 through parser.error when argv gives any of `settings` (names such as "lr"), which `mode`
    (the flag that decides, as typed) would ignore: "--evaluate does not use --lr, --epochs: drop them"."""
    typed = given_flags(parser, argv)
    given = [flag_name(name) for name in settings if name in typed]
    if given:
        parser.error(f"{mode} does not use {', '.join(given)}: drop {'them' if len(given) > 1 else 'it'}")


def resume_settings(parser, argv, out_dir, may_change=(), this_command=()):
    """The settings that --resume continues: those out_dir's run.json saved ({"settings": {...}}), but the flags
    of `may_change` given now (say --max-steps) and of `this_command` (say --stop-at-step), given or not. Raises
    ValueError when out_dir holds no run.json of this script (none, another script's, or one edited into a value
    its flag refuses), or naming a flag argv changes and both values."""
    run_file = Path(out_dir) / "run.json"
    saved = read_json(run_file, "--resume: the run's settings") if run_file.is_file() else {}
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):  # say, another stage's run
        raise ValueError(f"--resume: {out_dir} holds no run.json of this script, so no run to continue: start a new "
                         "run without --resume (or with --overwrite)")
    saved = {name: value for name, value in saved["settings"].items() if name not in this_command}
    actions = {action.dest: action for action in parser._actions}
    for name, value in saved.items():  # run.json may be another script's, or edited by hand
        action = actions.get(name)
        try:  # each value as its flag would take it
            fits = action is not None and (value is None or action.type is None or action.type(str(value)) == value)
        except argparse.ArgumentTypeError:
            fits = False
        if not fits or (value is not None and action.choices and value not in action.choices):
            raise ValueError(f"--resume: {run_file} holds {name} = {value!r}, which this script's flags do not "
                             "take (another script's run, or an edited one): start a new run with --overwrite")
    given = given_flags(parser, argv)
    for name, value in given.items():
        if name in saved and name not in may_change and saved[name] != value:
            flag = flag_name(name)
            raise ValueError(f"--resume continues the saved run, which used {flag} {saved[name]}, not {value}: "
                             f"drop {flag}, or start a new run with --overwrite or another --out-dir")
    defaults = vars(parser.parse_args([]))  # settings added since the run was saved
    return argparse.Namespace(**{**defaults, **saved, **given})


def print_settings(settings, defaults):
    """Print in one line the settings (a Namespace) that differ from `defaults` (those of no flags)."""
    changed = [f"{name}={value}" for name, value in vars(settings).items() if getattr(defaults, name, None) != value]
    others = "the others: defaults; " if changed else ""
    print(f"settings: {', '.join(changed) or 'the defaults'} ({others}all in run.json)")


def length_within_context(length, cfg, flag):
    """The value of a length flag (--max-length, --context-length), or the model's context
    length when it is None. Raises ValueError naming the flag when it is longer."""
    if length is not None and length > cfg.context_length:
        raise ValueError(f"{flag} {length} is longer than the model's context length {cfg.context_length}")
    return length or cfg.context_length


def claim_run_folder(out_dir, run_files, *, resume=False, overwrite=False, resumable=True):
    """out_dir as a Path, checked before any work: the one run-folder rule. A folder holding another run (any of
    `run_files`, relative to it) is refused unless `resume` (then it must hold one) or `overwrite` (its run files
    are deleted now). Raises ValueError naming the path and the flags that help (--resume if `resumable`)."""
    out_dir = Path(out_dir)
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise ValueError(f"{existing} is a file, not a folder: choose another folder than {out_dir}")
    found = [name for name in run_files if Path(os.path.normpath(out_dir / name)).exists()]  # "run/../x.pt"
    if found and not (resume or overwrite):
        raise ValueError(f"{out_dir} holds another run ({', '.join(found)}): "
                         + ("continue it with --resume, " if resumable else "")
                         + "replace it with --overwrite, or choose another folder")
    if resume and not found:
        raise ValueError(f"--resume: {out_dir} holds no run to continue; start one without --resume")
    if overwrite and not resume:
        for name in found:
            (out_dir / name).unlink()
    return out_dir


PROGRESS_SECONDS = 10  # the least time between progress lines (a download updates per 64 KiB)
_progress = {"printed": -math.inf}  # when show_progress last printed


def show_progress(text):
    """Print text as a line on stderr, unless the last one came less than PROGRESS_SECONDS ago."""
    if time.time() - _progress["printed"] >= PROGRESS_SECONDS:
        print(text, file=sys.stderr, flush=True)
        _progress["printed"] = time.time()


def training_position(step, total_steps, steps_per_epoch):
    """"step 7/10 (epoch 1.40/2.00)": the step and epoch reached, and those where the run stops."""
    return f"step {step}/{total_steps} (epoch {step / steps_per_epoch:.2f}/{total_steps / steps_per_epoch:.2f})"


def eta(started, done, total):
    """The time left, formatted, when `done` of `total` units took the time since `started` (time.time())."""
    return format_duration((time.time() - started) / done * (total - done)) if done > 0 else "?"


def command_line(memory_hint="use a smaller --batch-size"):
    """Decorator for a script's main(argv): ValueError, RuntimeError and OSError print "error: <message>" and
    exit 1 (out of memory: `memory_hint`); Ctrl-C prints "interrupted", exit 130; `| head` ends it quietly."""

    def decorate(main):
        @functools.wraps(main)
        def wrapper(argv=None):
            try:
                return main(argv)
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                raise SystemExit(130) from None
            except BrokenPipeError:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
                raise SystemExit(141) from None  # 128 + SIGPIPE, as a shell reports it
            except (ValueError, RuntimeError, OSError) as e:
                out_of_memory = isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)
                sys.exit(f"error: {'out of memory: ' + memory_hint if out_of_memory else e}")

        return wrapper

    return decorate


# ----------------------------------------------------------------------------------------
# 12. Training helpers the stages share
# ----------------------------------------------------------------------------------------


def make_adamw(model, lr, weight_decay, betas=(0.9, 0.999)):
    """AdamW over model's trainable parameters, decaying only matrices and embeddings (not biases and
    norms, as nanoGPT), fused into one kernel per step on a CUDA GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=any(p.is_cuda for p in params))


def trainable_weights(model):
    """A CPU copy of the weights that train {name: tensor}, for `model.load_state_dict(weights, strict=False)`."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def check_finite_loss(loss, step):
    """Raise RuntimeError when a loss (float or tensor) is NaN or infinite: training has diverged."""
    value = loss.item() if isinstance(loss, torch.Tensor) else float(loss)  # .item(): no autograd warning
    if not math.isfinite(value):
        raise RuntimeError(f"the loss became {value} at step {step}: training diverged; lower --lr and run again")


def model_summary(model, name, training=True):
    """"gpt2: 124.4M parameters (12 layers, 12 heads, 768 wide, context 1024), 0 trainable" (without training)."""
    cfg, trainable = model.cfg, count_parameters(model, trainable_only=True)
    return (f"{name}: {count_parameters(model) / 1e6:.1f}M parameters ({cfg.n_layers} layers, {cfg.n_heads} heads, "
            f"{cfg.emb_dim} wide, context {cfg.context_length})" + (f", {trainable:,} trainable" if training else ""))


def set_drop_rate(model, drop_rate):
    """Set the dropout probability of model's config, dropout layers and attention (scaled_dot_product_attention's)."""
    model.cfg.drop_rate = drop_rate
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = drop_rate
        if hasattr(module, "drop_rate"):
            module.drop_rate = drop_rate


@functools.lru_cache(maxsize=1)  # the current epoch's order, made once when training enters the epoch
def epoch_order(n_items, seed, epoch):
    """One epoch's order, a LongTensor permutation of range(n_items), from (seed, epoch) alone, as resume needs."""
    # One seed per (seed, epoch) pair, distinct for fewer than 100,003 epochs; torch takes 64 bits.
    generator = torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**64)
    return torch.randperm(n_items, generator=generator)


def split_by_fractions(items, seed, fractions):
    """Shuffle a copy of items with `seed` into len(fractions) + 1 parts: int(n * fraction) items each, the rest."""
    items = list(items)
    random.Random(seed).shuffle(items)
    sizes = [int(len(items) * share) for share in fractions]
    ends = [sum(sizes[:i]) for i in range(len(sizes) + 1)] + [len(items)]
    return [items[start:end] for start, end in zip(ends, ends[1:])]


def check_memory(needed, device, what, hint="use --dtype bfloat16, or a smaller model"):
    """Raise ValueError "WHAT: about N GB needed, but the DEVICE has M GB: HINT" when `needed` bytes exceed a CUDA
    device's free memory, else the RAM: checked before the work, as a process out of memory dies without a word."""
    device = torch.device(device)
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else math.inf
    if needed > available:
        raise ValueError(f"{what}: about {needed / 1e9:.1f} GB needed, but the {device.type} has "
                         f"{available / 1e9:.1f} GB: {hint}")


def check_training_memory(model, device, hint, processes=1):
    """`check_memory` of training with AdamW, before activations, `processes` times: the weights and each
    trainable one's gradient and two moments (Llama 3.2 1B in float32: 1.24e9 x 16 bytes = 19.8 GB)."""
    needed = processes * sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in model.parameters())
    check_memory(needed, device, "training (weights, gradients and AdamW's moments, before activations)", hint)


def autocast_context(device, dtype_name="auto"):
    """(context manager, dtype name) for the forward pass in "float32" (no-op), "bfloat16" or "float16"
    (torch.autocast), or "auto" (bfloat16 on CUDA GPUs that have it, else float32)."""
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype_name == "float32":
        return contextlib.nullcontext(), dtype_name
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype_name]), dtype_name


class StopSignal:
    """While active (`with`), Ctrl-C (SIGINT) and SIGTERM ask training to stop after the current step, to
    save: `requested` turns True, `signal_name` says which. A second Ctrl-C stops at once in one process
    (under torchrun, single_process=False, the launcher forwards each Ctrl-C to every process)."""

    def __init__(self, single_process=True):
        self.requested, self.signal_name, self.single_process = False, None, single_process

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        self.requested, self.signal_name = True, signal.Signals(signum).name
        if self.single_process:  # a second Ctrl-C raises KeyboardInterrupt: the last save stays as it was
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])


def restore_training_state(checkpoint, optimizer):
    """Load the optimizer's state from a checkpoint saved with optimizer=optimizer.state_dict() (the weights come
    with `model_from_checkpoint`; the random state needs nothing saved: the training loops seed each step)."""
    fused = optimizer.defaults.get("fused")
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:
        group["fused"] = fused  # the saved flag belongs to the device the run was saved on
        for param in group["params"]:
            # Moments saved beside weights of another memory layout (`load_weights_into` maps GPT-2's as
            # transposed views) take this parameter's: the fused kernel pairs them in memory order.
            for name, value in optimizer.state[param].items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][name] = torch.empty_like(param).copy_(value)
