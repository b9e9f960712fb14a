"""finetune_instruct.py: teach GPT-2 to follow instructions (supervised instruction fine-tuning).

The recipe of chapter 7 of "Build a Large Language Model (From Scratch)" (S. Raschka, 2024;
https://github.com/rasbt/LLMs-from-scratch/tree/main/ch07): the 1,100 instruction/response
pairs of the book in the Alpaca prompt format (Taori et al., 2023, "Stanford Alpaca",
https://github.com/tatsu-lab/stanford_alpaca), GPT-2 medium, AdamW at lr 5e-5 with weight
decay 0.1, batch size 8, 2 epochs. Then the fine-tuned model answers every test
instruction, and a local LLM served by Ollama can grade the answers (0-100).

Read it top to bottom: data -> prompt format -> batching with masking -> fine-tuning ->
generating answers -> evaluating them with an LLM judge.

Run:
    python finetune_instruct.py                                  # the book's recipe (downloads data and gpt2-medium)
    python finetune_instruct.py --data instruction-data.json --model gpt2 --lora
    python finetune_instruct.py --generate-only --checkpoint runs/instruct/model.pt
    python finetune_instruct.py --prompt "Rewrite the sentence in passive voice." --input "The cat ate the fish."
    python finetune_instruct.py --judge-only --judge ollama      # grade runs/instruct/responses.json

Writes to --out-dir (default runs/instruct/):
    model.pt            the fine-tuned model, a plain GPT checkpoint (LoRA adapters merged):
                        gpt.load_gpt2("runs/instruct/model.pt") reads it
    train_state.pt      weights, optimizer state, step and loss history for --resume
    losses.png          train and validation loss per step (with matplotlib installed)
    responses.json      the test entries, each with a "model_response" field
    responses-scored.json   the same with a "score" field (0-100 or null), after --judge ollama
"""

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import requests
import torch
import torch.nn.functional as F

import gpt

DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
)
IGNORE_INDEX = -100  # the target value torch.nn.functional.cross_entropy skips by default
SPLIT_FRACTIONS = (0.85, 0.10)  # train, test; validation gets the rest (5%), as in the book
JUDGE_SEED = 123  # fixed seed (and temperature 0) so the judge gives the same score twice


def build_parser():
    p = argparse.ArgumentParser(
        description="Instruction fine-tuning of GPT-2 (Alpaca format), answers for the test set, optional LLM judge.",
        formatter_class=gpt.HelpFormatter,
    )
    what = p.add_argument_group("what to run (default: fine-tune, then answer the test set)")
    what.add_argument(
        "--generate-only", action="store_true", help="skip training: answer the test set with --checkpoint"
    )
    what.add_argument(
        "--prompt", help="answer this one instruction with --checkpoint, print the answer and exit (default: none)"
    )
    what.add_argument("--input", help="input text for --prompt (the '### Input:' section; default: none)")
    what.add_argument("--judge-only", action="store_true", help="skip training and generation: grade --responses")
    what.add_argument("--resume", action="store_true", help="continue training from <out-dir>/train_state.pt")
    what.add_argument("--out-dir", default="runs/instruct", help="folder for all outputs")

    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        help="local JSON list or JSON Lines file in the Alpaca schema (instruction, input, output) "
        "(default: the book's instruction-data.json, downloaded once into the cache)",
    )
    data.add_argument("--seed", type=int, default=123, help="seed of the split, the shuffling, LoRA and sampling")
    data.add_argument("--max-length", type=int, help="truncate examples to this many tokens (default: context length)")
    data.add_argument("--mask-prompt", action="store_true", help="learn only the response: prompt targets become -100")

    model = p.add_argument_group("model and training")
    model.add_argument(
        "--model",
        default="gpt2-medium",
        help="starting point: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a .safetensors file, "
        "or a checkpoint of this project such as pretrain.py's",
    )
    model.add_argument("--epochs", type=int, default=2, help="passes over the training set")
    model.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    model.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate, constant")
    model.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    model.add_argument("--lora", action="store_true", help="train low-rank adapters only (merged before saving)")
    model.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r")
    model.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha, the update scales by alpha/rank")
    model.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (default: all epochs)")
    model.add_argument("--log-every", type=int, default=5, help="steps between progress lines")
    model.add_argument("--eval-every", type=int, default=25, help="steps between loss estimates")
    model.add_argument("--eval-batches", type=int, default=5, help="batches per loss estimate, 0: all")
    model.add_argument(
        "--save-every", type=int, default=50, help="steps between train_state.pt saves, and each epoch's end"
    )
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")

    answers = p.add_argument_group("answers and evaluation")
    answers.add_argument(
        "--checkpoint", help="model for --generate-only and --prompt, any --model value (default: <out-dir>/model.pt)"
    )
    answers.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    answers.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
    answers.add_argument("--top-k", type=int, help="sample only from the k most likely tokens (default: all)")
    answers.add_argument(
        "--top-p",
        type=float,
        help="nucleus sampling: only from the most likely tokens whose probabilities add up to p (default: all)",
    )
    answers.add_argument(
        "--responses", help="responses file to write, or to grade with --judge-only (default: <out-dir>/responses.json)"
    )
    answers.add_argument(
        "--judge", choices=["none", "ollama"], default="none", help="grade the answers with a local Ollama server"
    )
    answers.add_argument("--judge-url", default="http://localhost:11434", help="Ollama address")
    answers.add_argument("--judge-model", default="llama3", help="Ollama model that grades")
    return p


def flag(name):
    """The command-line flag of a settings key: "batch_size" -> "--batch-size"."""
    return "--" + name.replace("_", "-")


# Smallest value of each integer flag (None, where allowed, means unset).
INT_FLAG_MINIMUM = {"epochs": 1, "batch_size": 1, "log_every": 1, "eval_every": 1, "save_every": 1, "lora_rank": 1,
                    "max_steps": 1, "max_length": 1, "top_k": 1, "eval_batches": 0, "max_new_tokens": 0}


def parse_args(argv=None):
    """Read the flags and reject, before any data or model work, every value that cannot
    work: parser.error prints the flag and its value and exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, minimum in INT_FLAG_MINIMUM.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"{flag(name)} must be at least {minimum}, got {value}")
    if not 0 < args.lr < math.inf:  # written so that nan fails too
        parser.error(f"--lr must be a finite number above 0, got {args.lr}")
    for name in ("weight_decay", "temperature"):
        if not 0 <= getattr(args, name) < math.inf:
            parser.error(f"{flag(name)} must be a finite number >= 0, got {getattr(args, name)}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.lora_alpha > 0:
        parser.error(f"--lora-alpha must be positive, got {args.lora_alpha}")
    if args.prompt is not None and not args.prompt.strip():
        parser.error(f"--prompt must hold the instruction to answer, got {args.prompt!r}")
    if args.input is not None and args.prompt is None:
        parser.error("--input goes with --prompt: give the instruction too")
    if args.generate_only + args.judge_only + (args.prompt is not None) > 1:
        parser.error("choose one of --generate-only, --judge-only and --prompt")
    if args.judge_only and args.judge == "none":
        parser.error("--judge-only needs --judge ollama")
    return args


# ----------------------------------------------------------------------------------------
# 1. Data: load, check, split
# ----------------------------------------------------------------------------------------


def read_entries(path):
    """Read a JSON list or a JSON Lines file -> (entries, bad).

    entries: list of (where, object), `where` naming the entry for messages ("entry 7",
    0-based, in a JSON list; "line 8", 1-based, in JSON Lines). bad: list of (where,
    reason) for JSON Lines lines that do not parse. Raises FileNotFoundError for a
    missing file and ValueError for a file that is neither.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path}: not UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--data {path}: not valid JSON ({e})") from None
        return [(f"entry {i}", item) for i, item in enumerate(items)], []
    entries, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                entries.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append((f"line {number}", f"not valid JSON ({e.msg})"))
    return entries, bad


def check_entry(entry):
    """Why an entry cannot be used (a string), or None when it is a valid Alpaca entry:
    a JSON object with a non-empty string "instruction", a string "output", and an
    optional string "input" (missing or null means no input)."""
    if not isinstance(entry, dict):
        return f"not a JSON object but {type(entry).__name__}"
    for key in ("instruction", "output"):
        if key not in entry:
            return f"no {key!r} key"
    for key in ("instruction", "output", "input"):
        value = entry.get(key)
        if value is not None and not isinstance(value, str):
            return f"{key!r} is {type(value).__name__}, not a string"
    if entry["output"] is None:
        return "'output' is null"
    if not (entry["instruction"] or "").strip():
        return "empty 'instruction'"
    return None


def load_instruction_data(path, max_reported=10):
    """Read and check an Alpaca-style file -> list of usable entries (dicts, as in the file).

    Bad entries (see `check_entry`) are reported with their position and left out; the
    rest go on. Raises ValueError when no usable entry is left.
    """
    entries, bad = read_entries(path)
    good = []
    for where, entry in entries:
        problem = check_entry(entry)
        if problem:
            bad.append((where, problem))
        else:
            good.append(entry)
    if bad:
        print(f"data: {len(bad)} bad entr{'y' if len(bad) == 1 else 'ies'} in {path} left out:")
        for where, problem in bad[:max_reported]:
            print(f"  {where}: {problem}")
        if len(bad) > max_reported:
            print(f"  ... and {len(bad) - max_reported} more")
    if not good:
        raise ValueError(
            f"--data {path}: no usable entries ({len(bad)} bad); expected a JSON list or JSON Lines (one entry a "
            "line) of objects with a non-empty string 'instruction' and a string 'output' (Alpaca schema)"
        )
    return good


def split_dataset(entries, seed):
    """Shuffle with `seed`, then split 85% train, 10% test, the rest (5%) validation, as in
    the book (1,100 entries -> 935 / 110 / 55). Returns (train, validation, test) lists.
    Raises ValueError when a part would be empty (fewer than 10 entries)."""
    entries = list(entries)
    random.Random(seed).shuffle(entries)
    n_train = int(len(entries) * SPLIT_FRACTIONS[0])
    n_test = int(len(entries) * SPLIT_FRACTIONS[1])
    train, test, val = entries[:n_train], entries[n_train : n_train + n_test], entries[n_train + n_test :]
    if not (train and test and val):
        raise ValueError(f"the 85/5/10 split needs at least 10 usable entries, --data has {len(entries)}")
    return train, val, test


# ----------------------------------------------------------------------------------------
# 2. Prompt format (Alpaca)
# ----------------------------------------------------------------------------------------


def format_input(entry):
    """The Alpaca prompt of an entry, without the response section (the book's format_input):

        Below is an instruction that describes a task. Write a response that appropriately completes the request.

        ### Instruction:
        <instruction>

        ### Input:
        <input>

    An entry without input (empty, missing or null) leaves out the "### Input:" section.
    """
    text = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}"
    )
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_prompt(entry):
    """What the model reads before answering: format_input(entry) + "\\n\\n### Response:\\n"."""
    return format_input(entry) + "\n\n### Response:\n"


# ----------------------------------------------------------------------------------------
# 3. Batching: tokenize, pad, mask
# ----------------------------------------------------------------------------------------


def tokenize_examples(entries, max_length, mask_prompt):
    """Entries -> list of (token ids, prompt length in tokens) for training.

    Prompt and response are tokenized separately and joined, so that the prompt's tokens
    are exactly the first `prompt length` ids (needed to mask them). With --mask-prompt an
    entry whose prompt alone is longer than max_length has nothing left to learn and is
    reported and left out.
    """
    examples, too_long = [], 0
    for entry in entries:
        prompt_ids = gpt.text_to_token_ids(format_prompt(entry))[0].tolist()
        response_ids = gpt.text_to_token_ids(entry["output"])[0].tolist()
        if mask_prompt and len(prompt_ids) > max_length:
            too_long += 1
            continue
        examples.append((prompt_ids + response_ids, len(prompt_ids)))
    if too_long:
        print(f"data: {too_long} entries left out: with --mask-prompt their prompt is over --max-length {max_length}")
    return examples


def collate_instruction_batch(batch, *, mask_prompt=False, max_length=None, pad_id=gpt.EOT_ID):
    """Pad a batch of examples into inputs and targets: LongTensor [batch, seq_len] each.

    batch: list of (token ids, prompt length). Every sequence gets at least one
    <|endoftext|> (50256) appended and is padded with it to one token more than the
    longest in the batch; inputs are all but the last token, targets the same shifted
    left by one (target j is the token after input j). The first end-of-text target stays
    (the model learns to stop), the remaining padding targets become -100 so the loss
    ignores them. With mask_prompt the targets that predict prompt tokens become -100
    too, so only the response (and its end-of-text) is learned. Sequences are then cut
    to max_length tokens. Follows the book's custom_collate_fn (section 7.3 and exercise
    7.2), with the padding found by position rather than by token value, so a real
    50256 inside a text stays a target.
    """
    seq_len = max(len(ids) for ids, _ in batch) + 1  # +1: room for the end-of-text token
    inputs, targets = [], []
    for ids, prompt_length in batch:
        padded = ids + [pad_id] * (seq_len - len(ids))
        x, y = padded[:-1], padded[1:]
        y[len(ids) :] = [IGNORE_INDEX] * (len(y) - len(ids))  # y[len(ids) - 1] is the kept end-of-text
        if mask_prompt:
            # y[j] is token j + 1: the prompt tokens 1 .. prompt_length - 1 sit at y[: prompt_length - 1]
            y[: prompt_length - 1] = [IGNORE_INDEX] * (prompt_length - 1)
        inputs.append(x[:max_length])
        targets.append(y[:max_length])
    return torch.tensor(inputs), torch.tensor(targets)


def batches(examples, batch_size, order=None):
    """Split examples into lists of batch_size (the last may be shorter), in `order`
    (a list of indices; default: as given)."""
    order = range(len(examples)) if order is None else order
    chosen = [examples[i] for i in order]
    return [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]


def epoch_order(n_examples, seed, epoch):
    """The shuffled order of one epoch, reproducible from seed and epoch alone, so that a
    resumed run sees the same batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


# ----------------------------------------------------------------------------------------
# 4. Fine-tuning
# ----------------------------------------------------------------------------------------


def batch_tensors(batch, settings, device):
    """collate_instruction_batch with the run's --mask-prompt and --max-length, on device."""
    inputs, targets = collate_instruction_batch(
        batch, mask_prompt=settings["mask_prompt"], max_length=settings["max_length"]
    )
    return inputs.to(device), targets.to(device)


def calc_loss_batch(model, inputs, targets, autocast):
    """Mean cross-entropy over the targets that are not -100 (a float scalar tensor).
    inputs, targets: LongTensor [batch, seq_len] on the model's device."""
    with autocast:
        logits = model(inputs)  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate_loss(model, examples, settings, device, autocast):
    """Mean batch loss over the first `eval_batches` batches of examples (all when 0),
    in eval mode, in order (no shuffling), so successive estimates are comparable."""
    model.eval()
    chunks = batches(examples, settings["batch_size"])
    if settings["eval_batches"]:
        chunks = chunks[: settings["eval_batches"]]
    losses = []
    for chunk in chunks:
        inputs, targets = batch_tensors(chunk, settings, device)
        losses.append(calc_loss_batch(model, inputs, targets, autocast).item())
    model.train()
    return sum(losses) / len(losses)


def train_step(model, optimizer, batch, settings, device, autocast):
    """One optimizer step on a batch of examples -> (loss as a float, tokens in the batch)."""
    inputs, targets = batch_tensors(batch, settings, device)
    loss = calc_loss_batch(model, inputs, targets, autocast)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), inputs.numel()  # .item() also waits for the device, so step timings are true


# Settings that must agree between a run and its --resume: they shape the weights, the
# optimizer state or the batches.
RESUME_KEYS = ("model", "lora", "lora_rank", "lora_alpha", "lr", "weight_decay", "batch_size", "seed", "mask_prompt",
               "max_length", "data_sha256")


def prepare_model(settings, device, resume_config=None):
    """The model to train, in train mode on device: settings["model"] through
    gpt.load_gpt2, or, when resuming, an empty GPTModel of resume_config (a GPTConfig
    dict) whose weights `train` then restores; wrapped with LoRA adapters when
    settings["lora"] (only the adapters train)."""
    torch.manual_seed(settings["seed"])  # LoRA's A matrices start random
    if resume_config is None:
        model = gpt.load_gpt2(settings["model"], device=device)
    else:
        model = gpt.GPTModel(gpt.GPTConfig(**resume_config)).to(device)
    if settings["lora"]:
        gpt.add_lora(model, rank=settings["lora_rank"], alpha=settings["lora_alpha"])
    return model.train()


def check_resume(state, settings, path):
    """Raise ValueError listing every setting that differs from the run in train_state.pt."""
    saved = state["settings"]
    differ = [
        f"{flag(k)}: was {saved.get(k)!r}, now {settings[k]!r}" for k in RESUME_KEYS if saved.get(k) != settings[k]
    ]
    if differ:
        raise ValueError(
            f"--resume: {path} comes from a different run:\n  "
            + "\n  ".join(differ)
            + "\nuse the same flags, or another --out-dir"
        )


def train(model, train_examples, val_examples, settings, out_dir, device, resume_state=None):
    """Fine-tune model in place with AdamW; return the loss history
    {"step": [...], "train_loss": [...], "val_loss": [...]}.

    One optimizer step per batch, for settings["epochs"] epochs (or settings["max_steps"]
    steps in all). Prints a progress line every log_every steps (loss, tokens/s and
    seconds per step of the training steps alone, ETA), a train/validation loss estimate
    every eval_every steps and at the end, and writes out_dir/train_state.pt every
    save_every steps and at each epoch's end. With resume_state (a train_state.pt dict),
    the weights, optimizer state, step and history are restored and training goes on
    with the next batch.
    """
    # The book's recipe: every trainable parameter decays (biases and LayerNorm included).
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings["lr"], weight_decay=settings["weight_decay"]
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    steps_per_epoch = -(-len(train_examples) // settings["batch_size"])  # ceil: the last batch may be smaller
    total_steps = steps_per_epoch * settings["epochs"]
    if settings["max_steps"] is not None:
        total_steps = min(total_steps, settings["max_steps"])
    step, history = 0, {"step": [], "train_loss": [], "val_loss": []}
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        step, history = resume_state["step"], resume_state["history"]
        print(f"resuming at step {step} of {total_steps}")
    state_path = Path(out_dir) / "train_state.pt"

    def save_state():
        gpt.save_checkpoint(
            state_path, model, optimizer=optimizer.state_dict(), step=step, history=history, settings=settings
        )

    def log_losses():
        train_loss = evaluate_loss(model, train_examples, settings, device, autocast)
        val_loss = evaluate_loss(model, val_examples, settings, device, autocast)
        history["step"].append(step)
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        print(f"step {step}: train loss {train_loss:.3f}, val loss {val_loss:.3f}", flush=True)

    print(f"training: {len(train_examples)} examples, {steps_per_epoch} steps per epoch, {total_steps} steps in all")
    if step == 0:
        log_losses()  # the starting point of the loss curves
    started, start_step = time.time(), step
    step_seconds, window_seconds, window_tokens = 0.0, 0.0, 0
    model.train()
    epoch_batches = None
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch_batches is None or index == 0:
            epoch_batches = batches(
                train_examples, settings["batch_size"], epoch_order(len(train_examples), settings["seed"], epoch)
            )
        step_start = time.time()
        loss_value, n_tokens = train_step(model, optimizer, epoch_batches[index], settings, device, autocast)
        step += 1
        window_seconds += time.time() - step_start
        window_tokens += n_tokens
        if not math.isfinite(loss_value):
            raise RuntimeError(f"the loss became {loss_value} at step {step}: lower --lr (now {settings['lr']})")

        if step % settings["log_every"] == 0 or step == total_steps:
            step_seconds += window_seconds
            eta = (time.time() - started) / (step - start_step) * (total_steps - step)  # evaluation included
            print(
                f"epoch {epoch + 1}/{settings['epochs']} step {step}/{total_steps} | loss {loss_value:.3f} | "
                f"{window_tokens / window_seconds:.0f} tok/s | {step_seconds / (step - start_step):.2f} s/step | "
                f"ETA {gpt.format_duration(eta)}",
                flush=True,
            )
            window_seconds, window_tokens = 0.0, 0
        if step % settings["eval_every"] == 0 or step == total_steps:
            log_losses()
        if step % settings["save_every"] == 0 or step % steps_per_epoch == 0 or step == total_steps:
            save_state()
    if step > start_step:
        print(
            f"trained {step - start_step} steps: {step_seconds / (step - start_step):.3f} s/step "
            "in the training steps, "
            f"{gpt.format_duration(time.time() - started)} wall time with evaluation and saving"
        )
    return history


# ----------------------------------------------------------------------------------------
# 5. Answers: generate a response for each test entry
# ----------------------------------------------------------------------------------------


def generate_response(model, entry, *, max_new_tokens=256, temperature=0.0, top_k=None, top_p=None, seed=None):
    """The model's answer to one entry -> (response text, number of new tokens).

    Continues format_prompt(entry) with gpt.generate (greedy when temperature is 0, else
    sampling limited by top_k and top_p; with the KV cache), stops at <|endoftext|> or
    after max_new_tokens, and keeps only the new text, stripped of surrounding whitespace. Follows the book's section 7.7 (which
    removes "### Response:" afterwards; here the prompt already ends with it).
    """
    prompt_ids = gpt.text_to_token_ids(format_prompt(entry), device=model.wte.weight.device)
    output = gpt.generate(
        model,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=gpt.EOT_ID,
        seed=seed,
    )
    new_ids = output[0, prompt_ids.shape[1] :].tolist()
    if gpt.EOT_ID in new_ids:
        new_ids = new_ids[: new_ids.index(gpt.EOT_ID)]
    return gpt.token_ids_to_text(new_ids).strip(), len(new_ids)


def write_json(path, obj):
    """Write obj as indented UTF-8 JSON to path atomically."""
    gpt.atomic_write_bytes(path, json.dumps(obj, indent=4, ensure_ascii=False).encode("utf-8") + b"\n")


def generate_responses(model, entries, path, **options):
    """Answer every entry (options as in `generate_response`), printing a progress line per
    entry, and write the entries, each with a "model_response" field, to path (JSON,
    atomically). Returns that list."""
    results, tokens, started = [], 0, time.time()
    for i, entry in enumerate(entries, start=1):
        response, n_tokens = generate_response(model, entry, **options)
        results.append({**entry, "model_response": response})
        tokens += n_tokens
        elapsed = time.time() - started
        eta = gpt.format_duration(elapsed / i * (len(entries) - i))
        print(f"answers {i}/{len(entries)} | {tokens / elapsed:.1f} tok/s | ETA {eta}", flush=True)
    write_json(path, results)
    print(f"wrote {len(results)} responses to {path}")
    return results


# ----------------------------------------------------------------------------------------
# 6. Evaluation: an LLM judge served by Ollama
# ----------------------------------------------------------------------------------------


def judge_prompt(entry):
    """The grading request for one response (the book's section 7.8 wording)."""
    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry['model_response']}`"
        " on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


# The parts of a judge's reply that parse_score reads (re.I: "Score", "RATING", "8.5E1").
# 85, 85.5, -5, 8.5e1, always whole: not the 2 of "GPT-2", nor the 8 of "85" or the 0 of "7/0"
_NUMBER = r"(?<![\w./-])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?!\.?\d|e[-+]?\d)"
# 85, 8/10, 4 out of 5; a number before a "/" that makes no ratio ("7/0", a date) is no score
_SCORE = re.compile(rf"(?P<value>{_NUMBER})(?:\s*(?:/|out of)\s*(?P<top>[1-9]\d*))?(?!\s*/)", re.I)
_LABEL = (
    r"(?:\b(?:score|rating|grade)\b[\s*:=\"']*(?:(?:is|of|would be)\s+)?"  # "Score: 85", "**Rating:** 8/10"
    r"|\b(?:give|rate|score)s?\s+(?:(?:it|this|that|the)\s+(?:response\s+|answer\s+)?)?(?:an?\s+)?)"  # "I'd give it"
)
_LABELLED = re.compile(_LABEL + _SCORE.pattern, re.I)
_NOISE = re.compile(
    r"`(?=[^`\n]*[a-z])[^`\n]*`|\"(?=[^\"\n]*[a-z])[^\"\n]*\"|“[^”]*”"  # a quoted answer; a bare "85" stays
    r"|(?:\bbetween\s+\d+(?:\.\d+)?\s+and|\b\d+(?:\.\d+)?\s*(?:-|–|to))\s*\d+(?:\.\d+)?\b"  # "0 to 100", "0-100"
    r"|(?:^|(?<=[.!?]))[ \t]*\d[.)](?=\s)",  # a list marker: "1. The response...", "2) It..."
    re.I | re.M,
)
_JSON_OBJECT = re.compile(r'\{[^{}]*"score"[^{}]*\}')  # {"score": 85} inside prose or a ```json block


def parse_score(reply):
    """The judge's reply -> its score as a float in 0..100, or None when the reply has no
    single score (unscorable). reply is the message content: text, or a JSON value.

    The first rule that applies decides:
    1. JSON, the structured output asked for: a number, or an object {"score": x} (the
       whole reply, or an object within it) -> x. Anything else (null, a list) -> None.
    2. A labelled score: "Score: 85", "rating = 8/10", "I'd give it 85", "I would rate it 85".
    3. The number left once quoted text, scales and ranges ("0 to 100", "0-100") and list
       markers ("1. ") are dropped: "85", "85/100", "It deserves 85%."
    A ratio goes on the 0-100 scale: "8/10" and "4 out of 5" -> 80.0 (6 decimals kept).
    Two different values under rule 2 or 3 (ambiguous), or a value outside 0..100 -> None.
    """
    if isinstance(reply, dict):
        reply = reply.get("score")
    if isinstance(reply, (int, float)) and not isinstance(reply, bool):
        return float(reply) if 0 <= reply <= 100 else None  # NaN fails both comparisons
    if not isinstance(reply, str):
        return None  # no content (None), a list, true or false
    for candidate in [reply, *_JSON_OBJECT.findall(reply)]:
        try:
            return parse_score(json.loads(candidate))
        except (ValueError, RecursionError):  # not JSON (or nested too deep): the next candidate, then the text
            pass
    text = _NOISE.sub(" ", reply)
    matches = list(_LABELLED.finditer(text)) or list(_SCORE.finditer(text))
    # rounded so that 8.7/10 gives 87.0, not 86.99999999999999
    values = {round(float(m["value"]) * 100 / float(m["top"] or 100), 6) for m in matches}
    return parse_score(values.pop()) if len(values) == 1 else None


def ollama_help(url, model):
    """How to get a judge running, for error messages."""
    return (
        f"start the server with `ollama serve` (install it from https://ollama.com) and get the judge with "
        f"`ollama pull {model}`, or point --judge-url at a running server (now {url})"
    )


def check_ollama(url, model):
    """Make sure an Ollama server answers at url and has `model`; raise RuntimeError with
    the commands that fix it otherwise. Uses GET /api/tags (the list of local models)."""
    try:
        reply = requests.get(f"{url}/api/tags", timeout=5)
        reply.raise_for_status()
        names = {m.get("name") for m in reply.json().get("models", [])}
    except (requests.RequestException, ValueError, AttributeError) as e:
        raise RuntimeError(
            f"no Ollama server answers at {url} ({e.__class__.__name__}): {ollama_help(url, model)}"
        ) from None
    if model not in names and f"{model}:latest" not in names:
        raise RuntimeError(
            f"the Ollama server at {url} does not have the model {model!r} "
            f"(it has: {', '.join(sorted(names)) or 'none'}); "
            f"run `ollama pull {model}` or choose another --judge-model"
        )


# Ollama's structured output (https://ollama.com/blog/structured-outputs, Ollama 0.5+): the
# JSON schema in the request's "format" field constrains the reply to {"score": <0..100>}.
SCORE_FORMAT = {
    "type": "object",
    "properties": {"score": {"type": "number", "minimum": 0, "maximum": 100}},
    "required": ["score"],
}


def query_ollama(prompt, url, model, timeout=600):
    """One chat request to Ollama's HTTP API (POST /api/chat, not streamed) with
    temperature 0, a fixed seed and the SCORE_FORMAT schema -> the reply's content: text
    (normally '{"score": 85}'), or whatever JSON value the server sent instead. A server
    older than Ollama 0.5 rejects a schema (HTTP 400); it is then asked again without one.
    Raises RuntimeError when the server cannot be reached or answers with an error."""
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": False,
        "options": {"temperature": 0, "seed": JUDGE_SEED, "num_ctx": 2048},
    }
    try:
        reply = requests.post(f"{url}/api/chat", json={**payload, "format": SCORE_FORMAT}, timeout=(5, timeout))
        if reply.status_code == 400 and "format" in reply.text:
            # before 0.5 "format" could only be "json"; parse_score then reads the prose
            reply = requests.post(f"{url}/api/chat", json=payload, timeout=(5, timeout))
    except requests.RequestException as e:
        raise RuntimeError(
            f"the Ollama server at {url} stopped answering ({e.__class__.__name__}): {ollama_help(url, model)}"
        ) from None
    if reply.status_code != 200:
        raise RuntimeError(f"the Ollama server at {url} answered HTTP {reply.status_code}: {reply.text[:300]}")
    try:
        return reply.json()["message"]["content"]
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"the Ollama server at {url} sent an unexpected answer: {reply.text[:300]}") from None


def judge_responses(entries, url, model, path):
    """Score each entry's "model_response" against its "output" with the judge, print
    the mean score and how many could not be scored, and write the entries with a
    "score" field (a number 0-100, or null when unscorable) to path. Returns (mean or None,
    number unscorable). The responses file is only read."""
    check_ollama(url, model)
    scored, started = [], time.time()
    for i, entry in enumerate(entries, start=1):
        problem = check_entry(entry) or (
            None if isinstance(entry.get("model_response"), str) else "no string 'model_response'"
        )
        score = None
        if problem:
            print(f"  entry {i - 1}: cannot be scored: {problem}")
        else:
            answer = query_ollama(judge_prompt(entry), url, model)
            score = parse_score(answer)
            if score is None:
                print(f"  entry {i - 1}: no score 0-100 in the judge's answer {answer!r:.80}")
        scored.append({**entry, "score": score} if isinstance(entry, dict) else {"entry": entry, "score": None})
        elapsed = time.time() - started
        print(f"judging {i}/{len(entries)} | ETA {gpt.format_duration(elapsed / i * (len(entries) - i))}", flush=True)
    scores = [e["score"] for e in scored if e["score"] is not None]
    mean = sum(scores) / len(scores) if scores else None
    unscorable = len(entries) - len(scores)
    write_json(path, scored)
    mean_text = f"{mean:.2f}" if mean is not None else "n/a"
    print(f"judge {model}: mean score {mean_text} over {len(scores)} entries; {unscorable} could not be scored")
    print(f"wrote the scores to {path}")
    return mean, unscorable


def read_responses(path):
    """The list of entries in a responses file written by generate_responses."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--responses {path}: no such file; generate it first (e.g. --generate-only)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--responses {path}: not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--responses {path}: expected a non-empty JSON list of entries")
    return entries


# ----------------------------------------------------------------------------------------
# 7. Putting it together
# ----------------------------------------------------------------------------------------


def data_path(args):
    """--data, or the book's file downloaded once into the cache."""
    if args.data is not None:
        return Path(args.data)
    return gpt.fetch_dataset([DATA_URL], "instruction-data.json", flag="--data")


def load_for_answers(args, out_dir, device):
    """The model of --checkpoint (default <out-dir>/model.pt) for --generate-only and --prompt."""
    checkpoint = args.checkpoint or str(out_dir / "model.pt")
    if args.checkpoint is None and not Path(checkpoint).exists():
        raise FileNotFoundError(
            f"no {checkpoint}: fine-tune first, or pass --checkpoint PATH (any --model value works)"
        )
    print(f"model: {checkpoint}")
    return gpt.load_gpt2(checkpoint, device=device)


def judge(args, responses_path):
    """Grade the responses file with the --judge; the scores go to <name>-scored.json beside it."""
    scored_path = responses_path.with_name(responses_path.stem + "-scored.json")
    try:
        judge_responses(read_responses(responses_path), args.judge_url.rstrip("/"), args.judge_model, scored_path)
    except RuntimeError as e:
        raise RuntimeError(
            f"{e}\nthe answers stay in {responses_path}; grade them later with: "
            f"python finetune_instruct.py --judge-only --judge ollama --responses {responses_path}"
        ) from None


def run(args):
    out_dir = Path(args.out_dir)
    responses_path = Path(args.responses) if args.responses else out_dir / "responses.json"

    if args.judge_only:
        judge(args, responses_path)
        return

    device = gpt.pick_device(args.device)
    settings = dict(vars(args))  # the recipe, saved with the checkpoints
    answer_options = {key: getattr(args, key) for key in ("max_new_tokens", "temperature", "top_k", "top_p")}
    answer_options["seed"] = args.seed if args.temperature > 0 else None

    if args.prompt is not None:
        model = load_for_answers(args, out_dir, device)
        response, _ = generate_response(model, {"instruction": args.prompt, "input": args.input}, **answer_options)
        print(response)
        return

    path = data_path(args)
    train_set, val_set, test_set = split_dataset(load_instruction_data(path), args.seed)
    sizes = f"{len(train_set)} train, {len(val_set)} validation, {len(test_set)} test entries"
    print(f"data: {path}: {sizes} (seed {args.seed})")

    if args.generate_only:
        model = load_for_answers(args, out_dir, device)
    else:
        resume_state, state_path = None, out_dir / "train_state.pt"
        if args.resume:
            if not state_path.exists():
                raise FileNotFoundError(f"--resume: no {state_path} to continue from; run without --resume first")
            resume_state = gpt.load_checkpoint(state_path)
        model = prepare_model(settings, device, resume_state["config"] if resume_state else None)
        context_length = model.cfg.context_length
        if settings["max_length"] is None:
            settings["max_length"] = context_length
        elif settings["max_length"] > context_length:
            raise ValueError(
                f"--max-length {settings['max_length']} is longer than the model's context length {context_length}"
            )
        settings["data_sha256"] = hashlib.sha256(json.dumps(train_set + val_set, sort_keys=True).encode()).hexdigest()
        if resume_state is not None:
            check_resume(resume_state, settings, state_path)
        trainable = gpt.count_parameters(model, trainable_only=True) / 1e6
        print(
            f"model: {args.model}, {gpt.count_parameters(model) / 1e6:.1f}M parameters, "
            f"{trainable:.2f}M trainable{' (LoRA adapters)' if args.lora else ''}, on {device}"
        )
        train_examples = tokenize_examples(train_set, settings["max_length"], args.mask_prompt)
        val_examples = tokenize_examples(val_set, settings["max_length"], args.mask_prompt)
        if not train_examples or not val_examples:
            raise ValueError("no training or validation example is left: raise --max-length or drop --mask-prompt")

        history = train(model, train_examples, val_examples, settings, out_dir, device, resume_state)
        gpt.plot_curves(
            out_dir / "losses.png",
            {
                "loss": {
                    "train": (history["step"], history["train_loss"]),
                    "validation": (history["step"], history["val_loss"]),
                }
            },
            "step",
        )
        if args.lora:
            gpt.merge_lora(model)  # back to GPT-2's own layers: a plain checkpoint
        gpt.save_checkpoint(out_dir / "model.pt", model.eval(), settings=settings, history=history)
        print(f"saved the fine-tuned model to {out_dir / 'model.pt'}")

    generate_responses(model, test_set, responses_path, **answer_options)
    if args.judge == "ollama":
        judge(args, responses_path)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(
            f"interrupted: --resume continues from the last {Path(args.out_dir) / 'train_state.pt'} (see --save-every)"
        )


if __name__ == "__main__":
    main()
