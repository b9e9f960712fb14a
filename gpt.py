"""gpt.py: the GPT-2 core that every stage of this project stands on.

Read it top to bottom:

1. configuration   `GPTConfig` and `GPT_CONFIGS`, the four released sizes
2. the model       `CausalSelfAttention`, `MLP`, `TransformerBlock`, `GPTModel`
3. LoRA            `LoRALinear`, `add_lora`, `merge_lora`
4. generation      `KVCache`, `sample_next_token`, `generate_stream`, `generate`
5. tokenizer       `get_tokenizer`, `text_to_token_ids`, `token_ids_to_text`
6. files           `download_file`, `verify_file`, `fetch_dataset`, `atomic_write_bytes`, `atomic_save`, `plot_curves`
7. weights         `read_safetensors`, `load_gpt2` (released weights or a local file)
8. checkpoints     `save_checkpoint`, `load_checkpoint`, `model_from_checkpoint`
9. devices, CLI    `pick_device`, `HelpFormatter`

The model follows OpenAI's GPT-2 release (Radford et al., 2019, "Language Models are
Unsupervised Multitask Learners", https://github.com/openai/gpt-2) and uses the same
parameter names as that release and Hugging Face's `GPT2LMHeadModel` (`wte`, `wpe`,
`h.N.attn.c_attn`, ...), so importing the released weights is a loop with four
transposes. `test_all.py` checks that the logits agree with `transformers` to 1e-4.

Used by load_gpt2.py, pretrain.py, finetune_classify.py and finetune_instruct.py; it is
not meant to be run on its own.
"""

import argparse
import atexit
import contextlib
import copy
import dataclasses
import functools
import hashlib
import io
import json
import math
import mmap
import os
import random
import re
import struct
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import requests
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# 1. Configuration
# ----------------------------------------------------------------------------------------

EOT_ID = 50256  # id of <|endoftext|>, the last token of GPT-2's vocabulary of 50257


@dataclasses.dataclass
class GPTConfig:
    """Hyperparameters of a GPT-2-style model.

    vocab_size:     number of token ids (50257 for GPT-2's byte-pair encoding)
    context_length: longest sequence the model reads, in tokens (position embeddings)
    emb_dim:        embedding dimension, the width of every hidden state
    n_heads:        attention heads per layer; emb_dim must be divisible by n_heads
    n_layers:       number of transformer blocks
    drop_rate:      dropout probability on embeddings, attention and residual branches
                    (0.0 for inference and for the released weights' fine-tuning recipes)
    qkv_bias:       whether the query/key/value projection has a bias (GPT-2: yes)
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
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

        With a `KVCache`, x holds the positions after the `kv_cache.length` cached ones;
        this layer's keys and values are appended to the cache at index `layer`.
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
        # One query (a decoding step) may see every key: no mask. Several queries after
        # cached ones: query i sits at position start + i and may see keys 0 .. start + i.
        mask, is_causal = None, T > 1 and start == 0
        if T > 1 and start > 0:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
        dropout_p = self.drop_rate if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh * hd): heads side by side
        return self.resid_drop(self.c_proj(y))


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
        self.ln_1 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)  # eps as in GPT-2
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x, kv_cache=None, layer=0):
        """x: float [batch, seq_len, emb_dim] -> same shape."""
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPTModel(nn.Module):
    """GPT-2: token and position embeddings, `n_layers` transformer blocks, a final
    LayerNorm and a language-model head that shares its weight with the token embedding.

    Parameter names follow the GPT-2 release (`wte`, `wpe`, `h`, `ln_f`) so that
    `load_gpt2` can copy the released tensors by name.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # Token and position embeddings, created empty: _init_weights fills them below, or
        # load_gpt2 does (nn.Embedding's own random fill would cost it seconds of imports).
        self.wte = nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.emb_dim), freeze=False)
        self.wpe = nn.Embedding.from_pretrained(torch.empty(cfg.context_length, cfg.emb_dim), freeze=False)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim, eps=1e-5)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input/output embeddings, as released
        # A model built on the meta device only receives loaded weights (`load_gpt2`): skip
        # the random initialisation, whose meta version makes torch import its compiler.
        if not self.wte.weight.is_meta:
            self.apply(self._init_weights)
            # Residual projections add up over 2 * n_layers branches; scale them down so the
            # residual stream keeps unit variance at initialisation (GPT-2, section 2.3).
            for name, param in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # 0.02 as in GPT-2's code
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx, start=0):
        """Token ids [batch, seq_len] at positions start.. -> float [batch, seq_len, emb_dim].

        Raises ValueError when start + seq_len exceeds the context length.
        """
        T = idx.shape[1]
        if start + T > self.cfg.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's context length "
                f"({self.cfg.context_length}); crop the input to its last {self.cfg.context_length} tokens"
            )
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
        if kv_cache is not None:
            kv_cache.length += idx.shape[1]
        return self.lm_head(self.ln_f(x))


def count_parameters(model, trainable_only=False):
    """Number of distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


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
        self.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device, dtype=linear.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = alpha / rank

    def forward(self, x):
        """x: float [..., in_features] -> float [..., out_features]."""
        return self.linear(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling


LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # linear layers of each block


def add_lora(model, rank=8, alpha=16):
    """Freeze every parameter of model, then wrap the attention and MLP linear layers of
    each transformer block in `LoRALinear`, whose adapters are the only trainable
    parameters. Unfreeze anything else that should train (a new head, say) afterwards.
    Returns the model (changed in place)."""
    model.requires_grad_(False)
    for block in model.h:
        for target in LORA_TARGETS:
            parent_name, child_name = target.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, child_name, LoRALinear(getattr(parent, child_name), rank, alpha))
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold each `LoRALinear` back into a plain nn.Linear (W <- W + (alpha / rank) B A), so
    that the model has GPT-2's own parameter names again and saves as a plain checkpoint.
    Returns the model (changed in place)."""
    for block in model.h:
        for target in LORA_TARGETS:
            parent_name, child_name = target.split(".")
            parent = getattr(block, parent_name)
            layer = getattr(parent, child_name)
            if isinstance(layer, LoRALinear):
                layer.linear.weight += (layer.lora_b @ layer.lora_a) * layer.scaling
                setattr(parent, child_name, layer.linear)
    return model


# ----------------------------------------------------------------------------------------
# 4. Generation
# ----------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the positions a model has already read, one pair per layer.

    Buffers of shape [batch, n_heads, context_length, head_dim] are allocated on first
    use; `length` counts the positions filled. The model advances `length` after each
    forward pass. Source: the key/value caching of GPT-2's own sampling code
    (`past` in openai/gpt-2 src/model.py), here in preallocated buffers.
    """

    def __init__(self, cfg):
        self.max_length = cfg.context_length
        self.keys = [None] * cfg.n_layers
        self.values = [None] * cfg.n_layers
        self.length = 0

    def update(self, layer, k, v):
        """Append k, v: [batch, n_heads, T, head_dim] at `length`; return all keys and
        values so far, [batch, n_heads, length + T, head_dim]."""
        if self.keys[layer] is None:
            B, nh, _, hd = k.shape
            self.keys[layer] = k.new_empty(B, nh, self.max_length, hd)
            self.values[layer] = v.new_empty(B, nh, self.max_length, hd)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits: float [batch, vocab_size] -> LongTensor [batch].

    temperature 0 means greedy (argmax). Otherwise the logits are divided by the
    temperature, cut to the `top_k` most likely tokens and to the smallest set whose
    probabilities add up to at least `top_p` (nucleus sampling, Holtzman et al., 2019,
    "The Curious Case of Neural Text Degeneration"), then sampled.
    Raises ValueError for a negative temperature, top_k < 1 or top_p outside (0, 1].
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first one stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def window_start(length, context_length):
    """First position of the window a model reads when a sequence has `length` tokens.

    Up to the context length the model reads everything. Past it, the window moves
    forward in steps of half the context length rather than one token: with absolute
    position embeddings every move invalidates the key/value cache, so moving in big
    steps means the cache is rebuilt once per half-window instead of once per token.
    """
    if length <= context_length:
        return 0
    step = max(1, context_length // 2)
    return math.ceil((length - context_length) / step) * step


@torch.no_grad()
def generate_stream(
    model, idx, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None, eos_id=None, generator=None, use_cache=True
):
    """Yield new tokens one at a time: LongTensor [batch] per step.

    idx: LongTensor [batch, seq_len], the prompt. Stops after `max_new_tokens` tokens, or
    once every row has produced `eos_id` (a row that finished early repeats `eos_id`).
    Sampling options as in `sample_next_token`; pass a seeded `torch.Generator` for
    reproducible sampling. With `use_cache` each step reads one new position through a
    `KVCache`; without it each step re-reads the whole window (slower, same tokens).
    Past the context length the window is cropped as `window_start` describes.
    Raises ValueError for an empty prompt.
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"prompt must be a LongTensor [batch, seq_len] with seq_len >= 1, got shape {tuple(idx.shape)}")
    was_training = model.training
    model.eval()
    ctx = model.cfg.context_length
    tokens = idx
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache, cache_start = None, None
    try:
        for _ in range(max_new_tokens):
            start = window_start(tokens.shape[1], ctx)
            if not use_cache:
                logits = model(tokens[:, start:])
            elif start != cache_start:  # first step, or the window moved: (re)fill the cache
                cache, cache_start = KVCache(model.cfg), start
                logits = model(tokens[:, start:], kv_cache=cache)
            else:
                logits = model(tokens[:, -1:], kv_cache=cache)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished, eos_id)
                finished |= next_token == eos_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            yield next_token
            if eos_id is not None and finished.all():
                break
    finally:
        model.train(was_training)


def generate(model, idx, max_new_tokens, *, seed=None, on_token=None, **options):
    """Continue the prompt idx: LongTensor [batch, seq_len] -> [batch, seq_len + n_new].

    Greedy by default (temperature 0). `seed` makes sampling reproducible (a fresh
    `torch.Generator` on idx's device); `on_token(token: LongTensor [batch])` is called
    for each new token as it comes, for streaming. Other options (temperature, top_k,
    top_p, eos_id, generator, use_cache) as in `generate_stream`. The output includes
    the end-of-text token when generation stopped at `eos_id`.
    """
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


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """tiktoken's "gpt2" byte-pair encoding (50257 tokens, the one GPT-2 was trained with).

    tiktoken downloads its two vocabulary files on first use and caches them; set
    TIKTOKEN_CACHE_DIR to a folder that holds them to work offline. Raises RuntimeError
    when they are neither cached nor downloadable.
    """
    try:
        return tiktoken.get_encoding("gpt2")
    except requests.RequestException as e:
        raise RuntimeError(
            f"cannot download tiktoken's GPT-2 vocabulary files ({e.__class__.__name__}): connect once, or set "
            "TIKTOKEN_CACHE_DIR to a copy of tiktoken's cache folder from a machine that has them"
        ) from None


def text_to_token_ids(text, device=None):
    """Text -> LongTensor [1, n_tokens]. "<|endoftext|>" in the text becomes id 50256."""
    ids = get_tokenizer().encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0)


def token_ids_to_text(token_ids):
    """Token ids (LongTensor [n] or [1, n], or a list of ints) -> text."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.reshape(-1).tolist()
    return get_tokenizer().decode(token_ids)


# ----------------------------------------------------------------------------------------
# 6. Files: downloads, atomic writes, plots
# ----------------------------------------------------------------------------------------


def cache_dir():
    """Folder for downloaded weights and data: $GPT_CACHE_DIR, else ~/.cache/gpt2-lifecycle."""
    return Path(os.environ.get("GPT_CACHE_DIR") or Path.home() / ".cache" / "gpt2-lifecycle")


def format_duration(seconds):
    """Seconds -> "1h02m", "3m05s" or "42s", for ETAs and wall times."""
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def atomic_write_bytes(path, data):
    """Write bytes to path through a temporary file and a rename, so that readers never
    see a half-written file (os.replace is atomic on POSIX and Windows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path):
    """torch.save(obj) to path atomically: a temporary file, flushed to disk, then a rename."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def write_json(path, obj):
    """Write obj as indented UTF-8 JSON to path, atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8") + b"\n")


def decode_utf8(raw, source):
    """Bytes of a text file -> str. A byte-order mark is dropped (editors on Windows
    write one); Windows line endings are left to the reader. Raises ValueError naming
    `source`, the byte offset and the line of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # not "utf-8-sig": offsets count the mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{source}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} (line {line}); "
            "save it as UTF-8"
        ) from None


def read_json(path, source):
    """Parse a UTF-8 JSON file (a byte-order mark is allowed) -> object. Raises
    FileNotFoundError or ValueError naming `source` and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source} {path}: no such file")
    try:
        return json.loads(decode_utf8(path.read_bytes(), f"{source} {path}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} {path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{source} {path}: JSON nested too deeply to read") from None


def _print_progress(done, total, started, label):
    elapsed = max(time.time() - started, 1e-9)
    speed = done / elapsed
    if total:
        eta = format_duration((total - done) / speed) if speed > 0 else "?"
        line = f"{label}: {done / 1e6:.1f} / {total / 1e6:.1f} MB ({100 * done / total:.0f}%), {speed / 1e6:.1f} MB/s, ETA {eta}"
    else:
        line = f"{label}: {done / 1e6:.1f} MB, {speed / 1e6:.1f} MB/s"
    print("\r" + line, end="", file=sys.stderr, flush=True)


def _sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path, kind=None, *, size=None, sha256=None, member=None):
    """Check that a downloaded or cached file is complete and what it should be.

    kind: "safetensors" (header length, a JSON header that fits, every tensor inside the
    file), "zip" (every member's CRC-32), "tar" (every member readable to its end),
    "text" (valid UTF-8), "json" (parses), or None (no format check). size (bytes) and
    sha256 (hex) are those of the file, or of its zip member `member` when given: a zip
    made anew may differ byte-wise from the one hashed while its contents do not.
    Raises ValueError naming the file and the problem.
    """
    path = Path(path)
    if kind not in (None, "safetensors", "zip", "tar", "text", "json"):
        raise ValueError(f"unknown file kind {kind!r}")
    try:
        if kind == "safetensors":
            read_safetensors(path)  # memory maps only: cheap even for gpt2-xl
        elif kind == "zip":
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()  # reads every member and checks its CRC-32
            if bad is not None:
                raise ValueError(f"member {bad!r} is corrupt")
        elif kind == "tar":
            with tarfile.open(path) as archive:
                for info in archive:
                    if info.isfile():
                        _read_to_end(archive.extractfile(info))
        elif kind == "text":
            _read_to_end(open(path, encoding="utf-8"))  # strict: the first invalid byte raises
        elif kind == "json":
            json.loads(path.read_bytes())
        if member is not None:
            with zipfile.ZipFile(path) as archive:
                data = archive.read(member)  # KeyError when there is no such member
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, tarfile.TarError, zlib.error) as e:
        kind = kind or "zip"  # without a kind only reading the zip member can fail
        raise ValueError(f"{path}: not a valid {kind} file ({e})") from None
    what = path if member is None else f"{path} (member {member})"
    actual_size = path.stat().st_size if member is None else len(data)
    if size is not None and actual_size != size:
        raise ValueError(f"{what}: {actual_size} bytes, expected {size}")
    if sha256 is not None:
        actual_sha256 = _sha256_of_file(path) if member is None else hashlib.sha256(data).hexdigest()
        if actual_sha256 != sha256.lower():
            raise ValueError(f"{what}: SHA-256 {actual_sha256}, expected {sha256}")


def _read_to_end(f):
    """Read and close a file object in 1 MiB pieces: decoding or decompressing checks it."""
    with f:
        while f.read(1 << 20):
            pass


def _reuse_cached(dest, kind=None, **checks):
    """Whether dest exists and passes `verify_file`. A file that fails is deleted, saying
    why on stderr, so that it is downloaded again instead of failing the same way forever."""
    if not dest.exists():
        return False
    try:
        verify_file(dest, kind, **checks)
    except ValueError as e:
        print(f"warning: cached {e}; deleting it to download it again", file=sys.stderr)
        dest.unlink()
        return False
    return True


@contextlib.contextmanager
def _download_lock(dest):
    """Hold an exclusive fcntl.flock lock on `<dest>.lock` for a block, so that two processes
    (or threads) downloading the same file take turns. The OS releases it when a process
    dies: no stale locks (the empty .lock file stays; deleting it would race). Windows has
    no fcntl and gets no lock: download a file from one process at a time there."""
    with open(dest.with_name(dest.name + ".lock"), "a") as lock:  # "a": create, never truncate
        if os.name == "posix":
            import fcntl  # POSIX only

            fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process holds it; released on close
        yield


def download_file(url, dest, *, sha256=None, size=None, kind=None, member=None, timeout=30, retries=3, quiet=False):
    """Download url to dest, resuming and verifying; return dest as a Path.

    A dest that exists and passes `verify_file(kind, size, sha256, member)` (size in
    bytes, SHA-256 in hex) is returned as is; one that fails is downloaded again. The
    bytes go to `dest.part` first, under `_download_lock`: a second process waits, then
    reuses the file. An interrupted download resumes with an HTTP Range request (up to
    `retries` attempts per call, and again on the next call). Only a file that passes
    `verify_file` is renamed to dest; one that fails is deleted. `timeout` is in seconds
    per network read. Progress (MB, MB/s, ETA) goes to stderr unless `quiet`.
    Raises RuntimeError, one line naming the URL, for an HTTP error status, a web page
    (text/html) unless the URL names an .html file, any failed request (connection, TLS,
    redirect loop, invalid URL) or a failed check.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with _download_lock(dest):
        if _reuse_cached(dest, kind, size=size, sha256=sha256, member=member):
            return dest  # from an earlier run, or from another process while this one waited
        _transfer(url, part, timeout=timeout, retries=retries, quiet=quiet)
        try:
            verify_file(part, kind, size=size, sha256=sha256, member=member)
        except ValueError as e:
            part.unlink(missing_ok=True)
            raise RuntimeError(f"download of {url} is corrupt or not the expected file: {e}; deleted, run again") from None
        os.replace(part, dest)
    return dest


# requests failures that another attempt cannot fix -> what they mean, in a few words
_FATAL_REQUEST_ERRORS = {
    requests.exceptions.SSLError: "TLS/SSL error (a certificate or proxy problem)",
    requests.TooManyRedirects: "too many redirects (a redirect loop)",
    requests.exceptions.MissingSchema: "not a URL (it needs http:// or https://)",
    requests.exceptions.InvalidSchema: "not an http:// or https:// URL",
    requests.exceptions.InvalidURL: "not a valid URL",
}


def _transfer(url, part, *, timeout, retries, quiet):
    """The network half of `download_file`: bring `part` up to the whole of url. Resumes
    with a Range request; starts over when the server ignores it (200) or answers for
    another range (206); a body short of its Content-Length counts as a broken connection."""
    label = f"downloading {part.name.removesuffix('.part')}"
    reason = None
    for attempt in range(1, retries + 1):
        if reason is not None and not quiet:
            print(f"{label}: attempt {attempt - 1} of {retries} failed ({reason}); retrying", file=sys.stderr)
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if r.status_code == 416:  # partial file is already complete (or too long)
                    return
                if r.status_code not in (200, 206):
                    raise RuntimeError(f"download of {url} failed: HTTP {r.status_code} {r.reason}")
                web_page = r.headers.get("Content-Type", "").split(";")[0].strip().lower() == "text/html"
                if web_page and not urlparse(url).path.lower().endswith((".html", ".htm")):
                    raise RuntimeError(f"download of {url} failed: the server sent a web page (text/html), not the file")
                content_range = r.headers.get("Content-Range", "")
                asked = re.fullmatch(rf"bytes {have}-(\d+)/(\d+|\*)", content_range)  # from `have` to the end
                if r.status_code == 200:  # server ignored the Range header: start over
                    have = 0
                elif not asked or (asked[2] != "*" and int(asked[1]) + 1 != int(asked[2])):
                    part.unlink(missing_ok=True)
                    reason = f"asked for bytes {have}-, the server sent {content_range or 'no Content-Range'}"
                    continue
                length = r.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                started, done, last_print = time.time(), have, 0.0
                with open(part, "ab" if have else "wb") as f:
                    try:
                        for chunk in r.iter_content(chunk_size=1 << 16):  # small: a cut loses < 64 KiB
                            f.write(chunk)
                            done += len(chunk)
                            if not quiet and time.time() - last_print > 0.5:
                                _print_progress(done, total, started, label)
                                last_print = time.time()
                    finally:
                        if not quiet:  # end the progress line, also before an error
                            _print_progress(done, total, started, label)
                            print(file=sys.stderr)
                if total is None or done >= total:
                    return
                reason = f"the connection closed after {done} of {total} bytes"
        except requests.RequestException as e:
            fatal = [words for cls, words in _FATAL_REQUEST_ERRORS.items() if isinstance(e, cls)]
            if fatal:
                raise RuntimeError(f"download of {url} failed: {fatal[0]}") from None
            reason = f"{e.__class__.__name__}: no connection, or it broke off"
    got = part.stat().st_size if part.exists() else 0
    kept = f"{got} bytes are kept in {part}, run again to resume" if got else "nothing was downloaded"
    raise RuntimeError(f"download of {url} failed after {retries} attempts ({reason}); {kept}")


def fetch_dataset(urls, filename, *, flag="--data", kind=None, size=None, sha256=None, member=None, quiet=False):
    """Path of a data file in the cache, downloading it from the first of `urls` that works.

    The file lands in <cache>/data/<key>/<filename> (see `cache_dir`), where key is the
    first 12 hex digits of the SHA-256 of urls[0] (the others are mirrors of the same
    file): another URL with the same file name is another file. Each use checks the
    cached file with `verify_file(kind, size, sha256, member)` (see `download_file`) and
    downloads it again when it fails. Raises RuntimeError naming every URL tried and the
    command-line `flag` that takes a local copy instead, when none of them works.
    """
    dest = cache_dir() / "data" / hashlib.sha256(urls[0].encode()).hexdigest()[:12] / filename
    if _reuse_cached(dest, kind, size=size, sha256=sha256, member=member):
        return dest  # without taking the lock: a read-only cache works too
    errors = []
    for url in urls:
        try:
            return download_file(url, dest, sha256=sha256, size=size, kind=kind, member=member, quiet=quiet)
        except RuntimeError as e:
            errors.append(f"  {e}")
    raise RuntimeError(
        f"could not download {filename}:\n" + "\n".join(errors) + f"\nOffline? Pass a local copy with {flag} PATH"
    )


def plot_curves(path, panels, xlabel):
    """Save line plots side by side as a PNG; return the path, or None without matplotlib.

    panels: {panel title: {series label: (x values, y values)}}. matplotlib is an
    optional extra: without it this prints a one-line note and returns None.
    """
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return Path(path)


# ----------------------------------------------------------------------------------------
# 7. Pretrained weights: safetensors reader and GPT-2 loader
# ----------------------------------------------------------------------------------------

# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors)
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # bytes; the format's own limit


def read_safetensors(path):
    """Read a .safetensors file -> dict of name -> tensor, memory-mapped (no copy).

    The format: 8 bytes little-endian header length N, N bytes of JSON mapping each name
    to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of
    the header), then the raw little-endian tensor bytes. Each tensor is a view of a
    private (copy-on-write) memory mapping of its own bytes: reading costs no memory
    until the bytes are touched, and dropping the tensor releases them. Raises
    ValueError naming the problem for a truncated or malformed file, and
    FileNotFoundError when it does not exist.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        if file_size < 8:
            raise ValueError(f"{path}: not a safetensors file ({file_size} bytes, shorter than the 8-byte header length)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > file_size:
            raise ValueError(
                f"{path}: header length {header_len} bytes runs past the end of the {file_size}-byte file "
                "(truncated or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: header is not a JSON object")
        data_size = file_size - 8 - header_len
        return {
            name: _map_tensor(path, f, name, info, 8 + header_len, data_size)
            for name, info in header.items()
            if name != "__metadata__"  # optional free-form metadata, not a tensor
        }


def _map_tensor(path, f, name, info, data_start, data_size):
    """Check one header entry of an open safetensors file and map its bytes as a tensor."""
    try:
        dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path}: tensor {name!r} needs dtype, shape and two data_offsets, got {info!r}") from None
    if dtype_name not in SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has unknown dtype {dtype_name!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in (begin, end)):
        raise ValueError(f"{path}: tensor {name!r} has a malformed shape {shape} or offsets {[begin, end]}")
    if not 0 <= begin <= end <= data_size:
        raise ValueError(
            f"{path}: tensor {name!r} data offsets [{begin}, {end}] are outside the {data_size} data bytes "
            "(truncated file?)"
        )
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if end - begin != numel * itemsize:
        raise ValueError(
            f"{path}: tensor {name!r} has {end - begin} bytes but shape {shape} in {dtype_name} needs {numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # Mappings start on a page boundary: map from the page that holds the first byte.
    start = data_start + begin
    page_start = start - start % mmap.ALLOCATIONGRANULARITY
    region = mmap.mmap(f.fileno(), start + end - begin - page_start, offset=page_start, access=mmap.ACCESS_COPY)
    return torch.frombuffer(region, dtype=dtype, count=numel, offset=start - page_start).view(shape)


def hf_hub_cache():
    """Hugging Face's cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"


def find_in_hf_cache(name):
    """Path of model.safetensors of openai-community/<name> in the Hugging Face cache, or None."""
    for repo in (f"models--openai-community--{name}", f"models--{name}"):
        snapshots = hf_hub_cache() / repo / "snapshots"
        ref = hf_hub_cache() / repo / "refs" / "main"
        candidates = [snapshots / ref.read_text().strip()] if ref.exists() else []
        candidates += sorted(snapshots.glob("*")) if snapshots.exists() else []
        for snapshot in candidates:
            if (snapshot / "model.safetensors").exists():
                return snapshot / "model.safetensors"
    return None


def gpt2_weights_path(name):
    """Where the weights of a released size are (or will be) cached: <cache>/<name>/model.safetensors."""
    return cache_dir() / name / "model.safetensors"


def download_gpt2(name, *, quiet=False):
    """Make sure the released weights of `name` (a key of GPT_CONFIGS) are on disk; return the path.

    Looks in the Hugging Face cache, then in `gpt2_weights_path(name)`; otherwise downloads
    `model.safetensors` of openai-community/<name> from $HF_ENDPOINT (default
    https://huggingface.co), verified against the size and SHA-256 the hub announces in
    its X-Linked-Size and X-Linked-Etag headers. A cached file that is not a complete
    safetensors file is downloaded again. Raises ValueError for an unknown name and
    RuntimeError when the download fails.
    """
    if name not in GPT_CONFIGS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(GPT_CONFIGS)} or give a path to a file")
    found = find_in_hf_cache(name)
    if found is not None:
        return found
    dest = gpt2_weights_path(name)
    if _reuse_cached(dest, "safetensors"):
        return dest
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/openai-community/{name}/resolve/main/model.safetensors"
    try:
        head = requests.head(url, allow_redirects=False, timeout=30)
    except requests.RequestException as e:
        raise RuntimeError(
            f"cannot reach {url} ({e.__class__.__name__}). Offline? Pass a local .safetensors file instead of "
            f"{name!r}, or set HF_ENDPOINT to a mirror"
        ) from None
    if head.status_code >= 400:
        raise RuntimeError(f"download of {url} failed: HTTP {head.status_code} {head.reason}")
    etag = (head.headers.get("X-Linked-Etag") or head.headers.get("ETag") or "").strip('"').removeprefix("W/").strip('"')
    sha256 = etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None  # LFS files: the etag is the SHA-256
    size = head.headers.get("X-Linked-Size")
    return download_file(url, dest, sha256=sha256, size=int(size) if size else None, kind="safetensors", quiet=quiet)


# Keys of the released files that hold no parameters of ours: the causal-mask buffers
# `h.N.attn.bias` / `h.N.attn.masked_bias` (we build the mask on the fly) and
# `lm_head.weight` (tied to wte).
_IGNORED_KEYS = re.compile(r"(h\.\d+\.attn\.(bias|masked_bias)|lm_head\.weight)")
# The reference implementation stores these as Conv1D weights, [in_features, out_features].
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_from_weights(tensors, config_json=None, source="config.json"):
    """GPTConfig for a dict of GPT-2 tensors (keys without the `transformer.` prefix).

    Uses the Hugging Face config.json dict when given; otherwise reads the sizes off the
    tensor shapes. The number of heads leaves no trace in the shapes: it is taken from the
    released size with the same width, else emb_dim / 64 (GPT-2's head size). Raises
    ValueError naming `source` (the config file) and the key for a missing, non-integer
    or non-positive size, or sizes that do not fit together.
    """
    if config_json is not None:
        if not isinstance(config_json, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(config_json).__name__}")
        for key in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer"):
            value = config_json.get(key)
            if type(value) is not int or value < 1:  # not isinstance: True is an int too
                raise ValueError(f"{source}: {key!r} must be a positive integer, got {value!r}")
        if config_json["n_embd"] % config_json["n_head"]:
            raise ValueError(f"{source}: 'n_embd' ({config_json['n_embd']}) must be divisible by 'n_head' ({config_json['n_head']})")
        return GPTConfig(
            vocab_size=config_json["vocab_size"],
            context_length=config_json["n_positions"],
            emb_dim=config_json["n_embd"],
            n_heads=config_json["n_head"],
            n_layers=config_json["n_layer"],
        )
    for key in ("wte.weight", "wpe.weight"):
        if key not in tensors:
            raise ValueError(f"not a GPT-2 weights file: no tensor {key!r} (found {sorted(tensors)[:5]} ...)")
    vocab_size, emb_dim = tensors["wte.weight"].shape
    n_layers = len({int(m.group(1)) for k in tensors if (m := re.match(r"h\.(\d+)\.", k))})
    same_width = [c.n_heads for c in GPT_CONFIGS.values() if c.emb_dim == emb_dim]
    n_heads = same_width[0] if same_width else max(1, emb_dim // 64)
    return GPTConfig(
        vocab_size=vocab_size,
        context_length=tensors["wpe.weight"].shape[0],
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_layers=n_layers,
    )


def load_weights_into(model, tensors, *, device="cpu", dtype=torch.float32, source="weights"):
    """Put GPT-2 tensors (release names, `transformer.` prefix already removed) into model.

    Each tensor is copied once, to `device` in `dtype`, and becomes the parameter, so the
    model may be built on the meta device: nothing is allocated twice. Consumes `tensors`:
    each is dropped right after its copy, so a memory-mapped file's pages leave memory one
    tensor at a time. Strict: raises ValueError listing every missing, unexpected or
    mis-shaped tensor (before anything is copied).
    """
    params = {name: p for name, p in model.state_dict(keep_vars=True).items() if name != "lm_head.weight"}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(k for k in tensors if k not in params and not _IGNORED_KEYS.fullmatch(k))
    mismatched = []
    for name, param in params.items():
        if name in tensors:
            shape = tensors[name].shape[::-1] if name.endswith(_TRANSPOSED) else tensors[name].shape
            if tuple(shape) != tuple(param.shape):
                mismatched.append(f"{name}: file {tuple(tensors[name].shape)}, model {tuple(param.shape)}")
    if missing or unexpected or mismatched:
        problems = [f"missing: {', '.join(missing)}"] if missing else []
        problems += [f"unexpected: {', '.join(unexpected)}"] if unexpected else []
        problems += [f"wrong shape: {'; '.join(mismatched)}"] if mismatched else []
        raise ValueError(f"{source} do not fit the GPT-2 model:\n  " + "\n  ".join(problems))
    state = {}
    for name, param in params.items():
        tensor = tensors.pop(name).to(device=device, dtype=dtype, copy=True)
        # nn.Linear wants [out, in]; the release stores [in, out]. `.t()` is that as a view:
        # the memory keeps the release's layout, in which x @ W reads the weights in order
        # (measured about 1.2x faster greedy decoding on a CPU than a transposed copy).
        state[name] = tensor.t() if name.endswith(_TRANSPOSED) else tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.wte.weight  # tied: the head uses the token embedding


def load_gpt2(name_or_path="gpt2", *, device="cpu", dtype=torch.float32, quiet=False):
    """Load a GPT-2 with pretrained weights -> GPTModel in eval mode on `device`, in `dtype`.

    name_or_path:
    - a released size ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"): downloaded once
      from the Hugging Face Hub (see `download_gpt2`) and cached;
    - a `.safetensors` file as published on the hub or written by `save_pretrained`
      (tensor names with or without the `transformer.` prefix); the config comes from a
      `config.json` beside it when present, else from the tensor shapes;
    - a checkpoint written by this project's scripts (`save_checkpoint`, a `.pt` file).
    The model is built without random initialisation (on the meta device) and each
    tensor is copied once from the memory-mapped file and then released, so loading
    needs about one copy of the weights in memory. Raises ValueError for an unknown name
    or a malformed or mismatching file, FileNotFoundError for a missing path.
    """
    path = Path(name_or_path)
    if str(name_or_path) in GPT_CONFIGS and not path.exists():
        path = download_gpt2(str(name_or_path), quiet=quiet)
    elif not path.exists():
        raise FileNotFoundError(
            f"no model {str(name_or_path)!r}: give one of {', '.join(GPT_CONFIGS)}, a .safetensors file or a checkpoint"
        )
    if path.suffix != ".safetensors":
        return model_from_checkpoint(load_checkpoint(path), device=device, dtype=dtype)

    tensors = {k.removeprefix("transformer."): v for k, v in read_safetensors(path).items()}
    config_file = path.with_name("config.json")
    config_json = None
    if config_file.exists():
        try:
            config_json = json.loads(config_file.read_bytes())
        except (OSError, ValueError) as e:  # a folder, unreadable, or not JSON
            raise ValueError(f"{config_file}: not a readable JSON file ({e})") from None
    cfg = config_from_weights(tensors, config_json, source=config_file)
    with torch.device("meta"):  # parameters without memory: no random initialisation
        model = GPTModel(cfg)
    load_weights_into(model, tensors, device=device, dtype=dtype, source=str(path))
    return model.eval()


# ----------------------------------------------------------------------------------------
# 8. Checkpoints of this project
# ----------------------------------------------------------------------------------------


def unwrap_model(model):
    """The plain model inside DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path, model, **extra):
    """Save model config and weights (plus any extra entries: optimizer state, step, RNG
    states, ...) to path atomically. Wrappers are removed first, so the keys never carry
    `module.` or `_orig_mod.` prefixes. Extra values must be tensors, numbers, strings,
    or lists/dicts of them, so that `load_checkpoint` can read them with weights_only."""
    model = unwrap_model(model)
    atomic_save({"config": dataclasses.asdict(model.cfg), "model": model.state_dict(), **extra}, path)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by `save_checkpoint` -> dict (safely: weights_only=True).

    Raises ValueError when the file is not such a checkpoint.
    """
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: not a .safetensors file or a checkpoint of this project (torch.load: {e.__class__.__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "model" not in checkpoint:
        raise ValueError(f"{path}: not a checkpoint of this project (no 'config' and 'model' entries)")
    return checkpoint


def model_from_checkpoint(checkpoint, *, device="cpu", dtype=torch.float32):
    """GPTModel from a `load_checkpoint` dict, in eval mode. Raises ValueError when the
    weights do not fit the config (e.g. a classifier checkpoint with its own head)."""
    if "labels" in checkpoint:
        raise ValueError(
            "this is a spam classifier written by finetune_classify.py, not a language model: "
            "use it with `python finetune_classify.py --classify TEXT --checkpoint PATH`"
        )
    cfg = GPTConfig(**checkpoint["config"])
    with torch.device("meta"):  # no random initialisation: the weights come from the checkpoint
        model = GPTModel(cfg)
    try:
        model.load_state_dict(checkpoint["model"], assign=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights do not fit a GPT model of its config: {str(e)[:500]}") from None
    model.lm_head.weight = model.wte.weight  # assigning untied them: the head uses the token embedding
    return model.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------
# 9. Running a stage: flags, settings, run folders, errors
# ----------------------------------------------------------------------------------------


def _checked_number(convert, is_valid, requirement):
    """An argparse `type=` that converts a flag's text and checks its range in one place;
    argparse prints "argument --flag: must be <requirement>, got 'text'" and exits 2."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not is_valid(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    parse.__name__ = requirement  # argparse names the type by it in some messages
    return parse


# Ranges of flags, declared with the flag: `type=gpt.positive_int`. NaN fails every float
# check (every comparison with NaN is false) and infinity fails the "finite" ones.
positive_int = _checked_number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _checked_number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked_number(float, lambda v: 0 < v < math.inf, "a finite number > 0")
non_negative_float = _checked_number(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
probability = _checked_number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
dropout_rate = _checked_number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
fraction = _checked_number(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")
seed = _checked_number(int, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1")  # torch's seed range

# --dtype: the precision the work runs in. Training on a GPU keeps float32 weights and
# runs the forward pass under autocast in this type; generation converts the weights.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse help that ends each line with "(default: ...)", except for on/off flags
    and flags whose default is None: their help text says what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def pick_device(name="auto"):
    """"auto" -> "cuda" if available, else "mps" (Apple GPUs), else "cpu"; other names pass
    through after a check. Raises ValueError for a device this machine does not have."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available here; use --device cpu")
    return device


def flag_name(setting):
    """The command-line flag of a setting: "batch_size" -> "--batch-size"."""
    return "--" + setting.replace("_", "-")


def given_flags(parser, argv=None):
    """The settings that argv (default: sys.argv[1:]) sets explicitly -> dict.

    Parses argv once more with every default suppressed, so a flag repeated with its
    default value still counts as given."""
    parser = copy.deepcopy(parser)  # the caller's parser keeps its defaults
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def resume_settings(parser, argv, saved, may_change=()):
    """The settings of a resumed run: the saved ones, plus the flags of `may_change`
    given now (say --max-steps, to train on). Raises ValueError naming the flag and both
    values when argv gives another flag a value that differs from the saved run's."""
    given = given_flags(parser, argv)
    for name, value in given.items():
        if name in saved and name not in may_change and saved[name] != value:
            raise ValueError(
                f"--resume continues the saved run, which used {flag_name(name)} {saved[name]}, not {value}: "
                f"drop {flag_name(name)}, or start a new run with --overwrite or another --out-dir"
            )
    defaults = vars(parser.parse_args([]))  # settings added since the run was saved
    return argparse.Namespace(**{**defaults, **saved, **given})


def print_settings(settings):
    """Print a run's settings (a Namespace or dict) in one wrapped block, for the log."""
    items = vars(settings) if isinstance(settings, argparse.Namespace) else settings
    line = "settings: " + ", ".join(f"{name}={value}" for name, value in items.items())
    print("\n          ".join(textwrap.wrap(line, 100, subsequent_indent="")))


def _process_is_running(pid):
    """Whether a process with this id runs on this machine (signal 0 tests, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporary_files(folder):
    """Delete the temporary files (`.NAME.tmpPID`) that writes of processes that are gone
    left in folder, when they were interrupted; a running process's files stay."""
    for tmp in Path(folder).glob(".*.tmp*"):
        match = re.fullmatch(r"\..+\.tmp(\d+)(\..*)?", tmp.name)
        if match and not _process_is_running(int(match.group(1))):
            tmp.unlink(missing_ok=True)


def claim_run_folder(out_dir, run_files, *, resume=False, overwrite=False):
    """Make out_dir this process's run folder and return it as a Path.

    A folder that holds another run (any of `run_files`) is refused unless `resume`
    (continue it; then it must hold a run) or `overwrite` (its run files are deleted
    first). A lock file `.lock` naming this process keeps two runs out of one folder; a
    lock whose process is gone is taken over, and the lock is removed at exit. Leftover
    temporary files of interrupted writes are removed. Raises ValueError, naming the
    path and the flag that helps, when the folder cannot be used, before any work starts.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a folder: choose another --out-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _take_lock(out_dir / ".lock")
    except OSError as e:
        raise ValueError(f"--out-dir {out_dir} cannot be used: {e.strerror or e}") from None
    remove_stale_temporary_files(out_dir)
    folders = [name for name in run_files if (out_dir / name).is_dir()]
    if folders:
        raise ValueError(f"{out_dir / folders[0]} is a folder, but this run writes a file there: move it away")
    found = [name for name in run_files if (out_dir / name).exists()]
    if found and not (resume or overwrite):
        raise ValueError(
            f"{out_dir} holds another run ({', '.join(found)}): continue it with --resume, "
            "replace it with --overwrite, or choose another --out-dir"
        )
    if resume and not found:
        raise ValueError(f"--resume: {out_dir} holds no run to continue; start one without --resume")
    if overwrite and not resume:
        for name in found:
            (out_dir / name).unlink()
    return out_dir


def _take_lock(lock):
    """Create the lock file `lock` holding this process's id; take over a lock whose
    process is gone. Raises ValueError when a running process holds it."""
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _process_is_running(owner):
                raise ValueError(
                    f"{lock.parent} is in use by another run (process {owner}): wait for it, or choose another --out-dir"
                ) from None
            lock.unlink(missing_ok=True)  # left by a process that is gone (or by this one)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(_release_lock, lock, os.getpid())
        return


def _release_lock(lock, pid):
    if lock.exists() and lock.read_text() == str(pid):
        lock.unlink(missing_ok=True)


def save_with_fallback(write, path):
    """Call write(path); when the file system refuses (a full disk, a folder that went
    away), write to the temporary folder instead, so finished work is not lost. Returns
    the path written. Raises OSError, naming both paths and reasons, when both fail."""
    path = Path(path)
    try:
        write(path)
        return path
    except OSError as first:
        fallback = Path(tempfile.gettempdir()) / f"{path.stem}-{os.getpid()}{path.suffix}"
        print(f"warning: cannot write {path} ({first.strerror or first}); writing {fallback} instead", file=sys.stderr)
        try:
            write(fallback)
        except OSError as second:
            raise OSError(
                f"cannot write {path} ({first.strerror or first}) nor {fallback} ({second.strerror or second}): "
                "free some disk space and run again"
            ) from None
        return fallback


_progress_line_open = False


def show_progress(text):
    """Overwrite the current status line on stderr with text (a long loop's progress)."""
    global _progress_line_open
    print("\r" + text + "\033[K", end="", file=sys.stderr, flush=True)
    _progress_line_open = True


def end_progress():
    """End a status line of `show_progress`, so that what follows starts on a new line."""
    global _progress_line_open
    if _progress_line_open:
        print(file=sys.stderr, flush=True)
        _progress_line_open = False


def eta(started, done, total):
    """Estimated time left, formatted, when `done` of `total` units took since `started`."""
    if done <= 0:
        return "?"
    return format_duration((time.time() - started) / done * (total - done))


def is_out_of_memory(error):
    """Whether an exception is the framework's out-of-memory error (GPU, or a CPU
    allocation that the operating system refused)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def command_line(memory_hint="use a smaller --batch-size"):
    """Decorator for a script's main(argv): the expected errors become one line.

    ValueError, RuntimeError and OSError (a missing file, a full disk, ...) print
    "error: <message>" and exit 1; out-of-memory says `memory_hint`; Ctrl-C prints
    "interrupted" and exits 130 (the shell's code for SIGINT); a reader that closed the
    output pipe (`| head`) ends the script quietly. An open progress line is ended first.
    """

    def decorate(main):
        @functools.wraps(main)
        def wrapper(argv=None):
            try:
                return main(argv)
            except KeyboardInterrupt:
                end_progress()
                print("interrupted", file=sys.stderr)
                raise SystemExit(130) from None
            except BrokenPipeError:
                # Python flushes stdout once more at exit: point it at /dev/null first.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise SystemExit(141) from None  # 128 + SIGPIPE, as a shell reports it
            except (ValueError, RuntimeError, OSError) as e:
                end_progress()
                message = f"out of memory: {memory_hint}" if is_out_of_memory(e) else str(e)
                sys.exit(f"error: {message}")

        return wrapper

    return decorate


# ----------------------------------------------------------------------------------------
# 10. Training helpers the stages share
# ----------------------------------------------------------------------------------------


def make_adamw(model, lr, weight_decay, betas=(0.9, 0.999)):
    """AdamW over the trainable parameters of model, with weight decay on the weight
    matrices and embeddings (two or more dimensions) only: biases and LayerNorm scales
    and shifts are not decayed (as nanoGPT's configure_optimizers). Fused into one
    kernel per step where this torch build has one for the device (CUDA; CPU since torch
    2.4): the same update with fewer passes over memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch version
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def check_finite_loss(loss, step):
    """Raise RuntimeError when a loss (float or tensor) is NaN or infinite: training has
    diverged, and every later step would only spread NaN through the weights."""
    value = float(loss)
    if not math.isfinite(value):
        raise RuntimeError(f"the loss became {value} at step {step}: training diverged; lower --lr and run again")


def model_summary(model, name):
    """One line for the log: "gpt2: 124.4M parameters (12 layers, 12 heads, 768 wide), 1,234 trainable"."""
    cfg = model.cfg
    trainable = count_parameters(model, trainable_only=True)
    return (
        f"{name}: {count_parameters(model) / 1e6:.1f}M parameters ({cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"{cfg.emb_dim} wide, context {cfg.context_length}), {trainable:,} trainable"
    )


def split_by_fractions(items, seed, fractions):
    """Shuffle a copy of items with `seed` and cut it into len(fractions) + 1 parts: the
    first parts get int(n * fraction) items each, the last part the rest."""
    items = list(items)
    random.Random(seed).shuffle(items)
    parts, start = [], 0
    for share in fractions:
        end = start + int(len(items) * share)
        parts.append(items[start:end])
        start = end
    return parts + [items[start:]]


def rng_state():
    """The random number generators' states (CPU, and CUDA when in use), for exact resume."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, device):
    """Restore what `rng_state` returned (the CUDA state only on a CUDA device)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
