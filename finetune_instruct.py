"""finetune_instruct.py: teach GPT-2, or a Llama-family model, to follow instructions.

Chapter 7 of "Build a Large Language Model (From Scratch)" (S. Raschka, 2024;
https://github.com/rasbt/LLMs-from-scratch/tree/main/ch07): the book's 1,100 instruction/response pairs in the Alpaca
prompt format (Taori et al., 2023, https://github.com/tatsu-lab/stanford_alpaca), GPT-2 medium, AdamW at lr 5e-5 with
weight decay 0.1, batch size 8, 2 epochs. The weights with the lowest validation loss are kept; they answer every test
instruction, and a local LLM served by Ollama can grade the answers (0-100). A Llama-family model trains the same way.

    python finetune_instruct.py                                  # the book's recipe (downloads data and gpt2-medium)
    python finetune_instruct.py --model HuggingFaceTB/SmolLM2-135M --lora --mask-prompt
    python finetune_instruct.py --resume                         # continue an interrupted run
    python finetune_instruct.py --generate-only                  # answer the run's test split again
    python finetune_instruct.py --prompt "Rewrite the sentence in passive voice." --input "The cat ate the fish."
    python finetune_instruct.py --judge-only                     # grade runs/instruct/responses.json with Ollama

Writes to --out-dir (default runs/instruct/; one that holds another run is refused unless --resume or --overwrite):
    run.json, train.json, validation.json, test.json   the settings and the split, for --resume and --generate-only
    model.pt          the kept weights, LoRA merged, with their tokenizer (1.4 GB for gpt2-medium): gpt.load() reads it
    train_state.pt    all --resume needs (4x the model; about 1x with --lora), while training or with --keep-state
    losses.png        train and validation loss per step (with matplotlib installed)
    responses.json    the test entries answered (--num-answers), each with a "model_response"; with --judge,
                      responses-scored.json adds a "score" to each
"""

import functools
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
DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/b80e7804b30830a00eb55d2abc7ac25a07f36fdc/"
            "ch07/01_main-chapter-code/instruction-data.json")
DATA_SIZE = 203524
DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
DATA_FIX = "give a JSON list, or JSON Lines, of objects with a string 'instruction' and 'output' (and 'input' or not)"
SPLIT_FIX = "put back the file the run wrote, or start the run again with --overwrite"
IGNORE_INDEX = -100  # the target value torch.nn.functional.cross_entropy skips by default
SPLIT_FRACTIONS = (0.85, 0.10)  # train, test; validation gets the rest (5%), as in the book
SPLIT_FILES = ("train.json", "validation.json", "test.json")
RUN_FILES = ("run.json", *SPLIT_FILES, "train_state.pt", "model.pt", "losses.png", "responses.json",
             "responses-scored.json")
# Flags that may differ from the saved run on --resume: more steps, another machine, other answers.
RESUME_MAY_CHANGE = ("resume", "epochs", "max_steps", "keep_state", "keep_last", "device", "cache_dir", "out_dir",
                     "num_answers", "max_new_tokens", "temperature", "top_k", "top_p", "judge",
                     "judge_url", "judge_model")
# Flags of training alone: --generate-only, --prompt and --judge-only would ignore them, so they are refused there.
TRAINING_FLAGS = ("model", "epochs", "batch_size", "lr", "weight_decay", "drop_rate", "lora", "lora_rank", "lora_alpha",
                  "max_steps", "log_every", "eval_every", "eval_batches", "keep_last", "save_every", "keep_state",
                  "max_length", "mask_prompt")


# --- 1. Data: read, check, split ------------------------------------------------------------


def load_instruction_data(path, source="--data", fix=DATA_FIX, keys=("instruction", "output")):
    """A JSON list or JSON Lines file of Alpaca entries (UTF-8) -> list of dicts: the one reader of --data, the run's
    splits and the answers. Each entry needs a string under each of `keys`; "input" is a string, null or missing.
    Raises ValueError "SOURCE PATH: entry 7: 'output' must be a string, not null: FIX" (lines count from 1)."""
    text = gpt.read_text(path, source)
    source = f"{source} {path}"
    if text.lstrip().startswith("["):
        numbered = [(f"entry {i}", entry) for i, entry in enumerate(gpt.parse_json(text, source))]
    else:  # JSON Lines: one entry a line, blank lines skipped
        lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        numbered = [(f"line {number}", gpt.parse_json(line, f"{source} line {number}")) for number, line in lines]
    for where, entry in numbered:
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: {where}: not a JSON object but {type(entry).__name__}: {fix}")
        for key in (*keys, "input"):
            if not isinstance(entry.get(key), str) and (key != "input" or entry.get(key) is not None):
                raise ValueError(f"{source}: {where}: {key!r} must be a string, not {json.dumps(entry.get(key)):.30}: "
                                 f"{fix}")
    if not numbered:
        raise ValueError(f"{source}: no entries: {fix}")
    return [entry for _, entry in numbered]


def data_path(args):
    """--data, or the book's file downloaded once into the cache."""
    if args.data is not None:
        return Path(args.data)
    return gpt.fetch_dataset([DATA_URL], "instruction-data.json", flag="--data", size=DATA_SIZE, sha256=DATA_SHA256)


def split_dataset(entries, seed):
    """Shuffle with `seed` and split 85/5/10 as the book does (1,100 entries -> 935 train, 55 validation, 110 test)
    -> (train, validation, test) lists. Raises ValueError when a part would be empty (< 10 entries)."""
    train, test, val = gpt.split_by_fractions(entries, seed, SPLIT_FRACTIONS)
    if not (train and test and val):
        raise ValueError(f"the 85/5/10 split needs at least 10 usable entries, --data has {len(entries)}")
    return train, val, test


# --- 2. Prompt format (Alpaca) and batching: tokenize, pad, mask ----------------------------


def format_input(entry):
    """The Alpaca prompt of an entry without its response section (the book's format_input); an entry without input
    (empty, missing or null) leaves out the "### Input:" section."""
    text = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
            f"\n\n### Instruction:\n{entry['instruction']}")
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_prompt(entry):
    """What the model reads before answering: format_input(entry) + "\\n\\n### Response:\\n"."""
    return format_input(entry) + "\n\n### Response:\n"


def tokenize_examples(entries, tokenizer, max_length, mask_prompt):
    """Entries -> list of (token ids, prompt length): prompt and response tokenized apart and joined, so the prompt is
    exactly the first ids. With mask_prompt an entry whose prompt is over max_length has nothing to learn: left out."""
    examples = []
    for entry in entries:
        prompt_ids = tokenizer.encode(format_prompt(entry), bos=True)  # Llama 3: <|begin_of_text|> first
        response_ids = tokenizer.encode(entry["output"])  # a piece of the same text: no begin token
        if not (mask_prompt and len(prompt_ids) > max_length):
            examples.append((prompt_ids + response_ids, len(prompt_ids)))
    if len(examples) < len(entries):
        print(f"data: {len(entries) - len(examples)} entries left out: with --mask-prompt their prompt is over "
              f"--max-length {max_length}")
    return examples


def collate_instruction_batch(batch, eot_id, *, mask_prompt=False, max_length=None):
    """Pad a batch of (token ids, prompt length) into inputs and targets, LongTensor [batch, seq_len] each, cut to
    max_length: the book's custom_collate_fn (section 7.3, exercise 7.2). Padded with eot_id to one more than the
    longest; targets are the inputs shifted left by one. The first end-of-text target stays (the model learns to
    stop); later ones, and with mask_prompt those that predict prompt tokens, become -100 (the loss skips them)."""
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


# --- 3. Fine-tuning: the model (+ LoRA), the training loop, the stage ----------------------


def prepare_model(args, device, state=None):
    """--model, or the state's model on --resume (`train` loads its weights), with --drop-rate and --lora, in train
    mode -> (model, its tokenizer). Raises RuntimeError when training cannot fit in memory."""
    torch.manual_seed(args.seed)  # LoRA's A matrices start random
    if state is None:
        model, tokenizer = gpt.load(args.model, device=device, language_model=True)
    else:
        model = gpt.build_model(gpt.config_from_dict(state["config"])).to(device)
        tokenizer = gpt.tokenizer_from_state(state.get("tokenizer"))
    gpt.set_drop_rate(model, args.drop_rate)
    if args.lora:
        gpt.add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
    # Weights, gradients and AdamW's moments (16 bytes a parameter; 20 GB for a 1B model) must fit
    hint = "choose a smaller --model" + ("" if args.lora else ", or train only low-rank adapters with --lora")
    gpt.check_training_memory(model, device, hint)
    return model.train(), tokenizer


def calc_loss_batch(model, inputs, targets, autocast):
    """Mean cross-entropy over the targets that are not -100; inputs, targets: LongTensor [batch, seq_len]."""
    with autocast:
        logits = model(inputs)  # (batch, seq_len, vocab)
    return gpt.next_token_loss(logits, targets)


@torch.no_grad()
def evaluate_loss(model, examples, collate, args, device, autocast):
    """Mean loss of the first --eval-batches batches of examples (0: all), unshuffled: estimates stay comparable."""
    model.eval()
    chunks = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    losses = []
    for chunk in chunks[: args.eval_batches or None]:
        inputs, targets = collate(chunk)
        losses.append(calc_loss_batch(model, inputs.to(device), targets.to(device), autocast).item())
    model.train()
    return sum(losses) / len(losses)


def evaluate(model, train_examples, val_examples, progress, *options):
    """Add both losses at progress["step"] to progress["history"] (options: `evaluate_loss`'s) and print them; at the
    lowest validation loss so far a CPU copy of the trainable weights goes to progress["best"] (early stopping)."""
    losses = [evaluate_loss(model, examples, *options) for examples in (train_examples, val_examples)]
    step, history = progress["step"], progress["history"]
    for key, value in zip(("step", "train_loss", "val_loss"), (step, *losses)):
        history[key].append(value)
    print(f"step {step}: train loss {losses[0]:.3f}, val loss {losses[1]:.3f}", flush=True)
    if losses[1] < progress["best"]["val_loss"]:
        progress["best"] = {"step": step, "val_loss": losses[1], "weights": gpt.trainable_weights(model)}


def planned_steps(args, n_examples):
    """(Steps per epoch, steps in all): --max-steps when given, else --epochs; an epoch's last batch may be short."""
    steps_per_epoch = math.ceil(n_examples / args.batch_size)
    return steps_per_epoch, args.max_steps or steps_per_epoch * args.epochs


def train(model, tokenizer, train_examples, val_examples, collate, args, device, state_path, stopper, state=None):
    """Fine-tune model in place with AdamW for --epochs (or --max-steps) -> progress {"step", "history", "best"}. The
    state goes to state_path every --save-every steps, at each epoch's end and at a stop (stopper: a gpt.StopSignal);
    given back as `state`, training goes on as if it had not stopped."""
    optimizer = gpt.make_adamw(model, args.lr, args.weight_decay)
    autocast, _ = gpt.autocast_context(device, args.dtype)
    steps_per_epoch, total_steps = planned_steps(args, len(train_examples))
    progress = {"step": 0, "history": {"step": [], "train_loss": [], "val_loss": []}, "best": {"val_loss": math.inf}}
    if state is not None:
        model.load_state_dict(state["model"])
        gpt.restore_training_state(state, optimizer)  # AdamW's moments
        progress = {key: state[key] for key in progress}
        print(f"resuming at step {progress['step']} of {total_steps}")
    started, start_step, window_seconds, window_tokens = time.time(), progress["step"], 0.0, 0
    while True:
        step = progress["step"]
        # Evaluate at step 0, every --eval-every steps and at the end (a resumed run has this step already).
        if (step % args.eval_every == 0 or step == total_steps) and step not in progress["history"]["step"]:
            evaluate(model, train_examples, val_examples, progress, collate, args, device, autocast)
        stop = stopper.requested and step < total_steps  # a stop saves the steps made since the last save
        if stop or (step > start_step and (step % args.save_every == 0 or step % steps_per_epoch == 0
                                           or step == total_steps)):
            # What --resume needs: the weights, AdamW's moments, the progress (each step seeds the random state)
            gpt.save_checkpoint(state_path, model, tokenizer, optimizer=optimizer.state_dict(), **progress)
        if stop:  # say how to go on; exit with the shell's code
            print(f"stopped at step {step} ({stopper.signal_name}), the state saved in {state_path}: go on with "
                  f"python finetune_instruct.py --resume --out-dir {state_path.parent}", file=sys.stderr)
            raise SystemExit(128 + signal.Signals[stopper.signal_name])
        if step == total_steps:
            break

        # The epoch's order comes from --seed and the epoch alone: a resumed run reads what an uninterrupted one would.
        epoch, index = divmod(step, steps_per_epoch)
        first = index * args.batch_size  # the epoch's last batch may be shorter
        order = gpt.epoch_order(len(train_examples), args.seed, epoch)[first : first + args.batch_size]
        inputs, targets = collate([train_examples[i] for i in order.tolist()])
        step_started = time.time()
        torch.manual_seed(hash((args.seed, step)))  # dropout's masks from (seed, step) alone, as the order
        loss = calc_loss_batch(model, inputs.to(device), targets.to(device), autocast)
        gpt.check_finite_loss(loss.detach(), step + 1)  # before the update: a NaN never reaches the weights
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress["step"] = step = step + 1
        window_seconds += time.time() - step_started  # training time only, without the evaluations and saves
        window_tokens += inputs.numel()
        if step % args.log_every == 0 or step == total_steps:
            eta = gpt.eta(started, step - start_step, total_steps - start_step)
            print(f"{gpt.training_position(step, total_steps, steps_per_epoch)} | loss {loss.item():.3f} | "
                  f"{window_tokens / window_seconds:.0f} tok/s | ETA {eta}", flush=True)
            window_seconds, window_tokens = 0.0, 0
    print(f"trained to step {step} in {gpt.format_duration(time.time() - started)}")
    return progress


def keep_weights(model, progress, keep_last):
    """Load the weights of the lowest validation loss into model (keep_last: keep the last) -> their step, loss."""
    history, best = progress["history"], progress["best"]
    kept = {"step": history["step"][-1], "val_loss": history["val_loss"][-1]}  # the end is always evaluated
    if not keep_last:
        model.load_state_dict(best["weights"], strict=False)  # the trainable part; the rest never changed
        kept = {"step": best["step"], "val_loss": best["val_loss"]}
    note = f"; the lowest validation loss was at step {best['step']}" if keep_last else ", the lowest validation loss"
    print(f"kept the weights of step {kept['step']} (validation loss {kept['val_loss']:.3f}){note}")
    return kept


def resume_run(args, argv, out_dir):
    """The saved run in out_dir -> (settings, [train, validation, test], training state). Raises ValueError for a flag
    that differs from the saved one (but RESUME_MAY_CHANGE), no training state, or no step left to train."""
    args = gpt.resume_settings(build_parser(), argv, out_dir, RESUME_MAY_CHANGE)
    splits = [load_instruction_data(out_dir / name, "the run's split", SPLIT_FIX) for name in SPLIT_FILES]
    state_path = out_dir / "train_state.pt"
    state = gpt.load_checkpoint(state_path) if state_path.is_file() else {}
    if not {"optimizer", "step", "history"} <= state.keys():  # none, or a model checkpoint (model.pt copied)
        model_path = out_dir / "model.pt"
        why = "the run stopped before its first save): "  # on a full disk, say
        if model_path.is_file():
            why = f"a finished run keeps it only with --keep-state): train on from {model_path} with --model, or "
        raise ValueError(f"--resume: {state_path} is {'not a training state' if state else 'not there'} ({why}"
                         "start again with --overwrite")
    steps = planned_steps(args, len(splits[0]))[1]
    if state["step"] >= steps:  # before run.json is written again
        limit, value = ("--max-steps", args.max_steps) if steps == args.max_steps else ("--epochs", args.epochs)
        raise ValueError(f"--resume: the run is complete (at step {state['step']}, as {limit} {value} allows): "
                         f"raise {limit} to train on")
    return args, splits, state


def fine_tune(args, argv, device):
    """Claim --out-dir, split the data (the saved split with --resume), fine-tune, save model.pt -> (settings, model in
    --dtype, its tokenizer, the test entries to answer); nothing is written before data and model pass their checks.
    Ctrl-C or SIGTERM saves the state and exits 130 or 143; a second Ctrl-C stops at once, from the last save."""
    out_dir = gpt.claim_run_folder(args.out_dir, RUN_FILES, resume=args.resume, overwrite=args.overwrite)
    if args.resume:
        args, splits, state = resume_run(args, argv, out_dir)
        source = f"the run's split in {out_dir}"
    else:
        source, state = data_path(args), None
        splits = split_dataset(load_instruction_data(source), args.seed)
    gpt.print_settings(args, build_parser().parse_args([]))
    print(f"data: {source}: {len(splits[0])} train, {len(splits[1])} validation, {len(splits[2])} test entries")
    model, tokenizer = prepare_model(args, device, state)  # the model's own tokenizer and end-of-text token
    max_length = gpt.length_within_context(args.max_length, model.cfg, "--max-length")
    print(gpt.model_summary(model, args.model) + f", on {device}")
    examples = [tokenize_examples(entries, tokenizer, max_length, args.mask_prompt) for entries in splits[:2]]
    if not all(examples):
        raise ValueError("no training or validation example is left: raise --max-length or drop --mask-prompt")
    steps_per_epoch, total_steps = planned_steps(args, len(examples[0]))
    answers = answer_entries(args, splits[2])
    print(f"training: {len(examples[0])} examples, {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs); "
          f"then {len(answers)} answers of up to {args.max_new_tokens} tokens (--num-answers)")
    gpt.write_json(out_dir / "run.json", {"settings": vars(args)})  # on --resume: with a new --epochs or --max-steps
    for name, entries in zip(SPLIT_FILES, splits):
        gpt.write_json(out_dir / name, entries)

    collate = functools.partial(collate_instruction_batch, eot_id=tokenizer.eot_id, mask_prompt=args.mask_prompt,
                                max_length=max_length)
    state_path = out_dir / "train_state.pt"
    try:
        with gpt.StopSignal() as stopper:  # Ctrl-C or SIGTERM: finish the step, save, stop
            progress = train(model, tokenizer, *examples, collate, args, device, state_path, stopper, state)
    except KeyboardInterrupt:  # a second Ctrl-C: at once, without saving
        if state_path.exists():
            print(f"python finetune_instruct.py --resume --out-dir {out_dir} goes on from the last save in "
                  f"{state_path}", file=sys.stderr)
        raise
    history = progress["history"]
    losses = {"train": (history["step"], history["train_loss"]), "validation": (history["step"], history["val_loss"])}
    gpt.plot_curves(out_dir / "losses.png", {"loss": losses}, "step")
    kept = keep_weights(model, progress, args.keep_last)
    gpt.merge_lora(model)  # LoRA's adapters folded into the model's own layers: a plain checkpoint
    gpt.save_checkpoint(out_dir / "model.pt", model.eval(), tokenizer, settings=vars(args), history=history, kept=kept)
    print(f"saved the fine-tuned model to {out_dir / 'model.pt'}")
    if not args.keep_state:
        state_path.unlink(missing_ok=True)  # up to 4x the model; --keep-state keeps it for --resume
    return args, model.to(gpt.DTYPES[args.dtype]), tokenizer, answers


# --- 4. Answers: a response for each test entry ---------------------------------------------


def generate_response(model, tokenizer, entry, max_new_tokens=256, **sampling):
    """The model's answer to one entry (the book's section 7.7) -> (text, number of new tokens): format_prompt(entry)
    continued by gpt.generate (`sampling`: as there) up to the end-of-text token or max_new_tokens, stripped."""
    prompt_ids = gpt.text_to_token_ids(format_prompt(entry), device=model.wte.weight.device, tokenizer=tokenizer)
    eot_id = tokenizer.eot_id  # 50256 for GPT-2; the Llama family's own
    output = gpt.generate(model, prompt_ids, max_new_tokens, eot_id=eot_id, **sampling)
    new_ids = output[0, prompt_ids.shape[1] :].tolist()
    if eot_id in new_ids:
        new_ids = new_ids[: new_ids.index(eot_id)]
    return gpt.token_ids_to_text(new_ids, tokenizer=tokenizer).strip(), len(new_ids)


def generate_responses(model, tokenizer, entries, path, **options):
    """Answer every entry (options: `generate_response`'s), then write them with a "model_response" each to path in
    one atomic write: interrupted, it writes nothing."""
    results, tokens, started = [], 0, time.time()
    for i, entry in enumerate(entries):
        response, n_tokens = generate_response(model, tokenizer, entry, **options)
        results.append({**entry, "model_response": response})
        tokens += n_tokens
        eta = gpt.eta(started, i + 1, len(entries))
        gpt.show_progress(f"answers {i + 1}/{len(entries)} | {tokens / (time.time() - started):.1f} tok/s | ETA {eta}")
    gpt.write_json(path, results)
    empty = sum(not result["model_response"] for result in results)
    print(f"wrote {len(results)} responses to {path} ({empty} empty: ended at once by the end-of-text token)")


# --- 5. Evaluation: an LLM judge served by Ollama -------------------------------------------

JUDGE_SEED = 123  # fixed seed (and temperature 0) so the judge gives the same score twice
# Ollama's structured output (https://ollama.com/blog/structured-outputs): the JSON schema in the request's "format"
# field constrains the reply to {"score": <0..100>}.
SCORE_FORMAT = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
                "required": ["score"]}
# A number standing alone in a judge's reply: 85, 85.5, "85%", "85." at a sentence's end. Not a part of "1,000" or of
# a decimal comma "7,5" (which is meant cannot be told), nor of a ratio "8/10", a name "GPT-2", or "-5".
_NUMBER = re.compile(r"(?<![\w.,/-])\d+(?:\.\d+)?(?![\w/]|[.,]\d)")


def judge_prompt(entry):
    """The grading request for one response (the book's section 7.8)."""
    return (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, score the model response "
            f"`{entry['model_response']}` on a scale from 0 to 100, where 100 is the best score. Respond with the "
            "integer number only.")


def parse_score(reply):
    """The judge's reply (text, or a JSON value) -> its score, a float in 0..100, or None. JSON comes first, the
    structured output asked for: a number, or {"score": x}. Other text scores only when it holds one number, however
    often ("Score: 85. 85 it is")."""
    if isinstance(reply, str):
        try:
            reply = json.loads(reply)
        except (ValueError, RecursionError):  # not JSON: prose, or JSON inside prose
            numbers = {float(number) for number in _NUMBER.findall(reply)}
            reply = numbers.pop() if len(numbers) == 1 else None
    if isinstance(reply, dict):
        reply = reply.get("score")
    if isinstance(reply, (int, float)) and not isinstance(reply, bool) and 0 <= reply <= 100:  # NaN fails
        return float(reply)
    return None


def ask_judge(prompt, url, model):
    """One chat request to Ollama (POST /api/chat, not streamed, temperature 0, a fixed seed, the reply held to
    SCORE_FORMAT) -> the reply's content: normally '{"score": 85}'. RuntimeError: no server (how to start one), an
    HTTP error such as a model not pulled, or a reply of another shape (a server that is not Ollama)."""
    options = {"temperature": 0, "seed": JUDGE_SEED, "num_ctx": 2048}
    messages = [{"role": "user", "content": prompt}]
    payload = {"model": model, "messages": messages, "stream": False, "options": options, "format": SCORE_FORMAT}
    try:
        reply = requests.post(url + "/api/chat", json=payload, timeout=(5, 600))
    except requests.RequestException as e:
        raise RuntimeError(f"no Ollama server answers at {url} ({type(e).__name__}): start the server with `ollama "
                           f"serve` (install it from https://ollama.com) and get the judge with `ollama pull {model}`, "
                           "or point --judge-url at a running server") from None
    if reply.status_code != 200:
        raise RuntimeError(f"the server at {url} answered HTTP {reply.status_code}: {reply.text[:300]}; is the judge "
                           f"there? `ollama pull {model}` gets it, or choose another --judge-model")
    try:
        return reply.json()["message"]["content"]  # TypeError for a list or a number, KeyError for a missing field
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"the server at {url} answered an unexpected reply: {reply.text[:300]!r}; is it an Ollama "
                           "server? check --judge-url") from None


def judge(args, responses_path):
    """Grade each "model_response" of the responses file against its "output"; print the mean score and write the
    entries with a "score" (0-100, null when unscorable) to <name>-scored.json beside it."""
    entries = load_instruction_data(responses_path, "the answers", "give answers as --generate-only writes them",
                                    keys=("instruction", "output", "model_response"))
    url, scored, started = args.judge_url.rstrip("/"), [], time.time()
    try:
        for i, entry in enumerate(entries):
            answer = ask_judge(judge_prompt(entry), url, args.judge_model)
            scored.append({**entry, "score": parse_score(answer)})
            if scored[-1]["score"] is None:
                print(f"  entry {i}: no score 0-100 in the judge's answer {answer!r:.80}")
            print(f"judging {i + 1}/{len(entries)} | ETA {gpt.eta(started, i + 1, len(entries))}", flush=True)
    except RuntimeError as e:  # the answers are kept: say how to grade them once the judge is there
        raise RuntimeError(f"{e}; the answers stay in {responses_path}: grade them later with python "
                           f"finetune_instruct.py --judge-only --out-dir {responses_path.parent} "
                           f"--judge-url {url} --judge-model {args.judge_model}") from None
    scored_path = responses_path.with_name(responses_path.stem + "-scored.json")
    gpt.write_json(scored_path, scored)
    scores = [e["score"] for e in scored if e["score"] is not None]
    if not scores:  # a judge that answered without a readable score every time: no result
        raise RuntimeError(f"the judge {args.judge_model} gave no score 0-100 for any of the {len(entries)} entries "
                           f"(its answers are in {scored_path}): try another --judge-model")
    print(f"judge {args.judge_model}: mean score {sum(scores) / len(scores):.2f} over {len(scores)} entries; "
          f"{len(entries) - len(scores)} could not be scored; the scores are in {scored_path}")


# --- 6. The other modes: answers of a saved model (--generate-only, --prompt) ---------------


def answer_entries(args, test_set):
    """The test entries to answer: the first --num-answers (default: all; 10 after a short run with --max-steps)."""
    return test_set[: args.num_answers if args.num_answers is not None else 10 if args.max_steps else len(test_set)]


def answer_options(args):
    """The generation options of `generate_response` from the flags (sampling seeded by --seed; greedy needs none)."""
    return {key: getattr(args, key) for key in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")}


def answer_without_training(args, device, responses):
    """With --checkpoint (any --model value; default <out-dir>/model.pt), --prompt: print the answer to one
    instruction; --generate-only: answer the run's test split (its test.json, else --data's) into responses."""
    checkpoint = Path(args.checkpoint or Path(args.out_dir) / "model.pt")
    if args.checkpoint is None and not checkpoint.exists():
        raise FileNotFoundError(f"no {checkpoint}: fine-tune first, or give --checkpoint (any --model value works)")
    print(f"model: {checkpoint}")
    model, tokenizer = gpt.load(checkpoint, device=device, dtype=gpt.DTYPES[args.dtype], language_model=True)
    if args.prompt is not None:
        entry = {"instruction": args.prompt, "input": args.input}
        answer = generate_response(model, tokenizer, entry, **answer_options(args))[0]
        return print(answer or "(an empty answer: the model ended it at once with its end-of-text token)")
    out_dir = gpt.claim_run_folder(args.out_dir, [])  # answering again replaces responses.json, as was asked
    if (out_dir / "test.json").is_file():
        print(f"data: the run's test split, {out_dir / 'test.json'}")
        test_set = load_instruction_data(out_dir / "test.json", "the run's split", SPLIT_FIX)
    else:
        path = data_path(args)
        print(f"data: {out_dir} holds no test.json: answering the test split of {path} with --seed {args.seed}")
        test_set = split_dataset(load_instruction_data(path), args.seed)[2]
    generate_responses(model, tokenizer, answer_entries(args, test_set), responses, **answer_options(args))


# --- 7. Command line ------------------------------------------------------------------------


def build_parser():
    p = gpt.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = p.add_argument_group("what to run (default: fine-tune, then answer the test set)")
    what.add_argument("--generate-only", action="store_true", help="answer the run's test split with --checkpoint")
    what.add_argument("--prompt", help="answer this one instruction with --checkpoint, print it, exit")
    what.add_argument("--input", help="input text for --prompt (the '### Input:' section)")
    what.add_argument("--judge-only", action="store_true", help="no training, no answers: grade --out-dir's answers")
    gpt.add_flags(what.add_mutually_exclusive_group(), "resume", "overwrite")
    what.add_argument("--keep-state", action="store_true", help="keep train_state.pt after training, for --resume")
    gpt.add_flags(what, "out_dir", out_dir=("runs/instruct", "one per stage"))
    data = p.add_argument_group("data")
    data.add_argument("--data", help="Alpaca JSON list or JSON Lines (default: the book's, downloaded to --cache-dir)")
    gpt.add_flags(data, "cache_dir", "seed", "max_length")
    data.add_argument("--mask-prompt", action="store_true", help="learn only the response: prompt targets become -100")
    train = p.add_argument_group("model and training")
    gpt.add_flags(train, "model", "epochs", "batch_size", "lr", "weight_decay", "drop_rate", "lora", "lora_rank",
                  "lora_alpha", "max_steps", "log_every", "eval_every", "eval_batches", "keep_last", epochs=(2, "the "
                  "book's"), model=("gpt2-medium", "the book's: gpt2 follows instructions poorly"),
                  eval_every=(25, "the book's run has 234 steps"))
    train.add_argument("--save-every", type=gpt.positive_int, default=50, help="steps between train_state.pt saves")
    gpt.add_flags(train, "dtype", "device")
    answers = p.add_argument_group("answers and evaluation")
    answers.add_argument("--checkpoint", help="model that answers, any --model value (default: model.pt in --out-dir)")
    answers.add_argument("--num-answers", type=gpt.non_negative_int, help="answer the first N test entries (default: "
                         "all; 10 with --max-steps, a short try)")
    gpt.add_flags(answers, "max_new_tokens", "temperature", "top_k", "top_p", max_new_tokens=(256, "a whole answer"))
    answers.add_argument("--judge", choices=["none", "ollama"], default="none", help="grade with a local Ollama")
    answers.add_argument("--judge-url", default="http://localhost:11434", help="Ollama address")
    answers.add_argument("--judge-model", default="llama3", help="Ollama model that grades")
    return p


def parse_args(argv=None):
    """The flags, each checked by its `type=`; combinations that cannot work exit 2 with one line naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        parser.error(f"--prompt must hold the instruction to answer, got {args.prompt!r}")
    if args.input is not None and args.prompt is None:
        parser.error("--input goes with --prompt: give the instruction too")
    if args.generate_only + args.judge_only + (args.prompt is not None) + args.resume > 1:
        parser.error("choose one of --generate-only, --judge-only, --prompt and --resume")
    if args.num_answers == 0 and args.judge != "none":
        parser.error("--num-answers 0 leaves --judge nothing to grade")
    sampling = [flag for flag in ("top_k", "top_p") if getattr(args, flag) is not None]
    if sampling and not args.temperature:
        parser.error(f"{gpt.flag_name(sampling[0])} is for sampling: give --temperature above 0 as well")
    modes = [flag for flag in ("generate_only", "judge_only", "prompt") if getattr(args, flag) not in (None, False)]
    if args.dtype == "float16" and not modes:
        parser.error("--dtype float16 trains without loss scaling: train in bfloat16 or float32")
    if modes:
        mode = gpt.flag_name(modes[0])
        gpt.refuse_flags(parser, argv, TRAINING_FLAGS + ("num_answers",) * (mode != "--generate-only"), mode)
    return args


@gpt.command_line(memory_hint="use a smaller --batch-size or --max-length, or --lora")
def main(argv=None):
    args = parse_args(argv)
    os.environ["GPT_CACHE_DIR"] = args.cache_dir
    responses = Path(args.out_dir) / "responses.json"
    if args.judge == "ollama" and not args.judge_only:  # before hours of training and answering: is the judge there?
        ask_judge("Answer with the score 100.", args.judge_url.rstrip("/"), args.judge_model)
    if args.judge_only:
        return judge(args, responses)
    device = gpt.pick_device(args.device)
    if args.prompt is not None or args.generate_only:
        answer_without_training(args, device, responses)
    else:
        args, model, tokenizer, answers = fine_tune(args, argv, device)
        try:
            generate_responses(model, tokenizer, answers, responses, **answer_options(args))
        except KeyboardInterrupt:  # model.pt is saved: --resume would find the training done, answering goes on alone
            defaults = answer_options(build_parser().parse_args([]))
            flags = "".join(f" {gpt.flag_name(key)} {value}" for key, value in answer_options(args).items()
                            if value != defaults[key])
            print(f"python finetune_instruct.py --generate-only --out-dir {args.out_dir} --num-answers {len(answers)}"
                  f"{flags} answers the test split with the saved model", file=sys.stderr)
            raise
    if args.judge == "ollama" and args.prompt is None:
        judge(args, responses)


if __name__ == "__main__":
    main()
