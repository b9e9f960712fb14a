"""load_gpt2.py: get the released GPT-2 weights and try them.

Stage 1 of the lifecycle. Downloads OpenAI's GPT-2 from the Hugging Face Hub (once;
later runs read the cache), loads it into the model of gpt.py and continues a prompt,
printing the tokens as they are generated.

    python load_gpt2.py                                  # gpt2 (124M), greedy
    python load_gpt2.py --model gpt2-medium --prompt "The meaning of life is" \
        --temperature 0.8 --top-k 50 --seed 1
    python load_gpt2.py --model path/to/model.safetensors   # offline: a local file
    python load_gpt2.py --model runs/pretrain/best.pt       # a checkpoint of pretrain.py
    python load_gpt2.py --download-only --model gpt2-xl

Prints the parameter count, the load time and where the weights are cached, then the
prompt and its continuation. Writes nothing but the weights cache (see gpt.cache_dir:
--cache-dir, else $GPT_CACHE_DIR, else ~/.cache/gpt2-lifecycle; an existing Hugging
Face cache, $HF_HUB_CACHE or $HF_HOME/hub, is used as is; $HF_ENDPOINT names a mirror).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

import gpt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Load pretrained GPT-2 weights and generate a continuation of a prompt.",
        formatter_class=gpt.HelpFormatter,
    )
    parser.add_argument("--model", default="gpt2",
                        help=f"one of {', '.join(gpt.GPT_CONFIGS)}, a local .safetensors file, or a checkpoint (.pt) of this project")
    parser.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="number of tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more random sampling")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set of tokens whose probability reaches p (default: all)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling (default: a fresh one each run)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="precision of the weights and the computation")
    parser.add_argument("--cache-dir", default=str(gpt.cache_dir()),
                        help="folder for downloaded weights; the default comes from $GPT_CACHE_DIR, else ~/.cache/gpt2-lifecycle")
    parser.add_argument("--download-only", action="store_true", help="download the weights into the cache and exit")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.temperature >= 0:  # written so that nan fails too
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        parser.error("--prompt is empty: give at least one character of text to continue")
    return args


def weights_location(name_or_path):
    """Where the weights of --model are on disk: the file itself, or the cached download."""
    if name_or_path in gpt.GPT_CONFIGS and not Path(name_or_path).exists():
        return gpt.find_in_hf_cache(name_or_path) or gpt.gpt2_weights_path(name_or_path)
    return Path(name_or_path)


def stream_continuation(model, prompt_ids, args):
    """Generate after prompt_ids [1, n], printing each token's text as soon as it comes.

    A token can end in the middle of a multi-byte character, so the text printed is the
    decoded text so far minus what was already printed.
    """
    new_ids, printed = [], ""

    def print_token(token):
        nonlocal printed
        new_ids.append(token.item())
        text = gpt.token_ids_to_text(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a split character
            print(text[len(printed):], end="", flush=True)
            printed = text

    gpt.generate(
        model, prompt_ids, args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, on_token=print_token,
    )
    print(gpt.token_ids_to_text(new_ids)[len(printed):])


def main(argv=None):
    args = parse_args(argv)
    os.environ["GPT_CACHE_DIR"] = args.cache_dir  # where gpt.cache_dir() looks
    try:
        device = gpt.pick_device(args.device)
        if args.download_only:
            if args.model not in gpt.GPT_CONFIGS:
                raise ValueError(f"--download-only needs one of {', '.join(gpt.GPT_CONFIGS)}, got {args.model!r}")
            print(f"weights of {args.model} are in {gpt.download_gpt2(args.model)}")
            return
        prompt_ids = gpt.text_to_token_ids(args.prompt, device=device)  # before the load: cheap, and fails fast

        started = time.time()
        model = gpt.load_gpt2(args.model, device=device, dtype=DTYPES[args.dtype])
        load_seconds = time.time() - started
        cfg = model.cfg
        if prompt_ids.max().item() >= cfg.vocab_size:
            raise ValueError(f"the prompt has token ids up to {prompt_ids.max().item()}, but the model's vocabulary "
                             f"has only {cfg.vocab_size} tokens; use a model trained with the GPT-2 tokenizer")
        print(f"model:      {args.model} ({gpt.count_parameters(model) / 1e6:.1f}M parameters: {cfg.n_layers} layers, "
              f"{cfg.n_heads} heads, embedding dimension {cfg.emb_dim}, context length {cfg.context_length})")
        print(f"weights:    {weights_location(args.model)}")
        print(f"load time:  {load_seconds:.2f} s on {device}, {args.dtype}")
        print("-" * 80)
        print(args.prompt, end="", flush=True)
        stream_continuation(model, prompt_ids, args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C; an interrupted download keeps its partial file and resumes next time
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
