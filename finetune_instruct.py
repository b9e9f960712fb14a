"""finetune_instruct.py: teach GPT-2, or a Llama-family model, to follow instructions.

Chapter 7 of "Build a Large Language Model (From Scratch)" (S. Raschka, 2024;
https://github.com/rasbt/LLMs-from-scratch/tree/main/ch07): the book's 1,100 instruction/response pairs in the Alpaca
prompt format (Taori et al., 2023, https://github.com/tatsu-lab/stanford_alpaca), GPT-2 medium, AdamW at lr 5e-5 with
weight decay 0.1, batch size 8, 2 epochs. The weights of the evaluation with the lowest validation loss are kept; they
answer every test instruction, and a local LLM served by Ollama can grade the answers (0-100). A Llama-family model
(SmolLM2, Qwen3, Llama 3.2) trains the same way, with its own tokenizer and end-of-text token.

    python finetune_instruct.py                                  # the book's recipe (downloads data and gpt2-medium)
    python finetune_instruct.py --model HuggingFaceTB/SmolLM2-135M --lora --mask-prompt
    python finetune_instruct.py --resume                         # continue an interrupted run
    python finetune_instruct.py --generate-only                  # answer the run's test split again
    python finetune_instruct.py --prompt "Rewrite the sentence in passive voice." --input "The cat ate the fish."
    python finetune_instruct.py --judge-only --judge ollama      # grade runs/instruct/responses.json

Writes to --out-dir (default runs/instruct/; one that holds another run is refused unless --resume or --overwrite):
    run.json, train.json, validation.json, test.json   the settings and the split, for --resume and --generate-only
    model.pt          the kept weights, LoRA merged, with its tokenizer (1.4 GB for gpt2-medium); load it with
                      model, tokenizer = gpt.load("runs/instruct/model.pt")
    train_state.pt    model, optimizer, step, history, random state and the best weights so far (4x the model; about 1x
                      with --lora), while training or with --keep-state
    losses.png        train and validation loss per step (with matplotlib installed)
    responses.json    the test entries with a "model_response" each (responses.partial.json while answering)
    responses-scored.json   the same with a "score" (0-100 or null), after --judge ollama
"""

import functools
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import requests
import torch

import gpt

# The book's file at a fixed commit, checked by size (bytes) and SHA-256 after each download and use.
DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/"
    "b80e7804b30830a00eb55d2abc7ac25a07f36fdc/ch07/01_main-chapter-code/instruction-data.json"
)
DATA_SIZE = 203524
DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
IGNORE_INDEX = -100  # the target value torch.nn.functional.cross_entropy skips by default
SPLIT_FRACTIONS = (0.85, 0.10)  # train, test; validation gets the rest (5%), as in the book
SPLIT_FILES = ("train.json", "validation.json", "test.json")
JUDGE_SEED = 123  # fixed seed (and temperature 0) so the judge gives the same score twice
ANSWERS_PER_SAVE = 10  # answers between saves of responses.partial.json
RUN_FILES = ("run.json", *SPLIT_FILES, "train_state.pt", "model.pt", "losses.png", "responses.json",
             "responses.partial.json", "responses-scored.json")
# Flags that may differ from the saved run on --resume: more steps, another machine, other answers.
RESUME_MAY_CHANGE = ("resume", "epochs", "max_steps", "keep_state", "keep_last", "device", "cache_dir", "out_dir",
                     "responses", "max_new_tokens", "temperature", "top_k", "top_p", "judge", "judge_url",
                     "judge_model")
# Flags of training alone: --generate-only, --prompt and --judge-only would ignore them, so they are refused there.
TRAINING_FLAGS = ("model", "epochs", "batch_size", "lr", "weight_decay", "drop_rate", "lora", "lora_rank", "lora_alpha",
                  "max_steps", "log_every", "eval_every", "eval_batches", "keep_last", "save_every", "keep_state",
                  "max_length", "mask_prompt")


# ----------------------------------------------------------------------------------------
# 1. Data: read, check, split
# ----------------------------------------------------------------------------------------


def check_entry(entry):
    """Why an entry cannot be used (a string), or None for a valid Alpaca entry: a JSON object with a non-empty
    string "instruction", a string "output" and an optional string "input" (missing or null: no input)."""
    if not isinstance(entry, dict):
        return f"not a JSON object but {type(entry).__name__}"
    for key in ("instruction", "output"):  # required
        if entry.get(key) is None:
            return f"{key!r} is null" if key in entry else f"no {key!r} key"
    for key in ("instruction", "output", "input"):  # "input" may be missing or null
        if entry.get(key) is not None and not isinstance(entry[key], str):
            return f"{key!r} is {type(entry[key]).__name__}, not a string"
    return None if entry["instruction"].strip() else "empty 'instruction'"


def load_instruction_data(path, max_reported=10):
    """Read an Alpaca-style JSON list or JSON Lines file (UTF-8, a byte-order mark allowed) -> the usable entries
    (dicts, as in the file). Bad entries are reported with their position, "entry 7" (0-based) in a list, "line 8"
    (1-based) in JSON Lines, and left out. Raises FileNotFoundError, or ValueError when no usable entry is left."""
    path = gpt.existing_file(path, "--data")
    text = gpt.decode_utf8(path.read_bytes(), f"--data {path}")
    if not text.strip():
        raise ValueError(f"--data {path}: the file is empty: give a JSON list of Alpaca entries")
    if text.lstrip().startswith("{"):
        try:
            whole = json.loads(text)  # JSON Lines of two or more entries fail here: "extra data"
        except (json.JSONDecodeError, RecursionError):
            whole = None
        if isinstance(whole, dict) and "instruction" not in whole:
            raise ValueError(f"--data {path}: one JSON object, not a list of entries: give a JSON list (or JSON "
                             "Lines) of Alpaca entries")
    entries, bad, good = [], [], []
    if text.lstrip().startswith("["):
        entries = [(f"entry {i}", item) for i, item in enumerate(gpt.parse_json(text, f"--data {path}"))]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append((f"line {number}", f"not valid JSON ({e.msg})"))
            except RecursionError:
                bad.append((f"line {number}", "JSON nested too deeply"))
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


def read_split(path):
    """The entries of a split file a run wrote (train.json, validation.json, test.json) -> list. Raises ValueError
    naming the file when it is no longer a non-empty list of usable entries (edited or damaged since)."""
    entries = gpt.read_json(path, "the run's split")
    if not isinstance(entries, list) or not entries:
        problem = "it holds no entries" if entries == [] else "it is not a JSON list"
    else:
        problem = next((f"entry {i}: {check_entry(e)}" for i, e in enumerate(entries) if check_entry(e)), None)
    if problem:
        raise ValueError(f"{path}: the run's split is damaged ({problem}): put back the file the run wrote, or "
                         "start the run again with --overwrite")
    return entries


def split_dataset(entries, seed):
    """Shuffle with `seed`, then split 85% train, 10% test, the rest (5%) validation, as in the book (1,100 entries ->
    935 / 110 / 55) -> (train, validation, test) lists. Raises ValueError when a part would be empty (< 10 entries)."""
    train, test, val = gpt.split_by_fractions(entries, seed, SPLIT_FRACTIONS)
    if not (train and test and val):
        raise ValueError(f"the 85/5/10 split needs at least 10 usable entries, --data has {len(entries)}")
    return train, val, test


# ----------------------------------------------------------------------------------------
# 2. Prompt format (Alpaca)
# ----------------------------------------------------------------------------------------


def format_input(entry):
    """The Alpaca prompt of an entry without its response section (the book's format_input); an entry without
    input (empty, missing or null) leaves out the "### Input:" section."""
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


def tokenize_examples(entries, tokenizer, max_length, mask_prompt):
    """Entries -> list of (token ids, prompt length) with the model's tokenizer. Prompt and response are tokenized
    separately and joined, so the prompt is exactly the first ids (to mask them). With --mask-prompt an entry whose
    prompt alone is over max_length has nothing to learn: left out."""
    examples, too_long = [], 0
    for entry in entries:
        prompt_ids = tokenizer.encode(format_prompt(entry), bos=True)  # Llama 3: <|begin_of_text|> first
        response_ids = tokenizer.encode(entry["output"])  # a piece of the same text: no begin token
        if mask_prompt and len(prompt_ids) > max_length:
            too_long += 1
            continue
        examples.append((prompt_ids + response_ids, len(prompt_ids)))
    if too_long:
        print(f"data: {too_long} entries left out: with --mask-prompt their prompt is over --max-length {max_length}")
    return examples


def collate_instruction_batch(batch, eot_id, *, mask_prompt=False, max_length=None):
    """Pad a batch of (token ids, prompt length) into inputs and targets: LongTensor [batch, seq_len] each.

    The book's custom_collate_fn (section 7.3, exercise 7.2). Each sequence gets at least one end-of-text token
    (eot_id: the tokenizer's, 50256 for GPT-2; the Llama family's own, which also pads, as those models define no
    padding token) and is padded with it to one token more than the longest; targets are the inputs shifted left by
    one. The first end-of-text target stays (the model learns to stop); later padding targets become -100 (the loss
    skips them), and so do, with mask_prompt, the targets that predict prompt tokens. Then sequences are cut to
    max_length. Padding is found by position, not value: a real end-of-text in a text stays a target.
    """
    seq_len = max(len(ids) for ids, _ in batch) + 1  # +1: room for the end-of-text token
    inputs, targets = [], []
    for ids, prompt_length in batch:
        padded = ids + [eot_id] * (seq_len - len(ids))
        x, y = padded[:-1], padded[1:]
        y[len(ids) :] = [IGNORE_INDEX] * (len(y) - len(ids))  # y[len(ids) - 1] is the kept end-of-text
        if mask_prompt:
            # y[j] is token j + 1: the prompt tokens 1 .. prompt_length - 1 sit at y[: prompt_length - 1]
            y[: prompt_length - 1] = [IGNORE_INDEX] * (prompt_length - 1)
        inputs.append(x[:max_length])
        targets.append(y[:max_length])
    return torch.tensor(inputs), torch.tensor(targets)


def epoch_batch(examples, batch_size, seed, epoch, index):
    """Batch `index` of an epoch (a list of examples; the epoch's last batch may be shorter), in the order
    `gpt.epoch_order` gives the epoch from seed and epoch alone: a resumed run reads what an uninterrupted one would."""
    order = gpt.epoch_order(len(examples), seed, epoch)[index * batch_size : (index + 1) * batch_size]
    return [examples[i] for i in order.tolist()]


# ----------------------------------------------------------------------------------------
# 4. Fine-tuning: the model (+ LoRA) and the training loop
# ----------------------------------------------------------------------------------------


def prepare_model(args, device, state=None):
    """The model to train, in train mode on device, and its tokenizer -> (model, gpt.Tokenizer): --model (see
    gpt.load), or on --resume one of the state's config and tokenizer (`train` loads its weights); dropout at
    --drop-rate; with --lora only adapters train. Raises RuntimeError when training cannot fit."""
    torch.manual_seed(args.seed)  # LoRA's A matrices start random
    if state is None:
        model, tokenizer = gpt.load(args.model, device=device)
    else:
        model = gpt.build_model(gpt.GPTConfig(**state["config"])).to(device)
        tokenizer = gpt.tokenizer_from_state(state.get("tokenizer"))
    gpt.set_drop_rate(model, args.drop_rate)
    if args.lora:
        gpt.add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
    # Weights, gradients and AdamW's moments (16 bytes a parameter; 20 GB for a 1B model) must fit
    hint = "choose a smaller --model" + ("" if args.lora else ", or train only low-rank adapters with --lora")
    gpt.check_training_memory(model, device, hint)
    return model.train(), tokenizer


def calc_loss_batch(model, inputs, targets, autocast):
    """Mean cross-entropy over the targets that are not -100 (a float scalar tensor).
    inputs, targets: LongTensor [batch, seq_len] on the model's device."""
    with autocast:
        logits = model(inputs)  # (batch, seq_len, vocab)
    return gpt.next_token_loss(logits, targets)


@torch.no_grad()
def evaluate_loss(model, examples, collate, args, device, autocast):
    """Mean batch loss over the first --eval-batches batches of examples (all when 0), in eval mode, in order (no
    shuffling), so successive estimates are comparable."""
    model.eval()
    chunks = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    losses = []
    for chunk in chunks[: args.eval_batches or None]:
        inputs, targets = collate(chunk)
        losses.append(calc_loss_batch(model, inputs.to(device), targets.to(device), autocast).item())
    model.train()
    return sum(losses) / len(losses)


def train(model, tokenizer, train_examples, val_examples, collate, args, device, state_path, stopper, state=None):
    """Fine-tune model in place with AdamW, one step per batch, for --epochs (or --max-steps) -> (history {"step",
    "train_loss", "val_loss": lists}, best {"step", "val_loss", "weights"}: a CPU copy of the trainable weights at the
    evaluation with the lowest validation loss, stopped: None at the end, else the name of the signal that stopped
    it). The training state, best and tokenizer included, goes to state_path every --save-every steps, at each
    epoch's end and at a stop (stopper: Ctrl-C or SIGTERM, a gpt.StopSignal); given back as `state`, training goes
    on as if it had not stopped."""
    optimizer = gpt.make_adamw(model, args.lr, args.weight_decay)
    autocast, _ = gpt.autocast_context(device, args.dtype)
    steps_per_epoch = math.ceil(len(train_examples) / args.batch_size)  # the last batch may be smaller
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    step, history, best = 0, {"step": [], "train_loss": [], "val_loss": []}, {"val_loss": math.inf}
    if state is not None:
        model.load_state_dict(state["model"])
        gpt.restore_training_state(state, optimizer, device, state["rng"])  # AdamW's moments, the random state
        step, history = state["step"], state["history"]
        best = state.get("best", best)
        print(f"resuming at step {step} of {total_steps}")
    print(f"training: {len(train_examples)} examples, {steps_per_epoch} steps per epoch, {total_steps} in all")
    started, start_step, window_seconds, window_tokens = time.time(), step, 0.0, 0
    while True:
        # Evaluate at step 0, every --eval-every steps and at the end (a resumed run has this step already).
        if (step % args.eval_every == 0 or step == total_steps) and step not in history["step"]:
            train_loss = evaluate_loss(model, train_examples, collate, args, device, autocast)
            val_loss = evaluate_loss(model, val_examples, collate, args, device, autocast)
            history["step"].append(step)
            history["train_loss"].append(train_loss)
            history["val_loss"].append(val_loss)
            print(f"step {step}: train loss {train_loss:.3f}, val loss {val_loss:.3f}", flush=True)
            if val_loss < best["val_loss"]:  # keep the weights that generalise best (early stopping)
                best = {"step": step, "val_loss": val_loss, "weights": gpt.trainable_weights(model)}
        # A stop saves the steps made since the last save: --resume goes on from this very step.
        stop = stopper.requested and step < total_steps
        if stop or (step > start_step and (step % args.save_every == 0 or step % steps_per_epoch == 0
                                           or step == total_steps)):
            gpt.save_training_state(state_path, model, tokenizer, optimizer, step=step, history=history, best=best,
                                    rng=gpt.rng_state())
            saved = state_path
        if stop:
            print(f"stopped at step {step} ({stopper.signal_name}), the state saved in {saved}: go on with python "
                  f"finetune_instruct.py --resume --out-dir {state_path.parent}", file=sys.stderr)
            return history, best, stopper.signal_name
        if step == total_steps:
            break

        epoch, index = divmod(step, steps_per_epoch)
        inputs, targets = collate(epoch_batch(train_examples, args.batch_size, args.seed, epoch, index))
        step_started = time.time()
        loss = calc_loss_batch(model, inputs.to(device), targets.to(device), autocast)
        gpt.check_finite_loss(loss.detach(), step + 1)  # before the update: a NaN never reaches the weights
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        window_seconds += time.time() - step_started
        window_tokens += inputs.numel()

        if step % args.log_every == 0 or step == total_steps:
            eta = gpt.eta(started, step - start_step, total_steps - start_step)
            print(f"epoch {epoch + 1}/{args.epochs} step {step}/{total_steps} | loss {loss.item():.3f} | "
                  f"{window_tokens / window_seconds:.0f} tok/s | ETA {eta}", flush=True)
            window_seconds, window_tokens = 0.0, 0
    trained = f"{step - start_step} step" + ("s" if step - start_step != 1 else "")
    print(f"trained {trained} in {gpt.format_duration(time.time() - started)}")
    return history, best, None


def keep_weights(model, history, best, keep_last):
    """Load the weights of the lowest validation loss into model (with keep_last: keep the last ones) and say which
    were kept -> {"step", "val_loss"} of the kept weights' evaluation."""
    if keep_last:
        last = {"step": history["step"][-1], "val_loss": history["val_loss"][-1]}  # the end is always evaluated
        print(f"kept the last weights (step {last['step']}); the lowest validation loss was at step {best['step']}")
        return last
    model.load_state_dict(best["weights"], strict=False)  # the trainable part; the rest never changed
    print(f"kept the weights of step {best['step']}, the lowest validation loss ({best['val_loss']:.3f})")
    return {"step": best["step"], "val_loss": best["val_loss"]}


# ----------------------------------------------------------------------------------------
# 5. Answers: a response for each test entry
# ----------------------------------------------------------------------------------------


def generate_response(model, tokenizer, entry, max_new_tokens=256, **sampling):
    """The model's answer to one entry -> (response text, number of new tokens): format_prompt(entry) continued by
    gpt.generate (greedy; `sampling`: temperature, top_k, top_p and seed as there) up to the tokenizer's end-of-text
    token or max_new_tokens, the new text stripped (the book's section 7.7)."""
    prompt_ids = gpt.text_to_token_ids(format_prompt(entry), device=model.wte.weight.device, tokenizer=tokenizer)
    eot_id = tokenizer.eot_id  # 50256 for GPT-2; the Llama family's own
    output = gpt.generate(model, prompt_ids, max_new_tokens, eot_id=eot_id, **sampling)
    new_ids = output[0, prompt_ids.shape[1] :].tolist()
    if eot_id in new_ids:
        new_ids = new_ids[: new_ids.index(eot_id)]
    return gpt.token_ids_to_text(new_ids, tokenizer=tokenizer).strip(), len(new_ids)


def answers_fingerprint(checkpoint, entries, options):
    """What a set of answers depends on, to resume them only for the same work: the model file (path, size,
    modification time), the entries (SHA-256) and the options."""
    path = Path(checkpoint)
    model = f"{path} {path.stat().st_size} {path.stat().st_mtime_ns}" if path.is_file() else str(checkpoint)
    entries_sha256 = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    return {"model": model, "entries_sha256": entries_sha256, **options}


def generate_responses(model, tokenizer, entries, path, checkpoint, **options):
    """Answer every entry (options as in `generate_response`) and write them, each with a "model_response", to path
    (JSON; the temporary folder if path cannot be written) -> that list. Every ANSWERS_PER_SAVE answers go to <path
    stem>.partial.json; a later call for the same work (`answers_fingerprint`: checkpoint, entries, options) goes on."""
    fingerprint = answers_fingerprint(checkpoint, entries, options)
    so_far = path.with_name(path.stem + ".partial.json")
    saved = gpt.read_json(so_far, "saved answers") if so_far.is_file() else {}
    results = saved["responses"] if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint else []
    if results:
        print(f"answers: {len(results)} of {len(entries)} taken from {so_far}")
    done_before, tokens, started = len(results), 0, time.time()
    for i in range(done_before, len(entries)):
        response, n_tokens = generate_response(model, tokenizer, entries[i], **options)
        results.append({**entries[i], "model_response": response})
        tokens += n_tokens
        eta = gpt.eta(started, i + 1 - done_before, len(entries) - done_before)
        gpt.show_progress(f"answers {i + 1}/{len(entries)} | {tokens / (time.time() - started):.1f} tok/s | ETA {eta}")
        if (i + 1) % ANSWERS_PER_SAVE == 0:
            try:
                gpt.write_json(so_far, {"fingerprint": fingerprint, "responses": results})
            except OSError as e:  # the answers stay in memory, and the final write has a fallback
                gpt.end_progress()
                print(f"warning: cannot save the answers so far to {so_far} ({e.strerror or e})", file=sys.stderr)
    gpt.end_progress()
    gpt.write_json(path, results)
    written = path
    so_far.unlink(missing_ok=True)
    print(f"wrote {len(results)} responses to {written}")
    return results


# ----------------------------------------------------------------------------------------
# 6. Evaluation: an LLM judge served by Ollama
# ----------------------------------------------------------------------------------------


def judge_prompt(entry):
    """The grading request for one response (the book's section 7.8 wording)."""
    return (
        f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
        f"score the model response `{entry['model_response']}` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


# The parts of a judge's reply that parse_score reads (re.I: "Score", "RATING", "8.5E1").
# 85, 85.5, -5, 8.5e1, always whole: not the 2 of "GPT-2", nor the 8 of "85" or the 0 of "7/0";
# no part of "1,000" or of a decimal comma "7,5": which one is meant cannot be told, so neither is read
_NUMBER = r"(?<![\w./-])(?<!\d,)-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?!\.?\d|e[-+]?\d|,\d)"
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
    """The judge's reply -> its score as a float in 0..100, or None when the reply has no single score
    (unscorable). reply is the message content: text, or a JSON value. The first rule that applies decides:

    1. JSON, the structured output asked for: a number, or an object {"score": x} (the whole reply, or an object
       within it) -> x. Anything else (null, a list) -> None.
    2. A labelled score: "Score: 85", "rating = 8/10", "I'd give it 85", "I would rate it 85".
    3. The number left once quoted text, scales and ranges ("0 to 100", "0-100") and list markers ("1. ") are
       dropped: "85", "85/100", "It deserves 85%."
    A ratio goes on the 0-100 scale: "8/10" and "4 out of 5" -> 80.0 (6 decimals kept). Two different values under
    rule 2 or 3 (ambiguous), or a value outside 0..100 -> None.
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


# Ollama's structured output (https://ollama.com/blog/structured-outputs, Ollama 0.5+): the
# JSON schema in the request's "format" field constrains the reply to {"score": <0..100>}.
SCORE_FORMAT = {
    "type": "object",
    "properties": {"score": {"type": "number", "minimum": 0, "maximum": 100}},
    "required": ["score"],
}
OLLAMA_HELP = (
    "start the server with `ollama serve` (install it from https://ollama.com) and get the judge with "
    "`ollama pull {model}`, or point --judge-url at a running server (now {url})"
)


def check_ollama(url, model):
    """Make sure an Ollama server answers at url (GET /api/tags, the list of local models) and has `model`; raise
    RuntimeError with the commands that fix it otherwise."""
    try:
        reply = requests.get(f"{url}/api/tags", timeout=5)
    except requests.RequestException as e:
        fix = OLLAMA_HELP.format(url=url, model=model)
        raise RuntimeError(f"no Ollama server answers at {url} ({type(e).__name__}): {fix}") from None
    models = ollama_reply_field(reply, url, "models", kind=list)  # [{"name": "llama3:latest", ...}, ...]
    names = {str(m.get("name")) for m in models if isinstance(m, dict)}
    if model not in names and f"{model}:latest" not in names:
        raise RuntimeError(
            f"the Ollama server at {url} does not have the model {model!r} "
            f"(it has: {', '.join(sorted(names)) or 'none'}); run `ollama pull {model}` or choose another --judge-model"
        )


def query_ollama(prompt, url, model, timeout=600):
    """One chat request to Ollama's HTTP API (POST /api/chat, not streamed) with temperature 0, a fixed seed and the
    SCORE_FORMAT schema -> the reply's content: text (normally '{"score": 85}'), or whatever JSON value the server
    sent. A server older than Ollama 0.5 rejects a schema (HTTP 400) and is asked again without. Raises RuntimeError
    when the server fails to answer."""
    options = {"temperature": 0, "seed": JUDGE_SEED, "num_ctx": 2048}
    payload = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": False, "options": options}
    try:
        reply = requests.post(f"{url}/api/chat", json={**payload, "format": SCORE_FORMAT}, timeout=(5, timeout))
        if reply.status_code == 400 and "format" in reply.text:
            # before 0.5 "format" could only be "json"; parse_score then reads the prose
            reply = requests.post(f"{url}/api/chat", json=payload, timeout=(5, timeout))
    except requests.RequestException as e:
        fix = OLLAMA_HELP.format(url=url, model=model)
        raise RuntimeError(f"the Ollama server at {url} stopped answering ({type(e).__name__}): {fix}") from None
    return ollama_reply_field(reply, url, "message", "content")


def ollama_reply_field(reply, url, *keys, kind=object):
    """The value at `keys` in the JSON of a server's reply (("message", "content") -> reply["message"]["content"]),
    of type `kind`. Raises RuntimeError quoting the reply for an HTTP error status, and for a reply of another shape
    (not JSON, a list, a missing field): a server answers, but not as Ollama does."""
    if reply.status_code != 200:
        raise RuntimeError(f"the server at {url} answered HTTP {reply.status_code}: {reply.text[:300]}")
    try:
        value = reply.json()
        for key in keys:
            value = value[key]  # TypeError for a list or a number, KeyError for a missing field
        if not isinstance(value, kind):
            raise TypeError
        return value
    except (ValueError, KeyError, TypeError, IndexError):
        raise RuntimeError(f"the server at {url} answered an unexpected reply: {reply.text[:300]!r}; "
                           "is it an Ollama server? check --judge-url") from None


def judge(args, responses_path):
    """Grade each "model_response" of the responses file against its "output" with the --judge; print the mean score
    and how many could not be scored, and write the entries with a "score" (0-100, or null when unscorable) to
    <name>-scored.json beside it. The responses file is only read."""
    if not responses_path.is_file():
        raise FileNotFoundError(f"--responses {responses_path}: no such file; generate it first (e.g. --generate-only)")
    entries = gpt.read_json(responses_path, "--responses")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--responses {responses_path}: expected a non-empty JSON list of entries")
    url, scored, started = args.judge_url.rstrip("/"), [], time.time()
    try:
        check_ollama(url, args.judge_model)
        for i, entry in enumerate(entries):
            problem = check_entry(entry)
            if not problem and not isinstance(entry.get("model_response"), str):
                problem = "no string 'model_response'"
            score = None
            if problem:
                print(f"  entry {i}: cannot be scored: {problem}")
            else:
                answer = query_ollama(judge_prompt(entry), url, args.judge_model)
                score = parse_score(answer)
                if score is None:
                    print(f"  entry {i}: no score 0-100 in the judge's answer {answer!r:.80}")
            scored.append({**entry, "score": score} if isinstance(entry, dict) else {"entry": entry, "score": None})
            print(f"judging {i + 1}/{len(entries)} | ETA {gpt.eta(started, i + 1, len(entries))}", flush=True)
    except RuntimeError as e:
        if args.judge_only:
            raise
        raise RuntimeError(
            f"{e}; the answers stay in {responses_path}: grade them later with python finetune_instruct.py "
            f"--judge-only --judge ollama --responses {responses_path} --judge-url {url} "
            f"--judge-model {args.judge_model}"
        ) from None
    scores = [e["score"] for e in scored if e["score"] is not None]
    mean = f"{sum(scores) / len(scores):.2f}" if scores else "n/a"
    print(f"judge {args.judge_model}: mean score {mean} over {len(scores)} entries; "
          f"{len(entries) - len(scores)} could not be scored")
    gpt.write_json(scored_path(responses_path), scored)
    print(f"wrote the scores to {scored_path(responses_path)}")


# ----------------------------------------------------------------------------------------
# 7. The stage: data, model, training, the kept weights saved
# ----------------------------------------------------------------------------------------


def fine_tune(args, argv, device):
    """Claim --out-dir, read and split the data (the saved run's with --resume), fine-tune and save model.pt ->
    (settings, model in --dtype, its tokenizer, where model.pt went, test entries). Settings and split are written
    once data and model have passed their checks."""
    out_dir = gpt.claim_run_folder(args.out_dir, RUN_FILES, resume=args.resume, overwrite=args.overwrite)
    state_path = out_dir / "train_state.pt"
    if args.resume:
        args, splits, state = resume_run(args, argv, out_dir)
        source = f"the run's split in {out_dir}"
    else:
        source, state = data_path(args), None
        splits = split_dataset(load_instruction_data(source), args.seed)
    train_set, val_set, test_set = splits
    print(f"data: {source}: {len(train_set)} train, {len(val_set)} validation, {len(test_set)} test entries")
    gpt.print_settings(args)
    model, tokenizer = prepare_model(args, device, state)  # the model's own tokenizer and end-of-text token
    max_length = gpt.length_within_context(args.max_length, model.cfg, "--max-length")
    print(gpt.model_summary(model, args.model) + f", on {device}")
    train_examples = tokenize_examples(train_set, tokenizer, max_length, args.mask_prompt)
    val_examples = tokenize_examples(val_set, tokenizer, max_length, args.mask_prompt)
    if not train_examples or not val_examples:
        raise ValueError("no training or validation example is left: raise --max-length or drop --mask-prompt")
    gpt.write_json(out_dir / "run.json", vars(args))  # on --resume: with an extended --epochs or --max-steps
    for name, entries in zip(SPLIT_FILES, splits):
        gpt.write_json(out_dir / name, entries)

    collate = functools.partial(collate_instruction_batch, eot_id=tokenizer.eot_id, mask_prompt=args.mask_prompt,
                                max_length=max_length)
    try:
        with gpt.StopSignal() as stopper:  # Ctrl-C or SIGTERM: finish the step, save, stop
            history, best, stopped = train(
                model, tokenizer, train_examples, val_examples, collate, args, device, state_path, stopper, state
            )
    except KeyboardInterrupt:  # a second Ctrl-C: at once, without saving
        if state_path.exists():
            print(f"--resume --out-dir {out_dir} goes on from the last save in {state_path}", file=sys.stderr)
        raise
    if stopped:
        raise SystemExit(128 + signal.Signals[stopped])  # the shell's code for the signal: 130 or 143
    losses = {"train": (history["step"], history["train_loss"]), "validation": (history["step"], history["val_loss"])}
    gpt.plot_curves(out_dir / "losses.png", {"loss": losses}, "step")
    kept = keep_weights(model, history, best, args.keep_last)
    if args.lora:
        gpt.merge_lora(model)  # back to the model's own layers: a plain checkpoint
    checkpoint = out_dir / "model.pt"
    gpt.save_checkpoint(checkpoint, model.eval(), tokenizer, settings=vars(args), history=history, kept=kept)
    print(f"saved the fine-tuned model to {checkpoint}")
    if not args.keep_state:
        state_path.unlink(missing_ok=True)  # up to 4x the model; --keep-state keeps it for --resume
    return args, model.to(gpt.DTYPES[args.dtype]), tokenizer, checkpoint, test_set


# ----------------------------------------------------------------------------------------
# 8. Command line and run folder
# ----------------------------------------------------------------------------------------

def build_parser():
    p = gpt.ArgumentParser(
        description="Instruction fine-tuning of GPT-2 or a Llama-family model (Alpaca format), answers for the test "
        "set, optional LLM judge. A new run refuses an --out-dir that holds another run unless --resume continues it "
        "or --overwrite replaces it; --generate-only, --prompt and --judge-only use an existing run."
    )
    what = p.add_argument_group("what to run (default: fine-tune, then answer the test set)")
    what.add_argument("--generate-only", action="store_true", help="answer the run's test split with --checkpoint")
    what.add_argument("--prompt", help="answer this one instruction with --checkpoint, print it, exit (default: none)")
    what.add_argument("--input", help="input text for --prompt (the '### Input:' section; default: none)")
    what.add_argument("--judge-only", action="store_true", help="no training, no answers: grade --responses")
    what.add_argument("--resume", action="store_true", help="continue the run in --out-dir with its saved settings")
    what.add_argument("--overwrite", action="store_true", help="delete the run in --out-dir first")
    what.add_argument("--keep-state", action="store_true", help="keep train_state.pt after training, for --resume")
    what.add_argument("--out-dir", default="runs/instruct", help="folder for all outputs")

    data = p.add_argument_group("data")
    data.add_argument("--data", help="Alpaca JSON list or JSON Lines (default: the book's, downloaded to --cache-dir)")
    data.add_argument("--cache-dir", type=gpt.folder_path, default=str(gpt.cache_dir()),
                      help="folder for downloaded data and weights")
    data.add_argument("--seed", type=gpt.non_negative_int, default=123,
                      help="seed of the split, the shuffling, LoRA and sampling")
    data.add_argument("--max-length", type=gpt.positive_int, help="truncate examples (default: the context length)")
    data.add_argument("--mask-prompt", action="store_true", help="learn only the response: prompt targets become -100")

    train = p.add_argument_group("model and training")
    train.add_argument("--model", default="gpt2-medium", help="starting point: gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                       "a Llama-family Hub name (HuggingFaceTB/SmolLM2-135M, Qwen/Qwen3-0.6B-Base, "
                       "meta-llama/Llama-3.2-1B) or folder, a .safetensors file, or a checkpoint of this project")
    train.add_argument("--epochs", type=gpt.positive_int, default=2, help="passes over the training set")
    train.add_argument("--batch-size", type=gpt.positive_int, default=8, help="examples per optimizer step")
    train.add_argument("--lr", type=gpt.positive_float, default=5e-5, help="AdamW learning rate, constant")
    train.add_argument("--weight-decay", type=gpt.non_negative_float, default=0.1, help="AdamW weight decay")
    train.add_argument("--drop-rate", type=gpt.dropout_rate, default=0.0, help="dropout probability while training")
    train.add_argument("--lora", action="store_true", help="train low-rank adapters only (merged before saving)")
    train.add_argument("--lora-rank", type=gpt.positive_int, default=16, help="LoRA rank r")
    train.add_argument("--lora-alpha", type=gpt.positive_float, default=16.0, help="LoRA scale: alpha / rank")
    train.add_argument("--max-steps", type=gpt.positive_int, help="stop after this many steps (default: all epochs)")
    train.add_argument("--log-every", type=gpt.positive_int, default=5, help="steps between progress lines")
    train.add_argument("--eval-every", type=gpt.positive_int, default=25, help="steps between loss estimates")
    train.add_argument("--eval-batches", type=gpt.non_negative_int, default=5, help="batches per estimate, 0: all")
    train.add_argument("--keep-last", action="store_true", help="keep the last weights, not the lowest validation loss")
    train.add_argument("--save-every", type=gpt.positive_int, default=50, help="steps between train_state.pt saves")
    train.add_argument("--dtype", choices=gpt.DTYPES, default="float32", help="precision: autocast while training "
                       "(float32 weights; not float16), the weights' type when answering")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")

    answers = p.add_argument_group("answers and evaluation")
    answers.add_argument("--checkpoint", help="model that answers, any --model value (default: <out-dir>/model.pt)")
    answers.add_argument("--max-new-tokens", type=gpt.non_negative_int, default=256, help="longest answer in tokens")
    answers.add_argument("--temperature", type=gpt.non_negative_float, default=0.0, help="0: greedy; above: sampling")
    answers.add_argument("--top-k", type=gpt.positive_int, help="sample from the k most likely tokens (default: all)")
    answers.add_argument("--top-p", type=gpt.probability, help="sample from the most likely tokens whose "
                         "probabilities add up to p (default: all)")
    answers.add_argument("--responses", help="answers to write, or to grade (default: <out-dir>/responses.json)")
    answers.add_argument("--judge", choices=["none", "ollama"], default="none", help="grade with a local Ollama")
    answers.add_argument("--judge-url", default="http://localhost:11434", help="Ollama address")
    answers.add_argument("--judge-model", default="llama3", help="Ollama model that grades")
    return p


def parse_args(argv=None):
    """The flags, each value checked by its `type=`; the combinations that cannot work are refused here (parser.error
    names the flag and exits 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        parser.error(f"--prompt must hold the instruction to answer, got {args.prompt!r}")
    if args.input is not None and args.prompt is None:
        parser.error("--input goes with --prompt: give the instruction too")
    if args.generate_only + args.judge_only + (args.prompt is not None) + args.resume > 1:
        parser.error("choose one of --generate-only, --judge-only, --prompt and --resume")
    if args.resume and args.overwrite:
        parser.error("choose --resume (continue the run) or --overwrite (replace it)")
    if args.judge_only and args.judge == "none":
        parser.error("--judge-only needs --judge ollama")
    sampling = [flag for flag in ("top_k", "top_p") if getattr(args, flag) is not None]
    if sampling and not args.temperature:
        parser.error(f"{gpt.flag_name(sampling[0])} is for sampling: give --temperature above 0 as well")
    if args.dtype == "float16" and not (args.generate_only or args.judge_only or args.prompt is not None):
        parser.error("--dtype float16 trains without loss scaling: train in bfloat16 or float32")
    modes = [flag for flag in ("generate_only", "judge_only", "prompt") if getattr(args, flag) not in (None, False)]
    ignored = [flag for flag in TRAINING_FLAGS if flag in gpt.given_flags(parser, argv)]
    if modes and ignored:
        mode = gpt.flag_name(modes[0])
        if ignored[0] == "model" and mode != "--judge-only":  # a model to answer with: that is --checkpoint
            parser.error(f"--model is the model that trains; {mode} answers with --checkpoint: give --checkpoint "
                         f"{args.model}")
        parser.error(f"{gpt.flag_name(ignored[0])} is for training, and {mode} does not train: drop it")
    return args


def answer_options(args):
    """The generation options of `generate_response` from the flags (sampling seeded by --seed)."""
    options = {key: getattr(args, key) for key in ("max_new_tokens", "temperature", "top_k", "top_p")}
    return {**options, "seed": args.seed if args.temperature > 0 else None}


def scored_path(responses_path):
    """Where the judge writes: responses.json -> responses-scored.json beside it."""
    return responses_path.with_name(responses_path.stem + "-scored.json")


def answer_paths(args):
    """(responses file, checkpoint) of this command; a folder where the answers or scores go
    is an error (ValueError) before any work. A checkpoint may be a model folder."""
    responses = Path(args.responses or Path(args.out_dir) / "responses.json")
    for path in (responses, scored_path(responses)):
        if path.is_dir():
            raise ValueError(f"{path} is a folder, but a file goes there: move it away, or give another --responses")
    return responses, Path(args.checkpoint or Path(args.out_dir) / "model.pt")


def data_path(args):
    """--data, or the book's file downloaded once into the cache."""
    if args.data is not None:
        return Path(args.data)
    return gpt.fetch_dataset([DATA_URL], "instruction-data.json", flag="--data", kind="json", size=DATA_SIZE,
                             sha256=DATA_SHA256)


def load_for_answers(args, checkpoint, device):
    """The model of --checkpoint (default <out-dir>/model.pt) in --dtype and the tokenizer it
    carries -> (model, tokenizer)."""
    if args.checkpoint is None and not checkpoint.exists():
        raise FileNotFoundError(f"no {checkpoint}: fine-tune first, or give --checkpoint (any --model value works)")
    print(f"model: {checkpoint}")
    return gpt.load(checkpoint, device=device, dtype=gpt.DTYPES[args.dtype])


def test_split(args, out_dir):
    """The entries --generate-only answers: the run's test.json, else the split of --data."""
    if (out_dir / "test.json").is_file():
        print(f"data: the run's test split, {out_dir / 'test.json'}")
        return read_split(out_dir / "test.json")
    path = data_path(args)
    print(f"data: {out_dir} holds no test.json: answering the test split of {path} with --seed {args.seed}")
    return split_dataset(load_instruction_data(path), args.seed)[2]


def resume_run(args, argv, out_dir):
    """The saved run in out_dir -> (settings, (train, validation, test), train state dict).
    Flags given with --resume must agree with the saved ones, except RESUME_MAY_CHANGE."""
    args = gpt.resume_settings(build_parser(), argv, gpt.read_json(out_dir / "run.json", "--resume"), RESUME_MAY_CHANGE)
    splits = [read_split(out_dir / name) for name in SPLIT_FILES]
    if not (out_dir / "train_state.pt").is_file() and (out_dir / "model.pt").is_file():
        raise ValueError(
            f"--resume: the run in {out_dir} has finished, and its train_state.pt was not kept (a run started with "
            f"--keep-state keeps it): answer its test split with --generate-only, or train on with "
            f"--model {out_dir / 'model.pt'}"
        )
    if not (out_dir / "train_state.pt").is_file():
        raise ValueError(f"--resume: the run in {out_dir} stopped before its first save; start again with --overwrite")
    state = gpt.load_checkpoint(out_dir / "train_state.pt")
    missing = [key for key in ("optimizer", "step", "history", "rng") if key not in state]
    if missing:  # a model checkpoint (a copy of model.pt, say) has the weights but not where training stood
        raise ValueError(f"--resume: {out_dir / 'train_state.pt'} is a model checkpoint, not a training state of "
                         f"finetune_instruct.py (no {', '.join(missing)}): start again with --overwrite")
    epoch_steps = math.ceil(len(splits[0]) / args.batch_size) * args.epochs
    stopped_by_max_steps = args.max_steps and args.max_steps < epoch_steps
    limit = f"--max-steps {args.max_steps}" if stopped_by_max_steps else f"--epochs {args.epochs}"
    if state["step"] >= min(epoch_steps, args.max_steps or math.inf):  # before run.json is written again
        steps = f"{state['step']} step" + ("s" if state["step"] != 1 else "")
        raise ValueError(f"--resume: the run is complete ({steps}, as {limit} allows): raise {limit.split()[0]} "
                         "to train on")
    return args, splits, state


# ----------------------------------------------------------------------------------------
# 9. Putting it together
# ----------------------------------------------------------------------------------------


@gpt.command_line(memory_hint="use a smaller --batch-size or --max-length, or --lora")
def main(argv=None):
    args = parse_args(argv)
    os.environ["GPT_CACHE_DIR"] = args.cache_dir
    responses_path, checkpoint = answer_paths(args)
    if args.judge_only:
        judge(args, responses_path)
        return
    if args.judge == "ollama":  # before hours of training and answering: is the judge there?
        check_ollama(args.judge_url.rstrip("/"), args.judge_model)
    device = gpt.pick_device(args.device)
    if args.prompt is not None:
        model, tokenizer = load_for_answers(args, checkpoint, device)
        entry = {"instruction": args.prompt, "input": args.input}
        answer = generate_response(model, tokenizer, entry, **answer_options(args))[0]
        print(answer or "(an empty answer: the model ended it at once with its end-of-text token)")
        return
    if args.generate_only:
        model, tokenizer = load_for_answers(args, checkpoint, device)
        # No run file is protected: answering again replaces responses.json, which is what was asked for.
        test_set = test_split(args, gpt.claim_run_folder(args.out_dir, []))
    else:
        args, model, tokenizer, checkpoint, test_set = fine_tune(args, argv, device)
        responses_path, _ = answer_paths(args)  # with --resume, the saved run's
    generate_responses(model, tokenizer, test_set, responses_path, checkpoint, **answer_options(args))
    if args.judge == "ollama":
        judge(args, responses_path)


if __name__ == "__main__":
    main()
