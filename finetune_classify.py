"""finetune_classify.py: fine-tune a pretrained GPT-2 into an SMS spam classifier.

Stage "fine-tune a pretrained GPT for classification" of the lifecycle (chapter 6 of
"Build a Large Language Model (From Scratch)", rasbt/LLMs-from-scratch). The language-
model head of GPT-2 is replaced by a 2-class linear head that reads the hidden state of
each message's last token; by default only the last transformer block, the final
LayerNorm and the new head are trained.

    python finetune_classify.py                              # download data and GPT-2, train, evaluate, save
    python finetune_classify.py --data path/to/SMSSpamCollection --model path/to/model.safetensors
    python finetune_classify.py --trainable lora --lora-rank 16
    python finetune_classify.py --classify "You won a prize! Call now" "See you at 6?"
    python finetune_classify.py --classify-file messages.txt --checkpoint runs/classify/classifier.pt

Data: the SMS Spam Collection (UCI Machine Learning Repository, data set 228; Almeida and
Gomez Hidalgo, 2011), balanced to as many ham as spam messages, shuffled and split 70/10/20.

Writes into --out-dir (default runs/classify/): train.csv, validation.csv and test.csv
(the splits), classifier.pt (config and all weights of the fine-tuned classifier, read
back by --classify), metrics.json (settings, per-epoch history, final metrics, timings)
and loss-accuracy.png (when matplotlib is installed).

Speed: when the lower blocks are frozen and dropout is 0, their outputs never change.
They are computed once per message (the "activation cache") and training runs only the
trainable top on them, with the same logits and gradients as the full forward pass.
"""

import argparse
import csv
import io
import json
import random
import sys
import time
import zipfile
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
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
TRAINABLE_CHOICES = ("last-block", "all", "head", "lora")
CACHE_BATCH_TOKENS = 4096  # tokens per batch when filling the activation cache: big matrices run faster
MAX_WARNINGS = 5  # bad data lines reported one by one; the rest are counted


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune GPT-2 as an SMS spam classifier, or classify texts with a fine-tuned one.",
        formatter_class=gpt.HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="local copy of the SMS Spam Collection: the UCI zip or the extracted tab-separated "
                           "SMSSpamCollection file (default: download it once into the cache)")
    data.add_argument("--strict-data", action="store_true",
                      help="stop at bad lines of the data file (no tab, unknown label, empty message) "
                           "instead of skipping them with a warning")
    data.add_argument("--max-length", type=int, default=None,
                      help="truncate messages to this many tokens (default: the model's context length)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="gpt2",
                       help=f"pretrained model: one of {', '.join(gpt.GPT_CONFIGS)}, a local .safetensors file, "
                            "or a checkpoint (.pt) of pretrain.py")
    model.add_argument("--trainable", choices=TRAINABLE_CHOICES, default="last-block",
                       help="what trains: last-block (last transformer block + final LayerNorm + head), "
                            "all, head (the new head only), lora (low-rank adapters + head)")
    model.add_argument("--lora-rank", type=int, default=16, help="rank of the LoRA adapters (--trainable lora)")
    model.add_argument("--lora-alpha", type=float, default=16.0,
                       help="LoRA scaling alpha; the update is scaled by alpha / rank (--trainable lora)")
    model.add_argument("--drop-rate", type=float, default=0.0,
                       help="dropout probability during training (above 0 turns the activation cache off)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=5, help="passes over the training split")
    train.add_argument("--batch-size", type=int, default=8, help="messages per optimizer step")
    train.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    train.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    train.add_argument("--seed", type=int, default=123, help="seed of the data split, the head's initialisation and the shuffling")
    train.add_argument("--log-every", type=int, default=25, help="print a progress line every N steps")
    train.add_argument("--eval-every", type=int, default=50,
                       help="estimate train/validation loss and accuracy every N steps (on --eval-batches batches)")
    train.add_argument("--eval-batches", type=int, default=5, help="batches per split for the estimates every --eval-every steps")
    train.add_argument("--no-activation-cache", action="store_true",
                       help="recompute the frozen blocks at every step (slower; same result), to compare")
    train.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    train.add_argument("--out-dir", default="runs/classify", help="folder for the splits, checkpoint, metrics and plot")
    use = parser.add_argument_group("classify with a fine-tuned model (no training)")
    use.add_argument("--classify", nargs="+", metavar="TEXT", default=None,
                     help="texts to classify as spam or not spam (default: none: train a classifier)")
    use.add_argument("--classify-file", default=None, metavar="FILE",
                     help="classify each non-empty line of FILE (UTF-8 text; invalid UTF-8 is an error "
                          "naming its byte offset); - reads standard input (default: none)")
    use.add_argument("--checkpoint", default=None,
                     help="classifier checkpoint to write (training) or read (--classify); default: OUT_DIR/classifier.pt")
    args = parser.parse_args(argv)

    for name in ("epochs", "batch_size", "log_every", "eval_every", "eval_batches", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_length is not None and args.max_length < 1:
        parser.error(f"--max-length must be at least 1, got {args.max_length}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not args.weight_decay >= 0:
        parser.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.drop_rate < 1:
        parser.error(f"--drop-rate must be in [0, 1), got {args.drop_rate}")
    if not args.lora_alpha > 0:
        parser.error(f"--lora-alpha must be positive, got {args.lora_alpha}")
    if args.checkpoint is None:
        args.checkpoint = str(Path(args.out_dir) / "classifier.pt")
    return args


# ----------------------------------------------------------------------------------------
# Data: download, parse, balance, split
# ----------------------------------------------------------------------------------------


def sms_collection_path(data=None, urls=DATA_URLS):
    """Path of the SMS Spam Collection: `data` when given, else the cached download
    (fetched from the first of `urls` that works). Raises FileNotFoundError for a
    missing `data`, RuntimeError naming the URLs and --data when the download fails."""
    if data is not None:
        if not Path(data).is_file():
            raise FileNotFoundError(f"--data {data}: no such file")
        return Path(data)
    return gpt.fetch_dataset(
        urls, DATA_FILENAME, flag="--data", kind="zip", member=ZIP_MEMBER, size=MEMBER_SIZE, sha256=MEMBER_SHA256
    )


def read_sms_bytes(path):
    """Raw bytes of the collection: the file itself, or its `SMSSpamCollection` member when
    path is a zip file (as UCI distributes it). Raises ValueError for a zip without it."""
    if not zipfile.is_zipfile(path):
        return Path(path).read_bytes()
    with zipfile.ZipFile(path) as archive:
        members = [name for name in archive.namelist() if Path(name).name == ZIP_MEMBER]
        if not members:
            raise ValueError(f"{path}: the zip file has no member {ZIP_MEMBER!r} (it has: {', '.join(archive.namelist())})")
        return archive.read(members[0])


def parse_sms_collection(raw, source="data", strict=False):
    """Messages of the collection's format -> list of (label, text), label "ham" or "spam".

    raw: bytes, one message per line: the label, a tab, the text. A UTF-8 byte-order mark
    and Windows line endings are accepted; invalid UTF-8 bytes become U+FFFD. Blank lines
    are ignored. A line without a tab, with a label other than ham/spam (any case) or
    with an empty text is bad: it is skipped with a warning naming its line number, or,
    when `strict`, raises ValueError naming the line.
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        print(f"warning: {source}: invalid UTF-8 (first at byte {e.start}) replaced by U+FFFD")
        text = raw.decode("utf-8-sig", errors="replace")
    messages, bad = [], []
    # split("\n"), not splitlines(): messages may contain other Unicode line separators.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        label, tab, message = line.partition("\t")
        label, message = label.strip().lower(), message.strip()
        if not tab:
            bad.append(f"line {number}: no tab between label and message")
        elif label not in LABELS:
            bad.append(f"line {number}: unknown label {label[:20]!r} (expected ham or spam)")
        elif not message:
            bad.append(f"line {number}: empty message")
        else:
            messages.append((label, message))
    if bad and strict:
        raise ValueError(f"{source}: {len(bad)} bad line(s) (--strict-data): " + "; ".join(bad[:MAX_WARNINGS]))
    for problem in bad[:MAX_WARNINGS]:
        print(f"warning: {source} {problem}; skipped (--strict-data makes this an error)")
    if len(bad) > MAX_WARNINGS:
        print(f"warning: {source}: {len(bad) - MAX_WARNINGS} more bad lines skipped")
    return messages


def create_balanced_dataset(messages, seed):
    """All spam messages plus as many ham messages sampled with `seed`, in that order.

    Raises ValueError when one class is missing.
    """
    spam = [m for m in messages if m[0] == "spam"]
    ham = [m for m in messages if m[0] == "ham"]
    if not spam or not ham:
        raise ValueError(f"the data has {len(ham)} ham and {len(spam)} spam messages: a classifier needs both classes")
    return random.Random(seed).sample(ham, min(len(ham), len(spam))) + spam


def random_split(messages, seed, min_train=1):
    """Shuffle with `seed` and cut into train/validation/test by SPLIT_FRACTIONS (70/10/20).

    Raises ValueError when a split would be empty or the training split smaller than
    `min_train` (one batch).
    """
    messages = list(messages)
    random.Random(seed).shuffle(messages)
    train_end = int(len(messages) * SPLIT_FRACTIONS[0])
    val_end = train_end + int(len(messages) * SPLIT_FRACTIONS[1])
    splits = messages[:train_end], messages[train_end:val_end], messages[val_end:]
    if min(len(s) for s in splits) < 1 or len(splits[0]) < min_train:
        raise ValueError(
            f"{len(messages)} messages after balancing are too few for a 70/10/20 split with a training "
            f"batch of {min_train}: got {len(splits[0])} / {len(splits[1])} / {len(splits[2])}; "
            "use a larger data file or a smaller --batch-size"
        )
    return splits


def write_split_csv(path, messages):
    """Write (label, text) pairs as CSV (header `label,text`, UTF-8, "\\n" line ends), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "text"])
    writer.writerows(messages)
    gpt.atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def tokenize_messages(texts, max_length=None):
    """Texts -> list of LongTensor [n_tokens], each cut to its first `max_length` tokens (if given).

    "<|endoftext|>" inside a message is read as plain text, not as the special token.
    """
    tokenizer = gpt.get_tokenizer()
    return [torch.tensor(tokenizer.encode_ordinary(text)[:max_length], dtype=torch.long) for text in texts]


# ----------------------------------------------------------------------------------------
# Model: GPT-2 with a classification head
# ----------------------------------------------------------------------------------------


def set_dropout(model, drop_rate):
    """Set the dropout probability of every dropout layer and attention of model."""
    model.cfg.drop_rate = drop_rate
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = drop_rate
        if isinstance(module, gpt.CausalSelfAttention):
            module.drop_rate = drop_rate


def add_classification_head(model, num_classes=2):
    """Replace the language-model head (emb_dim -> 50257 logits) by nn.Linear(emb_dim,
    num_classes), initialised from the global torch seed. Returns the model."""
    model.lm_head = nn.Linear(model.cfg.emb_dim, num_classes).to(model.wte.weight.device)
    return model


def set_trainable(model, trainable, lora_rank=16, lora_alpha=16.0):
    """Freeze model except what `trainable` names; returns the model.

    last-block: the last transformer block, the final LayerNorm and the head (the book's
    choice); all: every parameter; head: the head only; lora: LoRA adapters on the
    attention and MLP linear layers of every block (gpt.add_lora) and the head.
    """
    if trainable not in TRAINABLE_CHOICES:
        raise ValueError(f"--trainable {trainable!r}: choose one of {', '.join(TRAINABLE_CHOICES)}")
    if trainable == "lora":
        gpt.add_lora(model, rank=lora_rank, alpha=lora_alpha)
    else:
        model.requires_grad_(trainable == "all")
    if trainable == "last-block":
        model.h[-1].requires_grad_(True)
        model.ln_f.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------
# Forward passes: the full model, or the trainable top on cached activations
# ----------------------------------------------------------------------------------------


def last_token_index(sequences, device):
    """Index of each sequence's last real token (its length - 1): LongTensor [batch]."""
    return torch.tensor([len(s) - 1 for s in sequences], device=device)


def full_pass_logits(model, token_ids):
    """Class logits of a batch through the whole model: float [batch, num_classes].

    token_ids: list of LongTensor [n_tokens_i]. The batch is right-padded with
    <|endoftext|> (50256, GPT-2's only special token) to its longest message; with
    causal attention no real token sees the padding, so reading the hidden state at
    each message's last real token makes the prediction independent of the padding.
    """
    idx = pad_sequence(token_ids, batch_first=True, padding_value=gpt.EOT_ID)  # [B, T]
    last = last_token_index(token_ids, idx.device)
    logits = model(idx)  # [B, T, num_classes]
    return logits[torch.arange(len(token_ids), device=idx.device), last]


@torch.no_grad()
def compute_frozen_activations(model, token_ids, n_frozen, progress=True):
    """Hidden states after the embeddings and the first `n_frozen` blocks, per message.

    token_ids: list of LongTensor [n_tokens_i] -> list of float [n_tokens_i, emb_dim].
    Identical messages (the collection repeats some) are computed once and share one
    tensor. Messages run in batches of similar length (sorted, at most
    CACHE_BATCH_TOKENS padded tokens each), which wastes little on padding; causal
    attention keeps each message's states independent of its batch. Valid while those
    blocks are frozen and dropout is 0.
    """
    was_training = model.training
    model.eval()
    first_of = {}  # token sequence -> index of its first occurrence
    for i, ids in enumerate(token_ids):
        first_of.setdefault(tuple(ids.tolist()), i)
    order = sorted(first_of.values(), key=lambda i: len(token_ids[i]))
    batches, batch = [], []
    for i in order:  # ascending lengths: the newest message is the batch's longest
        if batch and (len(batch) + 1) * len(token_ids[i]) > CACHE_BATCH_TOKENS:
            batches.append(batch)
            batch = []
        batch.append(i)
    batches.append(batch)

    activations = [None] * len(token_ids)
    total_tokens = sum(len(token_ids[i]) for i in order)
    done_tokens, started, last_print = 0, time.time(), time.time()
    for batch in batches:
        seqs = [token_ids[i] for i in batch]
        x = model.embed(pad_sequence(seqs, batch_first=True, padding_value=gpt.EOT_ID))  # [B, T, C]
        for block in model.h[:n_frozen]:
            x = block(x)
        for row, i in enumerate(batch):
            activations[i] = x[row, : len(token_ids[i])].clone()  # a copy frees the padded batch
        done_tokens += sum(len(s) for s in seqs)
        if progress and (time.time() - last_print > 10 or done_tokens == total_tokens):
            elapsed = time.time() - started
            eta = gpt.format_duration(elapsed / done_tokens * (total_tokens - done_tokens))
            print(f"activation cache: {done_tokens}/{total_tokens} tokens of {len(order)} distinct messages, "
                  f"{done_tokens / elapsed:.0f} tokens/s, ETA {eta}", flush=True)
            last_print = time.time()
    for i, ids in enumerate(token_ids):
        activations[i] = activations[first_of[tuple(ids.tolist())]]
    model.train(was_training)
    return activations


def last_block_at_last_token(block, x, last):
    """A transformer block's output at one position per row: float [B, C].

    x: float [B, T, C], the states entering the block (right-padded); last: LongTensor
    [B], each row's last real position. Equals block(x)[arange(B), last] without dropout:
    the classifier reads only that position, so the query, the attention output and the
    MLP are computed there alone; keys and values still come from every position up to
    it (padding after it is masked out).
    """
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
    """Class logits from cached activations: float [batch, num_classes], the same as
    `full_pass_logits` on the messages they came from.

    activations: list of float [n_tokens_i, emb_dim], the states after the first
    `n_frozen` blocks (`compute_frozen_activations`). The remaining blocks run on the
    right-padded batch, the last of them only at each message's last token.
    """
    x = pad_sequence(activations, batch_first=True)  # [B, T, C], zero padding after each message
    last = last_token_index(activations, x.device)
    top_blocks = model.h[n_frozen:]
    for block in top_blocks[:-1]:
        x = block(x)
    if len(top_blocks):
        x_last = last_block_at_last_token(top_blocks[-1], x, last)
    else:
        x_last = x[torch.arange(len(activations), device=x.device), last]
    return model.lm_head(model.ln_f(x_last))


# ----------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------


def make_adamw(params, lr, weight_decay):
    """torch.optim.AdamW, fused into one kernel per step where this torch build has one
    for the device (CUDA; CPU since torch 2.4): the same update with fewer passes over
    memory (about half the optimizer time of the default here, on CPU)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch version
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def evaluate(model, logits_fn, inputs, labels, batch_size):
    """Mean cross-entropy loss, accuracy and predictions (LongTensor [n], in input order).

    Batches hold messages of similar length (sorted), so little compute goes to padding;
    the predictions do not depend on the batching (see `full_pass_logits`).
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    predictions = torch.empty(len(inputs), dtype=torch.long, device=labels.device)
    total_loss = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        logits = logits_fn([inputs[i] for i in batch])
        total_loss += F.cross_entropy(logits, labels[batch], reduction="sum").item()
        predictions[batch] = logits.argmax(dim=-1)
    model.train(was_training)
    accuracy = (predictions == labels).float().mean().item()
    return total_loss / len(inputs), accuracy, predictions


def train_classifier(model, logits_fn, train, validation, *, epochs=5, batch_size=8, lr=5e-5, weight_decay=0.1,
                     seed=123, log_every=25, eval_every=50, eval_batches=5):
    """Fine-tune the trainable parameters of model with AdamW on cross-entropy; returns the history.

    train, validation: (inputs, labels): a list of per-message inputs for `logits_fn`
    and a LongTensor [n] of class indices. Each epoch shuffles the training split with
    a generator seeded by `seed` and drops the last incomplete batch (as the book does).
    Prints a progress line every `log_every` steps, loss and accuracy estimates on the
    first `eval_batches` batches of each split every `eval_every` steps, and the loss
    and accuracy on both full splits after each epoch; the history holds the latter.
    Raises RuntimeError when the loss stops being finite.
    """
    train_inputs, train_labels = train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train_inputs) // batch_size
    total_steps = steps_per_epoch * epochs
    history = {name: [] for name in ("epoch", "train_loss", "train_accuracy", "validation_loss", "validation_accuracy")}
    estimate_size = eval_batches * batch_size
    step, started = 0, time.time()
    window_start, window_examples = started, 0
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train_inputs), generator=generator).tolist()
        for b in range(steps_per_epoch):
            batch = order[b * batch_size : (b + 1) * batch_size]
            logits = logits_fn([train_inputs[i] for i in batch])
            loss = F.cross_entropy(logits, train_labels[batch])
            if not torch.isfinite(loss):
                raise RuntimeError(f"the loss became {loss.item()} at step {step + 1}; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            window_examples += len(batch)
            if step % log_every == 0 or step == total_steps:
                now = time.time()
                eta = gpt.format_duration((now - started) / step * (total_steps - step))
                print(f"epoch {epoch}/{epochs} step {step}/{total_steps} | loss {loss.item():.4f} | "
                      f"{window_examples / (now - window_start):.1f} examples/s | ETA {eta}", flush=True)
                window_start, window_examples = now, 0
            if step % eval_every == 0:
                train_loss, train_acc, _ = evaluate(model, logits_fn, train_inputs[:estimate_size],
                                                    train_labels[:estimate_size], batch_size)
                val_loss, val_acc, _ = evaluate(model, logits_fn, validation[0][:estimate_size],
                                                validation[1][:estimate_size], batch_size)
                print(f"  step {step} estimate ({estimate_size} messages per split): train loss {train_loss:.4f} "
                      f"accuracy {100 * train_acc:.1f}% | validation loss {val_loss:.4f} accuracy {100 * val_acc:.1f}%")
                window_start, window_examples = time.time(), 0  # throughput counts training only
        train_loss, train_acc, _ = evaluate(model, logits_fn, *train, batch_size)
        val_loss, val_acc, _ = evaluate(model, logits_fn, *validation, batch_size)
        print(f"epoch {epoch}: train loss {train_loss:.4f} accuracy {100 * train_acc:.2f}% | "
              f"validation loss {val_loss:.4f} accuracy {100 * val_acc:.2f}%", flush=True)
        for name, value in zip(history, (epoch, train_loss, train_acc, val_loss, val_acc)):
            history[name].append(value)
        window_start, window_examples = time.time(), 0
    return history


def binary_classification_metrics(predictions, labels, positive=1):
    """Precision, recall and F1 of the `positive` class and the confusion matrix.

    predictions, labels: LongTensor [n] of class indices 0/1. Returns a dict with
    precision, recall, f1 (0.0 where undefined: no positive predictions or labels) and
    confusion_matrix [[true 0 predicted 0, true 0 predicted 1], [true 1 ..., ...]].
    """
    matrix = [[int(((labels == t) & (predictions == p)).sum()) for p in (0, 1)] for t in (0, 1)]
    true_pos = matrix[positive][positive]
    predicted_pos = matrix[0][positive] + matrix[1][positive]
    actual_pos = sum(matrix[positive])
    precision = true_pos / predicted_pos if predicted_pos else 0.0
    recall = true_pos / actual_pos if actual_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "confusion_matrix": matrix}


def print_confusion_matrix(matrix):
    """Print a 2x2 confusion matrix with the class names."""
    print("confusion matrix on the test split (rows: true label, columns: predicted label):")
    print(f"  {'':>10} {CLASS_NAMES[0]:>10} {CLASS_NAMES[1]:>10}")
    for name, row in zip(CLASS_NAMES, matrix):
        print(f"  {name:>10} {row[0]:>10} {row[1]:>10}")


# ----------------------------------------------------------------------------------------
# The saved classifier and --classify
# ----------------------------------------------------------------------------------------


def save_classifier(path, model, **extra):
    """Save the classifier atomically: config, ALL weights (the GPT-2 body with the
    2-class head, LoRA adapters merged), the class names and `extra` entries."""
    gpt.merge_lora(model)  # plain GPT-2 parameter names, no LoRA wrapper needed to load
    gpt.save_checkpoint(path, model, labels=CLASS_NAMES, **extra)


def load_classifier(path, device="cpu"):
    """Read a checkpoint of `save_classifier` -> (model in eval mode, checkpoint dict).

    Raises FileNotFoundError for a missing file and ValueError for a file that is not
    a classifier checkpoint of this script.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no classifier checkpoint at {path}: train one first, or pass --checkpoint PATH")
    checkpoint = gpt.load_checkpoint(path)
    if "labels" not in checkpoint:
        raise ValueError(f"{path}: not a classifier checkpoint of finetune_classify.py (no 'labels' entry)")
    cfg = gpt.GPTConfig(**checkpoint["config"])
    with torch.device("meta"):  # no random initialisation: the weights come from the file
        model = add_classification_head(gpt.GPTModel(cfg), len(checkpoint["labels"]))
    try:
        model.load_state_dict(checkpoint["model"], assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit the classifier of its config: {str(e)[:300]}") from None
    return model.to(device).eval(), checkpoint


@torch.no_grad()
def classify_texts(model, texts, max_length, labels=CLASS_NAMES, batch_size=16):
    """Classify texts -> list of (label, probability of that label), in the texts' order."""
    device = model.wte.weight.device
    token_ids = [t.to(device) for t in tokenize_messages(texts, max_length)]
    results = []
    for start in range(0, len(token_ids), batch_size):
        probabilities = full_pass_logits(model, token_ids[start : start + batch_size]).softmax(dim=-1)
        for p in probabilities:
            best = int(p.argmax())
            results.append((labels[best], p[best].item()))
    return results


def read_texts_file(path):
    """Non-empty lines of a UTF-8 text file (or of standard input for "-"), stripped.

    A byte-order mark and Windows line endings are accepted. Raises ValueError naming the
    file, the byte offset and the line of the first invalid UTF-8 byte (a binary file, or
    another encoding), rather than classifying garbage.
    """
    raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # "utf-8", not "utf-8-sig": offsets count the mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"--classify-file {'standard input' if path == '-' else path}: not UTF-8 text: byte "
                         f"0x{raw[e.start]:02x} at byte offset {e.start} (line {line}); save it as UTF-8") from None
    return [line.strip() for line in text.split("\n") if line.strip()]


def run_classify(args, device):
    """--classify / --classify-file: print `label (p=probability)  text` per text."""
    texts = list(args.classify or [])
    if args.classify_file is not None:
        if args.classify_file != "-" and not Path(args.classify_file).is_file():
            raise FileNotFoundError(f"--classify-file {args.classify_file}: no such file")
        texts += read_texts_file(args.classify_file)
    if not texts or any(not t.strip() for t in texts):
        raise ValueError("nothing to classify: give non-empty texts with --classify or lines in --classify-file")
    model, checkpoint = load_classifier(args.checkpoint, device)
    for text, (label, probability) in zip(texts, classify_texts(model, texts, checkpoint.get("max_length"), checkpoint["labels"])):
        print(f"{label:<8} (p={probability:.3f})  {text}")


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------


def prepare_data(args, out_dir):
    """Read, balance and split the data; write the splits as CSV; returns (train, validation, test)."""
    path = sms_collection_path(args.data)
    messages = parse_sms_collection(read_sms_bytes(path), source=str(path), strict=args.strict_data)
    n_spam = sum(label == "spam" for label, _ in messages)
    print(f"data:       {path}: {len(messages)} messages ({len(messages) - n_spam} ham, {n_spam} spam)")
    splits = random_split(create_balanced_dataset(messages, args.seed), args.seed, min_train=args.batch_size)
    for name, split in zip(("train", "validation", "test"), splits):
        write_split_csv(out_dir / f"{name}.csv", split)
    print(f"splits:     {' / '.join(str(len(s)) for s in splits)} (train / validation / test, balanced, seed "
          f"{args.seed}) written to {out_dir}/{{train,validation,test}}.csv")
    train_texts = {text for _, text in splits[0]}
    repeated = sum(text in train_texts for _, text in splits[2])
    if repeated:
        print(f"note:       {repeated} of {len(splits[2])} test messages also occur in the training split "
              "(the collection repeats some messages)")
    return splits


def build_classifier(args, device):
    """Pretrained GPT-2 with a 2-class head, dropout and trainable parameters set -> (model, max_length)."""
    model = gpt.load_gpt2(args.model, device=device)
    cfg = model.cfg
    max_length = args.max_length or cfg.context_length
    if max_length > cfg.context_length:
        raise ValueError(f"--max-length {max_length} is longer than the model's context length {cfg.context_length}")
    if cfg.vocab_size < gpt.get_tokenizer().n_vocab:
        raise ValueError(f"--model {args.model} has a vocabulary of {cfg.vocab_size} tokens; the GPT-2 tokenizer needs "
                         f"{gpt.get_tokenizer().n_vocab}")
    torch.manual_seed(args.seed)  # the head's (and LoRA's) initialisation, and dropout
    add_classification_head(model, len(CLASS_NAMES))
    set_dropout(model, args.drop_rate)
    set_trainable(model, args.trainable, args.lora_rank, args.lora_alpha)
    print(f"model:      {args.model} ({gpt.count_parameters(model) / 1e6:.1f}M parameters, "
          f"{gpt.count_parameters(model, trainable_only=True):,} trainable: --trainable {args.trainable}) on {device}")
    return model, max_length


def tokenize_splits(splits, max_length, device):
    """Token ids of each split's messages (cut to max_length) and their labels, on device."""
    token_ids = [tokenize_messages([text for _, text in split]) for split in splits]
    labels = [torch.tensor([LABELS[label] for label, _ in split], device=device) for split in splits]
    n_truncated = sum(len(t) > max_length for split in token_ids for t in split)
    token_ids = [[t[:max_length].to(device) for t in split] for split in token_ids]
    print(f"tokens:     longest message {max(len(t) for split in token_ids for t in split)} tokens after truncation "
          f"to --max-length {max_length} ({n_truncated} messages truncated)")
    return token_ids, labels


def choose_forward_pass(model, token_ids, args):
    """The model inputs of each split and the function that turns a batch of them into
    logits: cached activations and the trainable top where that is exact, else token
    ids and the full forward pass. Returns (inputs, logits_fn, use_cache)."""
    cfg = model.cfg
    # The fast path, decided in one line: frozen lower blocks without dropout give the same
    # activations at every step, so compute them once (n_frozen: blocks below the trainable top).
    n_frozen = {"last-block": cfg.n_layers - 1, "head": cfg.n_layers}.get(args.trainable)
    use_cache = n_frozen is not None and args.drop_rate == 0 and not args.no_activation_cache
    if not use_cache:
        reason = "--no-activation-cache" if args.no_activation_cache else (
            f"--drop-rate {args.drop_rate}" if args.drop_rate else f"--trainable {args.trainable} trains the lower blocks")
        print(f"activation cache: off ({reason}): full forward pass at every step")
        return token_ids, partial(full_pass_logits, model), False
    print(f"activation cache: on (embeddings and {n_frozen} of {cfg.n_layers} blocks frozen, dropout 0)")
    flat = compute_frozen_activations(model, [t for split in token_ids for t in split], n_frozen)
    n_train, n_val = len(token_ids[0]), len(token_ids[1])
    inputs = [flat[:n_train], flat[n_train : n_train + n_val], flat[n_train + n_val :]]
    return inputs, partial(cached_logits, model, n_frozen=n_frozen), True


def evaluate_test_split(model, logits_fn, inputs, labels, history, batch_size):
    """Evaluate on the test split and print the results; returns the metrics dict."""
    _, test_accuracy, test_predictions = evaluate(model, logits_fn, inputs, labels, batch_size)
    metrics = binary_classification_metrics(test_predictions.cpu(), labels.cpu())
    metrics.update(train_accuracy=history["train_accuracy"][-1], validation_accuracy=history["validation_accuracy"][-1],
                   test_accuracy=test_accuracy)
    print(f"accuracy:   train {100 * metrics['train_accuracy']:.2f}% | validation {100 * metrics['validation_accuracy']:.2f}% "
          f"| test {100 * test_accuracy:.2f}%")
    print(f"test, spam as the positive class: precision {metrics['precision']:.4f} | recall {metrics['recall']:.4f} "
          f"| F1 {metrics['f1']:.4f}")
    print_confusion_matrix(metrics["confusion_matrix"])
    return metrics


def plot_history(path, history):
    """Loss and accuracy per epoch, train and validation, as a PNG (when matplotlib is installed)."""
    epochs = history["epoch"]
    plot = gpt.plot_curves(
        path,
        {
            "loss": {"train": (epochs, history["train_loss"]), "validation": (epochs, history["validation_loss"])},
            "accuracy": {"train": (epochs, history["train_accuracy"]),
                         "validation": (epochs, history["validation_accuracy"])},
        },
        xlabel="epoch",
    )
    if plot is not None:
        print(f"plot:       {plot} (loss and accuracy per epoch)")


def train_and_evaluate(args, device):
    """The whole job: model, data, forward pass (with or without the activation cache),
    training, test metrics, then the checkpoint, plot and metrics.json."""
    started = time.time()
    out_dir = Path(args.out_dir)
    if args.data is not None:
        sms_collection_path(args.data)  # a missing --data file fails now, not after a model download
    # The model before the data: a wrong --model or --max-length fails in seconds, before the
    # data download, and leaves nothing in out_dir.
    model, max_length = build_classifier(args, device)
    splits = prepare_data(args, out_dir)
    token_ids, labels = tokenize_splits(splits, max_length, device)

    cache_started = time.time()
    inputs, logits_fn, use_cache = choose_forward_pass(model, token_ids, args)
    cache_seconds = time.time() - cache_started

    train_started = time.time()
    history = train_classifier(
        model, logits_fn, (inputs[0], labels[0]), (inputs[1], labels[1]),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
        log_every=args.log_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
    )
    train_seconds = time.time() - train_started
    metrics = evaluate_test_split(model, logits_fn, inputs[2], labels[2], history, args.batch_size)

    save_classifier(args.checkpoint, model, max_length=max_length, base_model=str(args.model),
                    trainable=args.trainable, seed=args.seed, metrics=metrics)
    size_mb = Path(args.checkpoint).stat().st_size / 1e6
    print(f"saved:      {args.checkpoint} (config and all weights, {size_mb:.0f} MB); try it with\n"
          f"            python finetune_classify.py --checkpoint {args.checkpoint} --classify \"Free entry! Text WIN now\"")
    plot_history(out_dir / "loss-accuracy.png", history)
    seconds = {"wall": time.time() - started, "activation_cache": cache_seconds, "training": train_seconds}
    gpt.atomic_write_bytes(out_dir / "metrics.json", json.dumps(
        {"settings": vars(args), "activation_cache": use_cache, "history": history, "test": metrics,
         "seconds": seconds}, indent=2).encode("utf-8"))
    print(f"wall time:  {gpt.format_duration(seconds['wall'])} (activation cache {gpt.format_duration(cache_seconds)}, "
          f"training with evaluations {gpt.format_duration(train_seconds)}); metrics in {out_dir / 'metrics.json'}")


def main(argv=None):
    args = parse_args(argv)
    classify = args.classify is not None or args.classify_file is not None
    try:
        device = gpt.pick_device(args.device)
        if classify:
            run_classify(args, device)
        else:
            train_and_evaluate(args, device)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback, and the shell's code for SIGINT (128 + 2)
        lost = "nothing was classified" if classify else (
            f"no classifier saved (it is written to {args.checkpoint} after training and the test)")
        print(f"interrupted: {lost}; run the command again to start over", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
