"""finetune_classify.py: fine-tune a pretrained GPT-2 (or a Llama-family model) into an SMS spam classifier.

Stage "fine-tune a pretrained GPT for classification" of the lifecycle (chapter 6 of "Build a Large Language Model
(From Scratch)", rasbt/LLMs-from-scratch). The language-model head is replaced by a 2-class linear head that reads the
hidden state of each message's last token (under causal attention the only position that has seen the whole message);
by default only the last transformer block, the final norm and the new head train, and the epoch with the best
validation accuracy is kept. Start reading at `train_and_evaluate`: the job in order; the functions above it are its
steps.

    python finetune_classify.py                              # download data and GPT-2, train, evaluate, save
    python finetune_classify.py --data path/to/SMSSpamCollection --model path/to/model.safetensors
    python finetune_classify.py --model HuggingFaceTB/SmolLM2-135M --lora --lora-rank 16
    python finetune_classify.py --classify "You won a prize! Call now" "See you at 6?"
    python finetune_classify.py --classify-file messages.txt --results predictions.csv --threshold 0.8
    python finetune_classify.py --evaluate runs/classify/test.csv --results evaluation.json
    python finetune_classify.py --checkpoint runs/classify --export-hf out/classifier

Data: the SMS Spam Collection (UCI Machine Learning Repository, data set 228; Almeida and Gomez Hidalgo, 2011),
balanced to as many ham as spam messages, shuffled and split 70/10/20.

Writes into --out-dir (default runs/classify/; a folder that holds another run is refused unless --overwrite):
run.json (the settings), train.csv, validation.csv, test.csv (the splits, columns label and text, as --evaluate
reads them), classifier.pt (config, settings, tokenizer and all weights of the kept epoch), metrics.json (settings,
history, kept epoch, test metrics, timings), loss-accuracy.png (with matplotlib).

Speed: frozen lower blocks without dropout give the same outputs at every step: they run once per message (the
"activation cache") and training runs only the trainable top, with the same logits and gradients as the full model.
"""

import csv
import io
import math
import os
import random
import sys
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
DATA_FILENAME = "sms+spam+collection.zip"
ZIP_MEMBER = "SMSSpamCollection"
# The extracted member is checked (size in bytes, SHA-256), not the zip: a zip made anew differs byte-wise.
MEMBER_SIZE = 477907
MEMBER_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
LABELS = {"ham": 0, "spam": 1}  # the data set's labels -> class index
CLASS_NAMES = ["not spam", "spam"]  # what --classify prints for class 0 and 1
SPLIT_FRACTIONS = (0.7, 0.1)  # train, validation; the test set gets the rest (0.2)
TRAINABLE_CHOICES = ("last-block", "all", "head")  # --trainable; --lora trains adapters instead
CACHE_BATCH_TOKENS = 4096  # padded tokens per batch filling the activation cache: big matrices, bounded memory
MAX_WARNINGS = 5  # bad data lines named in a warning or error; the rest are counted
HISTORY = ("epoch", "step", "train_loss", "train_accuracy", "validation_loss", "validation_accuracy")  # per epoch


# --- Data: download, read, balance, split, tokenize -------------------------------------


def sms_collection_path(data=None, urls=DATA_URLS):
    """`data` when given, else the cached download from the first of `urls` that works (RuntimeError naming the URLs
    and --data if none does)."""
    if data is not None:
        return gpt.existing_file(data, "--data")
    return gpt.fetch_dataset(urls, DATA_FILENAME, flag="--data", member=ZIP_MEMBER, size=MEMBER_SIZE,
                             sha256=MEMBER_SHA256)


def read_sms_bytes(path):
    """Raw bytes of a file, or of its `SMSSpamCollection` member when path is a zip file (as UCI distributes the
    collection). Raises ValueError naming the file for a damaged zip file or one without that member."""
    raw = Path(path).read_bytes()
    if not raw.startswith(b"PK"):  # the zip signature; a data file starts with a label
        return raw
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            members = [name for name in archive.namelist() if Path(name).name == ZIP_MEMBER]
            if not members:
                raise ValueError(f"{path}: the zip file has no member {ZIP_MEMBER!r} (it has: {archive.namelist()})")
            return archive.read(members[0])
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(f"{path}: a damaged zip file ({e}): give the extracted {ZIP_MEMBER} file instead (a "
                         "downloaded zip is fetched again once deleted)") from None


def parse_labelled(raw, source="data", strict=False):
    """Bytes of labelled messages -> list of (label, text), label "ham" or "spam". Two formats, by `source`'s name:
    a .csv file has a header with label and text columns (as a run writes its splits; the label "not spam", as
    --classify writes it, is ham), any other file the collection's lines `label TAB text`. A byte-order mark and
    Windows line endings are accepted, invalid UTF-8 becomes U+FFFD, blank lines are ignored. A line without a tab,
    with another label or an empty text is skipped with a warning naming it; with `strict` it is a ValueError, as are
    a CSV header without those columns and no messages at all."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        print(f"warning: {source}: invalid UTF-8 (first at byte {e.start}) replaced by U+FFFD")
        text = raw.decode("utf-8-sig", errors="replace")
    rows = []  # (line number, label, text or None for a line without a tab)
    if str(source).lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [column for column in ("label", "text") if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{source}: no {' and no '.join(missing)} column (header: {reader.fieldnames}): "
                             "a CSV file needs a header with label and text columns")
        rows = [(reader.line_num, row["label"] or "", row["text"] or "") for row in reader]
    else:  # split("\n"), not splitlines(): messages may contain other Unicode line separators
        for number, line in enumerate(text.split("\n"), start=1):
            label, tab, message = line.partition("\t")
            if line.strip():
                rows.append((number, label, message if tab else None))
    messages, bad = [], []
    for number, label, message in rows:
        label = label.strip().lower()  # strip(): also the "\r" of Windows line endings
        label = "ham" if label == CLASS_NAMES[0] else label
        if message is None:
            bad.append(f"line {number}: no tab between label and message")
        elif label not in LABELS:
            bad.append(f"line {number}: unknown label {label[:20]!r} (expected ham or spam)")
        elif not message.strip():
            bad.append(f"line {number}: empty message")
        else:
            messages.append((label, message.strip()))
    named = "; ".join(bad[:MAX_WARNINGS]) + ("; ..." if len(bad) > MAX_WARNINGS else "")
    summary = f"{source}: {len(bad)} bad line(s): {named}"
    if bad and strict:
        raise ValueError(summary)
    if bad:
        print(f"warning: {summary}: skipped (--strict-data makes them an error)")
    if not messages:
        raise ValueError(f"{source}: no labelled messages: give 'ham|spam<TAB>message' lines (the SMS Spam "
                         "Collection) or a .csv file with label and text columns")
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
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    gpt.atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def tokenize_messages(texts, max_length=None, tokenizer=None):
    """Texts -> list of LongTensor [n_tokens] by `tokenizer` (default GPT-2's), cut to `max_length` tokens if set.
    Each message is a whole text: Llama 3 starts it with <|begin_of_text|>, as transformers' tokenizer does."""
    tokenizer = tokenizer or gpt.get_tokenizer()
    token_ids = [tokenizer.encode(text, bos=True)[:max_length] for text in texts]
    for ids in token_ids:
        # transformers' ...ForSequenceClassification reads the last token that is not padding (the end-of-text
        # token): a message that ends in it is read before it there, so here too (the earlier tokens never see it).
        while len(ids) > 1 and ids[-1] == tokenizer.eot_id:
            ids.pop()
    return [torch.tensor(ids, dtype=torch.long) for ids in token_ids]


# --- Model: a pretrained GPT with a classification head -------------------------------


def add_classification_head(model):
    """Replace the language-model head (emb_dim -> vocabulary logits) by nn.Linear(emb_dim, 2) for CLASS_NAMES,
    initialised from the global torch seed. Returns the model."""
    # The Llama family's head has no bias, as transformers' LlamaForSequenceClassification:
    # its RMSNorm has no shift that could carry one into an export (see gpt.classifier_tensors).
    return gpt.add_classifier_head(model, CLASS_NAMES, bias=model.cfg.family == "gpt2")


def set_trainable(model, trainable, lora_rank=16, lora_alpha=16.0):
    """Freeze model except what `trainable` names -> model. last-block: the last transformer block, the final norm and
    the head (the book's choice); all; head; lora (--lora): adapters on every block's linear layers and the head."""
    if trainable == "lora":
        gpt.add_lora(model, rank=lora_rank, alpha=lora_alpha)
    else:
        model.requires_grad_(trainable == "all")
    if trainable == "last-block":
        model.h[-1].requires_grad_(True)
        model.ln_f.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    return model


def full_pass_logits(model, token_ids, pad_id=gpt.EOT_ID):
    """Class logits of a batch through the whole model: float [batch, num_classes]. token_ids: list of LongTensor
    [n_tokens_i], right-padded with `pad_id` (the tokenizer's end-of-text id: GPT-2's 50256; the Llama family define
    no padding token). With causal attention no real token sees the padding: each message's last real token is read."""
    idx = pad_sequence(token_ids, batch_first=True, padding_value=pad_id)  # [B, T]
    last = torch.tensor([len(t) - 1 for t in token_ids], device=idx.device)  # [B]
    return model(idx)[torch.arange(len(token_ids), device=idx.device), last]  # [B, T, classes] -> [B, classes]


def autocast_logits(logits_fn, device, dtype_name):
    """logits_fn in --dtype: its forward pass under torch.autocast in dtype_name (weights stay float32, matrix
    products run in that type; "float32": no autocast) -> float32 logits."""
    autocast, _ = gpt.autocast_context(device, dtype_name)

    def logits(inputs):
        with autocast:
            return logits_fn(inputs).float()

    return logits


# --- Speed: the activation cache (the same logits; frozen blocks run once per message) --


@torch.no_grad()
def compute_frozen_activations(model, token_ids, n_frozen, pad_id=gpt.EOT_ID, progress=True):
    """Hidden states after the embeddings and the first `n_frozen` blocks, per message: list of LongTensor
    [n_tokens_i] -> list of float [n_tokens_i, emb_dim]; valid while those blocks are frozen and dropout is 0.
    Identical messages (the collection repeats some) are computed once and share one tensor. Batches hold messages
    of similar length (sorted), at most CACHE_BATCH_TOKENS padded tokens."""
    first_of = {}  # token sequence -> index of its first occurrence
    first_index = [first_of.setdefault(tuple(ids.tolist()), i) for i, ids in enumerate(token_ids)]  # per message
    order = sorted(first_of.values(), key=lambda i: len(token_ids[i]))  # similar lengths batch together
    batches = [[]]
    for i in order:  # ascending lengths: the newest message is the batch's longest
        if batches[-1] and (len(batches[-1]) + 1) * len(token_ids[i]) > CACHE_BATCH_TOKENS:
            batches.append([])
        batches[-1].append(i)
    activations = {}  # index of a first occurrence -> its hidden states
    total_tokens = sum(len(token_ids[i]) for i in order)
    done_tokens, started = 0, time.time()
    for batch in batches:
        seqs = [token_ids[i] for i in batch]
        x = model.embed(pad_sequence(seqs, batch_first=True, padding_value=pad_id))  # [B, T, C]
        for block in model.h[:n_frozen]:
            x = block(x)
        for row, i in enumerate(batch):
            activations[i] = x[row, : len(token_ids[i])].clone()  # a copy frees the padded batch
        done_tokens += sum(len(s) for s in seqs)
        if progress:
            gpt.show_progress(f"activation cache: {done_tokens}/{total_tokens} tokens of {len(order)} distinct "
                              f"messages, {done_tokens / (time.time() - started):.0f} tokens/s, "
                              f"ETA {gpt.eta(started, done_tokens, total_tokens)}")
    gpt.end_progress()
    return [activations[i] for i in first_index]


def last_block_at_last_token(block, x, last):
    """Speed only (skip it on a first read): block(x)[arange(B), last] of a GPT-2 block without dropout: float [B, C],
    computed only where the classifier reads (tested equal). x: float [B, T, C], right-padded; last: LongTensor [B],
    each row's last real position. The query, attention output and MLP run at that position alone; keys and values
    come from every position up to it (later: masked)."""
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
    `n_frozen` blocks): float [batch, num_classes], equal to `full_pass_logits` on their messages. The top blocks run
    on the right-padded batch; GPT-2's last one only at each message's last token."""
    x = pad_sequence(activations, batch_first=True)  # [B, T, C], zero padding after each message
    last = torch.tensor([len(a) - 1 for a in activations], device=x.device)  # [B]
    top_blocks = model.h[n_frozen:]
    shortcut = len(top_blocks) > 0 and model.cfg.family == "gpt2"  # the Llama family runs every position
    for block in top_blocks[:-1] if shortcut else top_blocks:
        x = block(x)
    if shortcut:
        return model.lm_head(model.ln_f(last_block_at_last_token(top_blocks[-1], x, last)))
    return model.lm_head(model.ln_f(x[torch.arange(len(activations), device=x.device), last]))


# --- Training ---------------------------------------------------------------------------


def train_classifier(model, logits_fn, train, validation, *, epochs=5, max_steps=None, batch_size=8, lr=5e-5,
                     weight_decay=0.1, seed=123, log_every=25, eval_every=50, eval_batches=5, keep_last=False):
    """Fine-tune the trainable parameters with AdamW on cross-entropy -> history (HISTORY per epoch, `step_loss` per
    step, `kept_epoch`).

    train, validation: (inputs for `logits_fn`, LongTensor [n] of labels). Each epoch shuffles the training split
    (seeded) and drops the last incomplete batch, as the book does; `max_steps` stops earlier. Every `eval_every`
    steps: estimates on `eval_batches` batches per split; after each epoch and at the last step: both full splits
    (epoch: a fraction when stopped within one). The weights of the best epoch on validation (accuracy; ties: lower
    loss, then earlier) are put back at the end unless `keep_last`.
    """
    train_inputs, train_labels = train
    optimizer = gpt.make_adamw(model, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train_inputs) // batch_size
    total_steps = min(steps_per_epoch * epochs, max_steps or math.inf)
    epochs = math.ceil(total_steps / steps_per_epoch)  # fewer when max_steps stops earlier
    history = {name: [] for name in (*HISTORY, "step_loss")}
    n = eval_batches * batch_size  # the estimates run on the first eval_batches batches of each split
    estimate_splits = [(train_inputs[:n], train_labels[:n]), (validation[0][:n], validation[1][:n])]
    best, kept_weights = None, None
    step, started, window_seconds = 0, time.time(), 0.0  # throughput counts the training steps only
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train_inputs), generator=generator).tolist()
        for b in range(min(steps_per_epoch, total_steps - step)):
            step_started = time.perf_counter()
            batch = order[b * batch_size : (b + 1) * batch_size]
            loss = F.cross_entropy(logits_fn([train_inputs[i] for i in batch]), train_labels[batch])
            loss_value = loss.item()  # the one read from the device per step
            gpt.check_finite_loss(loss_value, step + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            history["step_loss"].append(loss_value)
            window_seconds += time.perf_counter() - step_started
            if step % log_every == 0 or step == total_steps:
                examples = ((step - 1) % log_every + 1) * batch_size  # since the last progress line
                print(f"epoch {epoch}/{epochs} step {step}/{total_steps} | loss {loss_value:.4f} | "
                      f"{examples / window_seconds:.1f} examples/s | ETA {gpt.eta(started, step, total_steps)}",
                      flush=True)
                window_seconds = 0.0
            if step % eval_every == 0:
                _, line = split_scores(model, logits_fn, estimate_splits, batch_size, digits=1)
                print(f"  step {step} estimate (first {eval_batches} batches per split): {line}")
        scores, line = split_scores(model, logits_fn, (train, validation), batch_size, digits=2)
        print(f"epoch {epoch}: {line}", flush=True)
        for name, value in zip(HISTORY, (step / steps_per_epoch, step, *scores)):
            history[name].append(value)
        # Model selection: keep a copy of the trainable weights of the best epoch so far (--keep-last: the last).
        _, _, validation_loss, validation_accuracy = scores
        if keep_last or best is None or (validation_accuracy, -validation_loss) > best:  # ties: the lower loss
            best, kept_weights = (validation_accuracy, -validation_loss), gpt.trainable_weights(model)
            history["kept_epoch"] = history["epoch"][-1]
    model.load_state_dict(kept_weights, strict=False)
    print_kept_epoch(history, keep_last)
    return history


def split_scores(model, logits_fn, splits, batch_size, digits):
    """`evaluate` on the training and validation splits -> ((train loss, train accuracy, validation loss,
    validation accuracy), a line that shows them with `digits` decimals of the accuracies)."""
    (train_loss, train_acc, _), (val_loss, val_acc, _) = [evaluate(model, logits_fn, *s, batch_size) for s in splits]
    line = (f"train loss {train_loss:.4f} accuracy {100 * train_acc:.{digits}f}% | "
            f"validation loss {val_loss:.4f} accuracy {100 * val_acc:.{digits}f}%")
    return (train_loss, train_acc, val_loss, val_acc), line


def print_kept_epoch(history, keep_last):
    """Say which epoch's weights `train_classifier` kept, and its scores."""
    kept = history["epoch"].index(history["kept_epoch"])
    print(f"kept:       epoch {history['kept_epoch']:.3g} of {history['epoch'][-1]:.3g} "
          f"({'--keep-last' if keep_last else 'best validation accuracy; --keep-last keeps the last'}): train "
          f"accuracy {100 * history['train_accuracy'][kept]:.2f}% | validation accuracy "
          f"{100 * history['validation_accuracy'][kept]:.2f}%, loss {history['validation_loss'][kept]:.4f}")


# --- Evaluation -------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, logits_fn, inputs, labels, batch_size, threshold=0.5):
    """Mean cross-entropy loss, accuracy and predictions (LongTensor [n], in input order: spam where its probability
    reaches `threshold`). Batches hold messages of similar length (sorted): little compute goes to padding."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    predictions = torch.empty(len(inputs), dtype=torch.long, device=labels.device)
    total_loss = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        logits = logits_fn([inputs[i] for i in batch]).float()
        total_loss += F.cross_entropy(logits, labels[batch], reduction="sum").item()
        predictions[batch] = (logits.softmax(dim=-1)[:, 1] >= threshold).long()
    model.train(was_training)
    return total_loss / len(inputs), (predictions == labels).sum().item() / len(inputs), predictions


def binary_classification_metrics(predictions, labels):
    """Accuracy; precision, recall and F1 of spam (class 1; 0.0 where undefined); the confusion matrix [[true 0
    predicted 0, true 0 predicted 1], [true 1 ..., ...]]. predictions, labels: LongTensor [n] of class indices 0/1."""
    matrix = [[int(((labels == t) & (predictions == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    true_pos, predicted_pos, actual_pos = matrix[1][1], matrix[0][1] + matrix[1][1], sum(matrix[1])
    precision = true_pos / predicted_pos if predicted_pos else 0.0
    recall = true_pos / actual_pos if actual_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = (matrix[0][0] + matrix[1][1]) / len(labels)
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "confusion_matrix": matrix}


def labelled_metrics(model, logits_fn, inputs, labels, batch_size, threshold, what):
    """Messages, loss and `binary_classification_metrics` of labelled messages -> dict, printed as `what`: what a
    training run reports on its test split and --evaluate on a file, one computation."""
    loss, _, predictions = evaluate(model, logits_fn, inputs, labels, batch_size, threshold)
    metrics = {"messages": len(inputs), "loss": loss, **binary_classification_metrics(predictions.cpu(), labels.cpu())}
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
    trains = "--lora" if args.lora else f"--trainable {args.trainable}"
    print(f"model:      {gpt.model_summary(model, args.model)} ({trains}) on {device}")
    # Weights, gradients and AdamW's moments must fit before the work starts (activations come on top).
    gpt.check_training_memory(model, device, "train fewer parameters (--lora, or --trainable last-block or head)")
    return model, tokenizer


def prepare_data(args, out_dir, device, tokenizer):
    """Read, balance, split (written as CSV) and tokenize the data -> (token ids, labels) per split: lists of
    LongTensor [n_tokens] cut to --max-length, and LongTensor [n]."""
    path = sms_collection_path(args.data)
    messages = parse_labelled(read_sms_bytes(path), str(path), strict=args.strict_data)
    n_spam = sum(label == "spam" for label, _ in messages)
    print(f"data:       {path}: {len(messages)} messages ({len(messages) - n_spam} ham, {n_spam} spam)")
    splits = random_split(create_balanced_dataset(messages, args.seed), args.seed, min_train=args.batch_size)
    for name, split in zip(("train", "validation", "test"), splits):
        write_csv(out_dir / f"{name}.csv", ("label", "text"), split)
    train_texts = {text for _, text in splits[0]}
    repeated = sum(text in train_texts for _, text in splits[2])  # the collection repeats some messages
    print(f"splits:     {' / '.join(str(len(s)) for s in splits)} (train / validation / test, balanced, seed "
          f"{args.seed}) in {out_dir}/{{train,validation,test}}.csv; {repeated} test messages occur in training")
    # Tokenized as --classify and --evaluate tokenize (`tokenize_messages`): the same ids for the same text.
    token_ids = [tokenize_messages([text for _, text in split], args.max_length, tokenizer) for split in splits]
    n_truncated = sum(len(tokenizer.encode(text, bos=True)) > args.max_length for split in splits for _, text in split)
    token_ids = [[t.to(device) for t in split] for split in token_ids]
    print(f"tokens:     longest message {max(len(t) for split in token_ids for t in split)} tokens after truncation "
          f"to --max-length {args.max_length} ({n_truncated} messages truncated)")
    return token_ids, [torch.tensor([LABELS[label] for label, _ in split], device=device) for split in splits]


def choose_forward_pass(model, token_ids, args, pad_id):
    """The inputs of each split and the function that turns a batch of them into logits: cached activations and the
    trainable top where that is exact, else token ids and the full forward pass -> (inputs, logits_fn, use_cache)."""
    # Frozen lower blocks without dropout give the same activations at every step: compute
    # them once (n_frozen: the blocks below the trainable top).
    n_layers = model.cfg.n_layers
    n_frozen = None if args.lora else {"last-block": n_layers - 1, "head": n_layers}.get(args.trainable)
    reasons = {"--no-activation-cache": args.no_activation_cache, f"--drop-rate {args.drop_rate}": args.drop_rate,
               "the lower blocks train": n_frozen is None}
    if any(reasons.values()):
        print(f"activation cache: off ({next(r for r, on in reasons.items() if on)}): full forward pass at every step")
        return token_ids, partial(full_pass_logits, model, pad_id=pad_id), False
    print(f"activation cache: on (embeddings and {n_frozen} of {model.cfg.n_layers} blocks frozen, dropout 0)")
    flat = compute_frozen_activations(model, [t for split in token_ids for t in split], n_frozen, pad_id)
    inputs = [flat[: len(token_ids[0])], flat[len(token_ids[0]) :]]
    return inputs, partial(cached_logits, model, n_frozen=n_frozen), True


def train_and_evaluate(args, device):
    """The whole job, in order: run folder, model, data, activation cache, training, test, saving."""
    started = time.time()
    if args.data is not None:
        sms_collection_path(args.data)  # a missing --data file fails now, not after a model download
    # Before any work: the folder is ours, holds no other run, and can be written. The
    # checkpoint, named relative to it, is checked too (--checkpoint may put it elsewhere).
    out_dir = gpt.claim_run_folder(args.out_dir, [os.path.relpath(args.checkpoint, args.out_dir), *RUN_FILES],
                                   overwrite=args.overwrite, resumable=False)
    # The model before the data: a wrong --model or --max-length fails in seconds, before the data download.
    model, tokenizer = build_classifier(args, device)
    gpt.print_settings(args)
    token_ids, labels = prepare_data(args, out_dir, device, tokenizer)
    gpt.write_json(out_dir / "run.json", {"settings": vars(args)})  # after the data: bad data leaves no run behind
    cache_started = time.time()
    inputs, logits_fn, use_cache = choose_forward_pass(model, token_ids[:2], args, tokenizer.eot_id)
    train_started = time.time()
    # --dtype: mixed precision for what runs per step; weights, cache and loss stay float32.
    history = train_classifier(model, autocast_logits(logits_fn, device, args.dtype), (inputs[0], labels[0]),
                               (inputs[1], labels[1]), epochs=args.epochs, max_steps=args.max_steps,
                               batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                               log_every=args.log_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
                               keep_last=args.keep_last)
    seconds = {"activation_cache": train_started - cache_started, "training": time.time() - train_started}
    del inputs, logits_fn  # the activation cache (held by both): the test split needs the full model only
    # The test split through the full forward pass of the weights as saved (LoRA merged), as
    # --evaluate runs the checkpoint: evaluating OUT_DIR/test.csv gives these numbers again.
    gpt.merge_lora(model)
    full_pass = autocast_logits(partial(full_pass_logits, model, pad_id=tokenizer.eot_id), device, args.dtype)
    metrics = labelled_metrics(model, full_pass, token_ids[2], labels[2], args.batch_size, args.threshold, "test split")
    report = dict(settings=vars(args), activation_cache=use_cache, history=history, test=metrics, seconds=seconds)
    save_run(args, out_dir, model, tokenizer, report, started)


def save_run(args, out_dir, model, tokenizer, report, started):
    """Write the classifier (all weights, its tokenizer, --max-length, settings and test metrics), metrics.json and the
    plot."""
    checkpoint = Path(args.checkpoint)
    gpt.save_checkpoint(checkpoint, model, tokenizer, max_length=args.max_length, settings=report["settings"],
                        metrics=report["test"])
    print(f"saved:      {checkpoint} (config, settings and all weights, {checkpoint.stat().st_size / 1e6:.0f} MB)")
    print(f"try it:     python finetune_classify.py --checkpoint {checkpoint} --classify \"Win a prize now\"")
    seconds = report["seconds"]
    seconds["wall"] = time.time() - started
    metrics_path = out_dir / "metrics.json"
    gpt.write_json(metrics_path, report)
    history = report["history"]
    panels = {name: {split: (history["epoch"], history[f"{split}_{name}"]) for split in ("train", "validation")}
              for name in ("loss", "accuracy")}
    if gpt.plot_curves(out_dir / "loss-accuracy.png", panels, xlabel="epoch") is not None:
        print(f"plot:       {out_dir / 'loss-accuracy.png'} (loss and accuracy per epoch, train and validation)")
    print(f"wall time:  {gpt.format_duration(seconds['wall'])} (activation cache "
          f"{gpt.format_duration(seconds['activation_cache'])}, training with evaluations "
          f"{gpt.format_duration(seconds['training'])}); metrics in {metrics_path}")


# --- The other modes: classify texts, evaluate on a labelled file (export: in main) -----


def load_classifier(path, device="cpu"):
    """A classifier saved by a run, or a ...ForSequenceClassification folder (our export or transformers') -> (model
    in eval mode, its tokenizer, the length in tokens it reads messages at). Raises FileNotFoundError for a missing
    path, ValueError for a model that is no spam classifier."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no classifier at {path}: train one first, or pass --checkpoint PATH")
    model, tokenizer = gpt.load(path, device=device)
    if len(getattr(model, "labels", ())) != 2:
        raise ValueError(f"{path} is no spam classifier of finetune_classify.py (class names: "
                         f"{getattr(model, 'labels', 'none, a language model')}): train one from it with --model")
    # The length the classifier read messages at: saved with it, or as the export's model_max_length.
    if Path(path).is_dir():
        config_path = Path(path) / "tokenizer_config.json"
        max_length = gpt.read_json(config_path, "tokenizer config").get("model_max_length") \
            if config_path.is_file() else None
    else:  # memory-mapped: the one entry is read, not the weights again
        max_length = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("max_length")
    return model, tokenizer, min(max_length or model.cfg.context_length, model.cfg.context_length)


@torch.no_grad()
def classify_texts(model, texts, max_length, tokenizer=None, dtype_name="float32", batch_size=16):
    """Spam probability of each text -> list of float, in the texts' order; each text cut to its first `max_length`
    tokens of `tokenizer` (default GPT-2's), the forward pass in `dtype_name` (see `autocast_logits`)."""
    tokenizer = tokenizer or gpt.get_tokenizer()
    device = model.wte.weight.device
    token_ids = [t.to(device) for t in tokenize_messages(texts, max_length, tokenizer)]
    logits_fn = autocast_logits(partial(full_pass_logits, model, pad_id=tokenizer.eot_id), device, dtype_name)
    probabilities = []
    for start in range(0, len(token_ids), batch_size):
        probabilities += logits_fn(token_ids[start : start + batch_size]).softmax(dim=-1)[:, 1].tolist()
    return probabilities


def read_texts_file(path):
    """Non-empty lines, stripped, of a UTF-8 text file or of standard input ("-"). Raises ValueError when standard
    input is closed, or naming file, byte offset and line of the first byte not UTF-8 (not classifying garbage)."""
    if path == "-" and sys.stdin is None:
        raise ValueError("--classify-file -: standard input is closed: pipe the texts in, or give a file name")
    raw = sys.stdin.buffer.read() if path == "-" else gpt.existing_file(path, "--classify-file").read_bytes()
    text = gpt.decode_utf8(raw, f"--classify-file {'standard input' if path == '-' else path}")
    return [line.strip() for line in text.split("\n") if line.strip()]


def run_classify(args, device):
    """--classify / --classify-file: print `label (p(spam)=probability)  text` per text, or write text, label and spam
    probability to --results (CSV or JSON, by its extension)."""
    texts = args.classify or read_texts_file(args.classify_file)
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("nothing to classify: give non-empty texts with --classify or lines in --classify-file")
    model, tokenizer, max_length = load_classifier(args.checkpoint, device)
    probabilities = classify_texts(model, texts, max_length, tokenizer, args.dtype)
    rows = [(text, model.labels[p >= args.threshold], p) for text, p in zip(texts, probabilities)]
    if args.results is None:
        for text, label, probability in rows:
            print(f"{label:<8} (p(spam)={probability:.3f})  {text}")
        return
    keys = ("text", "label", "spam_probability")
    if Path(args.results).suffix.lower() == ".json":
        write = partial(gpt.write_json, obj=[dict(zip(keys, row)) for row in rows])
    else:
        write = partial(write_csv, header=keys, rows=rows)
    path = args.results
    write(path)
    n_spam = sum(p >= args.threshold for p in probabilities)
    print(f"classified: {len(rows)} texts, {n_spam} spam (probability >= {args.threshold}), written to {path}")


def run_evaluate(args, device):
    """--evaluate: `labelled_metrics` of --checkpoint on a labelled file, printed, and written as JSON to --results.
    The test split of a run (OUT_DIR/test.csv) gives its test metrics again, to the last digit."""
    path = gpt.existing_file(args.evaluate, "--evaluate")
    messages = parse_labelled(read_sms_bytes(path), args.evaluate, strict=True)
    model, tokenizer, max_length = load_classifier(args.checkpoint, device)
    token_ids = [t.to(device) for t in tokenize_messages([text for _, text in messages], max_length, tokenizer)]
    labels = torch.tensor([LABELS[label] for label, _ in messages], device=device)
    full_pass = autocast_logits(partial(full_pass_logits, model, pad_id=tokenizer.eot_id), device, args.dtype)
    metrics = labelled_metrics(model, full_pass, token_ids, labels, args.batch_size, args.threshold, args.evaluate)
    if args.results is not None:
        report = {"checkpoint": args.checkpoint, "file": args.evaluate, "threshold": args.threshold, "metrics": metrics}
        gpt.write_json(args.results, report)
        print(f"metrics in {args.results}")


# --- Command line -----------------------------------------------------------------------

# Flags of a training run. --classify, --classify-file, --evaluate and --export-hf use the classifier of --checkpoint
# as it was trained (its model, its --max-length): given with them, these flags would be ignored, so they are refused.
TRAINING_FLAGS = ("data", "strict_data", "max_length", "model", "trainable", "lora", "lora_rank", "lora_alpha",
                  "drop_rate", "epochs", "max_steps", "lr", "weight_decay", "seed", "log_every", "eval_every",
                  "eval_batches", "keep_last", "no_activation_cache")


def parse_args(argv=None):
    parser = gpt.ArgumentParser(description="Fine-tune GPT-2 (or a Llama-family model) as an SMS spam classifier, or "
                                "classify texts and evaluate on labelled files with a fine-tuned one. A run writes "
                                "into --out-dir; a folder that holds another run is refused unless --overwrite.")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="labelled messages: the UCI zip, the SMSSpamCollection file (label TAB text) or a "
                      ".csv with label and text columns (default: download the collection once)")
    data.add_argument("--strict-data", action="store_true", help="stop at bad data lines instead of skipping them")
    data.add_argument("--max-length", type=gpt.positive_int, help="cut messages to N tokens (default: the context)")
    data.add_argument("--cache-dir", default=str(gpt.cache_dir()),
                      help="folder for downloaded data and weights")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="gpt2", help="gpt2[-medium|-large|-xl], a Llama-family Hub name such as "
                       "HuggingFaceTB/SmolLM2-135M or a folder of one, a .safetensors or .pt file")
    model.add_argument("--trainable", choices=TRAINABLE_CHOICES, default="last-block",
                       help="what trains: last-block (+ final norm + head), all, or head (the new head only)")
    model.add_argument("--lora", action="store_true", help="train LoRA adapters in every block + the head instead")
    model.add_argument("--lora-rank", type=gpt.positive_int, default=16, help="rank of the LoRA adapters")
    model.add_argument("--lora-alpha", type=gpt.non_negative_float, default=16.0, help="LoRA updates scale: alpha/rank")
    model.add_argument("--drop-rate", type=gpt.fraction, default=0.0, help="dropout (> 0 turns the cache off)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=gpt.positive_int, default=5, help="passes over the training split")
    train.add_argument("--max-steps", type=gpt.positive_int, help="stop after N optimizer steps (default: all epochs)")
    train.add_argument("--batch-size", type=gpt.positive_int, default=8, help="messages per step or evaluation batch")
    train.add_argument("--lr", type=gpt.non_negative_float, default=5e-5, help="AdamW learning rate")
    train.add_argument("--weight-decay", type=gpt.non_negative_float, default=0.1, help="AdamW weight decay")
    train.add_argument("--seed", type=gpt.non_negative_int, default=123,
                       help="seed of the split, head init and shuffling")
    train.add_argument("--log-every", type=gpt.positive_int, default=25, help="print a progress line every N steps")
    train.add_argument("--eval-every", type=gpt.positive_int, default=50, help="estimate loss, accuracy every N steps")
    train.add_argument("--eval-batches", type=gpt.positive_int, default=5, help="batches per split for the estimates")
    train.add_argument("--keep-last", action="store_true", help="keep the last epoch, not the best on validation")
    train.add_argument("--no-activation-cache", action="store_true", help="run the frozen blocks at every step")
    train.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="precision of the work "
                       "(autocast; the weights stay float32); --export-hf: the type of the weights written")
    train.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")
    train.add_argument("--out-dir", default="runs/classify", help="folder for the splits, checkpoint, metrics and plot")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out-dir (deletes its files), or an earlier --export-hf folder")
    use = parser.add_argument_group("use a fine-tuned classifier (no training)")
    mode = use.add_mutually_exclusive_group()
    mode.add_argument("--classify", nargs="+", metavar="TEXT", help="texts to classify (default: none: train)")
    mode.add_argument("--classify-file", metavar="FILE", help="classify each line of FILE, - for stdin (default: none)")
    mode.add_argument("--evaluate", metavar="FILE", help="accuracy, precision, recall, F1 on a labelled FILE as "
                      "--data reads it (OUT_DIR/test.csv gives the run's test metrics) (default: none)")
    use.add_argument("--threshold", type=gpt.fraction, default=0.5, metavar="P",
                     help="spam when its probability is at least this (--classify, --evaluate, the test metrics)")
    use.add_argument("--results", metavar="FILE", help="write --evaluate's metrics (.json) or the predictions of "
                     "--classify with spam probabilities (.csv or .json) (default: print only)")
    use.add_argument("--checkpoint", help="classifier to write or read: a file, a run folder (its classifier.pt) "
                                          "or a ...ForSequenceClassification folder (default: OUT_DIR/classifier.pt)")
    mode.add_argument("--export-hf", metavar="FOLDER", help="write --checkpoint as a transformers "
                     "...ForSequenceClassification folder in --dtype and exit (default: none)")
    args = parser.parse_args(argv)
    check_args(parser, argv, args)
    args.checkpoint = args.checkpoint or str(Path(args.out_dir) / "classifier.pt")
    if (Path(args.checkpoint) / "classifier.pt").is_file():  # a run folder: its classifier
        args.checkpoint = str(Path(args.checkpoint) / "classifier.pt")
    return args


def check_args(parser, argv, args):
    """Refuse flags that cannot go together (parser.error: one line, exit code 2)."""
    if args.lora and args.trainable != "last-block":
        parser.error(f"--lora trains the adapters and the head: drop --trainable {args.trainable}")
    use = [flag for flag in ("classify", "classify_file", "evaluate", "export_hf") if getattr(args, flag) is not None]
    ignored = [flag for flag in TRAINING_FLAGS if flag in gpt.given_flags(parser, argv)] if use else []
    if ignored:
        hint = "to use another classifier, give --checkpoint PATH" if "model" in ignored else \
            f"drop {gpt.flag_name(ignored[0])}"
        parser.error(f"{gpt.flag_name(ignored[0])} is for training; {gpt.flag_name(use[0])} uses the classifier of "
                     f"--checkpoint as it was trained: {hint}")
    kinds = (".json",) if args.evaluate is not None else (".csv", ".json")
    if args.results is not None and use in ([], ["export_hf"]):
        parser.error("--results goes with --evaluate, --classify or --classify-file (a run writes metrics.json)")
    if args.results is not None and (Path(args.results).suffix.lower() not in kinds or Path(args.results).is_dir()):
        parser.error(f"--results {args.results}: give a {' or '.join(kinds)} file")


@gpt.command_line(memory_hint="use a smaller --batch-size (or --max-length)")
def main(argv=None):
    args = parse_args(argv)
    os.environ["GPT_CACHE_DIR"] = args.cache_dir  # where gpt.py downloads data and weights
    if args.export_hf is not None:
        gpt.claim_run_folder(args.export_hf, gpt.EXPORT_FILES, overwrite=args.overwrite, resumable=False)  # first
        model, tokenizer, max_length = load_classifier(args.checkpoint)
        folder = gpt.export_hf(model, args.export_hf, tokenizer=tokenizer, dtype=gpt.DTYPES[args.dtype],
                               overwrite=args.overwrite, max_length=max_length)
        architecture = gpt.read_json(folder / "config.json", "config")["architectures"][0]
        print(f"exported {args.checkpoint} ({args.dtype}) to {folder}, a {architecture} folder")
        return
    device = gpt.pick_device(args.device)
    if args.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("note: this GPU has no bfloat16 (a T4, say): the work runs in float32")
        args.dtype = "float32"
    if args.evaluate is not None:
        run_evaluate(args, device)
    elif args.classify is not None or args.classify_file is not None:
        run_classify(args, device)
    else:
        try:
            train_and_evaluate(args, device)
        except KeyboardInterrupt:
            print(f"nothing is saved (a run takes minutes): run again with --overwrite --out-dir {args.out_dir}",
                  file=sys.stderr)
            raise


if __name__ == "__main__":
    main()
