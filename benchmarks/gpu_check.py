"""gpu_check.py: every GPU path of the project, run and measured on one CUDA GPU in one go.

Writes random-weight models of the GPT-2 124M and 355M shapes (as make_random_model.py
does: the compute of the released models, none of their knowledge), then runs, each
script in a process of its own, timed, with its peak GPU memory:

  matmul    a large bfloat16 matrix product: the GPU's measured peak, for MFU
  load      load_gpt2.py: a prompt, perplexity, the HellaSwag and MMLU samples in testdata/
  classify  the main job, finetune_classify.py with its defaults, on testdata's SMS zip
  pretrain  pretrain.py at the 124M shape in bfloat16, without and with --compile:
            tokens/s and MFU against the data-sheet peak and against the measured one
  instruct  finetune_instruct.py for a few steps at 124M and 355M, answers included
  generate  greedy generation at batch 1 and batch 16, ours next to transformers' generate
  tests     test_all.py (the CUDA tests first)

    python benchmarks/gpu_check.py --out-dir gpu-check              # on a machine with a GPU
    python benchmarks/gpu_check.py --only pretrain generate         # some parts again
    python benchmarks/gpu_check.py --device cpu --quick --only classify pretrain instruct generate
                                                                    # the plumbing on a CPU

--quick swaps in a 2-layer model and a few steps, to check the plumbing; its numbers mean
nothing. The pretraining text and the instruction data are files beside the repository
(--text, --instructions; see their defaults). Nothing is downloaded.

Writes into --out-dir: results.json (every number), results.md (the table for the README),
log.txt (what every process printed), and the runs and models it made.
"""

import argparse
import dataclasses
import json
import os
import platform
import re
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's top level
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpt  # noqa: E402
from make_random_model import write_random_model  # noqa: E402

PARTS = ["matmul", "load", "classify", "pretrain", "instruct", "generate", "tests"]
# A 2-layer model of GPT-2's vocabulary for --quick: the same code paths, seconds of work.
QUICK_SHAPE = dict(n_layers=2, n_heads=2, emb_dim=64, context_length=128)


def measured_matmul_peak(device, n=8192, repeats=10):
    """FLOP/s of an n x n x n bfloat16 matrix product (mean of `repeats` after three warm-ups)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- Each script in a process of its own ---------------------------------------------------


def run_script(script, args, log, timeout):
    """Run `python script args` (through this file's --child mode, which records the peak GPU
    memory) -> (dict(rc, seconds, peak_gpu_gb), its output); the output goes into `log` too."""
    memory_file = log.with_name("peak-memory.txt")
    memory_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", str(memory_file), str(ROOT / script), *map(str, args)]
    started = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        rc, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as e:
        rc, output = "timeout", (e.stdout or b"").decode("utf-8", "replace") + f"\n[stopped after {timeout:.0f} s]"
    seconds = time.time() - started
    with log.open("a", encoding="utf-8") as f:
        f.write(f"\n===== {script} {' '.join(map(str, args))}\n{output}\n===== rc {rc}, {seconds:.1f} s\n")
    peak = float(memory_file.read_text()) if memory_file.exists() else None
    print(f"{script}: rc {rc}, {seconds:.1f} s" + (f", peak GPU memory {peak:.2f} GB" if peak else ""), flush=True)
    return dict(rc=rc, seconds=round(seconds, 2), peak_gpu_gb=peak), output


def child(memory_file, script, *args):
    """Run script as __main__ with args; on exit write its peak GPU memory (GB) to memory_file."""
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            Path(memory_file).write_text(f"{torch.cuda.max_memory_allocated() / 1e9:.3f}")


# --- The parts -----------------------------------------------------------------------------


def check_load(ctx):
    """load_gpt2.py on the GPU: try the model, then measure it (each in float32 and bfloat16)."""
    text = ctx.work / "text-100k.txt"
    text.write_text(Path(ctx.args.text).read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    results = {}
    for dtype in ("float32", "bfloat16"):
        common = ["--model", ctx.models["124M"], "--device", ctx.device, "--dtype", dtype]
        for name, extra in (("prompt", ["--prompt", "Every effort moves you", "--max-new-tokens", 50]),
                            ("perplexity", ["--perplexity", text]),
                            ("hellaswag", ["--benchmark", "hellaswag", "--benchmark-file",
                                           ROOT / "testdata" / "hellaswag_tiny.jsonl"]),
                            ("mmlu", ["--benchmark", "mmlu", "--benchmark-file", ROOT / "testdata" / "mmlu"])):
            results[f"{name} {dtype}"], _ = run_script("load_gpt2.py", common + extra, ctx.log, ctx.time_left(60))
    return results


def check_classify(ctx):
    """The main job with its defaults on the 124M shape, on the real SMS data."""
    out_dir = ctx.work / "runs" / "classify"
    data = ROOT / "testdata" / "sms+spam+collection.zip"
    argv = ["--model", ctx.models["124M"], "--data", data, "--out-dir", out_dir, "--overwrite", "--device", ctx.device]
    result, _ = run_script("finetune_classify.py", argv + ctx.quick_args(["--max-steps", "10"]), ctx.log,
                           ctx.time_left(300))
    metrics_file = out_dir / "metrics.json"
    if result["rc"] == 0 and metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        result.update(phase_seconds=metrics["seconds"], test_accuracy=metrics["test"]["accuracy"])
    return result


def check_pretrain(ctx):
    """pretrain.py from scratch at the 124M shape in bfloat16, eager and compiled: the same steps."""
    shape = ["--n-layers", 2, "--n-heads", 2, "--emb-dim", 64, "--context-length", 128] if ctx.args.quick else \
        ["--size", "gpt2", "--context-length", 1024]
    steps = 10 if ctx.args.quick else ctx.args.pretrain_steps
    batch_size = 4 if ctx.args.quick else ctx.args.pretrain_batch_size
    dtype = "float32" if ctx.args.quick else "bfloat16"  # bfloat16 crawls on most CPUs
    log_every = max(1, steps // 5)
    results = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        result, output = run_script("pretrain.py", [
            "--data", ctx.args.text, "--token-dir", ctx.work / "tokens",
            "--out-dir", ctx.work / "runs" / f"pretrain-{name}",
            "--overwrite", *shape, "--batch-size", batch_size, "--max-steps", steps, "--epochs", 1000,
            "--log-every", log_every, "--eval-every", 10 * steps, "--eval-batches", 2, "--sample-tokens", 20,
            "--dtype", dtype, "--device", ctx.device, *extra], ctx.log, ctx.time_left(240))
        # The first logged interval holds the warm-up (and the compilation): the others are steady.
        speeds = [float(s.replace(",", "")) for s in re.findall(r"^step \d+/\d+ .*?\| ([\d,.]+) tok/s", output,
                                                                 re.MULTILINE)]
        if result["rc"] == 0 and len(speeds) >= 2:
            tokens_per_s = statistics.median(speeds[1:])
            flops = ctx.flops_per_token * tokens_per_s
            result.update(tokens_per_s=round(tokens_per_s), model_tflops=round(flops / 1e12, 1))
            if ctx.sheet_peak:
                result["mfu_data_sheet"] = round(flops / ctx.sheet_peak, 4)
            if ctx.matmul_peak:
                result["mfu_measured_peak"] = round(flops / ctx.matmul_peak, 4)
        results[name] = result
    return results


def check_instruct(ctx):
    """finetune_instruct.py: a few steps and the test split's answers, at 124M and 355M."""
    entries = json.loads(Path(ctx.args.instructions).read_text(encoding="utf-8"))
    data = ctx.work / "instructions-200.json"
    data.write_text(json.dumps(entries[:200]))  # 170 train, 20 test, 10 validation
    results = {}
    for size in ("124M", "355M"):
        steps = 5 if ctx.args.quick else 20
        results[size], _ = run_script("finetune_instruct.py", [
            "--model", ctx.models[size], "--data", data, "--out-dir", ctx.work / "runs" / f"instruct-{size}",
            "--overwrite", "--max-steps", steps, "--eval-every", 10, "--eval-batches", 2, "--max-new-tokens", 64,
            "--device", ctx.device], ctx.log, ctx.time_left(180))
        responses = ctx.work / "runs" / f"instruct-{size}" / "responses.json"
        if responses.exists():
            results[size]["answers"] = len(json.loads(responses.read_text()))
    return results


@torch.no_grad()
def check_generate(ctx, new_tokens=256, prompt_length=16, repeats=3):
    """Greedy tokens/s at batch 1 and 16, ours and transformers', on the 124M shape, in float32
    and bfloat16 weights; and whether both chose the same tokens."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    device = torch.device(ctx.device)
    results = {}
    for dtype_name in ("float32", "bfloat16"):
        dtype = gpt.DTYPES[dtype_name]
        ours = gpt.load_model(ctx.models["124M"], device=device, dtype=dtype, quiet=True)
        theirs = AutoModelForCausalLM.from_pretrained(ctx.models["124M"], dtype=dtype).to(device).eval()
        new_tokens = min(new_tokens, ours.cfg.context_length - prompt_length)  # --quick: a short context
        for batch in (1, 16):
            prompt = torch.randint(0, ours.cfg.vocab_size, (batch, prompt_length),
                                   generator=torch.Generator().manual_seed(batch)).to(device)
            runs = {
                "ours": lambda: gpt.generate(ours, prompt, new_tokens),
                "transformers": lambda: theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                        do_sample=False, pad_token_id=0),
            }
            outputs, seconds = {}, {name: [] for name in runs}
            for name, run in runs.items():
                outputs[name] = run()  # warm-up
            for _ in range(repeats):
                for name, run in runs.items():
                    synchronize(device)
                    started = time.perf_counter()
                    run()
                    synchronize(device)
                    seconds[name].append(time.perf_counter() - started)
            speeds = {name: round(batch * new_tokens / statistics.median(s)) for name, s in seconds.items()}
            same_rows = (outputs["ours"] == outputs["transformers"]).all(dim=1).sum().item()
            results[f"{dtype_name} batch {batch}"] = dict(tokens_per_s=speeds, same_tokens_rows=f"{same_rows}/{batch}")
            print(f"generate {dtype_name} batch {batch}: {speeds} tokens/s, same tokens in {same_rows}/{batch} rows",
                  flush=True)
    return results


def check_tests(ctx):
    """test_all.py: the CUDA tests first (quick), then the rest."""
    results = {}
    for name, selection in (("cuda", "cuda"), ("others", "not cuda")):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_all.py", "-k", selection,
                   "--durations", "10"]
        started = time.time()
        try:
            done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=ctx.time_left(400))
            rc, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as e:
            rc, output = "timeout", (e.stdout or b"").decode("utf-8", "replace")
        with ctx.log.open("a", encoding="utf-8") as f:
            f.write(f"\n===== pytest -k '{selection}'\n{output}\n===== rc {rc}\n")
        summary = output.strip().splitlines()[-1] if output.strip() else ""
        results[name] = dict(rc=rc, seconds=round(time.time() - started, 1), summary=summary)
        print(f"tests ({selection}): {summary}", flush=True)
    return results


# --- The run -------------------------------------------------------------------------------


class Context:
    """What the parts share: settings, the models, the peaks, the log and the time left."""

    def __init__(self, args):
        self.args, self.device = args, args.device
        self.work = Path(args.out_dir).resolve()
        self.log = self.work / "log.txt"
        self.deadline = time.time() + args.time_limit
        self.models, self.matmul_peak = {}, None
        self.sheet_peak = gpt.peak_flops(torch.device(args.device), "bfloat16")
        shape = dict(QUICK_SHAPE) if args.quick else dict(context_length=1024)
        model = gpt.build_model(gpt.GPTConfig(**{**dataclasses.asdict(gpt.GPT_CONFIGS["gpt2"]), **shape}))
        self.flops_per_token = gpt.flops_per_token(model, shape["context_length"])

    def quick_args(self, args):
        return args if self.args.quick else []

    def time_left(self, most):
        """Seconds a part may take: at most `most`, and never past --time-limit."""
        return max(10.0, min(most, self.deadline - time.time()))


def write_models(ctx):
    """The 124M and 355M shapes with random weights (--quick: one small model for both)."""
    for size, name in (("124M", "gpt2"), ("355M", "gpt2-medium")):
        folder = ctx.work / "models" / size
        if not (folder / "model.safetensors").exists():
            cfg = gpt.GPT_CONFIGS[name]
            if ctx.args.quick:
                cfg = gpt.GPTConfig(**{**dataclasses.asdict(cfg), **QUICK_SHAPE})
            print(write_random_model(cfg, folder), flush=True)
        ctx.models[size] = folder


def environment(device):
    facts = dict(date=time.strftime("%Y-%m-%d"), python=platform.python_version(), torch=torch.__version__,
                 cuda=torch.version.cuda, device=device)
    try:
        import transformers

        facts["transformers"] = transformers.__version__
    except ImportError:
        facts["transformers"] = None
    if torch.device(device).type == "cuda":
        facts.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=round(
            torch.cuda.get_device_properties(device).total_memory / 1e9, 1), bf16=torch.cuda.is_bf16_supported())
    else:
        facts["cpu"] = platform.processor() or platform.machine()
    return facts


def summary_table(results):
    """results.md: one line per measurement."""
    lines = ["| part | what | value |", "| --- | --- | --- |"]

    def add(part, what, value):
        lines.append(f"| {part} | {what} | {value} |")

    env = results["environment"]
    add("machine", "GPU / torch / transformers", f"{env.get('gpu', env.get('cpu'))} / {env['torch']} / "
        f"{env['transformers']}")
    if results.get("matmul_peak_tflops"):
        add("matmul", "8192^3 bf16 product", f"{results['matmul_peak_tflops']} TFLOP/s")
    if "classify" in results:
        r = results["classify"]
        phases = r.get("phase_seconds", {})
        add("classify", "main job, defaults: process wall time", f"{r['seconds']} s (rc {r['rc']})")
        if phases:
            add("classify", "activation cache / training / script wall",
                f"{phases['activation_cache']:.1f} / {phases['training']:.1f} / {phases['wall']:.1f} s")
        add("classify", "peak GPU memory", f"{r['peak_gpu_gb']} GB")
    for name, r in results.get("pretrain", {}).items():
        add("pretrain", f"124M bf16 {name}: tokens/s", f"{r.get('tokens_per_s')} (rc {r['rc']})")
        add("pretrain", f"124M bf16 {name}: MFU data sheet / measured peak",
            f"{r.get('mfu_data_sheet', '-')} / {r.get('mfu_measured_peak', '-')}")
        add("pretrain", f"124M bf16 {name}: peak GPU memory", f"{r['peak_gpu_gb']} GB")
    for name, r in results.get("load", {}).items():
        add("load", f"load_gpt2.py {name}", f"{r['seconds']} s (rc {r['rc']})")
    for size, r in results.get("instruct", {}).items():
        add("instruct", f"{size}: wall time, answers", f"{r['seconds']} s, {r.get('answers')} (rc {r['rc']})")
        add("instruct", f"{size}: peak GPU memory", f"{r['peak_gpu_gb']} GB")
    for what, r in results.get("generate", {}).items():
        speeds = r["tokens_per_s"]
        ratio = speeds["ours"] / speeds["transformers"]
        add("generate", f"{what}: ours / transformers tokens/s", f"{speeds['ours']} / {speeds['transformers']} "
            f"({ratio:.2f}x), same tokens {r['same_tokens_rows']}")
    for name, r in results.get("tests", {}).items():
        add("tests", name, f"{r['summary']} ({r['seconds']} s)")
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", default="gpu-check", help="folder for results, logs, models and runs")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS, help="the parts to run")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu: with --quick, the plumbing)")
    parser.add_argument("--quick", action="store_true", help="a 2-layer model and a few steps: the plumbing only")
    parser.add_argument("--text", default=str(ROOT / "gpu_data" / "tinyshakespeare.txt"),
                        help="pretraining text (tinyshakespeare: about 338,000 tokens)")
    parser.add_argument("--instructions", default=str(ROOT / "gpu_data" / "instruction-data.json"),
                        help="the book's instruction data (the first 200 entries are used)")
    parser.add_argument("--pretrain-steps", type=int, default=60, help="optimizer steps of each pretraining run")
    parser.add_argument("--pretrain-batch-size", type=int, default=32, help="windows of 1,024 tokens per step")
    parser.add_argument("--time-limit", type=float, default=330, help="seconds for everything; later parts get "
                        "what is left")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA GPU here; --device cpu --quick checks the plumbing")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT / "testdata" / "tiktoken_cache"))
    os.environ.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

    ctx = Context(args)
    ctx.work.mkdir(parents=True, exist_ok=True)
    results_file = ctx.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}  # --only adds to a run
    results["environment"] = environment(args.device)
    print(json.dumps(results["environment"]), flush=True)
    write_models(ctx)
    if "matmul" in args.only or "pretrain" in args.only:
        n = 1024 if args.quick else 8192
        ctx.matmul_peak = measured_matmul_peak(torch.device(args.device), n)
        results["matmul_peak_tflops"] = round(ctx.matmul_peak / 1e12, 1)
        print(f"matmul: {n}^3 bfloat16 at {ctx.matmul_peak / 1e12:.1f} TFLOP/s", flush=True)
    parts = {"load": check_load, "classify": check_classify, "pretrain": check_pretrain, "instruct": check_instruct,
             "generate": check_generate, "tests": check_tests}
    for name in args.only:
        if name in parts:
            results[name] = parts[name](ctx)
            results_file.write_text(json.dumps(results, indent=2))  # a later failure keeps what is done
    (ctx.work / "results.md").write_text(summary_table(results))
    print(summary_table(results))


if __name__ == "__main__":
    main()
