"""make_random_model.py: a model folder of a released shape with random weights, for measuring offline.

    python benchmarks/make_random_model.py gpt2 gpt2-124M-random
    python benchmarks/make_random_model.py HuggingFaceTB/SmolLM2-135M smollm2-135M-random

Writes what `transformers`' `save_pretrained` writes (config.json, model.safetensors) for a
model of the named shape (a key of gpt.MODEL_CONFIGS) with random weights: the same compute
as the released model, none of its knowledge. Every script's `--model` accepts the folder.
A Llama-family folder also gets a stand-in tokenizer.json of the model's vocabulary size:
GPT-2's byte-level BPE cut to its first vocab_size - 1 tokens (ids follow the merge order,
so the cut is a valid tokenizer), `<|endoftext|>` as the last id, and SmolLM2's
pre-tokenizer (single digits, then byte-level splitting). Models with more ids than GPT-2's
50,257 keep GPT-2's tokens and leave the rest unused. Needs the test requirements
(transformers, tokenizers).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt  # noqa: E402


def standin_tokenizer(vocab_size, folder):
    """Write tokenizer.json and tokenizer_config.json: GPT-2's BPE cut to vocab_size ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    gpt2_files = gpt.hf_tokenizer_files(gpt.get_tokenizer())  # GPT-2's vocab.json and merges.txt, as bytes
    vocab = json.loads(gpt2_files["vocab.json"])
    merges = [tuple(line.split(" ")) for line in gpt2_files["merges.txt"].decode("utf-8").splitlines()[1:] if line]
    size = min(vocab_size, len(vocab)) - 1  # the last id is the end-of-text token
    kept = {token: i for token, i in vocab.items() if i < size}
    kept_merges = [merge for merge in merges if "".join(merge) in kept]
    tokenizer = Tokenizer(models.BPE(kept, kept_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return size


def write_random_model(cfg, folder, seed=0):
    """Write a `transformers` model folder of shape cfg (a gpt.GPTConfig) with random weights
    (seed), and for the Llama family a stand-in tokenizer. -> a line saying what was written."""
    import transformers

    torch.manual_seed(seed)
    folder = Path(folder)
    if cfg.family == "gpt2":
        config = transformers.GPT2Config(**gpt.hf_config(cfg))
        transformers.GPT2LMHeadModel(config).save_pretrained(folder)
        return f"{folder}: random weights"
    folder.mkdir(parents=True, exist_ok=True)
    eot_id = standin_tokenizer(cfg.vocab_size, folder)
    config = {**gpt.hf_config(cfg), "eos_token_id": eot_id}
    config = transformers.AutoConfig.for_model(**config)  # the family's class, by config.json's model_type
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return f"{folder}: random weights, stand-in tokenizer of {eot_id + 1} ids"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=list(gpt.MODEL_CONFIGS), help="the shape to copy")
    parser.add_argument("out_dir", help="the folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    print(write_random_model(gpt.MODEL_CONFIGS[args.model], args.out_dir, args.seed) + f", {args.model} shape")


if __name__ == "__main__":
    main()
