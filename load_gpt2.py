"""load_gpt2.py: get a model, try it, measure it, export it.

Stage 1 of the lifecycle. `gpt.load` reads GPT-2's released weights from the Hugging Face Hub (downloaded once), a
Llama-family model with its own tokenizer, a .safetensors file or model folder, a GGUF file ("ollama:NAME[:TAG]" finds
one Ollama pulled) or a checkpoint of this project. Measurements follow EleutherAI's lm-evaluation-harness (the same
prompts, tokenization and metrics) on benchmark files downloaded once from their sources, or --benchmark-file.

    python load_gpt2.py                                      # try it: gpt2 (124M) continues a prompt, greedy
    python load_gpt2.py --model gpt2-medium --prompt "The meaning of life is" --temperature 0.8 --top-k 50 --seed 1
    python load_gpt2.py --model HuggingFaceTB/SmolLM2-135M --max-new-tokens 0   # only download and load it
    python load_gpt2.py --benchmark hellaswag                # 10,042 items: acc and acc_norm
    python load_gpt2.py --benchmark mmlu --shots 5 --limit 20 --results mmlu.json   # 20 items of each of 57 subjects
    python load_gpt2.py --perplexity held_out.txt --stride 512       # perplexity, bits per byte
    python load_gpt2.py --benchmark mmlu --contamination train.txt --probe   # seen in training? recalled?
    python load_gpt2.py --model ollama:smollm2:135m --chat --prompt "Why is the sky blue?"   # in its chat format
    python load_gpt2.py --model runs/instruct/model.pt --export-hf out/   # or --export-gguf out/model.gguf (llama.cpp)

Prints the model and its load time, then the continuation or the measurements. Writes only the caches (--cache-dir;
a Hugging Face cache is used as is), --results and the export (a GGUF file with an Ollama Modelfile beside it).
"""

import collections
import csv
import itertools
import math
import os
import random
import re
import tarfile
import time
from pathlib import Path

import torch

import gpt

# --- 1. Try it: continue a prompt -------------------------------------------------------


def stream_continuation(model, tokenizer, args):
    """Print --prompt and its continuation (sampling flags of args) token by token as they come, up to the tokenizer's
    end-of-text token or, with --chat, the end of the model's turn (neither printed), or --max-new-tokens."""
    prompt, stop_id = gpt.chat_prompt(tokenizer, args.prompt) if args.chat else (args.prompt, tokenizer.eot_id)
    print(prompt, end="", flush=True)
    prompt_ids = gpt.text_to_token_ids(prompt, device=model.wte.weight.device, tokenizer=tokenizer)
    generator = None if args.seed is None else torch.Generator(prompt_ids.device).manual_seed(args.seed)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)
    new_ids, printed = [], ""
    for token in gpt.generate_stream(model, prompt_ids, args.max_new_tokens, eot_id=tokenizer.eot_id, **options):
        if token.item() in (tokenizer.eot_id, stop_id):
            break
        new_ids.append(token.item())
        text = gpt.token_ids_to_text(new_ids, tokenizer)
        if not text.endswith("\ufffd"):  # a token can end inside a character: wait for the rest
            print(text[len(printed) :], end="", flush=True)
            printed = text
    print(gpt.token_ids_to_text(new_ids, tokenizer)[len(printed) :])


# --- 2. Measure it: the log-likelihood of a continuation --------------------------------

# One quantity underlies every measurement here: the log-likelihood of a continuation after a context. A benchmark
# item's answers continue its question; a text's perplexity comes from each token as the continuation of those before.


def prefix_id(tokenizer):
    """The token before a text that has nothing before it, as the harness's `prefix_token_id`: the tokenizer's begin
    token where it names one (Llama 3: <|begin_of_text|>), else its end-of-text token (GPT-2: 50256; Qwen3)."""
    return tokenizer.eot_id if tokenizer.bos_id is None else tokenizer.bos_id


def continuation_request(context, continuation, context_length, tokenizer=None):
    """(token ids, n_scored) for `sum_logprobs` as lm-evaluation-harness makes them: the pair tokenized whole, the
    continuation scored on the ids after the context's own (" Paris" after "capital:" is one token). Spaces ending the
    context move to the continuation; an empty context becomes [`prefix_id`], a long one is cut from the left.
    tokenizer: the model's; None: GPT-2's. Raises ValueError when the continuation alone does not fit."""
    tokenizer = tokenizer or gpt.get_tokenizer()
    if not context:
        context_ids, continuation_ids = [prefix_id(tokenizer)], tokenizer.encode(continuation)
    else:
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        context_ids = tokenizer.encode(stripped)
        continuation_ids = tokenizer.encode(stripped + continuation)[len(context_ids) :]
    if not continuation_ids or len(continuation_ids) > context_length:
        raise ValueError(f"a continuation of {len(continuation_ids)} tokens cannot be scored with a context length "
                         f"of {context_length}: {continuation[:60]!r}")
    return (context_ids + continuation_ids)[-(context_length + 1) :], len(continuation_ids)


@torch.no_grad()
def sum_logprobs(model, requests, batch_size=8, label="scoring"):
    """Total log-probability (nats) of the last n_scored ids of each (token ids, n_scored) request -> list of floats.
    Requests with the same ids[:-1] (an MMLU item's " A" to " D") share a forward pass; batches go longest first (one
    too large for memory fails at once). ValueError: a request that does not fit the model, or NaN scores."""
    device = next(model.parameters()).device
    readers = collections.defaultdict(list)  # model input -> the requests that read it
    for i, (ids, n_scored) in enumerate(requests):
        if not 1 <= n_scored < len(ids) <= model.cfg.context_length + 1:
            raise ValueError(f"request {i}: {len(ids)} ids with {n_scored} scored does not fit the model")
        readers[tuple(ids[:-1])].append(i)
    inputs = sorted(readers, key=len, reverse=True)
    totals = [0.0] * len(requests)
    started = time.time()
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        idx = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)  # right padding: real positions never see it
        for row, seq in enumerate(batch):
            idx[row, : len(seq)] = torch.tensor(seq)
        logits = model(idx.to(device))  # [batch, longest, vocab]
        for row, seq in enumerate(batch):
            for i in readers[seq]:
                ids, n_scored = requests[i]
                scored_logits = logits[row : row + 1, len(seq) - n_scored : len(seq)]  # [1, n_scored, vocab]
                targets = torch.tensor([ids[-n_scored:]], device=device)
                totals[i] = -gpt.next_token_loss(scored_logits, targets, reduction="sum").item()
                if math.isnan(totals[i]):
                    raise ValueError("the model gives NaN log-probabilities: its weights hold NaN or infinite values")
        done = start + len(batch)
        remaining = gpt.eta(started, done, len(inputs))
        gpt.show_progress(f"{label}: {done:,}/{len(inputs):,} forward passes, ETA {remaining}")
    return totals


# --- 3. Multiple-choice benchmarks, prepared and scored as the harness does -------------

# HellaSwag (Zellers et al., 2019): a context and four endings, one of them right; its validation split (10,042
# items) is scored. MMLU (Hendrycks et al., 2021): questions with four options A-D in 57 subjects; its test split
# (14,042 items) is scored, its dev split gives the k-shot examples. A download is checked by its number of items.
HELLASWAG_URLS = ["https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"]
HELLASWAG_ITEMS = 10_042
MMLU_URLS = ["https://people.eecs.berkeley.edu/~hendrycks/data.tar"]  # data/{dev,val,test}/<subject>_<split>.csv
MMLU_TEST_ITEMS = 14_042
MMLU_FILE = re.compile(r"(?:^|/)(dev|test)/(\w+)_\1\.csv$")
LETTERS = "ABCD"


def hellaswag_preprocess(text):
    """The harness's clean-up of HellaSwag text: " [title]" is a sentence break, other [markers] go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_request(item):
    """A HellaSwag item as the harness scores it -> dict: context "activity_label: ctx_a Ctx_b", the endings as
    choices, gold (the label), the text contamination looks for."""
    query = hellaswag_preprocess(item["activity_label"] + ": " + item["ctx_a"] + " " + item["ctx_b"].capitalize())
    choices = [hellaswag_preprocess(ending) for ending in item["endings"]]
    gold = int(item["label"])
    return dict(context=query, choices=choices, gold=gold, text=query + " " + choices[gold], subject=None)


def mmlu_question(item):
    """Question, options "A. .." to "D. .." and "Answer:", as the harness writes an MMLU item."""
    options = "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, item["options"]))
    return item["question"].strip() + options + "\nAnswer:"


def mmlu_request(item):
    """An MMLU item as the harness scores it -> dict: context (subject line, the k solved examples, the question),
    choices "A" to "D", gold, the text contamination looks for, subject."""
    subject = item["subject"].replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    examples = "".join(mmlu_question(ex) + " " + LETTERS[ex["answer"]] + "\n\n" for ex in item["examples"])
    text = item["question"] + "\n" + "\n".join(item["options"])
    return dict(context=header + examples + mmlu_question(item), choices=list(LETTERS), gold=item["answer"],
                text=text, subject=item["subject"])


def score_multiple_choice(model, requests, batch_size=8, tokenizer=None):
    """Score each choice by its log-likelihood after the context and one space -> one dict per item, as the harness:
    lls (nats); acc, 1 when the gold choice's is the highest; acc_norm, the same per character of the choice (the space
    not counted). tokenizer: the model's; None: GPT-2's."""
    length = model.cfg.context_length
    pairs = [(request["context"], " " + choice) for request in requests for choice in request["choices"]]
    flat = [continuation_request(context, choice, length, tokenizer) for context, choice in pairs]
    lls = sum_logprobs(model, flat, batch_size, label="scoring choices")
    scored, start = [], 0
    for request in requests:
        choices, gold = request["choices"], request["gold"]
        item_lls = torch.tensor(lls[start : start + len(choices)], dtype=torch.float64)
        start += len(choices)
        # max(1, ...): an ending that preprocessing left empty would divide by zero.
        n_chars = torch.tensor([max(1, len(choice)) for choice in choices], dtype=torch.float64)
        acc = int(item_lls.argmax() == gold)  # argmax: the first of equal values, as numpy's in the harness
        acc_norm = int((item_lls / n_chars).argmax() == gold)
        scored.append(dict(lls=item_lls.tolist(), acc=acc, acc_norm=acc_norm))
    return scored


def summarize(scored, requests):
    """Mean acc and acc_norm with the harness's standard error sqrt(p (1 - p) / (n - 1)) (None for one item), the
    random-guess baseline, and acc per subject where items have one."""
    n = len(scored)
    summary = dict(items=n, random_guess=sum(1 / len(r["choices"]) for r in requests) / n)
    for metric in ("acc", "acc_norm"):
        p = sum(s[metric] for s in scored) / n
        summary[metric] = p
        summary[metric + "_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
    subjects = collections.defaultdict(list)
    for s, r in zip(scored, requests):
        if r["subject"] is not None:
            subjects[r["subject"]].append(s["acc"])
    if subjects:
        summary["subjects"] = {name: dict(items=len(v), acc=sum(v) / len(v)) for name, v in sorted(subjects.items())}
    return summary


def load_benchmark(args):
    """The items of --benchmark (--benchmark-file, else downloaded once and counted), the first --limit a subject."""
    hellaswag = args.benchmark == "hellaswag"
    path = args.benchmark_file
    if path is None:
        urls, name = (HELLASWAG_URLS, "hellaswag_val.jsonl") if hellaswag else (MMLU_URLS, "data.tar")
        path = gpt.fetch_dataset(urls, name, flag="--benchmark-file")
    items = read_hellaswag(path) if hellaswag else read_mmlu(path, args.shots)
    expected = HELLASWAG_ITEMS if hellaswag else MMLU_TEST_ITEMS
    if args.benchmark_file is None and len(items) != expected:
        raise ValueError(f"{path}: {len(items):,} items, expected {expected:,}: delete the file to download it again")
    groups = itertools.groupby(items, key=lambda item: item.get("subject"))  # HellaSwag's items: one group
    return [item for _, group in groups for item in itertools.islice(group, args.limit)]


def read_hellaswag(path):
    """HellaSwag JSON Lines -> list of item dicts. Each item is checked whole, so that nothing is silently misread
    (endings "abcd" as four endings, a label 1.7 as 1): ValueError names the first bad line."""
    text = gpt.read_text(path, "--benchmark-file")
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            item = gpt.parse_json(line, f"{path} line {number}")  # names the line, also when nested too deeply
            if not is_hellaswag_item(item):
                raise ValueError(f"{path} line {number}: not a HellaSwag item: each line needs the strings "
                                 "activity_label, ctx_a and ctx_b, a list of non-empty endings and the label (0, 1, "
                                 "...) of the right one")
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no HellaSwag items in the file")
    return items


def is_hellaswag_item(item):
    """Whether a parsed line is a HellaSwag item; its label: an integer, or a digit string as in Hugging Face's copy."""
    endings = item.get("endings") if isinstance(item, dict) else None
    if not isinstance(endings, list) or not all(isinstance(e, str) and e.strip() for e in endings):
        return False
    texts_ok = all(isinstance(item.get(field), str) for field in ("activity_label", "ctx_a", "ctx_b"))
    return texts_ok and type(item.get("label")) in (int, str) and str(item["label"]) in map(str, range(len(endings)))


def read_mmlu(path, shots=0):
    """MMLU's data.tar -> item dicts (subject, question, options, answer, and as examples the subject's first `shots`
    dev items, as the harness picks them) by subject. Raises ValueError for a bad file, row or too few dev items."""
    files = {}  # (split, subject) -> CSV text
    try:
        with tarfile.open(gpt.existing_file(path, "--benchmark-file")) as archive:
            for member in archive:
                if member.isfile() and (match := MMLU_FILE.search(member.name)):
                    raw = archive.extractfile(member).read()
                    files[match[1], match[2]] = gpt.decode_utf8(raw, f"{path} {member.name}")
    except (tarfile.TarError, EOFError):
        raise ValueError(f"--benchmark-file {path}: not a tar archive or cut short: give MMLU's data.tar") from None
    subjects = sorted(subject for split, subject in files if split == "test")
    if not subjects:
        raise ValueError(f"{path}: no test/<subject>_test.csv files: give MMLU's data.tar")
    items = []
    for subject in subjects:
        examples = read_mmlu_csv(files.get(("dev", subject), ""), f"{path} dev/{subject}_dev.csv")
        if len(examples) < shots:
            raise ValueError(f"{path}: {subject} has {len(examples)} dev items, fewer than --shots {shots}")
        for item in read_mmlu_csv(files["test", subject], f"{path} test/{subject}_test.csv"):
            items.append(dict(item, subject=subject, examples=examples[:shots]))
    return items


def read_mmlu_csv(text, source):
    """Rows "question,A,B,C,D,answer" (no header) -> list of {question, options, answer}."""
    items = []
    for number, row in enumerate(csv.reader(text.splitlines(keepends=True)), 1):
        if len(row) != 6 or row[5].strip() not in LETTERS:
            raise ValueError(f"{source} row {number}: expected question, four options and a letter A-D, "
                             f"got {row!r:.120}")
        items.append(dict(question=row[0], options=row[1:5], answer=LETTERS.index(row[5].strip())))
    return items


# --- 4. Perplexity and bits per byte of a text, with a sliding window -------------------


def perplexity_requests(ids, context_length, stride, first_id=gpt.EOT_ID):
    """Sliding windows over a text's ids (Hugging Face's perplexity guide) -> (token ids, n_scored) requests. Windows
    start `stride` apart, read up to context_length tokens and score those no earlier window scored (each with at
    least context_length - stride before it). first_id goes first, so that the first token is scored too."""
    if not 1 <= stride <= context_length:
        raise ValueError(f"--stride {stride} must be from 1 to the model's context length ({context_length})")
    sequence = [first_id] + list(ids)
    requests, scored = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context_length, len(ids))  # reads sequence[begin:end], predicts sequence[begin + 1 : end + 1]
        requests.append((sequence[begin : end + 1], end - scored))
        scored = end
        if end == len(ids):
            break
    return requests


def perplexity(model, text, stride, batch_size=8, tokenizer=None):
    """Perplexity (e to the mean negative log-likelihood per token) and bits per byte (the total in bits over the UTF-8
    bytes: comparable across tokenizers) of a non-empty text -> dict. tokenizer: the model's; None: GPT-2's."""
    tokenizer = tokenizer or gpt.get_tokenizer()
    ids = tokenizer.encode(text)
    requests = perplexity_requests(ids, model.cfg.context_length, stride, prefix_id(tokenizer))
    nll = -sum(sum_logprobs(model, requests, batch_size, label="perplexity"))
    n_bytes = len(text.encode("utf-8"))
    return dict(tokens=len(ids), bytes=n_bytes, windows=len(requests), stride=stride,
                perplexity=math.exp(nll / len(ids)), bits_per_byte=nll / (n_bytes * math.log(2)))


# --- 5. Was the test seen in training? Contamination and memorisation probes ------------


def normalized_words(text):
    """Lower-cased words without punctuation, as GPT-3's contamination study compares texts (Brown et al., 2020, C)."""
    return re.sub(r"[^\w\s]|_", "", text.lower()).split()


def find_contamination(texts, corpus_lines, n=13):
    """Indices of the texts that share an n-gram of `normalized_words` with corpus_lines (read once, as a stream) ->
    sorted list. A text under n words counts when it occurs whole."""
    wanted = collections.defaultdict(lambda: collections.defaultdict(set))  # length -> words -> texts
    for i, text in enumerate(texts):
        words = normalized_words(text)
        if not words:
            continue  # nothing to look for
        length = min(n, len(words))  # a text shorter than n is looked for whole
        for start in range(len(words) - length + 1):
            wanted[length][tuple(words[start : start + length])].add(i)
    found, window, words_read = set(), collections.deque(maxlen=n), 0
    for line in corpus_lines:
        for word in normalized_words(line):
            window.append(word)
            for length, grams in wanted.items():
                if len(window) >= length:
                    found |= grams.get(tuple(window)[-length:], set())
            words_read += 1
            if words_read % 1_000_000 == 0:
                gpt.show_progress(f"contamination: {words_read / 1e6:.0f}M words of the corpus read")
    return sorted(found)


def read_lines(path):
    """The lines of --contamination's UTF-8 text file, one at a time; ValueError at a byte that is not UTF-8."""
    try:
        with open(gpt.existing_file(path, "--contamination"), encoding="utf-8") as f:
            yield from f
    except UnicodeDecodeError as e:
        raise ValueError(f"--contamination {path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None


def shuffle_options(item, order):
    """An MMLU item with its options in another order: order[k] is the option now shown at letter k. The letters stay
    in place and move to other texts; the gold follows its text."""
    return dict(item, options=[item["options"][k] for k in order], answer=order.index(item["answer"]))


def reorder_sentences(item):
    """A HellaSwag item with the sentences of its context (ctx_a, cut after . ! or ?) in reverse order; ctx_b, which
    the endings finish, stays last."""
    sentences = re.split(r"(?<=[.!?])\s+", item["ctx_a"].strip())
    return dict(item, ctx_a=" ".join(reversed(sentences)))


def probe_memorisation(model, benchmark, items, scored, seed=0, batch_size=8, tokenizer=None):
    """Score the items again, changed where recall would notice (MMLU: options in a seeded random order; HellaSwag: the
    context's sentences reversed) -> dict: acc before (`scored`) and after, the change, items that flipped."""
    if benchmark == "hellaswag":
        perturbation, to_request = "context sentences reversed", hellaswag_request
        changed_items = [reorder_sentences(item) for item in items]
    else:
        perturbation, to_request = "options shuffled, letters stay", mmlu_request
        rng = random.Random(seed)
        changed_items = [shuffle_options(item, rng.sample(range(4), 4)) for item in items]  # the 4 options reordered
    requests = [to_request(item) for item in changed_items]
    changed = sum(to_request(item)["context"] != request["context"] for item, request in zip(items, requests))
    probe_scored = score_multiple_choice(model, requests, batch_size, tokenizer)
    before = sum(s["acc"] for s in scored) / len(items)
    after = sum(s["acc"] for s in probe_scored) / len(items)
    flipped = collections.Counter((s["acc"], p["acc"]) for s, p in zip(scored, probe_scored))
    return dict(perturbation=perturbation, items=len(items), items_changed=changed, acc=before, acc_probe=after,
                change=after - before, right_to_wrong=flipped[1, 0], wrong_to_right=flipped[0, 1])


# --- 6. Command line: the scores printed, the flags, main ------------------------------


def print_scores(name, summary):
    """Print a `summarize` dict: items, random guess, acc and acc_norm ± standard error, subjects."""
    print(f"{name}: items {summary['items']:,}, random guess {summary['random_guess']:.4f}")
    for metric in ("acc", "acc_norm"):
        stderr = summary[metric + "_stderr"]
        print(f"  {metric:<8} {summary[metric]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    for subject, scores in summary.get("subjects", {}).items():
        print(f"  {subject:<40} {scores['items']:>5} items  acc {scores['acc']:.4f}")


def run_benchmark(args, model, items, tokenizer):
    """Score --benchmark, check --contamination and run --probe, printing each -> results dict."""
    requests = [(hellaswag_request if args.benchmark == "hellaswag" else mmlu_request)(item) for item in items]
    if args.contamination:  # before the long scoring, so that a bad corpus fails fast
        contaminated = find_contamination([r["text"] for r in requests], read_lines(args.contamination), args.ngram)
    started = time.time()
    scored = score_multiple_choice(model, requests, args.batch_size, tokenizer)
    seconds = time.time() - started
    summary = summarize(scored, requests)
    print_scores(f"{args.benchmark} ({args.shots}-shot, {gpt.format_duration(seconds)})", summary)
    results = {"benchmark": dict(name=args.benchmark, shots=args.shots, seconds=round(seconds, 1), **summary)}
    if args.contamination:
        share = len(contaminated) / len(requests)
        print(f"contamination: {len(contaminated)} of {len(requests)} items ({share:.1%}) share a {args.ngram}-gram "
              f"with {args.contamination}" + (" (--results lists them)" if contaminated else ""))
        clean = sorted(set(range(len(requests))) - set(contaminated))
        clean_summary = summarize([scored[i] for i in clean], [requests[i] for i in clean]) if clean else None
        if clean_summary is not None:
            print_scores(f"{args.benchmark}, clean items only", clean_summary)
        results["contamination"] = dict(corpus=str(args.contamination), ngram=args.ngram, items=contaminated,
                                        share=share, clean=clean_summary)
    if args.probe:
        probe = probe_memorisation(model, args.benchmark, items, scored, args.seed or 0, args.batch_size, tokenizer)
        print(f"probe ({probe['perturbation']}, {probe['items_changed']} items changed): acc {probe['acc']:.4f} -> "
              f"{probe['acc_probe']:.4f} ({probe['change']:+.4f}); right to wrong {probe['right_to_wrong']}, "
              f"wrong to right {probe['wrong_to_right']}")
        results["probe"] = probe
    return results


# Flags that mean something only with another: given alone they would be ignored.
NEEDS = {"benchmark_file": ("benchmark",), "shots": ("benchmark",), "limit": ("benchmark",),
         "contamination": ("benchmark",), "probe": ("benchmark",), "ngram": ("contamination",),
         "stride": ("perplexity",), "results": ("benchmark", "perplexity"), "batch_size": ("benchmark", "perplexity"),
         "overwrite": ("export_hf", "export_gguf"), "gguf_type": ("export_gguf",)}


def build_parser():
    p = gpt.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpt.add_flags(p, "model", "device", "dtype", "cache_dir")
    g = p.add_argument_group("try it: continue a prompt (unless a flag below asks for another run)")
    g.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    g.add_argument("--chat", action="store_true", help="--prompt is a message: wrap it in the model's chat format")
    gpt.add_flags(g, "max_new_tokens", "temperature", "top_k", "top_p", "seed", seed=(None, "a new sample each run"),
                  max_new_tokens=(50, "a glimpse; an instruct answer needs more"))
    m = p.add_argument_group("measure it (instead of generating)")
    m.add_argument("--benchmark", choices=["hellaswag", "mmlu"], help="score a benchmark")
    m.add_argument("--benchmark-file", help="hellaswag_val.jsonl, or MMLU's data.tar (default: download)")
    m.add_argument("--shots", type=gpt.non_negative_int, default=0, help="MMLU: solved examples before each question")
    m.add_argument("--limit", type=gpt.positive_int, help="score the first LIMIT items of each subject (default: all)")
    m.add_argument("--perplexity", metavar="FILE", help="perplexity and bits per byte of a UTF-8 text file")
    m.add_argument("--stride", type=gpt.positive_int, help="tokens between perplexity windows (default: context / 2)")
    m.add_argument("--contamination", metavar="FILE", help="a training corpus (UTF-8 text): items that share n-grams")
    m.add_argument("--ngram", type=gpt.positive_int, default=13, help="words per n-gram of --contamination")
    m.add_argument("--probe", action="store_true", help="score again with options or sentences reordered: the change")
    gpt.add_flags(m, "batch_size")
    m.add_argument("--results", metavar="FILE", help="write the measurements to this JSON file (default: print only)")
    e = p.add_argument_group("export it (instead of generating)")
    e.add_argument("--export-hf", metavar="FOLDER", help="write --model in --dtype as a Hugging Face folder")
    e.add_argument("--export-gguf", metavar="FILE", help="write --model as a GGUF file (and an Ollama Modelfile)")
    e.add_argument("--gguf-type", choices=list(gpt.GGUF_FILE_TYPES), default="f16",
                   help="type of the weight matrices of --export-gguf (norms and biases stay f32)")
    gpt.add_flags(e, "overwrite")
    return p


def parse_args(argv=None):
    """The settings of the run; flags that contradict each other, or would be ignored, exit 2 with one line."""
    p = build_parser()
    args = p.parse_args(argv)
    given = gpt.given_flags(p, argv)
    for flag, needed in NEEDS.items():
        if flag in given and not any(getattr(args, name) for name in needed):
            p.error(f"{gpt.flag_name(flag)} needs {' or '.join(map(gpt.flag_name, needed))}")
    measuring = args.benchmark or args.perplexity
    runs = [measuring, args.export_hf, args.export_gguf]  # each a run of its own
    if sum(map(bool, runs)) > 1:
        p.error("--export-hf, --export-gguf and measuring (--benchmark, --perplexity) are separate runs")
    sampling = [flag for flag in ("prompt", "chat", "max_new_tokens", "temperature", "top_k", "top_p") if flag in given]
    if sampling and any(runs):
        p.error(f"{gpt.flag_name(sampling[0])} is for generating text, not for measuring or exporting")
    sampling_options = [flag for flag in ("top_k", "top_p", "seed") if flag in given]
    if sampling_options and not args.temperature and not measuring:
        p.error(f"{gpt.flag_name(sampling_options[0])} is for sampling: give --temperature above 0 as well")
    if args.shots and args.benchmark != "mmlu":
        p.error("--shots is for --benchmark mmlu (HellaSwag is scored zero-shot, as the harness does)")
    if not args.prompt:
        p.error("--prompt is empty: give at least one character of text to continue")
    return args


@gpt.command_line(memory_hint="use a smaller --batch-size or --model, or --dtype bfloat16")
def main(argv=None):
    args = parse_args(argv)
    os.environ["GPT_CACHE_DIR"] = args.cache_dir  # where gpt.cache_dir() looks
    device = gpt.pick_device(args.device)
    if args.export_hf:  # export it
        folder = gpt.export_hf(args.model, args.export_hf, dtype=gpt.DTYPES[args.dtype], overwrite=args.overwrite)
        return print(f"exported {args.model} ({args.dtype}) to {folder}, a folder that transformers reads")
    if args.export_gguf:
        model, tokenizer = gpt.load(args.model)
        modelfile = gpt.export_gguf(model, tokenizer, args.export_gguf, args.gguf_type, name=args.model,
                                    overwrite=args.overwrite)
        return print(f"exported {args.model} ({args.gguf_type}) to {args.export_gguf}, a GGUF file that llama.cpp "
                     f"reads; for Ollama: ollama create NAME -f {modelfile}")
    # Every input is read before the download and the load: cheap, and it fails fast.
    if args.results and Path(args.results).is_dir():
        raise ValueError(f"--results {args.results} is a folder: give the path of a JSON file")
    if args.contamination:
        gpt.existing_file(args.contamination, "--contamination")
    items = load_benchmark(args) if args.benchmark else None
    text = None
    if args.perplexity:
        text = gpt.read_text(args.perplexity, "--perplexity")
        if not text:
            raise ValueError(f"--perplexity {args.perplexity}: the file is empty: give a text to score")
    started = time.time()
    model, tokenizer = gpt.load(args.model, device=device, dtype=gpt.DTYPES[args.dtype], language_model=True)
    print(gpt.model_summary(model, args.model, training=False))
    print(f"load time: {time.time() - started:.2f} s on {device}, {args.dtype}")
    print("-" * 80)
    if items is None and text is None:  # try it
        return stream_continuation(model, tokenizer, args)
    results = dict(model=args.model, settings=vars(args))  # measure it
    if text is not None:
        stride = args.stride or max(1, model.cfg.context_length // 2)
        results["perplexity"] = score = perplexity(model, text, stride, args.batch_size, tokenizer)
        print(f"perplexity of {args.perplexity}: {score['perplexity']:.4f}, {score['bits_per_byte']:.4f} bits per byte "
              f"({score['tokens']:,} tokens, {score['bytes']:,} bytes, {score['windows']} windows, stride {stride})")
    if items is not None:
        results.update(run_benchmark(args, model, items, tokenizer))
    if args.results:
        gpt.write_json(args.results, results)
        print(f"results written to {args.results}")


if __name__ == "__main__":
    main()
