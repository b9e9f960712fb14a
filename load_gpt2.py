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
    python load_gpt2.py --model runs/instruct/model.pt --export-hf out/   # for transformers

Prints the model, where its weights are and the load time, then the prompt and its
continuation. Writes only the weights cache (--cache-dir; an existing Hugging Face cache,
$HF_HUB_CACHE or $HF_HOME/hub, is used as is; $HF_ENDPOINT names a mirror) and --export-hf.
"""

import argparse
import os
import time
from pathlib import Path

import gpt


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
            print(text[len(printed) :], end="", flush=True)
            printed = text

    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    gpt.generate(model, prompt_ids, args.max_new_tokens, on_token=print_token, **options)
    print(gpt.token_ids_to_text(new_ids)[len(printed) :])


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=gpt.HelpFormatter)
    p.add_argument("--model", default="gpt2", help=f"{', '.join(gpt.GPT_CONFIGS)}, a .safetensors file, a model folder or a checkpoint (.pt)")
    p.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    p.add_argument("--max-new-tokens", type=gpt.non_negative_int, default=50, help="number of tokens to generate")
    p.add_argument("--temperature", type=gpt.non_negative_float, default=0.0, help="0 = greedy; higher = more random")
    p.add_argument("--top-k", type=gpt.positive_int, help="sample only from the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=gpt.probability, help="sample from the smallest set reaching probability p (default: all)")
    p.add_argument("--seed", type=gpt.seed, help="seed for reproducible sampling (default: a fresh one each run)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=list(gpt.DTYPES), help="precision of the weights and the computation")
    p.add_argument("--cache-dir", default=str(gpt.cache_dir()), help="folder for downloaded weights ($GPT_CACHE_DIR)")
    p.add_argument("--download-only", action="store_true", help="download the weights of a released size into the cache and exit")
    p.add_argument("--export-hf", metavar="FOLDER", help="write --model as a Hugging Face model folder in --dtype and exit (default: none: generate)")
    p.add_argument("--overwrite", action="store_true", help="let --export-hf replace an earlier export (a folder holding model.safetensors)")
    return p


@gpt.command_line(memory_hint="use a smaller --model, or --dtype bfloat16")
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("--prompt is empty: give at least one character of text to continue")
    if args.download_only and args.model not in gpt.GPT_CONFIGS:
        parser.error(f"--download-only needs one of {', '.join(gpt.GPT_CONFIGS)}, got {args.model!r}")
    os.environ["GPT_CACHE_DIR"] = args.cache_dir  # where gpt.cache_dir() looks
    device = gpt.pick_device(args.device)
    if args.download_only:
        print(f"weights of {args.model} are in {gpt.download_gpt2(args.model)}")
        return
    if args.export_hf:
        folder = gpt.export_hf(args.model, args.export_hf, dtype=gpt.DTYPES[args.dtype], overwrite=args.overwrite)
        print(f"exported {args.model} ({args.dtype}) to {folder}, a folder that transformers reads")
        return
    prompt_ids = gpt.text_to_token_ids(args.prompt, device=device)  # before the load: cheap, and fails fast

    started = time.time()
    model = gpt.load_gpt2(args.model, device=device, dtype=gpt.DTYPES[args.dtype])
    load_seconds = time.time() - started
    gpt.check_vocabulary(model, f"--model {args.model}")
    print(gpt.model_summary(model, args.model))
    released = args.model in gpt.GPT_CONFIGS and not Path(args.model).exists()
    print(f"weights: {gpt.download_gpt2(args.model) if released else args.model}")
    print(f"load time: {load_seconds:.2f} s on {device}, {args.dtype}")
    print("-" * 80)
    print(args.prompt, end="", flush=True)
    stream_continuation(model, prompt_ids, args)


if __name__ == "__main__":
    main()
