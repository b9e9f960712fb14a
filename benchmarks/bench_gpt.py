"""bench_gpt.py: gpt.py against Hugging Face transformers' GPT-2, side by side in one run.

    python benchmarks/bench_gpt.py                       # everything, 124M shape, float32
    python benchmarks/bench_gpt.py --only generate --repeats 5
    python benchmarks/bench_gpt.py --family smollm2      # the Llama family: SmolLM2-135M's shape
    python benchmarks/bench_gpt.py --family gemma3       # Gemma 3 270M's shape (sliding-window layers)

Both models get the same random weights (a 124M-shaped model.safetensors written by
transformers' save_pretrained into a temporary folder, or --weights; with --family
smollm2 a LlamaForCausalLM of SmolLM2-135M's shape), so the work is identical. Ours and the reference alternate within each repeat and the medians are
compared, which keeps the ratios meaningful on a noisy machine. Measures:

- train:    forward + backward tokens/s at batch 4 x 256 tokens (cross-entropy loss)
- generate: greedy decoding of 200 new tokens after a 16-token prompt, batch 1, with the
            key/value cache, in tokens/s; the weight bytes read per second against the
            memory bandwidth measured here (decoding one token reads every weight once)
- load:     a fresh process imports its library, loads the file and runs one token (a
            ready model): seconds from the process start and for the load call alone, and
            the extra resident memory of the load call, after it and at its peak, against
            the file size

Needs the test requirements (transformers). Prints a Markdown table for the README.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt  # noqa: E402


def parse_args():
    parser = gpt.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["train", "generate", "load"], action="append",
                        help="run only these measurements (repeatable) (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each measurement per implementation")
    parser.add_argument("--family", choices=list(FAMILIES), default="gpt2", help="GPT-2 124M, or the Llama family at SmolLM2-135M's or Gemma 3 270M's shape")
    parser.add_argument("--weights", default=None, help="a model.safetensors of --family's shape with config.json beside it (default: random weights in a temporary folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser.parse_args()


# --family -> transformers' model class and its config of that shape (random weights)
FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", {}),
    "smollm2": ("LlamaForCausalLM", "LlamaConfig", dict(  # HuggingFaceTB/SmolLM2-135M's config.json
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(  # google/gemma-3-270m's config.json
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, sliding_window=512,
        query_pre_attn_scalar=256, rms_norm_eps=1e-6, pad_token_id=0)),
}


def reference_class(family):
    import transformers

    return getattr(transformers, FAMILIES[family][0])


def write_random_weights(folder, family):
    import transformers

    _, config_class, sizes = FAMILIES[family]
    torch.manual_seed(0)
    reference_class(family)(getattr(transformers, config_class)(**sizes)).save_pretrained(folder)
    return Path(folder) / "model.safetensors"


def load_both(weights, family):
    config_json, _, _ = gpt.model_files(Path(weights).parent)  # random weights: no tokenizer to load beside them
    ours = gpt.model_from_tensors(gpt.read_safetensors(weights), config_json, weights)
    reference = reference_class(family).from_pretrained(Path(weights).parent, attn_implementation="sdpa").eval()
    return ours, reference


def timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_train(ours, reference, repeats, batch=4, seq_len=256):
    """Median forward+backward tokens/s of each model at [batch, seq_len]."""
    torch.manual_seed(1)
    idx = torch.randint(0, ours.cfg.vocab_size, (batch, seq_len))
    targets = torch.randint(0, ours.cfg.vocab_size, (batch, seq_len))

    def step(model, get_logits):
        model.zero_grad(set_to_none=True)
        logits = get_logits(model(idx))
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()

    runs = {"ours": (ours, lambda out: out), "transformers": (reference, lambda out: out.logits)}
    for model, _ in runs.values():
        model.train()  # dropout: ours has none by default; the reference's is set to 0 below
    for module in reference.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    times = {name: [] for name in runs}
    for model, get in runs.values():
        step(model, get)  # warm-up
    for _ in range(repeats):
        for name, (model, get) in runs.items():
            times[name].append(timed(partial(step, model, get)))
    for model, _ in runs.values():
        model.zero_grad(set_to_none=True)
        model.eval()
    return {name: batch * seq_len / statistics.median(t) for name, t in times.items()}


def memory_bandwidth():
    """Read bandwidth in bytes/s: the best of a few sums over a 1 GiB float32 tensor."""
    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    best = min(timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best


@torch.no_grad()
def bench_generate(ours, reference, repeats, prompt_len=16, new_tokens=200):
    """Median tokens/s of greedy decoding; also checks both produce the same tokens."""
    torch.manual_seed(2)
    prompt = torch.randint(0, ours.cfg.vocab_size, (1, prompt_len))
    outputs = {}

    def run_ours():
        outputs["ours"] = gpt.generate(ours, prompt, new_tokens)

    def run_reference():
        outputs["transformers"] = reference.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,  # batch 1: never used
        )

    runs = {"ours": run_ours, "transformers": run_reference}
    for fn in runs.values():
        fn()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    same = torch.equal(outputs["ours"], outputs["transformers"])
    return {name: new_tokens / statistics.median(t) for name, t in times.items()}, same


LOAD_SCRIPT = """
import json, sys, time
process_started = time.perf_counter()
def status():
    fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return {{k: int(fields[k].split()[0]) * 1024 for k in ('VmRSS', 'VmHWM')}}
import torch
{imports}
before = status()
started = time.perf_counter()
model = {load}
with torch.no_grad():
    model(torch.tensor([[464]]))  # one token: every weight is read, the model is ready
seconds = time.perf_counter() - started
after = status()
print(json.dumps({{"seconds": seconds, "process_seconds": time.perf_counter() - process_started,
                  "extra_rss": after["VmRSS"] - before["VmRSS"], "extra_peak": after["VmHWM"] - before["VmHWM"]}}))
"""


def bench_load(weights, repeats, family):
    """Load each way in a fresh process (imports done before the clock starts)."""
    root = Path(__file__).resolve().parent.parent
    config = Path(weights).parent / "config.json"  # random weights: no tokenizer beside them
    ours = f"gpt.model_from_tensors(gpt.read_safetensors({str(weights)!r}), json.loads(open({str(config)!r}).read()), 'b')"
    name = FAMILIES[family][0]
    ways = {
        "ours": ("sys.path.insert(0, %r); import gpt" % str(root), ours),
        "transformers": (f"from transformers import {name}", f"{name}.from_pretrained(%r).eval()" % str(Path(weights).parent)),
    }
    results = {name: [] for name in ways}
    for _ in range(repeats):
        for name, (imports, load) in ways.items():
            code = LOAD_SCRIPT.format(imports=imports, load=load)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    return {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()}


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only or ["train", "generate", "load"])
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}, {args.family}")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.weights) if args.weights else write_random_weights(tmp, args.family)
        file_mb = weights.stat().st_size / 1e6
        rows = []
        if only & {"train", "generate"}:
            ours, reference = load_both(weights, args.family)
        if "train" in only:
            tps = bench_train(ours, reference, args.repeats)
            rows.append(("forward+backward, batch 4 x 256, tokens/s", tps["ours"], tps["transformers"]))
        if "generate" in only:
            tps, same = bench_generate(ours, reference, args.repeats)
            rows.append(("greedy generation, 200 tokens, tokens/s", tps["ours"], tps["transformers"]))
            weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
            bandwidth = memory_bandwidth()
            print(f"same tokens from both: {same}")
            print(f"decoding reads {weight_bytes / 1e6:.0f} MB of weights per token: ours {tps['ours'] * weight_bytes / 1e9:.1f} GB/s, "
                  f"transformers {tps['transformers'] * weight_bytes / 1e9:.1f} GB/s; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
        if "load" in only:
            load = bench_load(weights, args.repeats, args.family)
            for key, label in (("process_seconds", "new process to a ready model (imports included), s"),
                               ("seconds", "load call to a ready model (after imports), s"),
                               ("extra_rss", "extra resident memory after the load call, x file"),
                               ("extra_peak", "extra peak resident memory during the load call, x file")):
                scale = 1 if key.endswith("seconds") else weights.stat().st_size
                rows.append((label, load["ours"][key] / scale, load["transformers"][key] / scale))
            print(f"file: {file_mb:.0f} MB")
    print(f"\n(median of {args.repeats} runs each)\n")
    print("| measurement | ours | transformers | ours / transformers |")
    print("| --- | ---: | ---: | ---: |")
    for label, a, b in rows:
        print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
