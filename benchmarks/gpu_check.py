"""gpu_check.py: every GPU path of the project, run and measured on one CUDA GPU in one go.

Writes random-weight models of the GPT-2 124M and 355M shapes (as make_random_model.py
does: the compute of the released models, none of their knowledge), then runs these
parts, the scripts each in a process of its own, timed, with its peak GPU memory:

  matmul      a large bfloat16 matrix product: the GPU's measured peak, for MFU
  cuda-tests  test_all.py's test_cuda_* tests (GPU results against CPU results)
  classify    the main job, finetune_classify.py with its defaults, on testdata's SMS zip
  pretrain    pretrain.py at the 124M shape in bfloat16, without and with --compile:
              tokens/s and MFU against the data-sheet peak and against the measured one
  instruct    finetune_instruct.py for a few steps at 124M and 355M, answers included
  load        load_gpt2.py: a prompt, perplexity, the HellaSwag and MMLU samples in testdata/
  generate    greedy generation at batch 1 and 16, ours next to transformers' generate
  tests       the rest of test_all.py, on the GPU wherever a test leaves the device to "auto"

    python benchmarks/gpu_check.py --out-dir /tmp/gpu-check        # on a machine with a GPU
    python benchmarks/gpu_check.py --out-dir /tmp/gpu-check --only load generate tests   # more
    python benchmarks/gpu_check.py --device cpu --quick --only classify pretrain instruct generate
                                                                     # the plumbing, on a CPU

Parts run in that order until --time-limit; a part that has no time left, or fails, is
recorded as such and the next one runs. A second call with --only adds to the same
results. --quick swaps in a 2-layer model and a few steps to check the plumbing: its
numbers mean nothing. The pretraining text (tinyshakespeare) and the book's instruction data
are read from gpu_data/ beside the scripts when they are there (a machine without internet),
else downloaded once and checked (--text and --instructions take other files).

Writes into --out-dir: results.json (every number), results.md (a table), log.txt (what
every process printed), and the models and runs it made (gigabytes: keep --out-dir out of
any folder that is copied back).
"""

import dataclasses
import json
import os
import platform
import re
import runpy
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's top level
sys.path.insert(0, str(ROOT / "benchmarks"))
import finetune_instruct  # noqa: E402
import gpt  # noqa: E402
import pretrain  # noqa: E402
from make_random_model import write_random_model  # noqa: E402

PARTS = ["matmul", "cuda-tests", "classify", "pretrain", "instruct", "load", "generate", "tests"]
# A 2-layer model of GPT-2's vocabulary for --quick: the same code paths, seconds of work.
QUICK_SHAPE = dict(n_layers=2, n_heads=2, emb_dim=64, context_length=128)
# The two data files: (name in gpu_data/, where they are published, size in bytes, SHA-256).
DATA = {
    "--text": ("tinyshakespeare.txt", "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
               "tinyshakespeare/input.txt", 1115394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    "--instructions": ("instruction-data.json", finetune_instruct.DATA_URL, finetune_instruct.DATA_SIZE,
                       finetune_instruct.DATA_SHA256),
}


def data_file(flag, given):
    """The file of --text or --instructions: the one given, else the copy in gpu_data/, else
    the published file, downloaded once into the cache and checked."""
    name, url, size, sha256 = DATA[flag]
    if given is not None:
        return gpt.existing_file(given, flag)
    if (ROOT / "gpu_data" / name).is_file():
        return ROOT / "gpu_data" / name
    return gpt.fetch_dataset([url], name, flag=flag, size=size, sha256=sha256)


class OutOfTime(Exception):
    """Raised when less time is left than a part (or a piece of one) needs."""


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- Each script in a process of its own ---------------------------------------------------


def run_script(script, args, ctx, timeout):
    """Run `python script args` (through this file's --child mode, which records the peak GPU
    memory) -> (dict(rc, seconds, peak_gpu_gb), its output); the output goes into the log too."""
    memory_file = ctx.work / "peak-memory.txt"
    memory_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", str(memory_file), str(ROOT / script), *map(str, args)]
    rc, output, seconds = run_logged(command, ctx, timeout, title=f"{script} {' '.join(map(str, args))}")
    peak = float(memory_file.read_text()) if memory_file.exists() else None
    print(f"{script}: rc {rc}, {seconds:.1f} s" + (f", peak GPU memory {peak:.2f} GB" if peak else ""), flush=True)
    return dict(rc=rc, seconds=round(seconds, 2), peak_gpu_gb=peak), output


def run_logged(command, ctx, timeout, title=None):
    """Run command in the repository, stopped after timeout seconds -> (exit status or "timeout",
    output, seconds). The output is appended to the log under `title` (default: the command)."""
    started = time.time()
    try:
        done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        rc, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as e:
        rc, output = "timeout", (e.stdout or b"").decode("utf-8", "replace") + f"\n[stopped after {timeout:.0f} s]"
    seconds = time.time() - started
    with ctx.log.open("a", encoding="utf-8") as f:
        f.write(f"\n===== {title or ' '.join(command)}\n{output}\n===== rc {rc}, {seconds:.1f} s\n")
    return rc, output, seconds


def child(memory_file, script, *args):
    """Run script as __main__ with args; on exit write its peak GPU memory (GB) to memory_file."""
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            Path(memory_file).write_text(f"{torch.cuda.max_memory_allocated() / 1e9:.3f}")


# --- The parts: each fills its dict of results ---------------------------------------------


def check_matmul(ctx, out, repeats=100):
    """FLOP/s of an n x n x n bfloat16 matrix product, the mean of `repeats` after warm-ups
    (100 products of 8192: about 0.15 s on an H100, long enough for steady clocks)."""
    device, n = torch.device(ctx.device), 256 if ctx.args.quick else 8192  # --quick: bfloat16 on a CPU crawls
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(10):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    ctx.matmul_peak = 2 * n**3 * repeats / (time.perf_counter() - started)
    out.update(n=n, tflops=round(ctx.matmul_peak / 1e12, 1))
    print(f"matmul: {n}^3 bfloat16 at {ctx.matmul_peak / 1e12:.1f} TFLOP/s", flush=True)


def check_tests(ctx, out, selection, most):
    """pytest on test_all.py for the tests that -k `selection` picks."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_all.py", "-k", selection,
               "--durations", "10"]
    rc, output, seconds = run_logged(command, ctx, ctx.time_left(most, least=60))
    summary = next((line for line in reversed(output.splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)), "")
    out.update(rc=rc, seconds=round(seconds, 1), summary=summary.strip("= "))
    print(f"tests -k '{selection}': {out['summary']}", flush=True)


def check_classify(ctx, out):
    """The main job with its defaults on the 124M shape, on the real SMS data."""
    out_dir = ctx.work / "runs" / "classify"
    data = ROOT / "testdata" / "sms+spam+collection.zip"
    argv = ["--model", ctx.models["124M"], "--data", data, "--out-dir", out_dir, "--overwrite", "--device", ctx.device]
    result, _ = run_script("finetune_classify.py", argv + ctx.quick_args(["--max-steps", "10"]), ctx,
                           ctx.time_left(300, least=60))
    out.update(result)
    metrics_file = out_dir / "metrics.json"
    if result["rc"] == 0 and metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        out.update(phase_seconds=metrics["seconds"], test_accuracy=metrics["test"]["accuracy"])


def check_pretrain(ctx, out):
    """pretrain.py from scratch at the 124M shape in bfloat16, eager and compiled: the same steps."""
    if ctx.args.quick:
        shape = ["--n-layers", 2, "--n-heads", 2, "--emb-dim", 64, "--context-length", 128]
        steps, batch_size, dtype = 10, 4, "float32"  # bfloat16 crawls on most CPUs
    else:
        shape = ["--size", "gpt2", "--context-length", 1024]
        steps, batch_size, dtype = ctx.args.pretrain_steps, ctx.args.pretrain_batch_size, "bfloat16"
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        # --eval-batches 1: one batch shape in evaluation too, so that --compile compiles no third graph.
        result, output = run_script("pretrain.py", [
            "--data", ctx.args.text, "--cache-dir", ctx.work,
            "--out-dir", ctx.work / "runs" / f"pretrain-{name}", "--overwrite", *shape,
            "--batch-size", batch_size, "--max-steps", steps, "--epochs", 1000, "--log-every", max(1, steps // 5),
            "--eval-every", 10 * steps, "--eval-batches", 1, "--sample-tokens", 20,
            "--dtype", dtype, "--device", ctx.device, *extra], ctx, ctx.time_left(300, least=90))
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
        out[name] = result


def check_instruct(ctx, out):
    """finetune_instruct.py: a few steps and the test split's answers, at 124M and 355M."""
    entries = json.loads(Path(ctx.args.instructions).read_text(encoding="utf-8"))
    data = ctx.work / "instructions-200.json"
    data.write_text(json.dumps(entries[:200]))  # 170 train, 20 test, 10 validation
    for size in ("124M", "355M"):
        run_dir = ctx.work / "runs" / f"instruct-{size}"
        out[size], _ = run_script("finetune_instruct.py", [
            "--model", ctx.models[size], "--data", data, "--out-dir", run_dir, "--overwrite",
            "--max-steps", 5 if ctx.args.quick else 20, "--eval-every", 10, "--eval-batches", 2,
            "--num-answers", 20, "--max-new-tokens", 64, "--device", ctx.device], ctx, ctx.time_left(180, least=45))
        if (run_dir / "responses.json").exists():
            out[size]["answers"] = len(json.loads((run_dir / "responses.json").read_text()))


def check_load(ctx, out):
    """load_gpt2.py on the GPU: try the model, then measure it, in float32 and in bfloat16."""
    text = ctx.work / "text-100k.txt"
    text.write_text(Path(ctx.args.text).read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    mmlu = ctx.work / "mmlu.tar"  # testdata/mmlu packed as MMLU's data.tar, the one form --benchmark-file reads
    with tarfile.open(mmlu, "w") as archive:
        archive.add(ROOT / "testdata" / "mmlu" / "data", arcname="data")
    for dtype in ("float32", "bfloat16"):
        common = ["--model", ctx.models["124M"], "--device", ctx.device, "--dtype", dtype]
        for name, extra in (("prompt", ["--prompt", "Every effort moves you", "--max-new-tokens", 50]),
                            ("perplexity", ["--perplexity", text]),
                            ("hellaswag", ["--benchmark", "hellaswag", "--benchmark-file",
                                           ROOT / "testdata" / "hellaswag_tiny.jsonl"]),
                            ("mmlu", ["--benchmark", "mmlu", "--benchmark-file", mmlu])):
            out[f"{name} {dtype}"], _ = run_script("load_gpt2.py", common + extra, ctx, ctx.time_left(60))


@torch.no_grad()
def check_generate(ctx, out, new_tokens=256, prompt_length=16, repeats=2):
    """Greedy tokens/s at batch 1 and 16, ours and transformers', on the 124M shape, in float32
    and bfloat16 weights; and in how many rows both chose the same tokens."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    device = torch.device(ctx.device)
    for dtype_name in ("float32", "bfloat16"):
        dtype = gpt.DTYPES[dtype_name]
        ours, _ = gpt.load(ctx.models["124M"], device=device, dtype=dtype, quiet=True)
        theirs = AutoModelForCausalLM.from_pretrained(ctx.models["124M"], dtype=dtype).to(device).eval()
        theirs.generation_config.eos_token_id = None  # no early stop, as ours without eot_id: every row runs to the end
        new_tokens = min(new_tokens, ours.cfg.context_length - prompt_length)  # --quick: a short context
        for batch in (1, 16):
            ctx.time_left(0, least=30)  # raises OutOfTime when there is too little left
            prompt = torch.randint(0, ours.cfg.vocab_size, (batch, prompt_length),
                                   generator=torch.Generator().manual_seed(batch)).to(device)
            runs = {
                "ours": lambda: gpt.generate(ours, prompt, new_tokens),
                "transformers": lambda: theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                        max_new_tokens=new_tokens, do_sample=False, pad_token_id=0),
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
            out[f"{dtype_name} batch {batch}"] = dict(tokens_per_s=speeds, same_tokens_rows=f"{same_rows}/{batch}")
            print(f"generate {dtype_name} batch {batch}: {speeds} tokens/s, same tokens in {same_rows}/{batch} rows",
                  flush=True)


# --- The run -------------------------------------------------------------------------------


class Context:
    """What the parts share: settings, the models, the peaks, the log and the time left."""

    def __init__(self, args):
        self.args, self.device = args, args.device
        self.work = Path(args.out_dir).resolve()
        self.log = self.work / "log.txt"
        self.deadline = time.time() + args.time_limit
        self.models, self.matmul_peak = {}, None
        shape = dict(QUICK_SHAPE) if args.quick else dict(context_length=1024)
        model = gpt.build_model(gpt.GPTConfig(**{**dataclasses.asdict(gpt.GPT_CONFIGS["gpt2"]), **shape}))
        speed = pretrain.Throughput(model, shape["context_length"], 1, torch.device(args.device), "bfloat16")
        self.sheet_peak, self.flops_per_token = speed.peak, speed.flops_per_token

    def quick_args(self, args):
        return args if self.args.quick else []

    def time_left(self, most, least=20):
        """Seconds a piece of work may take: at most `most`, never past --time-limit. Raises
        OutOfTime when fewer than `least` seconds are left."""
        left = self.deadline - time.time()
        if left < least:
            raise OutOfTime(f"skipped: {max(left, 0):.0f} s of --time-limit left, {least} s needed")
        return min(most, left)


def write_models(ctx):
    """The 124M and 355M shapes with random weights (--quick: one small shape for both)."""
    for size, name in (("124M", "gpt2"), ("355M", "gpt2-medium")):
        folder = ctx.work / "models" / size
        if not (folder / "model.safetensors").exists():
            cfg = gpt.GPT_CONFIGS[name]
            if ctx.args.quick:
                cfg = dataclasses.replace(cfg, **QUICK_SHAPE)
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
        properties = torch.cuda.get_device_properties(device)
        facts.update(gpu=properties.name, gpu_memory_gb=round(properties.total_memory / 1e9, 1),
                     bf16=torch.cuda.is_bf16_supported())
    else:
        facts["cpu"] = platform.processor() or platform.machine()
    return facts


def summary_table(results):
    """results.md: a line per measurement, a part that did not run with its reason."""
    lines = ["| part | what | value |", "| --- | --- | --- |"]
    env = results["environment"]
    lines.append(f"| machine | GPU / torch / transformers | {env.get('gpu', env.get('cpu'))} / {env['torch']} / "
                 f"{env['transformers']} |")
    for part in PARTS:
        for what, value in rows(part, results.get(part)):
            lines.append(f"| {part} | {what} | {value} |")
    return "\n".join(lines) + "\n"


def rows(part, r):
    """(what, value) lines of one part's results; last, why it did not run (or not to the end)."""
    if r is None:
        return []
    reason = [("not run", r["not run"])] if "not run" in r else []
    r = {key: value for key, value in r.items() if key != "not run"}
    if not r:
        return reason
    if part == "matmul":
        return [(f"{r['n']}^3 bfloat16 product", f"{r['tflops']} TFLOP/s")]
    if part in ("cuda-tests", "tests"):
        return [("pytest", f"{r['summary']} ({r['seconds']} s, rc {r['rc']})")]
    if part == "classify":
        found = [("main job, defaults: process wall time", f"{r['seconds']} s (rc {r['rc']})"),
                 ("peak GPU memory", f"{r['peak_gpu_gb']} GB")]
        if "phase_seconds" in r:
            phases = r["phase_seconds"]
            found.append(("activation cache / training / whole run, as the script timed them",
                          f"{phases['activation_cache']:.1f} / {phases['training']:.1f} / {phases['wall']:.1f} s"))
        return found
    if part == "pretrain":
        found = [(f"124M bf16 {name}: tokens/s, MFU data sheet / measured peak, peak memory",
                  f"{s.get('tokens_per_s')}, {s.get('mfu_data_sheet', '-')} / {s.get('mfu_measured_peak', '-')}, "
                  f"{s['peak_gpu_gb']} GB (rc {s['rc']})") for name, s in r.items()]
    elif part == "instruct":
        found = [(f"{size}: wall time, answers, peak memory",
                  f"{s['seconds']} s, {s.get('answers')}, {s['peak_gpu_gb']} GB (rc {s['rc']})")
                 for size, s in r.items()]
    elif part == "load":
        found = [(f"load_gpt2.py {name}", f"{s['seconds']} s (rc {s['rc']})") for name, s in r.items()]
    else:  # generate
        found = [(f"{what}: ours / transformers tokens/s",
                  f"{s['tokens_per_s']['ours']} / {s['tokens_per_s']['transformers']} "
                  f"({s['tokens_per_s']['ours'] / s['tokens_per_s']['transformers']:.2f}x), "
                  f"same tokens {s['same_tokens_rows']}") for what, s in r.items()]
    return found + reason


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    parser = gpt.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="/tmp/gpu-check", help="folder for results, logs, models and runs")
    parser.add_argument("--only", nargs="+", choices=PARTS, metavar="PART",
                        help=f"the parts to run, in this order: {', '.join(PARTS)} (default: all)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N (cpu: with --quick, the plumbing)")
    parser.add_argument("--quick", action="store_true", help="a 2-layer model and a few steps: the plumbing only")
    parser.add_argument("--text", help="pretraining text (default: tinyshakespeare, about 338,000 tokens)")
    parser.add_argument("--instructions", help="instruction data, of which the first 200 entries are used "
                        "(default: the book's)")
    parser.add_argument("--pretrain-steps", type=int, default=60, help="optimizer steps of each pretraining run")
    parser.add_argument("--pretrain-batch-size", type=int, default=32, help="windows of 1,024 tokens per step")
    parser.add_argument("--time-limit", type=float, default=360, help="seconds for all parts")
    args = parser.parse_args()
    args.only = args.only or PARTS
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA GPU here; --device cpu --quick checks the plumbing")
    try:
        args.text, args.instructions = data_file("--text", args.text), data_file("--instructions", args.instructions)
    except (OSError, RuntimeError) as e:
        sys.exit(f"gpu_check.py: error: {e}")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT / "testdata" / "tiktoken_cache"))
    os.environ.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

    ctx = Context(args)
    ctx.work.mkdir(parents=True, exist_ok=True)
    results_file = ctx.work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}  # --only adds to a run
    results["environment"] = environment(args.device)
    print(json.dumps(results["environment"]), flush=True)
    write_models(ctx)
    if "pretrain" in args.only and "matmul" not in args.only and "matmul" in results:
        ctx.matmul_peak = results["matmul"].get("tflops", 0) * 1e12 or None  # from an earlier call
    parts = {"matmul": check_matmul, "cuda-tests": lambda ctx, out: check_tests(ctx, out, "cuda", 240),
             "classify": check_classify, "pretrain": check_pretrain, "instruct": check_instruct,
             "load": check_load, "generate": check_generate,
             "tests": lambda ctx, out: check_tests(ctx, out, "not cuda", 600)}
    for name in [part for part in PARTS if part in args.only]:
        results[name] = out = {}
        try:
            parts[name](ctx, out)
        except OutOfTime as e:  # what the part finished stays in out
            out["not run"] = str(e)
        except Exception as e:  # one part's failure must not cost the other parts their numbers
            out["not run"] = f"failed: {type(e).__name__}: {e}"
            with ctx.log.open("a", encoding="utf-8") as f:
                f.write(f"\n===== {name} failed\n{traceback.format_exc()}")
        print(f"{name}: {out.get('not run', 'done')}", flush=True)
        results_file.write_text(json.dumps(results, indent=2))  # what is done survives a later failure
    (ctx.work / "results.md").write_text(summary_table(results))
    print(summary_table(results))


if __name__ == "__main__":
    main()
