"""pretrain.py: the "pretrain" stage: train a GPT on plain text by next-token prediction.

    python pretrain.py                                   # a 16M-parameter GPT on "The Verdict", on the CPU, minutes
    python pretrain.py --data tinyshakespeare.txt --emb-dim 128 --max-steps 240 --lr 3e-3 --eval-every 40
    python pretrain.py --model HuggingFaceTB/SmolLM2-135M --data my_notes/ --lr 5e-5   # continue released weights
    torchrun --nproc_per_node 8 pretrain.py --data corpus/ --size gpt2 --grad-accum 4   # several GPUs
    python pretrain.py --resume --max-steps 2000         # continue the run in runs/pretrain/, and extend it

The story: the text ("The Verdict", the short story of chapter 5 of "Build a Large Language Model (From Scratch)", or
your text files: documents, each read whole, so each must fit in memory) is tokenized once into a memory-mapped token
file and split into training and validation windows; a GPT is built or loaded; one loop trains every weight with AdamW,
warm-up, cosine decay and gradient accumulation (DistributedDataParallel under torchrun, as nanoGPT's train.py); each
--eval-every steps it measures both losses, prints a sample and saves. Ctrl-C or SIGTERM saves; --resume is exact.

Writes to --out-dir (default runs/pretrain/; another run there is refused unless --resume or --overwrite): run.json,
latest.pt (the training state), best.pt (lowest validation loss: --model of the other stages), history.json, loss.png.
"""

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from array import array
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist

import gpt

VERDICT_URL = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
# Size in bytes and SHA-256 of the downloads we know: if the file on the `main` branch changes, that is an error.
KNOWN_DOWNLOADS = {VERDICT_URL: dict(size=20479,
                                     sha256="b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f")}

# The default model: 4 layers of width 256 (16M parameters, 13M of them the token embedding) and 128-token windows.
# It trains at hundreds of tokens/s on two CPU cores; 128 + 1 tokens fit in The Verdict's 515-token validation split.
DEFAULT_SHAPE = {"n_layers": 4, "n_heads": 4, "emb_dim": 256, "context_length": 128}


def log(*parts):
    """print, in the first process only (under torchrun every process runs this script)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*parts, flush=True)


# --- 1. Data: text files -> token file -> splits -> windows -> batches ------------------


def resolve_sources(data):
    """--data (a URL, downloaded once; a file; a folder's non-empty .txt files, sorted) -> list of text file Paths."""
    if urlparse(data).scheme in ("http", "https"):
        name = Path(urlparse(data).path).name or "corpus.txt"
        return [gpt.fetch_dataset([data], name, flag="--data", **KNOWN_DOWNLOADS.get(data, {}))]
    path = Path(data)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*.txt") if f.is_file() and f.stat().st_size > 0)
        if not files:
            raise ValueError(f"--data {data}: the folder holds no .txt file with text")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"--data {data}: no such file or folder (give a text file, a folder or a URL)")
    return [path]


# Token file types: (array typecode, torch dtype the file is read as). torch before 2.3 has no unsigned types: uint16
# ids are read as int16 (`get_batch` undoes it), uint32 ids as int32 (every vocabulary is far below 2**31 ids).
TOKEN_TYPES = {"uint16": ("H", torch.int16), "uint32": ("I", torch.int32)}


def prepare_token_file(paths, token_dir, tokenizer):
    """Tokenize the text files (documents, end-of-text tokens between them as in GPT-2's training data) into one token
    file, atomically -> (its Path, number of tokens, SHA-256). Its name is a fingerprint of the tokenizer and the files
    (paths, sizes, times); the record beside it, written last, marks it whole. A changed file makes a new token file."""
    dtype = "uint16" if tokenizer.max_token_value < 1 << 16 else "uint32"  # GPT-2, SmolLM2; Qwen3, Llama 3
    sources = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    key = json.dumps([tokenizer.state(), sources], sort_keys=True).encode()
    token_path = Path(token_dir) / f"{paths[0].stem}-{hashlib.sha256(key).hexdigest()[:16]}.{dtype}"
    typecode, record_path = TOKEN_TYPES[dtype][0], token_path.with_suffix(".json")
    with contextlib.suppress(OSError, ValueError, KeyError):  # not tokenized yet, or an unreadable record
        saved = json.loads(record_path.read_text())
        if token_path.stat().st_size == saved["n_tokens"] * array(typecode).itemsize:
            log(f"token file: {token_path} ({saved['n_tokens']:,} tokens, reused)")
            return token_path, saved["n_tokens"], saved["sha256"]
    started, digest, n_tokens = time.time(), hashlib.sha256(), 0

    def write(out):  # into the temporary file of gpt.atomic_write_bytes: an interrupted run leaves no half file
        nonlocal n_tokens
        for i, path in enumerate(paths):
            gpt.show_progress(f"tokenizing: document {i + 1:,} of {len(paths):,}, {n_tokens:,} tokens so far, ETA "
                              f"{gpt.eta(started, i, len(paths))}")
            text = gpt.decode_utf8(path.read_bytes(), f"--data {path}")  # read whole: a document must fit in memory
            text = text.replace("\r\n", "\n").replace("\r", "\n")  # Windows and old Mac line ends: "\n", as text mode
            separator = [tokenizer.eot_id] if i > 0 else []  # between documents, not before the first
            ids = separator + tokenizer.encode(text)
            data = array(typecode, ids).tobytes()  # native byte order
            out.write(data)
            digest.update(data)
            n_tokens += len(ids)

    gpt.atomic_write_bytes(token_path, write)
    gpt.write_json(record_path, {"sources": sources, "n_tokens": n_tokens, "sha256": digest.hexdigest()})
    log(f"token file: {token_path} ({n_tokens:,} tokens, in {gpt.format_duration(time.time() - started)})")
    return token_path, n_tokens, digest.hexdigest()


def split_tokens(tokens, train_fraction, context_length):
    """tokens [n] -> (train tokens [int(train_fraction * n)], validation tokens [the rest]). Raises ValueError when a
    split has fewer than context_length + 1 tokens (one window and its shifted target), saying what would work."""
    n_train = int(train_fraction * len(tokens))
    for which, have in (("training", n_train), ("validation", len(tokens) - n_train)):
        if have < context_length + 1:
            shorter = f"--context-length {have - 1} or less, " if have >= 2 else ""
            raise ValueError(f"the {which} split has {have:,} tokens ({len(tokens):,} in all, --train-fraction "
                             f"{train_fraction}), fewer than context length {context_length} + 1; use {shorter}"
                             "another --train-fraction or more text")
    return tokens[:n_train], tokens[n_train:]


def evaluation_starts(n_tokens, context_length, max_windows):
    """Starts of up to max_windows (0: all) non-overlapping windows spread evenly over a split, the same each time."""
    available = (n_tokens - 1) // context_length  # windows of context_length + 1 tokens (inputs and targets)
    k = min(available, max_windows or available)  # 0: all
    return [(j * available // k) * context_length for j in range(k)]


# The splits and their windows: train [n_train] and val [n_val], tokens as the token file holds them (TOKEN_TYPES);
# window i: context_length + 1 tokens from i * context_length; n_windows training windows, in epoch e in the order
# `gpt.epoch_order(n_windows, seed, e)`; eval_starts {"train": starts, "val": starts}, the same at every evaluation.
Splits = collections.namedtuple("Splits", "train val context_length n_windows seed eval_starts")


def make_splits(args, tokenizer, cfg, proc):
    """(Splits of --data for a model of config cfg, the data's fingerprint {"n_tokens", "sha256"})."""
    if proc.world_size > 1 and proc.local_rank != 0:
        dist.barrier()  # the first process of each machine tokenizes; the others wait here, then reuse its file
    sources = resolve_sources(args.data)
    token_path, n_tokens, sha256 = prepare_token_file(sources, Path(args.cache_dir) / "tokens", tokenizer)
    if proc.world_size > 1 and proc.local_rank == 0:
        dist.barrier()
    context_length = gpt.length_within_context(args.context_length, cfg, "--context-length")
    # Memory-mapped: read on demand, so a corpus larger than memory works.
    tokens = torch.from_file(str(token_path), size=n_tokens, dtype=TOKEN_TYPES[token_path.suffix[1:]][1])
    train, val = split_tokens(tokens, args.train_fraction, context_length)
    n_windows = (len(train) - 1) // context_length
    eval_windows = args.eval_batches * args.batch_size * proc.world_size  # --eval-batches in each process
    eval_starts = {name: evaluation_starts(len(split), context_length, eval_windows)
                   for name, split in (("train", train), ("val", val))}
    log(f"data: {n_tokens:,} tokens = {len(train):,} training + {len(val):,} validation; {n_windows:,} windows")
    splits = Splits(train, val, context_length, n_windows, args.seed, eval_starts)
    return splits, {"n_tokens": n_tokens, "sha256": sha256}


def micro_batch_starts(splits, samples_seen, micro_step, batch_size, rank=0, world_size=1):
    """Window starts of one process's micro-batch. Sample i of the run is window i % n_windows in the order of epoch
    i // n_windows: samples_seen alone says where the run is; each micro-step takes the next samples, rank by rank."""
    first, n = samples_seen + (micro_step * world_size + rank) * batch_size, splits.n_windows
    samples = range(first, first + batch_size)
    # gpt.epoch_order keeps the current epoch's order: one shuffle per epoch
    return [int(gpt.epoch_order(n, splits.seed, i // n)[i % n]) * splits.context_length for i in samples]


def get_batch(tokens, starts, context_length, device):
    """Windows of tokens -> (inputs, targets), LongTensors [len(starts), context_length], with
    targets[b, t] = inputs[b, t + 1]: the model learns to predict each next token."""
    rows = torch.stack([tokens[s : s + context_length + 1] for s in starts]).long()
    rows = rows & 0xFFFF if tokens.dtype == torch.int16 else rows  # uint16 ids, read as int16, back
    # On a GPU from pinned memory, so that the copy overlaps with compute.
    rows = rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows.to(device)
    return rows[:, :-1], rows[:, 1:]


# --- 2. The model and the learning-rate schedule (AdamW: gpt.make_adamw) -----------------


def model_config(args):
    """GPTConfig of a new model: --size (default: DEFAULT_SHAPE) with the shape flags; ValueError if impossible."""
    base = gpt.MODEL_CONFIGS[args.size] if args.size else gpt.GPTConfig(**DEFAULT_SHAPE)
    shape = {name: getattr(args, name) for name in DEFAULT_SHAPE if getattr(args, name) is not None}
    return dataclasses.replace(base, drop_rate=args.drop_rate, **shape)


def model_to_train(args, checkpoint=None):
    """(model in training mode on the CPU, its tokenizer): from latest.pt, from --model, or new (seeded by --seed)."""
    if checkpoint is not None:
        return gpt.model_from_checkpoint(checkpoint).train(), gpt.tokenizer_from_state(checkpoint.get("tokenizer"))
    if args.model:
        model, tokenizer = gpt.load(args.model, language_model=True)
        gpt.set_drop_rate(model, args.drop_rate)
        return model.train(), tokenizer
    hub = args.size in gpt.LLAMA_CONFIGS  # a Llama-family shape comes with its Hub tokenizer, the others GPT-2's
    tokenizer = gpt.tokenizer_from_files(gpt.hub_tokenizer_files(args.size), args.size) if hub else gpt.get_tokenizer()
    torch.manual_seed(args.seed)
    return gpt.build_model(model_config(args)).train(), tokenizer


def cosine_with_warmup(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    """Learning rate of optimizer step `step` (0-based): a linear warm-up to max_lr over warmup_steps, then a cosine
    decay to min_lr_ratio * max_lr at total_steps (Loshchilov and Hutter, 2017, "SGDR"; GPT-3 decays to 10%)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    min_lr = min_lr_ratio * max_lr
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# --- 3. Several processes under torchrun (as nanoGPT's train.py); the speed and MFU ------

# This process as it sees the run: its rank (0 prints and saves), its rank on this machine, the processes, its device.
Processes = collections.namedtuple("Processes", "rank local_rank world_size device")


@contextlib.contextmanager
def distributed_run(device_name="auto"):
    """Processes of this run, for a `with` block: torchrun's process group (NCCL on GPUs, Gloo on CPUs), else one."""
    device = gpt.pick_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        yield Processes(0, 0, 1, device)
        return
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "mps":
        raise ValueError("torchrun with MPS is not supported: use --device cpu")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield Processes(rank, local_rank, world_size, device)
    finally:
        dist.destroy_process_group()


# Dense bfloat16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets (another GPU: add its own, for the MFU in the
# log); the first name in torch.cuda.get_device_name() wins, so the PCIe H100 and the H200 NVL come before the SXM.
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200 NVL": 836e12, "H200": 989e12, "A100": 312e12,
                  "L40S": 362e12, "L4": 121e12}


class Throughput:
    """Tokens/s, MFU (model FLOPs utilisation: GPU_PEAK_FLOPS, bfloat16) and ETA of the steps since the last report."""

    def __init__(self, model, seq_len, tokens_per_step, device, dtype_name, world_size=1, first_step=0):
        self.tokens_per_step, self.first_step, self.started = tokens_per_step, first_step, time.time()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" and dtype_name == "bfloat16" else ""
        peak = next((flops for key, flops in GPU_PEAK_FLOPS.items() if key in name), None)  # of one device
        self.peak = peak * world_size if peak else None  # None: no MFU
        # Training FLOPs per token: 6 per multiplying weight plus 12 * n_layers * attention width * seq_len (PaLM,
        # Chowdhery et al., 2022, appendix B).
        cfg = model.cfg
        lookups = [] if cfg.family == "llama" else [model.wpe.weight]  # Llama has no position table
        if not cfg.tie_embeddings:
            lookups.append(model.wte.weight)  # only looked up: the separate head multiplies
        n_params = gpt.count_parameters(model) - sum(table.numel() for table in lookups)
        head_dim = getattr(cfg, "head_dim", None) or cfg.emb_dim // cfg.n_heads  # Gemma's heads are wider
        self.flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.n_heads * head_dim * seq_len
        self.restart(first_step)

    def restart(self, step):
        """Measure from now, at step (evaluating and saving do not count in tokens/s)."""
        self.interval_start, self.interval_step = time.time(), step

    def report(self, step, total_steps):
        """"1,234 tok/s | MFU 41.0% | ETA 3m05s" for the steps since the last report."""
        tokens_per_s = (step - self.interval_step) * self.tokens_per_step / (time.time() - self.interval_start)
        mfu = f" | MFU {self.flops_per_token * tokens_per_s / self.peak:.1%}" if self.peak else ""
        remaining = gpt.eta(self.started, step - self.first_step, total_steps - self.first_step)
        self.restart(step)
        return f"{tokens_per_s:,.0f} tok/s{mfu} | ETA {remaining}"


# --- 4. The training loop; evaluation (both losses and a sample), stop and save ----------


@torch.no_grad()
def evaluate_loss(model, splits, split, batch_size, autocast, proc):
    """Mean loss (nats per token) of the evaluation windows of split ("train" or "val"), shared among the processes."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=proc.device)  # [sum of losses, tokens]
    mine = splits.eval_starts[split][proc.rank :: proc.world_size]
    tokens = getattr(splits, split)  # splits.train or splits.val
    for i in range(0, len(mine), batch_size):
        inputs, targets = get_batch(tokens, mine[i : i + batch_size], splits.context_length, proc.device)
        with autocast:
            logits = model(inputs)  # [batch, seq_len, vocab_size]
        total[0] += gpt.next_token_loss(logits, targets, reduction="sum").double()
        total[1] += targets.numel()
    if proc.world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def evaluate(args, eval_model, model, splits, tokenizer, proc, state, lr, autocast):
    """At a due step not evaluated yet: eval_model's losses into history.json, model's sample, best.pt -> if it did."""
    step, history = state["step"], state["history"]
    evaluated = bool(history) and history[-1]["step"] == step  # already, before the run stopped and resumed
    if evaluated or not (step % args.eval_every == 0 or step == state["total_steps"]):
        return False
    train_loss = evaluate_loss(eval_model, splits, "train", args.batch_size, autocast, proc)
    val_loss = evaluate_loss(eval_model, splits, "val", args.batch_size, autocast, proc)
    gpt.check_finite_loss(train_loss + val_loss, step)  # NaN or infinity in either
    improved = step > 0 and val_loss < state["best_val_loss"]  # the random start is never "best"
    state["best_val_loss"] = val_loss if improved else state["best_val_loss"]
    tokens = state["samples_seen"] * splits.context_length
    history.append(dict(step=step, tokens=tokens, lr=lr, train_loss=train_loss, val_loss=val_loss))
    log(f"eval step {step} | train loss {train_loss:.3f} | val loss {val_loss:.3f} "
        f"(perplexity {math.exp(val_loss):,.1f})" + (" | lowest after step 0: saved as best.pt" if improved else ""))
    if proc.rank == 0:  # a sample: the prompt (none: the end-of-text token) continued, the same draw each time
        ids = tokenizer.encode(args.prompt, bos=True) if args.prompt else [tokenizer.eot_id]
        out = gpt.generate(model, torch.tensor([ids], device=proc.device), args.sample_tokens, temperature=0.8,
                           top_k=50, seed=args.seed, eot_id=tokenizer.eot_id)
        text = gpt.token_ids_to_text(out[0, (0 if args.prompt else 1) :], tokenizer)  # without a start end-of-text
        log("  sample: " + text.replace("\n", "\n          "))
        out_dir = Path(args.out_dir)
        if improved:
            gpt.save_checkpoint(out_dir / "best.pt", model, tokenizer, step=step, tokens_seen=tokens, val_loss=val_loss)
        gpt.write_json(out_dir / "history.json", {"evaluations": history})
    return True


def stop_reason(args, state, stopper, proc):
    """Why training stops at this step: "end", "stop-at-step", the signal ("SIGINT", "SIGTERM"), or None to go on."""
    if state["step"] == state["total_steps"]:
        return "end"
    stop = stopper.requested or state["step"] >= (args.stop_at_step or math.inf)
    if proc.world_size > 1:  # every process stops at the same step: a stop in any one stops all
        flag = torch.tensor(float(stop), device=proc.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    return (stopper.signal_name or "stop-at-step") if stop else None


def train(args, model, optimizer, splits, tokenizer, proc, state, stopper):
    """Train from step state["step"] to state["total_steps"], updating state; evaluate every --eval-every steps, save
    latest.pt then and at a stop. Returns why it stopped (see `stop_reason`)."""
    total_steps = state["total_steps"]
    autocast, dtype_name = gpt.autocast_context(proc.device, args.dtype)
    eval_model = train_model = torch.compile(model) if args.compile else model
    if proc.world_size > 1:  # DistributedDataParallel all-reduces the gradients in backward
        device_ids = [proc.device] if proc.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(eval_model, device_ids=device_ids)
    global_batch = args.batch_size * args.grad_accum * proc.world_size  # windows per optimizer step
    steps_per_epoch = splits.n_windows / global_batch
    speed = Throughput(model, splits.context_length, global_batch * splits.context_length, proc.device, dtype_name,
                       proc.world_size, state["step"])
    while True:  # at each step: evaluate and save if due, stop if asked, else one optimizer step
        step = state["step"]
        lr = cosine_with_warmup(step, args.lr, args.warmup_steps, total_steps, args.min_lr_ratio)
        evaluated = evaluate(args, eval_model, model, splits, tokenizer, proc, state, lr, autocast)
        stopped = stop_reason(args, state, stopper, proc)
        if evaluated or stopped:
            if proc.rank == 0:  # latest.pt: the model, AdamW's moments and the loop's state
                latest = Path(args.out_dir) / "latest.pt"
                gpt.save_checkpoint(latest, model, tokenizer, optimizer=optimizer.state_dict(), **state)
            speed.restart(step)  # evaluating and saving do not count in tokens/s
        if stopped:
            return stopped

        # One optimizer step: forward, loss and backward for each micro-batch, then the update. Dropout masks come
        # from (seed, step, rank) alone (a tuple of ints hashes alike in every run): a resumed run draws the same.
        torch.manual_seed(hash((args.seed, step, proc.rank)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro_step in range(args.grad_accum):
            starts = micro_batch_starts(splits, state["samples_seen"], micro_step, args.batch_size, proc.rank,
                                        proc.world_size)
            inputs, targets = get_batch(splits.train, starts, splits.context_length, proc.device)
            accumulate = proc.world_size > 1 and micro_step < args.grad_accum - 1  # all-reduce in the last only
            with train_model.no_sync() if accumulate else contextlib.nullcontext():
                with autocast:
                    logits = train_model(inputs)  # [batch, seq_len, vocab_size]
                    loss = gpt.next_token_loss(logits, targets) / args.grad_accum
                loss.backward()  # adds to the gradients of the earlier micro-batches
            loss_sum += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)  # 0: no clipping
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.update(step=step + 1, samples_seen=state["samples_seen"] + global_batch)

        if state["step"] % args.log_every == 0 or state["step"] == total_steps:
            loss_value = float(loss_sum)  # waits for the GPU: only on logging steps
            gpt.check_finite_loss(loss_value, state["step"])
            log(f"{gpt.training_position(state['step'], total_steps, steps_per_epoch)} | loss {loss_value:.3f} | lr "
                f"{lr:.2e} | grad norm {norm:.2f} | {speed.report(state['step'], total_steps)}")


# --- 5. The stage: start (or resume) the run, train, report -----------------------------

RUN_FILES = ["latest.pt", "best.pt", "history.json", "loss.png", "run.json"]


def start_run(args, proc):
    """Start the run, or resume it -> (model, optimizer, splits, tokenizer, state: the loop's, new or latest.pt's)."""
    out_dir = Path(args.out_dir)
    if proc.rank == 0:  # before any long work: a folder that cannot be used fails now
        gpt.claim_run_folder(out_dir, RUN_FILES, resume=args.resume, overwrite=args.overwrite)
        gpt.print_settings(args, build_parser().parse_args([]))
    if proc.world_size > 1:
        dist.barrier()
    latest = out_dir / "latest.pt"  # the training state: the model, AdamW's moments and the loop's state
    checkpoint = gpt.load_checkpoint(latest) if args.resume and latest.is_file() else None
    if args.resume and (checkpoint is None or "samples_seen" not in checkpoint):
        raise ValueError(f"--resume: no training state of pretrain.py in {latest}: the run stopped before its first "
                         "save; start it again with --overwrite")
    model, tokenizer = model_to_train(args, checkpoint)  # before the data: a wrong --model fails in seconds
    splits, data = make_splits(args, tokenizer, model.cfg, proc)
    if checkpoint is not None and checkpoint["data"] != data:
        raise ValueError(f"--resume: --data {args.data} changed since the run started (its tokens' SHA-256 is now "
                         f"{data['sha256'][:12]}...): restore it, or start a new run with --overwrite")
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if proc.device.type == "cpu" else 1  # share the RAM
    hint = "pretraining trains every weight: use a smaller model or more memory, or LoRA (the fine-tunes' --lora)"
    gpt.check_training_memory(model, proc.device, hint, processes)
    optimizer = gpt.make_adamw(model.to(proc.device), args.lr, args.weight_decay, betas=(0.9, 0.95))  # GPT-3's
    global_batch = args.batch_size * args.grad_accum * proc.world_size
    total_steps = args.max_steps or math.ceil(args.epochs * splits.n_windows / global_batch)
    if args.warmup_steps is None:  # 5% of the steps, saved as a number: extending the run keeps it
        args.warmup_steps = round(0.05 * total_steps)
    state = {"step": 0, "samples_seen": 0, "best_val_loss": math.inf, "history": []}
    if checkpoint is not None:
        if checkpoint["step"] >= total_steps:
            raise ValueError(f"--resume: the run in {out_dir} already made {checkpoint['step']} of {total_steps} "
                             "steps; raise --max-steps or --epochs to go on")
        state = {key: checkpoint[key] for key in state}
        gpt.restore_training_state(checkpoint, optimizer)  # no random state: the loop reseeds each step
        log(f"resumed from {latest} at step {state['step']}")
    state.update(total_steps=total_steps, settings=vars(args), data=data)
    if proc.rank == 0:
        gpt.write_json(out_dir / "run.json", {"settings": vars(args), "data": data})
    log(gpt.model_summary(model, "model") + f"; {proc.device}, {proc.world_size} process(es)")
    windows = total_steps * global_batch
    log(f"training: {total_steps} steps of {global_batch} windows of {splits.context_length} tokens "
        f"({windows * splits.context_length:,} tokens, {windows / splits.n_windows:.2f} epochs)")
    return model, optimizer, splits, tokenizer, state


def pretrain(args, proc):
    """Run the stage with the settings args in this process (proc: see `distributed_run`) -> a summary dict."""
    model, optimizer, splits, tokenizer, state = start_run(args, proc)
    with gpt.StopSignal(single_process=proc.world_size == 1) as stopper:
        stopped = train(args, model, optimizer, splits, tokenizer, proc, state, stopper)
    out_dir, history = Path(args.out_dir), state["history"]
    if proc.rank == 0:
        tokens = [h["tokens"] for h in history]
        series = {"train": (tokens, [h["train_loss"] for h in history]),
                  "validation": (tokens, [h["val_loss"] for h in history])}
        gpt.plot_curves(out_dir / "loss.png", {"loss (nats per token)": series}, xlabel="tokens seen")
    if stopped == "end":
        log(f"done: {state['step']} steps, validation loss {history[-1]['val_loss']:.3f} "
            f"(best {state['best_val_loss']:.3f}); try the model: python load_gpt2.py --model {out_dir / 'best.pt'}")
    else:
        log(f"stopped at step {state['step']} ({stopped}): go on with python pretrain.py --resume --out-dir {out_dir}")
    return dict(steps=state["step"], tokens_seen=state["samples_seen"] * splits.context_length, stopped=stopped,
                val_loss=history[-1]["val_loss"], latest=out_dir / "latest.pt", best=out_dir / "best.pt")


# --- 6. Command line and main -----------------------------------------------------------

# With --resume these come from the command line, not from the saved run: where the files are and when to stop.
THIS_COMMAND = ("resume", "overwrite", "stop_at_step", "out_dir", "cache_dir")
# With --resume these may differ from the saved run: --max-steps and --epochs extend it, the others change the speed.
MAY_CHANGE = ("max_steps", "epochs", "device", "compile")


def build_parser():
    p = gpt.ArgumentParser(description="Pretrain a GPT on plain text (next-token prediction). A new run refuses an "
                           "--out-dir that holds another run: --resume continues that run with its saved settings "
                           "(only --max-steps/--epochs (to extend it), --stop-at-step, --device, --compile, "
                           "--cache-dir may differ from them), --overwrite deletes it first.")
    data = p.add_argument_group("data")
    data.add_argument("--data", default=VERDICT_URL, help="a URL, a UTF-8 text file, or a folder of .txt files, each "
                      f"read whole: it must fit in memory (default: The Verdict, {VERDICT_URL})")
    data.add_argument("--train-fraction", type=gpt.fraction, default=0.9, help="share of the tokens for training")
    gpt.add_flags(data, "cache_dir")
    model = p.add_argument_group("model")
    gpt.add_flags(model, "model", model=(None, "a new one, its shape from --size and the flags after it"))
    model.add_argument("--size", choices=list(gpt.MODEL_CONFIGS), metavar="NAME", help="the shape of a new model: "
                       f"{', '.join(gpt.MODEL_CONFIGS)}; a Llama-family name brings its Hub tokenizer "
                       "(default: 4 layers, 4 heads, width 256)")
    model.add_argument("--n-layers", type=gpt.positive_int, help="transformer blocks (default: from --size)")
    model.add_argument("--n-heads", type=gpt.positive_int, help="attention heads per block (default: from --size)")
    model.add_argument("--emb-dim", type=gpt.positive_int, help="embedding width (default: from --size)")
    model.add_argument("--context-length", type=gpt.positive_int, help="tokens per window (default: the model's)")
    gpt.add_flags(model, "drop_rate")
    train = p.add_argument_group("training")
    gpt.add_flags(train, "batch_size")
    train.add_argument("--grad-accum", type=gpt.positive_int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--epochs", type=gpt.non_negative_float, default=10.0, help=gpt.FLAGS["epochs"]["help"] + " "
                       "(default: 10.0, as the default text is short; fractions too, for a large corpus)")
    gpt.add_flags(train, "max_steps", "lr", "weight_decay", "seed",
                  lr=(1e-3, "for new weights; with --model try 5e-05, as the fine-tunes"))
    train.add_argument("--min-lr-ratio", type=gpt.fraction, default=0.1, help="final learning rate / --lr")
    train.add_argument("--warmup-steps", type=gpt.non_negative_int, help="linear warm-up steps (default: 5%% of all)")
    train.add_argument("--grad-clip", type=gpt.non_negative_float, default=1.0, help="gradient norm limit (0: none)")
    run = p.add_argument_group("evaluation, run folder, devices")
    gpt.add_flags(run, "eval_every", "eval_batches", "log_every", "out_dir", out_dir=("runs/pretrain", "one per stage"),
                  eval_every=(10, "the default run has 45 steps"))
    run.add_argument("--prompt", default="Every effort moves you", help="start of the sample of each evaluation")
    run.add_argument("--sample-tokens", type=gpt.non_negative_int, default=30, help="tokens of the sample")
    gpt.add_flags(run.add_mutually_exclusive_group(), "resume", "overwrite")
    run.add_argument("--stop-at-step", type=gpt.positive_int, help="save and exit after this step (default: the end)")
    gpt.add_flags(run, "device")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help=gpt.FLAGS["dtype"]["help"]
                     + "; auto: bfloat16 on a GPU that has it, else float32 (default: auto, for speed)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; a C++ compiler on CPU)")
    return p


def parse_settings(argv=None):
    """The run's settings -> Namespace: the command line, or with --resume run.json's (see THIS_COMMAND, MAY_CHANGE)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs == 0:  # fractions of an epoch are fine; none at all would train nothing
        parser.error("argument --epochs: must be a number > 0, got '0'")
    if args.resume:
        args = gpt.resume_settings(parser, argv, args.out_dir, MAY_CHANGE, THIS_COMMAND)
        typed = gpt.given_flags(parser, argv)
        if "epochs" in typed and "max_steps" not in typed:
            args.max_steps = None  # the --epochs given now set the end of the run
    elif args.model:
        shape = ("size", "n_layers", "n_heads", "emb_dim")
        gpt.refuse_flags(parser, argv, shape, "--model (its weights bring the shape)")
    else:
        try:
            model_config(args)
        except ValueError as e:
            parser.error(f"the model's shape (--size and the shape flags): {e}")
    return args


@gpt.command_line("use a smaller --batch-size (and a larger --grad-accum for the same batch) or --context-length")
def main(argv=None):
    """Run the stage from the command line; after Ctrl-C or SIGTERM exit with the shell's code, 130 or 143."""
    args = parse_settings(argv)
    os.environ["GPT_CACHE_DIR"] = args.cache_dir  # downloads go there
    with distributed_run(args.device) as proc:
        result = pretrain(args, proc)
    if result["stopped"] in ("SIGINT", "SIGTERM"):
        raise SystemExit(128 + signal.Signals[result["stopped"]])
    return result


if __name__ == "__main__":
    main()
