"""finetune_classify.py: fine-tune a pretrained GPT-2 (or a Llama-family model) into an SMS spam classifier.

Stage "fine-tune for classification" (chapter 6 of "Build a Large Language Model (From Scratch)"): the SMS Spam
Collection (UCI data set 228), balanced, split 70/10/20; a 2-class head reads each message's last real token (which has
seen the whole message); the last block, final norm and head train, the frozen blocks run once per message (the
"activation cache"); the best epoch on validation is kept. The job, `train_and_evaluate` (after its parts): run folder
-> build_classifier -> prepare_data -> choose_forward_pass -> train_classifier -> labelled_metrics (test split) -> save.

    python finetune_classify.py                              # download data and GPT-2, train, evaluate, save
    python finetune_classify.py --model HuggingFaceTB/SmolLM2-135M --lora --lora-rank 16
    python finetune_classify.py --classify "You won a prize! Call now" "See you at 6?"
    python finetune_classify.py --classify-file messages.txt --threshold 0.8
    python finetune_classify.py --evaluate runs/classify/test.csv --results evaluation.json
    python finetune_classify.py --checkpoint runs/classify --export-hf out/classifier

Writes into --out-dir (default runs/classify/; another run there is refused unless --overwrite): run.json (the
settings), train.csv, validation.csv, test.csv (the splits, as --evaluate reads them), classifier.pt (config,
settings, tokenizer and all weights of the kept epoch), metrics.json (history, test metrics), loss-accuracy.png.
"""

import csv
import io
import math
import os
import random
import time
import zipfile
import zlib
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

import gpt

# UCI's own download, then the mirror the book uses when UCI is down.
DATA_URLS = [
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
]
ZIP_MEMBER = "SMSSpamCollection"
# The extracted member is checked (size in bytes, SHA-256), not the zip: a zip made anew differs byte-wise.
MEMBER_SIZE = 477907
MEMBER_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
LABELS = {"ham": 0, "spam": 1}  # the data set's labels -> class index
CLASS_NAMES = ["not spam", "spam"]  # what --classify prints for class 0 and 1
SPLIT_FRACTIONS = (0.7, 0.1)  # train, validation; the test set gets the rest (0.2)
TRAINABLE_CHOICES = ("last-block", "all", "head")  # --trainable; --lora trains adapters instead
CACHE_BATCH_TOKENS = 4096  # padded tokens per batch filling the activation cache: big matrices, bounded memory
MAX_BAD_LINES = 5  # bad data lines an error names; the rest are counted
HISTORY = ("epoch", "step", "train_loss", "train_accuracy", "validation_loss", "validation_accuracy")  # per epoch


# --- Data: download, read, balance, split, tokenize -------------------------------------


def sms_collection_path(data=None, urls=DATA_URLS):
    """`data` when given, else the download from the first of `urls` that works (RuntimeError: none does)."""
    if data is not None:
        return gpt.existing_file(data, "--data")
    return gpt.fetch_dataset(urls, "sms+spam+collection.zip", flag="--data", member=ZIP_MEMBER, size=MEMBER_SIZE,
                             sha256=MEMBER_SHA256)


def read_sms_bytes(path):
    """The bytes of a file, or of its SMSSpamCollection member when it is a zip file (as UCI distributes it).
    Raises ValueError naming the file for a damaged zip file or one without that member."""
    raw = Path(path).read_bytes()
    if not raw.startswith(b"PK"):  # the zip signature; a data file starts with a label
        return raw
    try:
        return zipfile.ZipFile(io.BytesIO(raw)).read(ZIP_MEMBER)
    except (KeyError, zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f"{path}: a damaged zip file or one without {ZIP_MEMBER} ({e}): give the extracted "
                         f"{ZIP_MEMBER} file instead") from None


def parse_labelled(raw, source="data"):
    """UTF-8 bytes of labelled messages -> list of (label, text), label "ham" or "spam": a .csv `source` with label and
    text columns (as a run writes its splits), else the collection's lines `label TAB text`. ValueError names the file
    and its first bad lines (no tab, another label, an empty text), or a lack of columns, messages or UTF-8."""
    text = gpt.decode_utf8(raw, source)
    # rows: (line number, label, text or None for a line without a tab or a CSV row without a text column)
    if str(source).lower().endswith(".csv"):
        # strict: a quote left open is an error, not one message that runs to the end of the file
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        try:
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]  # "Label", "Text" too
            rows = [(reader.line_num, row.get("label") or "", row.get("text")) for row in reader]
        except csv.Error as e:
            raise ValueError(f"{source}: not valid CSV in the row after line {reader.line_num} ({e}): close its "
                             'quote, or write a quote inside a quoted text as ""') from None
    else:  # split("\n"), not splitlines(): messages may contain other Unicode line separators
        lines = [(number, line.partition("\t")) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
        rows = [(number, label, message if tab else None) for number, (label, tab, message) in lines]
    messages, bad = [], []
    for number, label, message in rows:
        label = label.strip().lower()  # strip(): also the "\r" of Windows line ends
        if message is None:
            bad.append(f"line {number}: no message (no tab after the label, or no text column)")
        elif label not in LABELS:
            bad.append(f"line {number}: unknown label {label[:20]!r} (expected ham or spam)")
        elif not message.strip():
            bad.append(f"line {number}: empty message")
        else:
            messages.append((label, message.strip()))
    if bad or not messages:
        listed = "; ".join(bad[:MAX_BAD_LINES]) + ("; ..." if bad[MAX_BAD_LINES:] else "")
        problem = f"{len(bad)} bad line(s): {listed}" if bad else "no labelled messages"
        raise ValueError(f"{source}: {problem}: give 'ham|spam<TAB>message' lines "
                         "(the SMS Spam Collection) or a .csv file with label and text columns")
    return messages


def create_balanced_dataset(messages, seed):
    """All spam messages and as many ham messages sampled with `seed`, in that order. ValueError: a class is missing."""
    spam = [m for m in messages if m[0] == "spam"]
    ham = [m for m in messages if m[0] == "ham"]
    if not spam or not ham:
        raise ValueError(f"the data has {len(ham)} ham and {len(spam)} spam messages: a classifier needs both classes")
    return random.Random(seed).sample(ham, min(len(ham), len(spam))) + spam


def random_split(messages, seed, min_train=1):
    """Shuffle with `seed` and cut into train/validation/test by SPLIT_FRACTIONS (70/10/20). Raises ValueError when a
    split would be empty or the training split under `min_train`."""
    splits = gpt.split_by_fractions(messages, seed, SPLIT_FRACTIONS)
    if min(len(s) for s in splits) < 1 or len(splits[0]) < min_train:
        raise ValueError(f"{len(messages)} messages after balancing are too few for a 70/10/20 split with a training "
                         f"batch of {min_train}: got {len(splits[0])} / {len(splits[1])} / {len(splits[2])}; "
                         "use a larger data file or a smaller --batch-size")
    return splits


def write_csv(path, header, rows):
    """Write rows as CSV (UTF-8, "\\n" line ends) under a header line, atomically."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    gpt.atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def tokenize_messages(texts, max_length=None, tokenizer=None, device="cpu"):
    """Texts -> list of LongTensor [n_tokens] on `device` by `tokenizer` (default GPT-2's), each cut to `max_length`
    tokens if set. Each is a whole message: Llama 3 starts it with <|begin_of_text|>, as transformers does."""
    tokenizer = tokenizer or gpt.get_tokenizer()
    token_ids = []
    for text in texts:
        ids = tokenizer.encode(text, bos=True)[:max_length]
        # transformers pads with end-of-text and reads the last token that is not padding, so it skips a trailing
        # end-of-text; we drop it, so both read the same token.
        while len(ids) > 1 and ids[-1] == tokenizer.eot_id:
            ids.pop()
        token_ids.append(torch.tensor(ids, dtype=torch.long, device=device))
    return token_ids


# --- Model: a pretrained GPT with a classification head, and the activation cache -------
# Training and evaluation see the model through a "logits_fn": logits_fn(list of B inputs) -> float32 [B, 2], where an
# input is one message's token ids [n] (full_pass_logits) or its cached hidden states [n, emb_dim] (cached_logits).


def add_classification_head(model):
    """Turn the language model into a classifier -> model: its head `lm_head` becomes a random nn.Linear(emb_dim, 2),
    untied from wte, so model(idx) returns class logits [B, T, 2] (CLASS_NAMES, kept as model.labels)."""
    # The Llama family's head has no bias, as in transformers: its RMSNorm has no shift to carry one into an export.
    return gpt.add_classifier_head(model, CLASS_NAMES, bias=model.cfg.family == "gpt2")


def set_trainable(model, trainable, lora_rank=16, lora_alpha=16.0):
    """Freeze the model except what `trainable` names -> model: all; last-block (the book's choice); head; or lora
    (--lora): adapters of rank `lora_rank`, updates scaled by lora_alpha / lora_rank, on every block's linear layers."""
    if trainable == "all":
        return model.requires_grad_(True)
    if trainable == "lora":
        gpt.add_lora(model, rank=lora_rank, alpha=lora_alpha)  # freezes every weight it does not add
    else:
        model.requires_grad_(False)
    if trainable == "last-block":
        model.h[-1].requires_grad_(True)
        model.ln_f.requires_grad_(True)
    model.lm_head.requires_grad_(True)  # the new head trains in every mode
    return model


def full_pass_logits(model, token_ids):
    """Class logits of a batch through the whole model, read at each message's last real token: float [batch,
    num_classes]. token_ids: list of LongTensor [n_tokens_i], right-padded with id 0, which no real token sees."""
    idx = pad_sequence(token_ids, batch_first=True)  # [B, T]
    last = torch.tensor([len(t) - 1 for t in token_ids], device=idx.device)  # [B]
    return model(idx)[torch.arange(len(token_ids), device=idx.device), last]  # [B, T, classes] -> [B, classes]


def autocast_logits(logits_fn, device, dtype_name):
    """Wrap a logits_fn for --dtype -> a logits_fn: "bfloat16" runs it under torch.autocast (matrix products in
    bfloat16, weights stay float32), "float32" as it is; either way the logits come back as float32."""
    autocast, _ = gpt.autocast_context(device, dtype_name)

    def logits(inputs):
        with autocast:
            return logits_fn(inputs).float()

    return logits


@torch.no_grad()
def compute_frozen_activations(model, token_ids, n_frozen):
    """Hidden states after the embeddings and the first `n_frozen` blocks (frozen, dropout 0), per message: list of
    LongTensor [n_tokens_i] -> list of float [n_tokens_i, emb_dim]. Batches: similar lengths, CACHE_BATCH_TOKENS."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))  # little padding
    batch_size = max(1, CACHE_BATCH_TOKENS // len(token_ids[order[-1]]))
    activations = [None] * len(token_ids)
    started = time.time()
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        x = model.embed(pad_sequence([token_ids[i] for i in batch], batch_first=True))  # [B, T, C]
        for block in model.h[:n_frozen]:
            x = block(x)
        for row, i in enumerate(batch):
            activations[i] = x[row, : len(token_ids[i])].clone()  # a copy frees the padded batch
        done = start + len(batch)
        gpt.show_progress(f"activation cache: {done}/{len(order)} messages, ETA {gpt.eta(started, done, len(order))}")
    return activations


def last_block_at_last_token(block, x, last):
    """Speed only (skip it on a first read; 1.6x faster training): block(x)[arange(B), last] of a GPT-2 block without
    dropout, float [B, C], tested equal. x: float [B, T, C], right-padded; last: LongTensor [B]. The query, attention
    output and MLP run at the last position alone; keys and values come from every position up to it."""
    attn = block.attn
    B, T, C = x.shape
    rows = torch.arange(B, device=x.device)
    h = block.ln_1(x)  # [B, T, C]
    w_q, w_kv = attn.c_attn.weight.split([C, 2 * C])  # c_attn stacks the q, k, v projections
    b_q, b_kv = attn.c_attn.bias.split([C, 2 * C]) if attn.c_attn.bias is not None else (None, None)
    q = F.linear(h[rows, last], w_q, b_q).view(B, attn.n_heads, 1, attn.head_dim)  # (B, nh, 1, hd)
    k, v = F.linear(h, w_kv, b_kv).split(C, dim=2)
    k = k.view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, nh, T, hd)
    v = v.view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)  # (B, nh, T, hd)
    visible = torch.arange(T, device=x.device) <= last[:, None]  # [B, T]: the keys the last token sees
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])  # (B, nh, 1, hd)
    x_last = x[rows, last] + attn.c_proj(y.reshape(B, C))
    return x_last + block.mlp(block.ln_2(x_last))


def cached_logits(model, activations, n_frozen):
    """Class logits from cached activations (list of float [n_tokens_i, emb_dim], the states after the first
    `n_frozen` blocks): float [batch, num_classes], equal to `full_pass_logits` on their messages. GPT-2's last
    block runs only at each message's last token (`last_block_at_last_token`)."""
    x = pad_sequence(activations, batch_first=True)  # [B, T, C], zero padding after each message
    last = torch.tensor([len(a) - 1 for a in activations], device=x.device)  # [B]
    top_blocks = model.h[n_frozen:]  # the trainable top
    shortcut = len(top_blocks) > 0 and model.cfg.family == "gpt2"  # the Llama family runs every position
    for block in top_blocks[:-1] if shortcut else top_blocks:
        x = block(x)
    if shortcut:
        return model.lm_head(model.ln_f(last_block_at_last_token(top_blocks[-1], x, last)))
    return model.lm_head(model.ln_f(x[torch.arange(len(activations), device=x.device), last]))


# --- Training and evaluation ------------------------------------------------------------


def train_classifier(model, logits_fn, train, validation, *, epochs=5, max_steps=None, batch_size=8, lr=5e-5,
                     weight_decay=0.1, seed=123, log_every=25, keep_last=False):
    """Fine-tune the trainable parameters with AdamW on cross-entropy -> history (HISTORY per epoch, `step_loss` per
    step, `kept_epoch`). train, validation: (inputs for `logits_fn`, LongTensor [n] of labels). Each epoch shuffles
    (seeded), drops the last short batch (as the book does), evaluates both splits; the best epoch is kept (or last)."""
    train_inputs, train_labels = train
    optimizer = gpt.make_adamw(model, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train_inputs) // batch_size
    total_steps = max_steps or steps_per_epoch * epochs  # --max-steps, when given, whatever --epochs says
    n_epochs = math.ceil(total_steps / steps_per_epoch)  # the last may be cut short
    print(f"training:   {total_steps} steps of {batch_size} messages, {total_steps / steps_per_epoch:.2f} epochs")
    history = {name: [] for name in (*HISTORY, "step_loss")}
    best = None  # (validation accuracy, -validation loss) of the kept epoch
    kept_weights = None
    step = 0
    started = time.time()
    logged_step, logged_at = 0, time.perf_counter()  # of the last progress line or evaluation, for the throughput
    for epoch in range(1, n_epochs + 1):
        model.train()  # `evaluate` switched to eval mode
        order = torch.randperm(len(train_inputs), generator=generator).tolist()
        for b in range(min(steps_per_epoch, total_steps - step)):  # the last epoch stops at total_steps
            batch = order[b * batch_size : (b + 1) * batch_size]
            loss = F.cross_entropy(logits_fn([train_inputs[i] for i in batch]), train_labels[batch])
            loss_value = loss.item()  # the one read from the device per step
            gpt.check_finite_loss(loss_value, step + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            history["step_loss"].append(loss_value)
            if step % log_every == 0 or step == total_steps:
                examples_per_second = (step - logged_step) * batch_size / (time.perf_counter() - logged_at)
                print(f"{gpt.training_position(step, total_steps, steps_per_epoch)} | loss {loss_value:.4f} | "
                      f"{examples_per_second:.1f} examples/s | ETA {gpt.eta(started, step, total_steps)}", flush=True)
                logged_step, logged_at = step, time.perf_counter()
        train_loss, train_acc, _ = evaluate(model, logits_fn, *train, batch_size)
        val_loss, val_acc, _ = evaluate(model, logits_fn, *validation, batch_size)
        print(f"epoch {step / steps_per_epoch:.3g}: train loss {train_loss:.4f} accuracy {100 * train_acc:.2f}% | "
              f"validation loss {val_loss:.4f} accuracy {100 * val_acc:.2f}%", flush=True)
        for name, value in zip(HISTORY, (step / steps_per_epoch, step, train_loss, train_acc, val_loss, val_acc)):
            history[name].append(value)
        # Model selection: a copy of the trainable weights of the best epoch so far (--keep-last: the last).
        score = (val_acc, -val_loss)  # ties: the lower loss, then the earlier epoch
        if keep_last or best is None or score > best:
            best, kept_weights = score, gpt.trainable_weights(model)
            history["kept_epoch"] = history["epoch"][-1]
        logged_step, logged_at = step, time.perf_counter()  # evaluating does not count in examples/s
    model.load_state_dict(kept_weights, strict=False)
    print(f"kept:       epoch {history['kept_epoch']:.3g} of {history['epoch'][-1]:.3g} "
          f"({'--keep-last' if keep_last else 'best validation accuracy, then loss; --keep-last keeps the last'})")
    return history


@torch.no_grad()
def evaluate(model, logits_fn, inputs, labels, batch_size, threshold=0.5):
    """Mean cross-entropy loss, accuracy and predictions (LongTensor [n], in input order: spam where its probability
    reaches `threshold`), in eval mode. Batches hold messages of similar length (sorted): little padding."""
    model.eval()
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    predictions = torch.empty(len(inputs), dtype=torch.long, device=labels.device)
    total_loss = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        logits = logits_fn([inputs[i] for i in batch]).float()
        total_loss += F.cross_entropy(logits, labels[batch], reduction="sum").item()
        predictions[batch] = (logits.softmax(dim=-1)[:, 1] >= threshold).long()
    return total_loss / len(inputs), (predictions == labels).sum().item() / len(inputs), predictions


def binary_classification_metrics(predictions, labels):
    """Accuracy; precision, recall and F1 of spam (class 1; 0.0 where undefined); the confusion matrix [[true 0
    predicted 0, true 0 predicted 1], [true 1 ..., ...]]. predictions, labels: LongTensor [n] of class indices 0/1."""
    matrix = [[int(((labels == t) & (predictions == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    (true_neg, false_pos), (false_neg, true_pos) = matrix
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = (true_neg + true_pos) / len(labels)
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "confusion_matrix": matrix}


def labelled_metrics(model, token_ids, labels, batch_size, threshold, dtype_name, what):
    """Loss and `binary_classification_metrics` of labelled messages through the full forward pass -> dict, printed
    as `what`: a run's test metrics and those of --evaluate, one computation."""
    logits_fn = autocast_logits(partial(full_pass_logits, model), labels.device, dtype_name)
    loss, _, predictions = evaluate(model, logits_fn, token_ids, labels, batch_size, threshold)
    metrics = {"messages": len(labels), "loss": loss, **binary_classification_metrics(predictions.cpu(), labels.cpu())}
    print(f"{what} ({metrics['messages']} messages, spam at probability >= {threshold}): accuracy "
          f"{100 * metrics['accuracy']:.2f}% | spam precision {metrics['precision']:.4f} | recall "
          f"{metrics['recall']:.4f} | F1 {metrics['f1']:.4f}")
    print("confusion matrix (rows: true label, columns: predicted label):")
    for name, row in zip(["", *CLASS_NAMES], [CLASS_NAMES, *metrics["confusion_matrix"]]):  # a header, then the counts
        print(f"  {name:>10} {row[0]:>10} {row[1]:>10}")
    return metrics


# --- The stage: a run from the data to the saved classifier and its test metrics --------

RUN_FILES = ("run.json", "train.csv", "validation.csv", "test.csv", "metrics.json", "loss-accuracy.png")  # + checkpoint


def build_classifier(args, device):
    """Pretrained model with a 2-class head, dropout and trainable parameters set -> (model, its tokenizer); sets
    args.max_length (default: the context length)."""
    model, tokenizer = gpt.load(args.model, device=device)
    args.max_length = gpt.length_within_context(args.max_length, model.cfg, "--max-length")
    torch.manual_seed(args.seed)  # the head's (and LoRA's) initialisation, and dropout
    add_classification_head(model)
    gpt.set_drop_rate(model, args.drop_rate)
    set_trainable(model, "lora" if args.lora else args.trainable, args.lora_rank, args.lora_alpha)
    print(f"model:      {gpt.model_summary(model, args.model)} on {device}")
    # Weights, gradients and AdamW's moments must fit before the work starts (activations come on top).
    gpt.check_training_memory(model, device, "train fewer parameters (--lora, or --trainable last-block or head)")
    return model, tokenizer


def prepare_data(args, out_dir, device, tokenizer):
    """Read, balance, split (written as CSV) and tokenize the data -> (token ids, labels) per split: lists of
    LongTensor [n_tokens] cut to --max-length, and LongTensor [n]."""
    path = sms_collection_path(args.data)
    messages = parse_labelled(read_sms_bytes(path), str(path))
    n_spam = sum(label == "spam" for label, _ in messages)
    print(f"data:       {path}: {len(messages)} messages ({len(messages) - n_spam} ham, {n_spam} spam)")
    splits = random_split(create_balanced_dataset(messages, args.seed), args.seed, min_train=args.batch_size)
    for name, split in zip(("train", "validation", "test"), splits):
        write_csv(out_dir / f"{name}.csv", ("label", "text"), split)
    repeated = len({text for _, text in splits[2]} & {text for _, text in splits[0]})  # the data repeats some texts
    print(f"splits:     {' / '.join(str(len(s)) for s in splits)} (train / validation / test, balanced, seed "
          f"{args.seed}) in {out_dir}/{{train,validation,test}}.csv; {repeated} test texts occur in training")
    # Tokenized as --classify and --evaluate tokenize: the same ids for the same text.
    token_ids = [tokenize_messages([text for _, text in split], args.max_length, tokenizer, device) for split in splits]
    at_limit = sum(len(t) == args.max_length for split in token_ids for t in split)
    print(f"tokens:     longest message {max(len(t) for split in token_ids for t in split)} tokens; {at_limit} "
          f"messages reach --max-length {args.max_length} (longer ones are cut there)")
    return token_ids, [torch.tensor([LABELS[label] for label, _ in split], device=device) for split in splits]


def choose_forward_pass(model, train_ids, val_ids, args):
    """-> ([training inputs, validation inputs], the logits_fn that reads them, use_cache): the activation cache and
    `cached_logits` when the frozen blocks' output never changes, else the token ids and `full_pass_logits`."""
    off = None  # or why the activation cache is off
    if args.no_activation_cache:
        off = "--no-activation-cache"
    elif args.drop_rate > 0:
        off = f"--drop-rate {args.drop_rate}"  # dropout changes the frozen blocks' output at every step
    elif args.lora or args.trainable == "all":
        off = "the lower blocks train"
    if off is not None:
        print(f"activation cache: off ({off}): full forward pass at every step")
        return [train_ids, val_ids], partial(full_pass_logits, model), False
    n_frozen = model.cfg.n_layers - 1 if args.trainable == "last-block" else model.cfg.n_layers  # "head": all frozen
    print(f"activation cache: on (embeddings and {n_frozen} of {model.cfg.n_layers} blocks frozen, dropout 0)")
    activations = compute_frozen_activations(model, train_ids + val_ids, n_frozen)  # both splits in one pass
    inputs = [activations[: len(train_ids)], activations[len(train_ids) :]]
    return inputs, partial(cached_logits, model, n_frozen=n_frozen), True


def train_and_evaluate(args, device):
    """The whole job, in order: run folder, model, data, activation cache, training, test, saving."""
    started = time.time()
    if args.data is not None:
        sms_collection_path(args.data)  # a missing --data file fails now, not after a model download
    # Before any work: the folder holds no other run's files, an old checkpoint too (its name relative to the folder).
    out_dir = gpt.claim_run_folder(args.out_dir, [os.path.relpath(args.checkpoint, args.out_dir), *RUN_FILES],
                                   overwrite=args.overwrite, resumable=False)
    # The model before the data: a wrong --model or --max-length fails in seconds, before the data download.
    gpt.print_settings(args, parse_args([]))
    model, tokenizer = build_classifier(args, device)
    token_ids, labels = prepare_data(args, out_dir, device, tokenizer)
    gpt.write_json(out_dir / "run.json", {"settings": vars(args)})  # after the data: bad data leaves no run behind
    inputs, logits_fn, use_cache = choose_forward_pass(model, token_ids[0], token_ids[1], args)
    history = train_classifier(model, autocast_logits(logits_fn, device, args.dtype), (inputs[0], labels[0]),
                               (inputs[1], labels[1]), epochs=args.epochs, max_steps=args.max_steps,
                               batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                               log_every=args.log_every, keep_last=args.keep_last)
    del inputs, logits_fn  # they hold the activation cache, which the test split does not use
    gpt.merge_lora(model)  # the test split runs the weights as saved, in the full pass, as --evaluate does
    metrics = labelled_metrics(model, token_ids[2], labels[2], args.batch_size, args.threshold, args.dtype,
                               "test split")
    gpt.save_checkpoint(args.checkpoint, model, tokenizer, max_length=args.max_length, settings=vars(args),
                        metrics=metrics)
    print(f"saved:      {args.checkpoint} (config, all weights: {Path(args.checkpoint).stat().st_size / 1e6:.0f} MB)")
    print(f"try it:     python finetune_classify.py --checkpoint {args.checkpoint} --classify \"Win a prize now\"")
    report = dict(settings=vars(args), activation_cache=use_cache, history=history, test=metrics)
    gpt.write_json(out_dir / "metrics.json", report)
    panels = {name: {split: (history["epoch"], history[f"{split}_{name}"]) for split in ("train", "validation")}
              for name in ("loss", "accuracy")}
    gpt.plot_curves(out_dir / "loss-accuracy.png", panels, xlabel="epoch")  # without matplotlib: a note
    print(f"wall time:  {gpt.format_duration(time.time() - started)}; metrics in {out_dir / 'metrics.json'}")


# --- The other modes: classify texts, evaluate on a labelled file (export: in main) -----


def load_classifier(path, device="cpu"):
    """A run's classifier or a ...ForSequenceClassification folder -> (model in eval mode, its tokenizer, the length
    in tokens it reads messages at). FileNotFoundError: no such path; ValueError: no spam classifier."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no classifier at {path}: train one first, or pass --checkpoint PATH")
    model, tokenizer = gpt.load(path, device=device)
    if len(getattr(model, "labels", ())) != 2:
        raise ValueError(f"{path} is no spam classifier of finetune_classify.py (class names: "
                         f"{getattr(model, 'labels', 'none, a language model')}): train one from it with --model")
    # The length the classifier read messages at: an export's model_max_length, or saved with a run's checkpoint.
    config = Path(path) / "tokenizer_config.json"
    max_length = None
    if config.is_file():
        max_length = gpt.read_json(config, "tokenizer config").get("model_max_length")
    elif Path(path).is_file():  # memory-mapped: the one entry is read, not the weights again
        max_length = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("max_length")
    return model, tokenizer, min(max_length or model.cfg.context_length, model.cfg.context_length)


@torch.no_grad()
def classify_texts(model, texts, max_length, tokenizer=None, dtype_name="float32", batch_size=16):
    """Spam probability of each text -> list of float, in the texts' order; each text cut to its first `max_length`
    tokens of `tokenizer` (default GPT-2's), the forward pass in `dtype_name` (see `autocast_logits`)."""
    device = model.wte.weight.device
    token_ids = tokenize_messages(texts, max_length, tokenizer, device)
    logits_fn = autocast_logits(partial(full_pass_logits, model), device, dtype_name)
    probabilities = []
    for start in range(0, len(token_ids), batch_size):
        probabilities += logits_fn(token_ids[start : start + batch_size]).softmax(dim=-1)[:, 1].tolist()
    return probabilities


def run_classify(args, device):
    """--classify / --classify-file (the non-empty lines of a UTF-8 file or a pipe such as /dev/stdin): print
    `label (p(spam)=probability)  text` per text."""
    texts = args.classify
    if args.classify_file is not None:
        text = gpt.read_text(args.classify_file, "--classify-file")
        texts = [line.strip() for line in text.split("\n") if line.strip()]
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("nothing to classify: give non-empty texts with --classify or lines in --classify-file")
    model, tokenizer, max_length = load_classifier(args.checkpoint, device)
    for text, probability in zip(texts, classify_texts(model, texts, max_length, tokenizer, args.dtype)):
        print(f"{model.labels[probability >= args.threshold]:<8} (p(spam)={probability:.3f})  {text}")


def run_evaluate(args, device):
    """--evaluate: `labelled_metrics` of --checkpoint on a labelled file, printed, and written as JSON to --results.
    The test split of a run (OUT_DIR/test.csv) gives its test metrics again, to the last digit."""
    path = gpt.existing_file(args.evaluate, "--evaluate")
    messages = parse_labelled(read_sms_bytes(path), args.evaluate)
    model, tokenizer, max_length = load_classifier(args.checkpoint, device)
    token_ids = tokenize_messages([text for _, text in messages], max_length, tokenizer, device)
    labels = torch.tensor([LABELS[label] for label, _ in messages], device=device)
    metrics = labelled_metrics(model, token_ids, labels, args.batch_size, args.threshold, args.dtype, args.evaluate)
    if args.results is not None:
        report = {"checkpoint": args.checkpoint, "file": args.evaluate, "threshold": args.threshold, "metrics": metrics}
        gpt.write_json(args.results, report)
        print(f"metrics in {args.results}")


# --- Command line -----------------------------------------------------------------------

# What using the classifier of --checkpoint as trained (its model, its --max-length) reads: other flags are refused.
USE_FLAGS = ("classify", "classify_file", "evaluate", "export_hf", "threshold", "results", "checkpoint", "batch_size",
             "dtype", "device", "cache_dir", "out_dir", "overwrite")


def build_parser():
    parser = gpt.ArgumentParser(description="Fine-tune GPT-2 (or a Llama-family model) into an SMS spam classifier. "
                                "Another run in --out-dir is refused unless --overwrite.")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="SMSSpamCollection, its UCI zip or a .csv with label, text (default: download)")
    gpt.add_flags(data, "max_length", "cache_dir")
    model = parser.add_argument_group("model")
    gpt.add_flags(model, "model")
    model.add_argument("--trainable", choices=TRAINABLE_CHOICES, default="last-block",
                       help="what trains: last-block (+ final norm + head), all, or head (the new head only)")
    gpt.add_flags(model, "lora", "lora_rank", "lora_alpha", "drop_rate")
    train = parser.add_argument_group("training")
    gpt.add_flags(train, "epochs", "max_steps", "batch_size", "lr", "weight_decay", "seed", "log_every", "keep_last",
                  epochs=(5, "the book's"), log_every=(25, "as steps on the activation cache are short"))
    train.add_argument("--no-activation-cache", action="store_true", help="run frozen blocks at every step (slower)")
    train.add_argument("--dtype", **{**gpt.FLAGS["dtype"], "choices": ["float32", "bfloat16"]})
    gpt.add_flags(train, "device", "out_dir", "overwrite", out_dir=("runs/classify", "one per stage"))
    use = parser.add_argument_group("use a fine-tuned classifier (no training)")
    mode = use.add_mutually_exclusive_group()
    mode.add_argument("--classify", nargs="+", metavar="TEXT", help="texts to classify (default: none: train)")
    mode.add_argument("--classify-file", metavar="FILE", help="classify each line of FILE (/dev/stdin for a pipe)")
    mode.add_argument("--evaluate", metavar="FILE", help="metrics on a labelled FILE, as --data")
    mode.add_argument("--export-hf", metavar="FOLDER", help="write --checkpoint in --dtype as a Hugging Face folder")
    use.add_argument("--threshold", type=gpt.fraction, default=0.5, metavar="P", help="spam from this probability on")
    use.add_argument("--results", metavar="FILE", help="write the metrics of --evaluate to this JSON file")
    use.add_argument("--checkpoint", help="a run's file or folder, or an export (default: classifier.pt in --out-dir)")
    return parser


def parse_args(argv=None):
    """The flags; those that cannot go together exit 2 with one line (parser.error). Resolves --checkpoint."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lora and args.trainable != "last-block":
        parser.error(f"--lora trains the adapters and the head: drop --trainable {args.trainable}")
    use = [flag for flag in ("classify", "classify_file", "evaluate", "export_hf") if getattr(args, flag) is not None]
    if use:
        training_flags = [name for name in vars(args) if name not in USE_FLAGS]
        gpt.refuse_flags(parser, argv, training_flags, f"{gpt.flag_name(use[0])} (the classifier of --checkpoint)")
    if args.results is not None and (args.evaluate is None or Path(args.results).is_dir()):  # before the work
        parser.error("--results goes with --evaluate and names a JSON file (a run writes metrics.json)")
    args.checkpoint = args.checkpoint or str(Path(args.out_dir) / "classifier.pt")
    if (Path(args.checkpoint) / "classifier.pt").is_file():  # a run folder: its classifier
        args.checkpoint = str(Path(args.checkpoint) / "classifier.pt")
    return args


@gpt.command_line(memory_hint="use a smaller --batch-size (or --max-length)")
def main(argv=None):
    args = parse_args(argv)
    os.environ["GPT_CACHE_DIR"] = args.cache_dir  # where gpt.py downloads data and weights
    if args.export_hf is not None:
        model, tokenizer, max_length = load_classifier(args.checkpoint)
        folder = gpt.export_hf(model, args.export_hf, tokenizer=tokenizer, dtype=gpt.DTYPES[args.dtype],
                               overwrite=args.overwrite, max_length=max_length)
        architecture = gpt.read_json(folder / "config.json", "config")["architectures"][0]
        return print(f"exported {args.checkpoint} ({args.dtype}) to {folder}, a {architecture} folder")
    device = gpt.pick_device(args.device)
    if args.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("note: this GPU has no bfloat16 (a T4, say): the work runs in float32")
        args.dtype = "float32"
    if args.evaluate is not None:
        run_evaluate(args, device)
    elif args.classify is not None or args.classify_file is not None:
        run_classify(args, device)
    else:
        train_and_evaluate(args, device)


if __name__ == "__main__":
    main()
