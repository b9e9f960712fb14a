"""bench_pretrain.py: training throughput of pretrain.py's GPT against a straightforward one.

The straightforward model is the book's chapter-4 implementation ("Build a Large Language
Model (From Scratch)", rasbt/LLMs-from-scratch, ch04 `GPTModel`): separate query, key and
value projections, the full [seq_len, seq_len] attention matrix masked and soft-maxed
explicitly, a hand-written LayerNorm and GELU. Both models get the same shape (GPT-2 124M
by default), the same weights (copied, and checked to give the same logits), no dropout,
a tied output head, the same batches, and the same training step and optimizer (the step of
pretrain.py's loop, `gpt.make_adamw` with pretrain.py's betas). Steps alternate between the two
in one process, so both see the same machine load.

    python benchmarks/bench_pretrain.py                      # 124M, 2 x 256 tokens, CPU
    python benchmarks/bench_pretrain.py --context-length 1024 --batch-size 1 --steps 3

Prints tokens/s (median over the timed steps) of each and their ratio.
"""

import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's top level
import gpt  # noqa: E402


class BookMultiHeadAttention(nn.Module):
    """Chapter 4's MultiHeadAttention: materialises the attention matrix (B, nh, T, T)."""

    def __init__(self, d_in, d_out, context_length, num_heads, qkv_bias):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, _ = x.shape
        shape = (b, num_tokens, self.num_heads, self.head_dim)
        keys = self.W_key(x).view(shape).transpose(1, 2)  # (B, nh, T, hd)
        queries = self.W_query(x).view(shape).transpose(1, 2)
        values = self.W_value(x).view(shape).transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)  # (B, nh, T, T)
        attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        context = (attn_weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context)


class BookLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class BookTransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = BookMultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.context_length, cfg.n_heads, cfg.qkv_bias)
        self.ff = nn.Sequential(nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), BookGELU(), nn.Linear(4 * cfg.emb_dim, cfg.emb_dim))
        self.norm1, self.norm2 = BookLayerNorm(cfg.emb_dim), BookLayerNorm(cfg.emb_dim)

    def forward(self, x):
        x = x + self.att(self.norm1(x))
        return x + self.ff(self.norm2(x))


class BookGPTModel(nn.Module):
    """Chapter 4's GPTModel, without dropout and with the output head tied to the token
    embedding (as GPT-2 and gpt.GPTModel), so that both models have the same parameters."""

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.trf_blocks = nn.Sequential(*[BookTransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = BookLayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.out_head.weight = self.tok_emb.weight

    def forward(self, in_idx):
        pos = torch.arange(in_idx.shape[1], device=in_idx.device)
        x = self.trf_blocks(self.tok_emb(in_idx) + self.pos_emb(pos))
        return self.out_head(self.final_norm(x))


@torch.no_grad()
def copy_weights(ours, book):
    """Copy a gpt.GPTModel's weights into a BookGPTModel (c_attn splits into W_query/W_key/W_value)."""
    book.tok_emb.weight.copy_(ours.wte.weight)
    book.pos_emb.weight.copy_(ours.wpe.weight)
    for src, dst in zip(ours.h, book.trf_blocks):
        for part, w, b in zip(
            (dst.att.W_query, dst.att.W_key, dst.att.W_value), src.attn.c_attn.weight.chunk(3), src.attn.c_attn.bias.chunk(3)
        ):
            part.weight.copy_(w)
            part.bias.copy_(b)
        pairs = [(src.attn.c_proj, dst.att.out_proj), (src.mlp.c_fc, dst.ff[0]), (src.mlp.c_proj, dst.ff[2])]
        for s, d in pairs:
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)
        for s, d in ((src.ln_1, dst.norm1), (src.ln_2, dst.norm2)):
            d.scale.copy_(s.weight)
            d.shift.copy_(s.bias)
    book.final_norm.scale.copy_(ours.ln_f.weight)
    book.final_norm.shift.copy_(ours.ln_f.bias)


def train_step(model, optimizer, inputs, targets):
    """One optimizer step as pretrain.py's training loop takes it (float32, one micro-batch)."""
    logits = model(inputs)  # [batch, seq_len, vocab_size]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv=None):
    p = gpt.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(gpt.GPT_CONFIGS), default="gpt2", help="model shape")
    p.add_argument("--context-length", type=int, default=256, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=2, help="windows per step")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(gpt.GPT_CONFIGS[args.size], context_length=args.context_length)
    torch.manual_seed(0)
    ours = gpt.GPTModel(cfg).train()
    book = BookGPTModel(cfg).train()
    copy_weights(ours, book)
    inputs = torch.randint(0, cfg.vocab_size, (args.batch_size, args.context_length + 1))
    batch = [(inputs[:, :-1], inputs[:, 1:])]
    with torch.no_grad():
        diff = (ours(batch[0][0]) - book(batch[0][0])).abs().max().item()
    print(
        f"{args.size} shape, {gpt.count_parameters(ours) / 1e6:.1f}M parameters each, {args.batch_size} x {args.context_length} "
        f"tokens per step, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; max |logit difference| {diff:.2e}"
    )
    if diff > 1e-3:
        sys.exit(f"error: the two models disagree (max logit difference {diff}); the comparison would be meaningless")

    models = {
        "pretrain.py (gpt.GPTModel, scaled_dot_product_attention)": ours,
        "book chapter 4 (materialised attention)": book,
    }
    optimizers = {name: gpt.make_adamw(m, 1e-4, 0.1, betas=(0.9, 0.95)) for name, m in models.items()}
    seconds = {name: [] for name in models}
    for i in range(args.warmup + args.steps):
        for name, model in models.items():  # alternate, so that both see the same machine load
            started = time.perf_counter()
            train_step(model, optimizers[name], *batch[0])
            if i >= args.warmup:
                seconds[name].append(time.perf_counter() - started)
    tokens = args.batch_size * args.context_length
    speeds = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    for name, speed in speeds.items():
        print(
            f"  {name:<58} {speed:8.1f} tokens/s  (median of {args.steps} steps, {statistics.median(seconds[name]):.2f} s/step)"
        )
    ours_speed, book_speed = speeds.values()
    print(f"  ratio: {ours_speed / book_speed:.2f}x")
    return speeds


if __name__ == "__main__":
    main()
