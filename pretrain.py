"""pretrain.py: pretrain a GPT on plain text by next-token prediction.

The "pretrain" stage of the GPT-2 lifecycle. With no flag it trains a small GPT from
random initialisation on "The Verdict" (Edith Wharton, public domain, the short story of
chapter 5 of "Build a Large Language Model (From Scratch)"), downloaded once, on the CPU
in a few minutes:

    python pretrain.py
    python pretrain.py --data tinyshakespeare.txt --emb-dim 128 --max-steps 240 --lr 3e-3 --eval-interval 40
    python pretrain.py --data corpus/ --size gpt2 --batch-size 16 --grad-accum 32
    python pretrain.py --init gpt2 --data my_notes/          # continue from released weights
    torchrun --nproc_per_node 8 pretrain.py --data corpus/ --size gpt2   # several GPUs
    python pretrain.py --resume                              # continue an interrupted run

The story, top to bottom: the text is tokenized once into a memory-mapped token file,
split into training and validation tokens and cut into input/target windows; a GPT is
built (or loaded); AdamW with warm-up and cosine decay trains it with gradient
accumulation (and DistributedDataParallel under torchrun); every --eval-interval steps
the train and validation losses are measured, a sample is printed and checkpoints are
written. Ctrl-C finishes the current step, saves, and exits; --resume continues exactly.

Writes to --out-dir (default runs/pretrain/):
    latest.pt     the full training state (model, optimizer, step, data position, RNG)
    best.pt       the model with the lowest validation loss, for the next stages:
                  load_gpt2.py / finetune_classify.py / finetune_instruct.py --model runs/pretrain/best.pt
    history.json  the evaluations: step, tokens seen, learning rate, train and validation loss
    loss.png      train and validation loss against tokens seen (needs matplotlib)
The token file of a corpus goes to <cache>/tokens/ (cache: $GPT_CACHE_DIR or
~/.cache/gpt2-lifecycle) and is reused while the text files are unchanged.
"""

import argparse
import codecs
import dataclasses
import hashlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from array import array
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import gpt

VERDICT_URL = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
# Checks of the downloads we know (size in bytes, SHA-256), so that `main` moving on is an error, not other data.
KNOWN_DOWNLOADS = {
    VERDICT_URL: dict(kind="text", size=20479, sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"),
}

# The default model: 4 layers of width 256 (16M parameters, 13M of them the token
# embedding) and 128-token windows. It trains at several hundred tokens/s on two CPU
# cores, and 128 + 1 tokens fit in the 515-token validation split of The Verdict.
DEFAULT_SHAPE = {"n_layers": 4, "n_heads": 4, "emb_dim": 256, "context_length": 128}

# ----------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(
        description="Pretrain a GPT on plain text (next-token prediction).", formatter_class=gpt.HelpFormatter
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--data", default=VERDICT_URL, help="a URL, a UTF-8 text file, or a folder of .txt files (searched recursively)"
    )
    data.add_argument(
        "--train-fraction", type=float, default=0.9, help="share of the tokens for training; the rest is for validation"
    )
    data.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between the starts of training windows (default: the context length, no overlap)",
    )
    data.add_argument(
        "--replace-invalid-utf8",
        action="store_true",
        help="replace bytes that are not UTF-8 with U+FFFD instead of stopping",
    )
    data.add_argument("--token-dir", default=None, help="folder of the cached token files (default: <cache>/tokens)")

    model = p.add_argument_group("model")
    model.add_argument(
        "--size",
        choices=list(gpt.GPT_CONFIGS),
        default=None,
        help="a GPT-2 shape (default: the small shape 4 layers x 4 heads x 256, 128-token context)",
    )
    model.add_argument("--n-layers", type=int, default=None, help="transformer blocks (default: from --size)")
    model.add_argument("--n-heads", type=int, default=None, help="attention heads per block (default: from --size)")
    model.add_argument("--emb-dim", type=int, default=None, help="embedding width (default: from --size)")
    model.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="tokens per training window, and the model's context length when it is new "
        "(default: from --size, or the whole context of an --init or --resume model)",
    )
    model.add_argument("--dropout", type=float, default=0.0, help="dropout rate")
    model.add_argument(
        "--init",
        default=None,
        help="start from these weights: a GPT-2 name like gpt2, a .safetensors file or a checkpoint "
        "(default: random initialisation)",
    )

    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch, per process")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    train.add_argument(
        "--epochs", type=float, default=10.0, help="passes over the training windows (ignored with --max-steps)"
    )
    train.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps of the whole run (default: from --epochs)"
    )
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    train.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decay ends at this fraction of --lr")
    train.add_argument("--warmup-steps", type=int, default=None, help="steps of linear warm-up (default: 5%% of the steps)")
    train.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the weight matrices")
    train.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this value (0: no clipping)")
    train.add_argument("--seed", type=int, default=123, help="seed of the initial weights, data order, dropout and samples")

    run = p.add_argument_group("evaluation, checkpoints, devices")
    run.add_argument("--eval-interval", type=int, default=10, help="evaluate, sample and save latest.pt every N steps")
    run.add_argument(
        "--eval-iters", type=int, default=10, help="batches of --batch-size windows (per process) per split in an evaluation"
    )
    run.add_argument("--log-interval", type=int, default=5, help="print a progress line every N steps")
    run.add_argument("--prompt", default="Every effort moves you", help="the start of the sample printed at each evaluation")
    run.add_argument("--sample-tokens", type=int, default=30, help="tokens to generate for the sample")
    run.add_argument("--out-dir", default="runs/pretrain", help="folder for checkpoints, history and plot")
    run.add_argument("--resume", action="store_true", help="continue the run saved in --out-dir/latest.pt")
    run.add_argument("--stop-at-step", type=int, default=None,
                     help="save and exit after this step (and its evaluation) although the schedule runs on; "
                     "continue later with --resume (default: run to the end)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    run.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="autocast precision (auto: bfloat16 on GPUs that support it, else float32)",
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; a C++ compiler on CPU)")
    run.add_argument("--peak-flops", type=float, default=None,
                     help="peak FLOP/s of one device, for MFU where it is not known, e.g. 312e12 "
                     "(default: from a table of NVIDIA GPUs in bfloat16; no MFU elsewhere)")
    return p


def check_settings(args):
    """Raise ValueError naming the flag of the first setting out of range."""

    def given(names):
        return [name for name in names if getattr(args, name) is not None]

    at_least_1 = ["batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"]
    at_least_1 += given(["stride", "max_steps", "stop_at_step", "n_layers", "n_heads", "emb_dim", "context_length"])
    at_least_0 = ["grad_clip", "sample_tokens"] + given(["warmup_steps"])
    for low, names in ((1, at_least_1), (0, at_least_0)):
        for name in names:
            if getattr(args, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if not 0.0 < args.train_fraction < 1.0:
        raise ValueError(f"--train-fraction must be between 0 and 1, got {args.train_fraction}")
    if args.max_steps is None and not args.epochs > 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    if not args.lr > 0 or not 0.0 <= args.min_lr_ratio <= 1.0:
        raise ValueError(f"need --lr > 0 and 0 <= --min-lr-ratio <= 1, got {args.lr} and {args.min_lr_ratio}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.peak_flops is not None and not args.peak_flops > 0:
        raise ValueError(f"--peak-flops must be positive, got {args.peak_flops}")
    if args.init and given(["size", "n_layers", "n_heads", "emb_dim"]):
        raise ValueError("--init takes the model's shape from its weights: drop --size/--n-layers/--n-heads/--emb-dim")
    if given(["n_heads", "emb_dim"]) and not args.resume:  # a resumed model's shape is checked against latest.pt
        base = size_config(args.size)
        emb_dim, n_heads = args.emb_dim or base.emb_dim, args.n_heads or base.n_heads
        if emb_dim % n_heads:
            raise ValueError(f"--emb-dim {emb_dim} must be divisible by --n-heads {n_heads} (each head gets an equal share)")


# ----------------------------------------------------------------------------------------
# 1. Data: text files -> token file -> train/validation splits -> windows
# ----------------------------------------------------------------------------------------


def resolve_sources(data):
    """--data -> sorted list of text file Paths.

    A URL is downloaded once into <cache>/data/ (gpt.fetch_dataset); a folder gives the
    .txt files below it, in sorted order so that the token stream is reproducible.
    Raises FileNotFoundError for a missing path and ValueError for an empty file or a
    folder without non-empty .txt files.
    """
    if urlparse(data).scheme in ("http", "https"):
        name = Path(urlparse(data).path).name or "corpus.txt"
        return [gpt.fetch_dataset([data], name, flag="--data", **KNOWN_DOWNLOADS.get(data, {}))]
    path = Path(data)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*.txt") if f.is_file())
        if not files:
            raise ValueError(f"--data {data}: the folder holds no .txt files")
        files = [f for f in files if f.stat().st_size > 0]
        if not files:
            raise ValueError(f"--data {data}: every .txt file in the folder is empty")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"--data {data}: no such file or folder (give a text file, a folder of .txt files or a URL)")
    if path.stat().st_size == 0:
        raise ValueError(f"--data {data}: the file is empty")
    return [path]


def read_text_pieces(path, replace_invalid=False, chunk_bytes=1 << 20):
    """Yield the text of a UTF-8 file in pieces decoded from about chunk_bytes bytes each,
    so that a file larger than memory can be read.

    Raises ValueError with the byte offset of the first invalid UTF-8 sequence, unless
    replace_invalid, in which case such bytes become U+FFFD.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace" if replace_invalid else "strict")
    offset = 0  # bytes of the file handed to the decoder so far
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            held_back = len(decoder.getstate()[0])  # an incomplete character from the previous chunk
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: invalid UTF-8 at byte {offset - held_back + e.start} ({e.reason}); "
                    "fix the file or pass --replace-invalid-utf8"
                ) from None
            offset += len(chunk)
            yield text
            if not chunk:
                return


def safe_cut(text):
    """Index just after the last newline that has non-whitespace on both sides, or 0.

    GPT-2's pre-tokenizer always ends a word there (the newline is a token of its own and
    the next character starts a new one), so encoding text[:cut] and text[cut:] separately
    gives exactly the tokens of encoding the whole text.
    """
    cut = text.rfind("\n", 1, len(text) - 1)
    while cut > 0 and (text[cut - 1].isspace() or text[cut + 1].isspace()):
        cut = text.rfind("\n", 1, cut)
    return cut + 1 if cut > 0 else 0


def encode_pieces(pieces):
    """Token ids of a stream of text pieces: yields lists of ints whose concatenation
    equals encoding the joined text at once (cut only where `safe_cut` allows).
    "<|endoftext|>" in the text becomes the end-of-text token 50256."""
    enc = gpt.get_tokenizer()
    buffer = ""
    for piece in pieces:
        buffer += piece
        cut = safe_cut(buffer)
        if cut:
            yield enc.encode(buffer[:cut], allowed_special={"<|endoftext|>"})
            buffer = buffer[cut:]
    if buffer:
        yield enc.encode(buffer, allowed_special={"<|endoftext|>"})


def corpus_token_chunks(paths, replace_invalid=False, chunk_bytes=1 << 20):
    """Yield lists of token ids of all documents (files) in order, with the end-of-text
    token 50256 between documents, as GPT-2's training data separates them."""
    started = False
    for path in paths:
        document_started = False
        for ids in encode_pieces(read_text_pieces(path, replace_invalid, chunk_bytes)):
            if not ids:
                continue
            if started and not document_started:
                ids = [gpt.EOT_ID] + ids
            started = document_started = True
            yield ids


def write_token_file(paths, token_path, replace_invalid=False, chunk_bytes=1 << 20):
    """Tokenize the text files into token_path: the ids as uint16 (GPT-2's 50257 ids fit),
    native byte order, nothing else. Written to a temporary file and renamed, so an
    interrupted run leaves no half file. Returns the number of tokens."""
    token_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = token_path.with_name(f".{token_path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    n_tokens = 0
    try:
        with open(tmp, "wb") as f:
            for ids in corpus_token_chunks(paths, replace_invalid, chunk_bytes):
                f.write(array("H", ids).tobytes())
                n_tokens += len(ids)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, token_path)
    finally:
        tmp.unlink(missing_ok=True)
    return n_tokens


def prepare_token_file(paths, token_dir, replace_invalid=False, log=print):
    """(Path of the token file of the corpus, number of tokens), tokenizing only when needed.

    The file is reused while a JSON file beside it records the same sources with the same
    sizes and modification times. Raises ValueError when the text has no tokens.
    """
    sources = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    key = hashlib.sha256(json.dumps([[s[0] for s in sources], replace_invalid]).encode()).hexdigest()[:16]
    token_path = Path(token_dir) / f"{paths[0].stem}-{key}.uint16"
    meta_path = token_path.with_suffix(".json")
    meta = {"tokenizer": "gpt2", "dtype": "uint16", "replace_invalid_utf8": replace_invalid, "sources": sources}
    if meta_path.exists() and token_path.exists():
        saved = json.loads(meta_path.read_text())
        if {k: saved.get(k) for k in meta} == meta and token_path.stat().st_size == 2 * saved["n_tokens"]:
            log(f"token file: {token_path} ({saved['n_tokens']:,} tokens, reused)")
            return token_path, saved["n_tokens"]
    started = time.time()
    meta_path.unlink(missing_ok=True)  # the token file is about to change
    n_tokens = write_token_file(paths, token_path, replace_invalid)
    if n_tokens == 0:
        raise ValueError(f"--data: no tokens in {', '.join(str(p) for p in paths[:3])}")
    gpt.atomic_write_bytes(meta_path, json.dumps({**meta, "n_tokens": n_tokens}, indent=1).encode())
    megabytes = sum(s[1] for s in sources) / 1e6
    log(
        f"token file: {token_path} ({n_tokens:,} tokens from {len(paths)} file(s), {megabytes:.1f} MB, "
        f"in {gpt.format_duration(time.time() - started)})"
    )
    return token_path, n_tokens


def load_token_file(path, n_tokens):
    """Memory-map a token file -> int16 tensor [n_tokens] that reads the file on demand
    (no copy: a corpus larger than memory works). torch has no general uint16 type before
    2.3, so the ids above 32767 read as negative int16; `& 0xFFFF` in `get_batch` undoes it."""
    return torch.from_file(str(path), shared=False, size=n_tokens, dtype=torch.int16)


def split_tokens(tokens, train_fraction, context_length):
    """tokens [n] -> (train tokens [int(train_fraction * n)], validation tokens [the rest]).

    Raises ValueError when either split has fewer than context_length + 1 tokens (one
    window and its shifted target), saying which context length or split would work.
    """
    n = len(tokens)
    n_train = int(train_fraction * n)
    need = context_length + 1
    if min(n_train, n - n_train) < need:
        which, have = ("training", n_train) if n_train < need else ("validation", n - n_train)
        hints = []
        if min(n_train, n - n_train) >= 2:
            hints.append(f"--context-length {min(n_train, n - n_train) - 1} or less")
        low, high = math.ceil(100 * need / n) / 100, math.floor(100 * (n - need) / n) / 100
        if low <= high:
            hints.append(f"--train-fraction between {low:.2f} and {high:.2f}")
        hints.append("more text")
        raise ValueError(
            f"the {which} split has {have:,} tokens ({n:,} in all, --train-fraction {train_fraction}), fewer than "
            f"context length {context_length} + 1 = {need:,}; use " + ", or ".join(hints)
        )
    return tokens[:n_train], tokens[n_train:]


def count_windows(n_tokens, context_length, stride):
    """Number of training windows in n_tokens tokens: they start at 0, stride, 2 * stride, ...
    and each needs context_length + 1 tokens (the inputs, and the targets one further).
    E.g. 10 tokens, context 4, stride 2: starts 0, 2, 4 -> 3 windows."""
    if n_tokens < context_length + 1:
        return 0
    return (n_tokens - context_length - 1) // stride + 1


def get_batch(tokens, starts, context_length, device):
    """Windows of tokens -> (inputs, targets), LongTensors [len(starts), context_length].

    targets[b, t] = inputs[b, t + 1]: the model learns to predict each next token.
    """
    rows = torch.stack([tokens[s : s + context_length + 1] for s in starts]).long() & 0xFFFF  # uint16 ids
    if device.type == "cuda":
        rows = rows.pin_memory().to(device, non_blocking=True)  # copy overlaps with compute
    else:
        rows = rows.to(device)
    return rows[:, :-1], rows[:, 1:]


class WindowOrder:
    """The order in which the training windows are read: sample i of the run is window
    perm(i // n_windows)[i % n_windows], where perm(epoch) is a random permutation seeded
    by (seed, epoch). The data position is therefore one number, the samples seen, which
    a checkpoint stores and any process can turn into its share of any batch."""

    def __init__(self, n_windows, stride, seed):
        self.n_windows, self.stride, self.seed = n_windows, stride, seed
        self._epoch, self._perm = None, None

    def start(self, i):
        """Token position of the first token of sample i."""
        epoch = i // self.n_windows
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n_windows, generator=generator)
        return int(self._perm[i % self.n_windows]) * self.stride


def micro_batch_starts(order, samples_seen, micro_step, batch_size, rank=0, world_size=1):
    """Window starts of one process's micro-batch.

    An optimizer step reads batch_size * grad_accum * world_size consecutive samples from
    samples_seen on. Micro-step m of rank r takes samples samples_seen + (m * world_size
    + r) * batch_size + [0, batch_size): the ranks' micro-batches side by side are the
    micro-batch of one process with batch_size * world_size (rank-offset windows).
    """
    first = samples_seen + (micro_step * world_size + rank) * batch_size
    return [order.start(i) for i in range(first, first + batch_size)]


def evaluation_starts(n_tokens, context_length, max_windows):
    """Starts of up to max_windows non-overlapping windows spread evenly over a split:
    the same windows at every evaluation, so that the losses are comparable."""
    available = count_windows(n_tokens, context_length, context_length)
    k = min(available, max_windows)
    return [(j * available // k) * context_length for j in range(k)]


def unigram_baseline(train_tokens, val_tokens, vocab_size, max_tokens=100_000_000):
    """Cross-entropy (nats per token) of the validation tokens under the token frequencies
    of the training tokens, add-one smoothed: the loss of a model that ignores context.
    Counts at most the first max_tokens of each split, to stay quick on big corpora."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    train_tokens, val_tokens = train_tokens[:max_tokens], val_tokens[:max_tokens]
    step = 1 << 24
    for i in range(0, len(train_tokens), step):
        counts += torch.bincount(train_tokens[i : i + step].long() & 0xFFFF, minlength=vocab_size)
    log_probs = ((counts + 1) / (counts.sum() + vocab_size)).log()
    total = sum(log_probs[val_tokens[i : i + step].long() & 0xFFFF].sum().item() for i in range(0, len(val_tokens), step))
    return -total / len(val_tokens)


# ----------------------------------------------------------------------------------------
# 2. Model
# ----------------------------------------------------------------------------------------


def size_config(size):
    """GPTConfig of --size, or of the small DEFAULT_SHAPE when it is None."""
    return gpt.GPT_CONFIGS[size] if size else gpt.GPTConfig(**DEFAULT_SHAPE)


def model_config(args):
    """GPTConfig of a new model: --size (or the small DEFAULT_SHAPE), then the shape flags."""
    base = size_config(args.size)
    shape = {k: getattr(args, k) for k in DEFAULT_SHAPE if getattr(args, k) is not None}
    return dataclasses.replace(base, drop_rate=args.dropout, **shape)


def build_model(args, checkpoint=None):
    """The GPTModel to train, in float32 on the CPU, in training mode: from a --resume
    checkpoint, from --init weights (with this run's dropout), or new with random weights
    (GPT-2's initialisation, seeded by --seed)."""
    if checkpoint is not None:
        model = gpt.model_from_checkpoint(checkpoint)
    elif args.init:
        loaded = gpt.load_gpt2(args.init)
        model = gpt.GPTModel(dataclasses.replace(loaded.cfg, drop_rate=args.dropout))
        model.load_state_dict(loaded.state_dict())
    else:
        torch.manual_seed(args.seed)
        model = gpt.GPTModel(model_config(args))
    return model.train()


# ----------------------------------------------------------------------------------------
# 3. Optimizer and learning-rate schedule
# ----------------------------------------------------------------------------------------


def configure_optimizer(model, lr, weight_decay, fused=False):
    """AdamW with weight decay on the weight matrices and embeddings (parameters with two
    or more dimensions) only; biases and LayerNorm scales and shifts are not decayed, as
    in nanoGPT's configure_optimizers. betas (0.9, 0.95) as in GPT-3 (Brown et al., 2020,
    appendix B). fused: one CUDA kernel for the whole update."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def cosine_with_warmup(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    """Learning rate of optimizer step `step` (0-based): a linear warm-up to max_lr over
    warmup_steps, then a cosine decay to min_lr_ratio * max_lr at total_steps (Loshchilov
    and Hutter, 2017, "SGDR"; the GPT-3 recipe decays to 10%)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    min_lr = min_lr_ratio * max_lr
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------
# 4. Devices, precision, several processes
# ----------------------------------------------------------------------------------------


def setup_distributed(device_name):
    """(rank, local_rank, world_size, device). Under torchrun (RANK and WORLD_SIZE in the
    environment) this joins the process group: NCCL between GPUs, one GPU per process
    (cuda:LOCAL_RANK), or Gloo between CPU processes. Otherwise one process, rank 0."""
    device = gpt.pick_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 0, 1, device
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "mps":
        raise ValueError("torchrun with MPS is not supported: use --device cpu")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, local_rank, world_size, device


def autocast_context(device, dtype_name):
    """(autocast context, dtype name): bfloat16 autocast where asked for (auto: on CUDA
    GPUs that support it), else a no-op context and float32. The weights, gradients
    and optimizer state stay float32 either way."""
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype_name == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16), dtype_name
    return nullcontext(), dtype_name


# Dense bfloat16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets; the first name found
# in torch.cuda.get_device_name() wins, so the PCIe H100 comes before the SXM one.
GPU_PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device, dtype_name, given=None):
    """Peak FLOP/s of one device for MFU: --peak-flops if given, else the table entry for a
    CUDA GPU training in bfloat16, else None (CPUs: no reliable number, so no MFU)."""
    if given:
        return given
    if device.type != "cuda" or dtype_name != "bfloat16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in GPU_PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(model, seq_len):
    """Training FLOPs per token: 6 N for the forward and backward matrix multiplications
    of N weights (the tied output head included, the position lookup not) plus
    12 * n_layers * emb_dim * seq_len for attention (PaLM, Chowdhery et al., 2022, app. B)."""
    cfg = model.cfg
    n_params = gpt.count_parameters(model) - model.wpe.weight.numel()
    return 6 * n_params + 12 * cfg.n_layers * cfg.emb_dim * seq_len


# ----------------------------------------------------------------------------------------
# 5. Training and evaluation
# ----------------------------------------------------------------------------------------


def train_step(model, optimizer, micro_batches, autocast=None, grad_clip=1.0):
    """One optimizer step with gradient accumulation: for each (inputs, targets) pair of
    LongTensors [batch, seq_len] in micro_batches, forward, cross-entropy / number of
    micro-batches, backward; then clip the gradient norm and step. Under DDP the
    gradients are all-reduced only in the last backward pass (no_sync before it).
    Returns (mean loss, gradient norm before clipping), 0-dim tensors on the device."""
    n = len(micro_batches)
    total_loss = 0.0
    for i, (inputs, targets) in enumerate(micro_batches):
        skip_sync = isinstance(model, DistributedDataParallel) and i < n - 1
        with model.no_sync() if skip_sync else nullcontext(), autocast or nullcontext():
            logits = model(inputs)  # [batch, seq_len, vocab_size]
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) / n
            loss.backward()
        total_loss += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss, norm


@torch.no_grad()
def evaluate_loss(model, tokens, starts, context_length, batch_size, device, autocast=None, rank=0, world_size=1):
    """Mean cross-entropy (nats per token) of the windows of context_length tokens at
    `starts`. With several processes each takes every world_size-th window and the sums
    are all-reduced, so every process returns the same number."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, tokens]
    mine = starts[rank::world_size]
    for i in range(0, len(mine), batch_size):
        inputs, targets = get_batch(tokens, mine[i : i + batch_size], context_length, device)
        with autocast or nullcontext():
            logits = model(inputs)
        total[0] += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").double()
        total[1] += targets.numel()
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def sample_text(model, prompt, max_new_tokens, seed, device):
    """The prompt and a continuation of it (temperature 0.8, top-k 50, seeded: successive
    evaluations differ only through training). An empty prompt starts from <|endoftext|>."""
    idx = gpt.text_to_token_ids(prompt, device=device) if prompt else torch.tensor([[gpt.EOT_ID]], device=device)
    out = gpt.generate(model, idx, max_new_tokens, temperature=0.8, top_k=50, seed=seed)
    return gpt.token_ids_to_text(out[0, (0 if prompt else 1) :])


# ----------------------------------------------------------------------------------------
# 6. Checkpoints and stopping
# ----------------------------------------------------------------------------------------


def rng_states(world_size):
    """Every process's random number generator states ({"cpu": ..., "cuda": ...}), gathered
    from all processes, for --resume to restore dropout masks exactly."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def save_training_state(path, model, optimizer, rank, world_size, **state):
    """Write the full training state to path (rank 0; every process must call this because
    the RNG states are gathered): model and config, optimizer moments, the RNG states and
    the loop's counters in `state` (step, samples_seen, best_val_loss, history, ...)."""
    states = rng_states(world_size)
    if rank == 0:
        gpt.save_checkpoint(path, model, optimizer=optimizer.state_dict(), rng_states=states, **state)


def restore_training_state(checkpoint, optimizer, rank, world_size, device):
    """Load the optimizer moments and this process's RNG states from a latest.pt checkpoint
    (reseeding instead when the checkpoint was saved by another number of processes)."""
    fused = optimizer.defaults.get("fused")
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:
        group["fused"] = fused  # the saved flag belongs to the device the run was saved on
    states = checkpoint["rng_states"]
    if len(states) != world_size:
        if rank == 0:
            print(f"note: the checkpoint has RNG states of {len(states)} processes, this run has {world_size}: reseeding")
        torch.manual_seed(checkpoint["settings"]["seed"] + rank + checkpoint["step"])
        return
    torch.set_rng_state(states[rank]["cpu"])
    if "cuda" in states[rank] and device.type == "cuda":
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


def check_resume_checkpoint(args, checkpoint, path):
    """Raise ValueError when latest.pt is not a pretrain.py training state or its model
    disagrees with a shape flag given on the command line."""
    missing = [k for k in ("optimizer", "step", "samples_seen", "rng_states", "settings") if k not in checkpoint]
    if missing:
        raise ValueError(f"--resume: {path} is not a training state of pretrain.py (no {', '.join(missing)})")
    for name in ("n_layers", "n_heads", "emb_dim"):
        if getattr(args, name) is not None and getattr(args, name) != checkpoint["config"][name]:
            raise ValueError(
                f"--resume: the model in {path} has {name} {checkpoint['config'][name]}, not "
                f"--{name.replace('_', '-')} {getattr(args, name)}; drop the flag or use another --out-dir"
            )


class StopSignal:
    """While active, Ctrl-C (SIGINT) and SIGTERM ask training to stop after the current
    step, so that it can save a checkpoint, instead of killing it. A second Ctrl-C stops at
    once in a single process; under torchrun the launcher forwards the signal it receives,
    so repeats are expected and ignored (torchrun kills the workers after 30 s)."""

    def __init__(self, single_process=True):
        self.requested, self.signal_name = False, None
        self.single_process = single_process
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and self.single_process and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signal_name = True, signal.Signals(signum).name


def plot_history(path, history, unigram_loss):
    """loss.png: train and validation loss of each evaluation against tokens seen, with
    the unigram baseline as a flat line. Returns the path, or None without matplotlib."""
    tokens = [h["tokens"] for h in history]
    series = {
        "train": (tokens, [h["train_loss"] for h in history]),
        "validation": (tokens, [h["val_loss"] for h in history]),
        "unigram baseline": ([tokens[0], tokens[-1]], [unigram_loss, unigram_loss]),
    }
    return gpt.plot_curves(path, {"loss (nats per token)": series}, xlabel="tokens seen")


# ----------------------------------------------------------------------------------------
# 7. The run
# ----------------------------------------------------------------------------------------


def pretrain(args):
    """Run the stage with parsed settings. Returns a summary dict: steps, tokens_seen,
    train_loss, val_loss, best_val_loss, unigram_loss, latest, best, stopped (None, or
    "stop-at-step" / the signal's name when the run stopped early)."""
    check_settings(args)
    rank, local_rank, world_size, device = setup_distributed(args.device)
    try:
        return train_and_evaluate(args, rank, local_rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train_and_evaluate(args, rank, local_rank, world_size, device):
    """The body of `pretrain` once the processes are set up: data, model, optimizer, loop."""
    log = print if rank == 0 else (lambda *a, **k: None)
    if device.type == "cpu" and args.dtype == "bfloat16":  # CPUs without bfloat16 matrix units emulate it
        log("warning: --dtype bfloat16 is usually much slower than float32 on CPUs; --dtype auto picks float32 there")
    out_dir = Path(args.out_dir)
    latest_path, best_path = out_dir / "latest.pt", out_dir / "best.pt"
    checkpoint = None
    if args.resume:
        if not latest_path.exists():
            raise FileNotFoundError(
                f"--resume: no checkpoint {latest_path}; run without --resume or set --out-dir to the run's folder"
            )
        checkpoint = gpt.load_checkpoint(latest_path)
        check_resume_checkpoint(args, checkpoint, latest_path)
    elif latest_path.exists():
        log(f"note: {out_dir} holds an earlier run; this new run replaces its checkpoints (--resume continues it instead)")

    # Data. Local rank 0 downloads and tokenizes; the other processes wait, then reuse its file.
    if world_size > 1 and local_rank != 0:
        dist.barrier()
    token_dir = Path(args.token_dir) if args.token_dir else gpt.cache_dir() / "tokens"
    token_path, n_tokens = prepare_token_file(resolve_sources(args.data), token_dir, args.replace_invalid_utf8, log)
    if world_size > 1 and local_rank == 0:
        dist.barrier()
    model = build_model(args, checkpoint)
    cfg = model.cfg
    context_length = args.context_length or cfg.context_length
    if context_length > cfg.context_length:
        raise ValueError(f"--context-length {context_length} is longer than the model's context length {cfg.context_length}")
    stride = args.stride or context_length
    train_tokens, val_tokens = split_tokens(load_token_file(token_path, n_tokens), args.train_fraction, context_length)
    n_windows = count_windows(len(train_tokens), context_length, stride)
    order = WindowOrder(n_windows, stride, args.seed)
    global_batch = args.batch_size * args.grad_accum * world_size
    total_steps = args.max_steps or math.ceil(args.epochs * n_windows / global_batch)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else round(0.05 * total_steps)
    eval_windows = args.eval_iters * args.batch_size * world_size
    train_eval_starts = evaluation_starts(len(train_tokens), context_length, eval_windows)
    val_eval_starts = evaluation_starts(len(val_tokens), context_length, eval_windows)
    unigram_loss = unigram_baseline(train_tokens, val_tokens, cfg.vocab_size)
    log(
        f"data: {n_tokens:,} tokens = {len(train_tokens):,} training + {len(val_tokens):,} validation; "
        f"{n_windows:,} training windows of {context_length} tokens, stride {stride}"
    )

    # Model, precision, optimizer, and the state of a resumed run.
    model.to(device)
    autocast, dtype_name = autocast_context(device, args.dtype)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for the float32 matmuls
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, fused=device.type == "cuda")
    step, samples_seen, best_val_loss, history = 0, 0, float("inf"), []
    if checkpoint is not None:
        restore_training_state(checkpoint, optimizer, rank, world_size, device)
        step, samples_seen = checkpoint["step"], checkpoint["samples_seen"]
        best_val_loss, history = checkpoint["best_val_loss"], checkpoint["history"]
        if step >= total_steps:
            raise ValueError(
                f"--resume: the run in {out_dir} already made {step} of {total_steps} steps; raise --max-steps or --epochs to go on"
            )
        log(f"resumed from {latest_path} at step {step} ({samples_seen * context_length:,} tokens seen)")
    else:
        torch.manual_seed(args.seed + rank)  # dropout masks differ between processes
    compiled = torch.compile(model) if args.compile else model
    train_model = compiled
    if world_size > 1:
        train_model = DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None)
    peak = peak_flops(device, dtype_name, args.peak_flops)
    flops_token = flops_per_token(model, context_length)
    log(
        f"model: {gpt.count_parameters(model) / 1e6:.1f}M parameters ({cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"width {cfg.emb_dim}, context {cfg.context_length}); {device}, {dtype_name}, {world_size} process(es)"
    )
    log(
        f"training: {total_steps} steps of {global_batch} windows ({global_batch * context_length:,} tokens) = "
        f"{total_steps * global_batch / n_windows:.2f} epochs; lr {args.lr:g}, {warmup_steps} warm-up steps, "
        f"cosine decay to {args.min_lr_ratio * args.lr:g}"
    )
    log(
        f"unigram baseline: validation loss {unigram_loss:.3f} (perplexity {math.exp(unigram_loss):,.0f}) "
        "for a model that ignores context"
    )

    def evaluate(lr):
        """Losses on both splits, a history entry, a sample, and best.pt when validation improved."""
        nonlocal best_val_loss
        losses = [
            evaluate_loss(compiled, split, starts, context_length, args.batch_size, device, autocast, rank, world_size)
            for split, starts in ((train_tokens, train_eval_starts), (val_tokens, val_eval_starts))
        ]
        if not all(math.isfinite(x) for x in losses):
            raise RuntimeError(
                f"the loss became {losses} at step {step}: training diverged; lower --lr or raise --warmup-steps"
            )
        history.append(
            {"step": step, "tokens": samples_seen * context_length, "lr": lr, "train_loss": losses[0], "val_loss": losses[1]}
        )
        improved = step > 0 and losses[1] < best_val_loss  # the random start is never "best"
        best_val_loss = min(best_val_loss, losses[1]) if step > 0 else best_val_loss
        log(
            f"eval step {step} | train loss {losses[0]:.3f} (ppl {math.exp(losses[0]):,.1f}) | "
            f"val loss {losses[1]:.3f} (ppl {math.exp(losses[1]):,.1f})" + (" | best so far" if improved else "")
        )
        if rank == 0:
            log(
                "  sample: "
                + sample_text(model, args.prompt, args.sample_tokens, args.seed, device).replace("\n", "\n          ")
            )
            if improved:
                gpt.save_checkpoint(
                    best_path, model, step=step, tokens_seen=samples_seen * context_length, val_loss=losses[1]
                )
            gpt.atomic_write_bytes(
                out_dir / "history.json",
                json.dumps({"unigram_loss": unigram_loss, "evaluations": history}, indent=1).encode(),
            )

    def save_latest():
        save_training_state(
            latest_path,
            model,
            optimizer,
            rank,
            world_size,
            step=step,
            samples_seen=samples_seen,
            total_steps=total_steps,
            best_val_loss=best_val_loss,
            history=history,
            settings=vars(args),
        )

    # The loop: one optimizer step per iteration; evaluate and save every --eval-interval steps.
    stopper, stopped = StopSignal(single_process=world_size == 1), None
    with stopper:
        if step == 0:
            evaluate(cosine_with_warmup(0, args.lr, warmup_steps, total_steps, args.min_lr_ratio))
        started, first_step = time.time(), step
        interval_start, interval_step, eval_seconds = time.time(), step, 0.0
        while step < total_steps and not stopped:
            lr = cosine_with_warmup(step, args.lr, warmup_steps, total_steps, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [
                get_batch(
                    train_tokens,
                    micro_batch_starts(order, samples_seen, m, args.batch_size, rank, world_size),
                    context_length,
                    device,
                )
                for m in range(args.grad_accum)
            ]
            loss, norm = train_step(train_model, optimizer, micro_batches, autocast, args.grad_clip)
            step, samples_seen = step + 1, samples_seen + global_batch

            if step % args.log_interval == 0 or step == total_steps:
                loss_value = loss.item()  # waits for the GPU: only on logging steps
                if not math.isfinite(loss_value):
                    raise RuntimeError(
                        f"the loss became {loss_value} at step {step} (lr {lr:.2e}): training diverged; lower --lr or raise --warmup-steps"
                    )
                seconds = time.time() - interval_start - eval_seconds
                tokens_per_s = (step - interval_step) * global_batch * context_length / max(seconds, 1e-9)
                mfu = f" | MFU {100 * flops_token * tokens_per_s / (peak * world_size):.1f}%" if peak else ""
                eta = (time.time() - started) / (step - first_step) * (total_steps - step)
                log(
                    f"step {step:>{len(str(total_steps))}}/{total_steps} | loss {loss_value:.3f} | lr {lr:.2e} | "
                    f"grad norm {norm.item():.2f} | {tokens_per_s:,.0f} tok/s{mfu} | ETA {gpt.format_duration(eta)}"
                )
                interval_start, interval_step, eval_seconds = time.time(), step, 0.0

            evaluation_step = step % args.eval_interval == 0 or step == total_steps
            if evaluation_step:
                eval_started = time.time()
                evaluate(lr)
                save_latest()
                eval_seconds += time.time() - eval_started

            # A stop comes after the step's evaluation, so that --resume continues exactly
            # where an uninterrupted run would be.
            stop_now = stopper.requested or (args.stop_at_step is not None and step >= args.stop_at_step)
            if world_size > 1:  # every process must stop at the same step
                flag = torch.tensor(float(stop_now), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = bool(flag.item())
            if stop_now and step < total_steps:
                stopped = stopper.signal_name or "stop-at-step"
                if not evaluation_step:  # an evaluation step has just saved it
                    save_latest()
                log(f"stopped at step {step} ({stopped}): saved {latest_path}; continue with the same command and --resume")

    if rank == 0 and history:
        plot_history(out_dir / "loss.png", history, unigram_loss)
    last = history[-1] if history else {}
    if not stopped:
        log(
            f"done: {step} steps, {samples_seen * context_length:,} tokens; validation loss {last['val_loss']:.3f} "
            f"(best {best_val_loss:.3f}, unigram baseline {unigram_loss:.3f})"
        )
        log(f"try the model: python load_gpt2.py --model {best_path}")
    return {
        "steps": step,
        "tokens_seen": samples_seen * context_length,
        "train_loss": last.get("train_loss"),
        "val_loss": last.get("val_loss"),
        "best_val_loss": best_val_loss,
        "unigram_loss": unigram_loss,
        "latest": latest_path,
        "best": best_path,
        "stopped": stopped,
    }


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        result = pretrain(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted (no checkpoint written since the last evaluation)")
    if result["stopped"] in ("SIGINT", "SIGTERM"):
        sys.exit(128 + signal.Signals[result["stopped"]])  # the shell's code for "killed by this signal"
    return result


if __name__ == "__main__":
    main()
