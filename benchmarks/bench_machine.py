"""bench_machine.py: will it run on my machine? Memory and time of inference, LoRA and full fine-tuning.

    python benchmarks/bench_machine.py                          # GPT-2 124M and 355M, SmolLM2-135M, on the CPU
    python benchmarks/bench_machine.py --models gpt2 --steps 1 --new-tokens 10   # a quick look
    python benchmarks/bench_machine.py --device cuda --models gpt2-xl Qwen/Qwen3-0.6B-Base

Each model of --models (names of gpt.MODEL_CONFIGS) is built with random weights in float32 (the
compute of the released model, no download) and measured three ways, each in a fresh process, so
that its peak resident memory (ru_maxrss) is that case's alone:

- inference: greedy generation of --new-tokens tokens after an 8-token prompt, batch 1, with the
              key/value cache (gpt.generate), after one warm-up: tokens/s
- LoRA:       a training step of finetune_instruct.py --lora (gpt.add_lora with the default rank 16
              and alpha 16, gpt.make_adamw over the adapters, gpt.next_token_loss) at --batch-size x
              --seq-len tokens: seconds per step, the median of --steps after one warm-up
- full:       the same step with every weight trained (AdamW's two moments per weight)

With --device cuda the memory is torch's peak allocation on the GPU. Then, for every preset of
gpt.MODEL_CONFIGS, the memory computed from its parameter count, with the bytes per parameter
stated. Prints Markdown tables for the README, with the date, the machine and the command.
"""

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt  # noqa: E402

CASES = ("inference", "lora", "full")
DEFAULT_MODELS = ["gpt2", "gpt2-medium", "HuggingFaceTB/SmolLM2-135M"]
LORA = dict(rank=gpt.FLAGS["lora_rank"]["default"], alpha=gpt.FLAGS["lora_alpha"]["default"])


def parse_args():
    parser = gpt.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(gpt.MODEL_CONFIGS), default=DEFAULT_MODELS,
                        metavar="NAME", help="the shapes to measure (names of gpt.MODEL_CONFIGS)")
    parser.add_argument("--new-tokens", type=gpt.positive_int, default=50, help="tokens to generate")
    gpt.add_flags(parser, "batch_size", "device", device=("cpu", "this machine's processor"))
    parser.add_argument("--seq-len", type=gpt.positive_int, default=128, help="tokens per training sequence")
    parser.add_argument("--steps", type=gpt.positive_int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--case", nargs=2, metavar=("CASE", "NAME"), help=argparse.SUPPRESS)  # one case, in a child
    return parser.parse_args()


def peak_memory(device):
    """Peak bytes of this process so far: resident memory on the CPU (ru_maxrss: KiB on Linux, bytes on
    macOS), torch's peak allocation on a CUDA GPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def synchronized_time(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_case(case, name, args):
    """Measure one case -> {"rate": tokens/s or s/step, "peak": bytes}."""
    device = gpt.pick_device(args.device)
    torch.manual_seed(0)
    model = gpt.build_model(gpt.MODEL_CONFIGS[name]).to(device)
    if case == "inference":
        prompt = torch.randint(0, model.cfg.vocab_size, (1, 8), device=device)
        gpt.generate(model, prompt, 2)  # warm-up
        started = synchronized_time(device)
        gpt.generate(model, prompt, args.new_tokens)
        return {"rate": args.new_tokens / (synchronized_time(device) - started), "peak": peak_memory(device)}
    if case == "lora":
        gpt.add_lora(model, **LORA)
    model.train()
    optimizer = gpt.make_adamw(model, gpt.FLAGS["lr"]["default"], gpt.FLAGS["weight_decay"]["default"])
    inputs = torch.randint(0, model.cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    times = []
    for _ in range(1 + args.steps):  # the step of finetune_instruct.py's loop
        started = synchronized_time(device)
        loss = gpt.next_token_loss(model(inputs[:, :-1]), inputs[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(synchronized_time(device) - started)
    return {"rate": statistics.median(times[1:]), "peak": peak_memory(device)}


def measure_in_child(case, name, argv):
    """Run one case in a fresh Python process -> a table cell: "rate, peak memory", or why it failed (a process
    out of memory is killed: exit code -9)."""
    command = [sys.executable, __file__, *argv, "--case", case, name]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{case} of {name} failed (exit code {out.returncode}):\n{out.stderr}", file=sys.stderr)
        return f"failed (exit code {out.returncode})"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rate = f"{result['rate']:.1f} tokens/s" if case == "inference" else f"{result['rate']:.2f} s"
    return f"{rate}, {result['peak'] / 1e9:.2f} GB"


def parameter_counts(name):
    """(all parameters, LoRA adapters' parameters) of a preset, counted on torch's meta device (no memory)."""
    with torch.device("meta"):
        model = gpt.build_model(gpt.MODEL_CONFIGS[name])
        total = gpt.count_parameters(model)
        return total, gpt.count_parameters(gpt.add_lora(model, **LORA), trainable_only=True)


def machine():
    """"AMD EPYC, 2 cores, 25 GB RAM, torch 2.x (2 threads), python 3.x", the CPU's name from /proc/cpuinfo."""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 if hasattr(os, "sysconf") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GB RAM, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")


def measured_table(args, argv):
    """Measure every case of every model, each in its own process, and print the table."""
    device = gpt.pick_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    print(f"\n## Measured on the {where}, float32\n")
    print(f"| model | parameters | inference: tokens/s, peak memory | LoRA step ({args.batch_size} x {args.seq_len}): "
          f"s, peak memory | full fine-tuning step: s, peak memory |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.models:
        cells = [measure_in_child(case, name, argv) for case in CASES]
        print(f"| {name} | {parameter_counts(name)[0] / 1e6:.0f}M | " + " | ".join(cells) + " |", flush=True)


def computed_table():
    """Print the memory of every preset from its parameter count, before activations and framework overhead."""
    print("\n## Computed from the parameter count (before activations and torch's own memory)\n")
    print("- inference: the weights, params x 4 bytes in float32, x 2 in bfloat16 (+ the key/value cache, small at "
          "batch 1)")
    print(f"- LoRA (rank {LORA['rank']}): the frozen weights x 4 bytes (float32, as the scripts train) + the adapters "
          "x 16 bytes (weight 4, gradient 4, AdamW's two moments 8)")
    print("- full fine-tuning with AdamW: params x 16 bytes (float32 weight 4 + gradient 4 + two moments 8); "
          "--dtype bfloat16 (autocast) keeps float32 weights: the same\n")
    print("| model | parameters | inference float32 | inference bfloat16 | LoRA | full fine-tuning |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in gpt.MODEL_CONFIGS:
        total, adapters = parameter_counts(name)
        sizes = (total * 4, total * 2, total * 4 + adapters * 16, total * 16)
        print(f"| {name} | {total / 1e6:.0f}M | " + " | ".join(f"{size / 1e9:.2f} GB" for size in sizes) + " |")


def main():
    args = parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case, args)))
        return
    try:
        gpt.pick_device(args.device)
    except ValueError as error:
        raise SystemExit(f"bench_machine.py: {error}")
    argv = sys.argv[1:]
    started = time.perf_counter()
    print(f"# {time.strftime('%Y-%m-%d')}, {machine()}")
    print(f"`{shlex.join(['python', 'benchmarks/bench_machine.py', *argv])}`; a process with torch imported: "
          f"{peak_memory(torch.device('cpu')) / 1e9:.2f} GB resident, included in every CPU figure")
    measured_table(args, argv)
    computed_table()
    print(f"\n(each measurement in a fresh process; training: median of {args.steps} steps after one warm-up; "
          f"{time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
