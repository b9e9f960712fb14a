"""pretrain.py: pretrain a GPT on plain text by next-token prediction.

The "pretrain" stage of the GPT-2 lifecycle. With no flag it trains a small GPT from
random initialisation on "The Verdict" (Edith Wharton, public domain, the short story of
chapter 5 of "Build a Large Language Model (From Scratch)"), downloaded once, on the CPU
in a few minutes:

    python pretrain.py
    python pretrain.py --data tinyshakespeare.txt --emb-dim 128 --max-steps 240 --lr 3e-3 --eval-every 40
    python pretrain.py --data corpus/ --size gpt2 --batch-size 16 --grad-accum 32
    python pretrain.py --model gpt2 --data my_notes/         # continue from released weights
    torchrun --nproc_per_node 8 pretrain.py --data corpus/ --size gpt2   # several GPUs
    python pretrain.py --resume                              # continue the run in runs/pretrain/ as it was
    python pretrain.py --resume --max-steps 2000             # ... and extend it

The story, top to bottom: the text is tokenized once into a memory-mapped token file,
split into training and validation tokens and cut into input/target windows; a GPT is
built (or loaded); one loop trains it with AdamW, warm-up and cosine decay, gradient
accumulation (and DistributedDataParallel under torchrun), and every --eval-every steps
measures the train and validation losses, prints a sample and saves. Ctrl-C (or
SIGTERM) finishes the current step, saves and exits; --resume continues exactly.

Writes to --out-dir (default runs/pretrain/; a folder that holds another run is refused
unless --resume continues it or --overwrite replaces it):
    run.json      the settings and the data's fingerprint (a few KB)
    latest.pt     the training state: model, AdamW moments, step, data position, RNG
                  (12 bytes per parameter: 196 MB for the default model, 1.5 GB for --size gpt2)
    best.pt       the model with the lowest validation loss (4 bytes per parameter: 65 MB, 500 MB),
                  for load_gpt2.py / finetune_classify.py / finetune_instruct.py --model runs/pretrain/best.pt
    history.json  the evaluations: step, tokens seen, learning rate, train and validation loss
    loss.png      train and validation loss against tokens seen (needs matplotlib)
The token file of a corpus (2 bytes per token) goes to <--cache-dir>/tokens/ and is
reused while the text files are unchanged.
"""

import argparse
import codecs
import collections
import dataclasses
import hashlib
import io
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

# The default model: 4 layers of width 256 (16M parameters, 13M of them the token
# embedding) and 128-token windows. It trains at several hundred tokens/s on two CPU
# cores, and 128 + 1 tokens fit in the 515-token validation split of The Verdict.
DEFAULT_SHAPE = {"n_layers": 4, "n_heads": 4, "emb_dim": 256, "context_length": 128}


def log(*parts):
    """print, in the first process only (under torchrun every process runs this script)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*parts, flush=True)


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
        return [gpt.fetch_dataset([data], name, flag="--data")]
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
        raise FileNotFoundError(
            f"--data {data}: no such file or folder (give a text file, a folder of .txt files or a URL)"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"--data {data}: the file is empty")
    return [path]


def read_text_pieces(f, replace_invalid=False, chunk_bytes=1 << 20):
    """Yield the text of a UTF-8 file, open in binary mode as f, in pieces decoded from
    chunk_bytes bytes each, so that a file larger than memory can be read. Line endings
    become "\\n" whatever they were ("\\r\\n" of Windows, "\\r"), also where a chunk ends
    between "\\r" and "\\n"; a leading byte-order mark is dropped.

    Raises ValueError with the byte offset of the first invalid UTF-8 sequence, unless
    replace_invalid, in which case such bytes become U+FFFD.
    """
    utf8 = codecs.getincrementaldecoder("utf-8")("replace" if replace_invalid else "strict")
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True)  # holds back a final "\r"
    if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
        f.seek(0)
    offset = f.tell()  # bytes of the file handed to the decoder so far
    while True:
        chunk = f.read(chunk_bytes)
        held_back = len(utf8.getstate()[0])  # an incomplete character from the previous chunk
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{f.name}: invalid UTF-8 at byte {offset - held_back + e.start} ({e.reason}); "
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


def write_token_file(paths, token_path, replace_invalid=False, chunk_bytes=1 << 20):
    """Tokenize the text files (documents) into token_path, with the end-of-text token
    50256 between documents, as GPT-2's training data separates them. The file holds the
    ids as uint16 (GPT-2's 50257 ids fit), native byte order, nothing else. It is written
    to a temporary file and renamed, so an interrupted run leaves no half file (Ctrl-C
    here exits 130). Returns (number of tokens, SHA-256 of the file: the data's fingerprint).
    """
    token_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = token_path.with_name(f".{token_path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    total_bytes, done_bytes = sum(p.stat().st_size for p in paths), 0
    digest, n_tokens, started = hashlib.sha256(), 0, time.time()
    try:
        with open(tmp, "wb") as out:
            for path in paths:
                separator = [gpt.EOT_ID] if n_tokens else []  # between documents, not before the first
                with open(path, "rb") as f:
                    for ids in encode_pieces(read_text_pieces(f, replace_invalid, chunk_bytes)):
                        if ids and separator:
                            ids, separator = separator + ids, []
                        data = array("H", ids).tobytes()
                        out.write(data)
                        digest.update(data)
                        n_tokens += len(ids)
                        done = done_bytes + f.tell()
                        gpt.show_progress(
                            f"tokenizing: {done / 1e6:,.1f} of {total_bytes / 1e6:,.1f} MB, {n_tokens:,} tokens, "
                            f"ETA {gpt.eta(started, done, total_bytes)}"
                        )
                done_bytes += path.stat().st_size
            out.flush()
            os.fsync(out.fileno())
        gpt.end_progress()
        os.replace(tmp, token_path)
    except KeyboardInterrupt:
        gpt.end_progress()
        print("interrupted while tokenizing: the partial token file is deleted, no run file written", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        tmp.unlink(missing_ok=True)
    return n_tokens, digest.hexdigest()


def prepare_token_file(paths, token_dir, replace_invalid=False):
    """(Path of the token file of the corpus, number of tokens, its SHA-256), tokenizing
    only when needed: the file is reused while a JSON file beside it records the same
    sources with the same sizes and modification times. Raises ValueError when the text
    has no tokens.
    """
    sources = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    key = hashlib.sha256(json.dumps([[s[0] for s in sources], replace_invalid]).encode()).hexdigest()[:16]
    token_path = Path(token_dir) / f"{paths[0].stem}-{key}.uint16"
    meta_path = token_path.with_suffix(".json")
    meta = {"tokenizer": "gpt2", "dtype": "uint16", "replace_invalid_utf8": replace_invalid, "sources": sources}
    try:
        saved = json.loads(meta_path.read_text())
    except (OSError, ValueError):  # not tokenized yet, or an unreadable record: tokenize
        saved = {}
    if {k: saved.get(k) for k in meta} == meta and token_path.is_file() and "sha256" in saved:
        if token_path.stat().st_size == 2 * saved["n_tokens"]:
            log(f"token file: {token_path} ({saved['n_tokens']:,} tokens, reused)")
            return token_path, saved["n_tokens"], saved["sha256"]
    started = time.time()
    meta_path.unlink(missing_ok=True)  # the token file is about to change
    n_tokens, sha256 = write_token_file(paths, token_path, replace_invalid)
    if n_tokens == 0:
        raise ValueError(f"--data: no tokens in {', '.join(str(p) for p in paths[:3])}")
    gpt.write_json(meta_path, {**meta, "n_tokens": n_tokens, "sha256": sha256})
    megabytes = sum(s[1] for s in sources) / 1e6
    log(
        f"token file: {token_path} ({n_tokens:,} tokens from {len(paths)} file(s), {megabytes:.1f} MB, "
        f"in {gpt.format_duration(time.time() - started)})"
    )
    return token_path, n_tokens, sha256


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
    total = sum(
        log_probs[val_tokens[i : i + step].long() & 0xFFFF].sum().item() for i in range(0, len(val_tokens), step)
    )
    return -total / len(val_tokens)


@dataclasses.dataclass
class Splits:
    """The token splits and the windows that training and evaluation read from them."""

    train: torch.Tensor  # int16 [n_train], uint16 ids (see load_token_file)
    val: torch.Tensor  # int16 [n_val]
    context_length: int  # tokens per window
    order: WindowOrder  # the training window of each sample of the run
    n_windows: int  # training windows in one epoch
    eval_starts: dict  # {"train": starts, "val": starts}: the same windows at every evaluation
    unigram_loss: float  # validation loss of a model that ignores context, nats per token


def make_splits(token_path, n_tokens, args, cfg, world_size=1):
    """The Splits of a token file for a model of config cfg and the settings args
    (context length, stride, train fraction, evaluation batches, seed)."""
    context_length = args.context_length or cfg.context_length
    if context_length > cfg.context_length:
        raise ValueError(
            f"--context-length {context_length} is longer than the model's context length {cfg.context_length}"
        )
    stride = args.stride or context_length
    train, val = split_tokens(load_token_file(token_path, n_tokens), args.train_fraction, context_length)
    n_windows = count_windows(len(train), context_length, stride)
    eval_windows = args.eval_batches * args.batch_size * world_size
    eval_starts = {
        name: evaluation_starts(len(split), context_length, eval_windows)
        for name, split in [("train", train), ("val", val)]
    }
    log(
        f"data: {n_tokens:,} tokens = {len(train):,} training + {len(val):,} validation; "
        f"{n_windows:,} training windows of {context_length} tokens, stride {stride}"
    )
    order = WindowOrder(n_windows, stride, args.seed)
    return Splits(
        train, val, context_length, order, n_windows, eval_starts, unigram_baseline(train, val, cfg.vocab_size)
    )


# ----------------------------------------------------------------------------------------
# 2. Model
# ----------------------------------------------------------------------------------------


def size_config(size):
    """GPTConfig of --size, or of the small DEFAULT_SHAPE when it is None."""
    return gpt.GPT_CONFIGS[size] if size else gpt.GPTConfig(**DEFAULT_SHAPE)


def build_model(args, checkpoint=None):
    """The GPTModel to train, in float32 on the CPU, in training mode: from a --resume
    checkpoint, from --model weights (with this run's --drop-rate), or new with random
    weights (GPT-2's initialisation, seeded by --seed) of --size and the shape flags.
    Raises ValueError when a --model's vocabulary is smaller than the GPT-2 tokenizer's."""
    if checkpoint is not None:
        return gpt.model_from_checkpoint(checkpoint).train()
    if args.model:
        loaded = gpt.load_gpt2(args.model)
        if loaded.cfg.vocab_size < gpt.get_tokenizer().n_vocab:
            raise ValueError(
                f"--model {args.model} has a vocabulary of {loaded.cfg.vocab_size} tokens, but the GPT-2 tokenizer "
                f"has {gpt.get_tokenizer().n_vocab}: give a model made for the GPT-2 tokenizer"
            )
        model = gpt.GPTModel(dataclasses.replace(loaded.cfg, drop_rate=args.drop_rate))
        model.load_state_dict(loaded.state_dict())
        return model.train()
    torch.manual_seed(args.seed)
    shape = {name: getattr(args, name) for name in DEFAULT_SHAPE if getattr(args, name) is not None}
    return gpt.GPTModel(dataclasses.replace(size_config(args.size), drop_rate=args.drop_rate, **shape)).train()


# ----------------------------------------------------------------------------------------
# 3. Learning-rate schedule (the optimizer: gpt.make_adamw with GPT-3's betas, in pretrain)
# ----------------------------------------------------------------------------------------


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
# 4. Training and evaluation
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(model, splits, split, batch_size, autocast, proc):
    """Mean cross-entropy (nats per token) of the evaluation windows of a split ("train"
    or "val"). With several processes each takes every world_size-th window and the sums
    are all-reduced, so every process returns the same number."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=proc.device)  # [sum of losses, tokens]
    mine = splits.eval_starts[split][proc.rank :: proc.world_size]
    for i in range(0, len(mine), batch_size):
        inputs, targets = get_batch(
            getattr(splits, split), mine[i : i + batch_size], splits.context_length, proc.device
        )
        with autocast:
            logits = model(inputs)  # [batch, seq_len, vocab_size]
        total[0] += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").double()
        total[1] += targets.numel()
    if proc.world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def sample_text(model, prompt, max_new_tokens, seed, device):
    """The prompt and a continuation of it (temperature 0.8, top-k 50, seeded: successive
    evaluations differ only through training). An empty prompt starts from <|endoftext|>."""
    idx = gpt.text_to_token_ids(prompt, device=device) if prompt else torch.tensor([[gpt.EOT_ID]], device=device)
    out = gpt.generate(model, idx, max_new_tokens, temperature=0.8, top_k=50, seed=seed)
    return gpt.token_ids_to_text(out[0, (0 if prompt else 1) :])


def train(args, model, optimizer, splits, proc, state):
    """The training loop, from optimizer step state["step"] to state["total_steps"].

    Each step reads --grad-accum micro-batches of --batch-size windows per process.
    Every --eval-every steps, at the start and at the end, the loop measures both
    losses, prints a sample and saves best.pt (when validation improved), history.json
    and latest.pt. A stop (Ctrl-C, SIGTERM, --stop-at-step) comes after the step's
    evaluation and saves latest.pt, so that --resume continues exactly where an
    uninterrupted run would be. Updates state in place; returns None at the end of the
    schedule, else "stop-at-step" or the signal's name.
    """
    out_dir, history, total_steps = Path(args.out_dir), state["history"], state["total_steps"]
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else round(0.05 * total_steps)
    global_batch = args.batch_size * args.grad_accum * proc.world_size
    autocast, dtype_name = autocast_context(proc.device, args.dtype)
    compiled = torch.compile(model) if args.compile else model
    train_model = wrap_for_processes(compiled, proc)
    peak = peak_flops(proc.device, dtype_name, args.peak_flops)  # None: no MFU
    flops_token = flops_per_token(model, splits.context_length)
    started, first_step = time.time(), state["step"]
    interval_start, interval_step = started, first_step
    with StopSignal(single_process=proc.world_size == 1) as stopper:
        while True:
            step = state["step"]
            lr = cosine_with_warmup(step, args.lr, warmup_steps, total_steps, args.min_lr_ratio)
            # Evaluate, sample and save (unless this step was evaluated before a --resume).
            evaluation_step = step % args.eval_every == 0 or step == total_steps
            if evaluation_step and not (history and history[-1]["step"] == step):
                eval_started = time.time()
                train_loss, val_loss = [
                    evaluate_loss(compiled, splits, name, args.batch_size, autocast, proc) for name in ("train", "val")
                ]
                gpt.check_finite_loss(train_loss + val_loss, step)  # NaN or infinity in either
                improved = step > 0 and val_loss < state["best_val_loss"]  # the random start is never "best"
                state["best_val_loss"] = val_loss if improved else state["best_val_loss"]
                tokens = state["samples_seen"] * splits.context_length
                history.append(
                    {"step": step, "tokens": tokens, "lr": lr, "train_loss": train_loss, "val_loss": val_loss}
                )
                log(
                    f"eval step {step} | train loss {train_loss:.3f} (ppl {math.exp(train_loss):,.1f}) | "
                    f"val loss {val_loss:.3f} (ppl {math.exp(val_loss):,.1f})" + (" | best so far" if improved else "")
                )
                if proc.rank == 0:
                    sample = sample_text(model, args.prompt, args.sample_tokens, args.seed, proc.device)
                    log("  sample: " + sample.replace("\n", "\n          "))
                    if improved:
                        save_model(out_dir / "best.pt", model, step=step, tokens_seen=tokens, val_loss=val_loss)
                    gpt.write_json(
                        out_dir / "history.json", {"unigram_loss": splits.unigram_loss, "evaluations": history}
                    )
                save_training_state(out_dir / "latest.pt", model, optimizer, proc, state)
                interval_start += time.time() - eval_started  # the throughput counts training time only
            stop = stopper.requested or (args.stop_at_step is not None and step >= args.stop_at_step)
            if step == total_steps or any_process(stop, proc):  # every process stops at the same step
                if not evaluation_step:
                    save_training_state(out_dir / "latest.pt", model, optimizer, proc, state)
                return None if step == total_steps else stopper.signal_name or "stop-at-step"

            # One optimizer step: forward, loss and backward for each micro-batch, then the update.
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro_step in range(args.grad_accum):
                starts = micro_batch_starts(
                    splits.order, state["samples_seen"], micro_step, args.batch_size, proc.rank, proc.world_size
                )
                inputs, targets = get_batch(splits.train, starts, splits.context_length, proc.device)
                last = micro_step == args.grad_accum - 1
                with train_model.no_sync() if proc.world_size > 1 and not last else nullcontext():  # sync once
                    with autocast:
                        logits = train_model(inputs)  # [batch, seq_len, vocab_size]
                        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) / args.grad_accum
                    loss.backward()  # adds to the gradients of the earlier micro-batches
                loss_sum += loss.detach()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)  # 0: no clipping
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"], state["samples_seen"] = step + 1, state["samples_seen"] + global_batch

            if state["step"] % args.log_every == 0 or state["step"] == total_steps:
                loss_value = float(loss_sum)  # waits for the GPU: only on logging steps
                gpt.check_finite_loss(loss_value, state["step"])
                seconds = time.time() - interval_start
                tokens_per_s = (state["step"] - interval_step) * global_batch * splits.context_length / seconds
                mfu = f" | MFU {100 * flops_token * tokens_per_s / (peak * proc.world_size):.1f}%" if peak else ""
                log(
                    f"step {state['step']:>{len(str(total_steps))}}/{total_steps} | loss {loss_value:.3f} | "
                    f"lr {lr:.2e} | grad norm {norm.item():.2f} | {tokens_per_s:,.0f} tok/s{mfu} | "
                    f"ETA {gpt.eta(started, state['step'] - first_step, total_steps - first_step)}"
                )
                interval_start, interval_step = time.time(), state["step"]


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
# 5. The stage: data, model, optimizer, loop
# ----------------------------------------------------------------------------------------


def pretrain(args, proc):
    """Run the stage with the settings args (see parse_settings) in the processes proc
    (see setup_distributed). Returns a summary dict: steps, tokens_seen, train_loss,
    val_loss, best_val_loss, unigram_loss, latest, best, stopped (None, or
    "stop-at-step" / the signal's name when the run stopped early)."""
    out_dir = Path(args.out_dir)
    if proc.rank == 0:  # before any long work: a folder that cannot be used fails now
        gpt.claim_run_folder(out_dir, RUN_FILES, resume=args.resume, overwrite=args.overwrite)
        gpt.print_settings(args)
    barrier(proc)
    if proc.device.type == "cpu" and args.dtype == "bfloat16":  # CPUs without bfloat16 matrix units emulate it
        log("warning: --dtype bfloat16 is usually much slower than float32 on CPUs; --dtype auto picks float32 there")
    checkpoint = load_training_state(out_dir / "latest.pt") if args.resume else None

    # Data. The first process of each machine tokenizes; the others wait, then reuse its file.
    barrier(proc, proc.local_rank != 0)
    token_dir = Path(args.token_dir or Path(args.cache_dir) / "tokens")
    token_path, n_tokens, sha256 = prepare_token_file(resolve_sources(args.data), token_dir, args.replace_invalid_utf8)
    barrier(proc, proc.local_rank == 0)
    data = {"n_tokens": n_tokens, "sha256": sha256}
    if checkpoint is not None and checkpoint["data"] != data:
        raise ValueError(
            f"--resume: --data {args.data} changed since the run started ({n_tokens:,} tokens, SHA-256 {sha256[:12]}... "
            f"against {checkpoint['data']['n_tokens']:,}, {checkpoint['data']['sha256'][:12]}...): "
            "restore the data, or start a new run with --overwrite"
        )

    # Model and optimizer: AdamW with betas (0.9, 0.95), as GPT-3 (Brown et al., 2020, appendix B).
    model = build_model(args, checkpoint)
    splits = make_splits(token_path, n_tokens, args, model.cfg, proc.world_size)
    if proc.device.type == "cpu":
        check_step_memory(model, args.batch_size, splits.context_length)
    model.to(proc.device)
    optimizer = gpt.make_adamw(model, args.lr, args.weight_decay, betas=(0.9, 0.95))
    global_batch = args.batch_size * args.grad_accum * proc.world_size
    total_steps = args.max_steps or math.ceil(args.epochs * splits.n_windows / global_batch)
    if checkpoint is None:
        state = {"step": 0, "samples_seen": 0, "best_val_loss": math.inf, "history": []}
        torch.manual_seed(args.seed + proc.rank)  # dropout masks differ between processes
    else:
        state = restore_training_state(checkpoint, optimizer, proc)
        if state["step"] >= total_steps:
            raise ValueError(
                f"--resume: the run in {out_dir} already made {state['step']} of {total_steps} steps; "
                "raise --max-steps or --epochs to go on"
            )
        log(f"resumed from {out_dir / 'latest.pt'} at step {state['step']}")
    state.update(total_steps=total_steps, settings=vars(args), data=data)
    if proc.rank == 0:
        gpt.write_json(out_dir / "run.json", {"settings": vars(args), "data": data})
    log(gpt.model_summary(model, "model") + f"; {proc.device}, {proc.world_size} process(es)")
    log(
        f"training: {total_steps} steps of {global_batch} windows ({global_batch * splits.context_length:,} tokens) = "
        f"{total_steps * global_batch / splits.n_windows:.2f} epochs, peak lr {args.lr:g}"
    )
    log(f"unigram baseline: validation loss {splits.unigram_loss:.3f} for a model that ignores context")

    stopped = train(args, model, optimizer, splits, proc, state)
    if proc.rank == 0:
        plot_history(out_dir / "loss.png", state["history"], splits.unigram_loss)
    last = state["history"][-1]
    if stopped:
        log(f"stopped at step {state['step']} ({stopped}): saved {out_dir / 'latest.pt'}; continue with --resume")
    else:
        log(f"done: {state['step']} steps; validation loss {last['val_loss']:.3f} (best {state['best_val_loss']:.3f})")
        log(f"try the model: python load_gpt2.py --model {out_dir / 'best.pt'}")
    summary = {"steps": state["step"], "tokens_seen": state["samples_seen"] * splits.context_length}
    summary.update(train_loss=last["train_loss"], val_loss=last["val_loss"], best_val_loss=state["best_val_loss"])
    summary.update(unigram_loss=splits.unigram_loss, stopped=stopped)
    return {**summary, "latest": out_dir / "latest.pt", "best": out_dir / "best.pt"}


# ----------------------------------------------------------------------------------------
# 6. Command line and settings
# ----------------------------------------------------------------------------------------

RUN_FILES = ["latest.pt", "best.pt", "history.json", "loss.png", "run.json"]

# With --resume these settings come from this command, not from the saved run: where the
# files are, the device, when to stop. --max-steps or --epochs given with --resume extend
# the run (the cosine schedule then stretches to the new end).
THIS_COMMAND = ("resume", "overwrite", "stop_at_step", "device", "compile", "peak_flops")
THIS_COMMAND += ("out_dir", "cache_dir", "token_dir")
EXTEND = ("max_steps", "epochs")
unit_interval = gpt._checked_number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def build_parser():
    p = argparse.ArgumentParser(
        description="Pretrain a GPT on plain text (next-token prediction). A new run refuses an --out-dir that holds "
        "another run: --resume continues that run with its saved settings, --overwrite deletes it first.",
        formatter_class=gpt.HelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", default=VERDICT_URL, help="a URL, a UTF-8 text file, or a folder of .txt files")
    data.add_argument("--train-fraction", type=gpt.fraction, default=0.9, help="share of the tokens for training")
    data.add_argument("--stride", type=gpt.positive_int, help="tokens between window starts (default: no overlap)")
    data.add_argument("--replace-invalid-utf8", action="store_true", help="read bytes that are not UTF-8 as U+FFFD")
    data.add_argument("--cache-dir", default=str(gpt.cache_dir()), help="folder for downloads and token files")
    data.add_argument("--token-dir", help="folder of the token files (default: <--cache-dir>/tokens)")

    model = p.add_argument_group("model")
    model.add_argument(
        "--model", help="start from gpt2 (or another size), a .safetensors file, a checkpoint (default: random)"
    )
    model.add_argument("--size", choices=list(gpt.GPT_CONFIGS), help="a GPT-2 shape (default: 4 x 4 heads x 256)")
    model.add_argument("--n-layers", type=gpt.positive_int, help="transformer blocks (default: from --size)")
    model.add_argument("--n-heads", type=gpt.positive_int, help="attention heads per block (default: from --size)")
    model.add_argument("--emb-dim", type=gpt.positive_int, help="embedding width (default: from --size)")
    model.add_argument("--context-length", type=gpt.positive_int, help="tokens per window (default: the model's)")
    model.add_argument("--drop-rate", type=gpt.dropout_rate, default=0.0, help="dropout probability")

    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=gpt.positive_int, default=8, help="windows per micro-batch and process")
    train.add_argument("--grad-accum", type=gpt.positive_int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--epochs", type=gpt.positive_float, default=10.0, help="passes over the training windows")
    train.add_argument("--max-steps", type=gpt.positive_int, help="optimizer steps (default: from --epochs)")
    train.add_argument("--lr", type=gpt.positive_float, default=1e-3, help="peak learning rate")
    train.add_argument("--min-lr-ratio", type=unit_interval, default=0.1, help="final learning rate / --lr")
    train.add_argument("--warmup-steps", type=gpt.non_negative_int, help="steps of warm-up (default: 5%% of them)")
    train.add_argument("--weight-decay", type=gpt.non_negative_float, default=0.1, help="AdamW weight decay")
    train.add_argument("--grad-clip", type=gpt.non_negative_float, default=1.0, help="gradient norm limit (0: none)")
    train.add_argument("--seed", type=gpt.seed, default=123, help="seed of weights, data order, dropout, samples")

    run = p.add_argument_group("evaluation, run folder, devices")
    run.add_argument("--eval-every", type=gpt.positive_int, default=10, help="evaluate and save every N steps")
    run.add_argument("--eval-batches", type=gpt.positive_int, default=10, help="batches per split in an evaluation")
    run.add_argument("--log-every", type=gpt.positive_int, default=5, help="print a progress line every N steps")
    run.add_argument("--prompt", default="Every effort moves you", help="start of the sample of each evaluation")
    run.add_argument("--sample-tokens", type=gpt.non_negative_int, default=30, help="tokens of the sample")
    run.add_argument("--out-dir", default="runs/pretrain", help="folder of the run's files")
    again = run.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out-dir with its saved settings; only --max-steps/--epochs (to extend it), "
        "--stop-at-step, --device, --compile, --peak-flops, --cache-dir and --token-dir may differ from them",
    )
    again.add_argument("--overwrite", action="store_true", help="delete the run in --out-dir, start a new one")
    run.add_argument(
        "--stop-at-step", type=gpt.positive_int, help="save and exit after this step (default: at the end)"
    )
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    run.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="precision of the work: autocast on GPUs, float32 weights (auto: bfloat16 where supported)",
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; a C++ compiler on CPU)")
    run.add_argument("--peak-flops", type=gpt.positive_float, help="FLOP/s of one device for MFU (default: known GPUs)")
    return p


def parse_settings(argv=None):
    """The run's settings -> Namespace.

    A new run: the command line, and the checks that involve two flags (argparse exits
    2 for a bad flag). --resume: the settings saved in --out-dir/run.json, with
    THIS_COMMAND's from the command line and --max-steps/--epochs when given. Raises
    ValueError naming the flag and both values when another flag contradicts the saved run.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    shape_flags = [gpt.flag_name(k) for k in ("size", "n_layers", "n_heads", "emb_dim") if getattr(args, k) is not None]
    if args.model and shape_flags and not args.resume:
        parser.error(f"--model takes the model's shape from its weights: drop {', '.join(shape_flags)}")
    if not args.resume:
        base = size_config(args.size)
        emb_dim, n_heads = args.emb_dim or base.emb_dim, args.n_heads or base.n_heads
        if emb_dim % n_heads:
            parser.error(
                f"--emb-dim {emb_dim} must be divisible by --n-heads {n_heads} (each head gets an equal share)"
            )
        return args
    run_file = Path(args.out_dir) / "run.json"
    if not run_file.is_file():
        raise ValueError(f"--resume: {args.out_dir} holds no run to continue (no run.json); start one without --resume")
    saved = gpt.read_json(run_file, "--resume: the run's settings")
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        raise ValueError(f"--resume: {run_file} holds no settings of pretrain.py; start a new run with --overwrite")
    settings = gpt.resume_settings(parser, argv, saved["settings"], may_change=THIS_COMMAND + EXTEND)
    for name in THIS_COMMAND:
        setattr(settings, name, getattr(args, name))
    given = gpt.given_flags(parser, argv)
    if "epochs" in given and "max_steps" not in given:
        settings.max_steps = None  # the --epochs given now set the end of the run
    return settings


# ----------------------------------------------------------------------------------------
# 7. Plumbing: processes and devices, memory, checkpoints, signals
# ----------------------------------------------------------------------------------------

Processes = collections.namedtuple("Processes", "rank local_rank world_size device")


def setup_distributed(device_name):
    """Processes(rank, local_rank, world_size, device). Under torchrun (RANK and
    WORLD_SIZE in the environment) this joins the process group: NCCL between GPUs, one
    GPU per process (cuda:LOCAL_RANK), or Gloo between CPU processes. Otherwise one process."""
    device = gpt.pick_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Processes(0, 0, 1, device)
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "mps":
        raise ValueError("torchrun with MPS is not supported: use --device cpu")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, local_rank, world_size, device)


def barrier(proc, wait=True):
    """Wait until every process gets here (only with several processes, and when wait)."""
    if proc.world_size > 1 and wait:
        dist.barrier()


def any_process(flag, proc):
    """Whether flag is true in any process (all-reduced; every process must call this)."""
    if proc.world_size == 1:
        return flag
    value = torch.tensor(float(flag), device=proc.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def wrap_for_processes(model, proc):
    """DistributedDataParallel(model) with several processes (it all-reduces the
    gradients in backward), else the model itself."""
    if proc.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)


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
GPU_PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


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


def available_memory():
    """Bytes of memory available to this process: MemAvailable of /proc/meminfo (Linux),
    else the physical memory, else None when neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_step_memory(model, batch_size, context_length):
    """Raise ValueError when a training step on the CPU needs more memory than is
    available, before training starts: there the operating system may kill a process
    that runs out, without a message. The estimate, in bytes: 16 per parameter (float32
    weights, gradients, AdamW's two moments), per token 68 * emb_dim per layer for the
    activations kept for the backward pass (Korthikanti et al., 2022, section 4.1, in
    float32 and without the attention matrix, which scaled_dot_product_attention never
    holds), and 12 per vocabulary entry for the logits, their softmax and its gradient."""
    cfg, processes = model.cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per_token = 68 * cfg.emb_dim * cfg.n_layers + 12 * cfg.vocab_size
    need = processes * (16 * gpt.count_parameters(model) + batch_size * context_length * per_token)
    have = available_memory()
    if have is not None and need > have:
        raise ValueError(
            f"a training step needs about {need / 1e6:,.0f} MB of memory, but {have / 1e6:,.0f} MB are available: "
            "use a smaller --batch-size (and a larger --grad-accum for the same batch) or a shorter --context-length"
        )


def save_model(path, model, **extra):
    """Save a checkpoint; when the file system refuses (a full disk), to the temporary folder."""
    gpt.save_with_fallback(lambda p: gpt.save_checkpoint(p, model, **extra), path)


def save_training_state(path, model, optimizer, proc, state):
    """Write latest.pt: the model, the AdamW moments, every process's RNG states (for the
    same dropout masks after --resume) and `state` (step, data position, history,
    settings, data fingerprint). Every process must call this; the first one writes."""
    rng_states = [gpt.rng_state()]
    if proc.world_size > 1:
        rng_states = [None] * proc.world_size
        dist.all_gather_object(rng_states, gpt.rng_state())
    if proc.rank == 0:
        save_model(path, model, optimizer=optimizer.state_dict(), rng_states=rng_states, **state)


def load_training_state(path):
    """latest.pt of the run to continue -> checkpoint dict. Raises ValueError when it is
    missing or not a training state of this pretrain.py."""
    if not path.is_file():
        raise ValueError(f"--resume: no {path}: the run stopped before its first save; start it again with --overwrite")
    checkpoint = gpt.load_checkpoint(path)
    missing = [k for k in ("optimizer", "step", "samples_seen", "rng_states", "history", "data") if k not in checkpoint]
    if missing:
        raise ValueError(f"--resume: {path} is not a training state of this pretrain.py (no {', '.join(missing)})")
    return checkpoint


def restore_training_state(checkpoint, optimizer, proc):
    """Load the AdamW moments and this process's RNG states from a latest.pt checkpoint
    (reseeding when it was saved by another number of processes) -> the loop's state."""
    fused = optimizer.defaults.get("fused")
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group in optimizer.param_groups:
        group["fused"] = fused  # the saved flag belongs to the device the run was saved on
    states = checkpoint["rng_states"]
    if len(states) == proc.world_size:
        gpt.set_rng_state(states[proc.rank], proc.device)
    else:
        log(
            f"note: the checkpoint has RNG states of {len(states)} processes, this run has {proc.world_size}: reseeding"
        )
        torch.manual_seed(checkpoint["settings"]["seed"] + proc.rank + checkpoint["step"])
    return {key: checkpoint[key] for key in ("step", "samples_seen", "best_val_loss", "history")}


class StopSignal:
    """While active, Ctrl-C (SIGINT) and SIGTERM ask training to stop after the current
    step, so that it can save, instead of killing it. A second Ctrl-C stops at once in a
    single process; under torchrun the launcher forwards the signal it receives, so
    repeats are expected and ignored (torchrun kills the workers after 30 s)."""

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
            raise KeyboardInterrupt  # latest.pt keeps the state of the last save
        self.requested, self.signal_name = True, signal.Signals(signum).name


@gpt.command_line(
    "use a smaller --batch-size (and a larger --grad-accum for the same batch) or a shorter --context-length"
)
def main(argv=None):
    """Run the stage from the command line. After a Ctrl-C or SIGTERM stop (its state
    saved) exit with the shell's code for the signal, 130 or 143."""
    args = parse_settings(argv)
    os.environ["GPT_CACHE_DIR"] = args.cache_dir  # downloads go there
    proc = setup_distributed(args.device)
    try:
        result = pretrain(args, proc)
    finally:
        if proc.world_size > 1:
            dist.destroy_process_group()
    if result["stopped"] in ("SIGINT", "SIGTERM"):
        raise SystemExit(128 + signal.Signals[result["stopped"]])
    return result


if __name__ == "__main__":
    main()
