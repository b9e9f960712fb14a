"""test_all.py: the tests of every stage, offline and on the CPU.

    python -m pytest -q test_all.py

Sections follow the lifecycle: the core (gpt.py: agreement with Hugging Face
transformers, generation, weight loading, downloads), load_gpt2.py, pretrain.py,
finetune_classify.py, finetune_instruct.py. Downloads are tested against a local HTTP
server on 127.0.0.1 that the tests start; nothing touches the network.
"""

import hashlib
import http.server
import json
import struct
import threading
from pathlib import Path

import pytest
import torch

import gpt

# ========================================================================================
# Shared fixtures
# ========================================================================================


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


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=2)
    cfg.update(overrides)
    return gpt.GPTModel(gpt.GPTConfig(**cfg)).eval()


class FileServer:
    """A local HTTP server for download tests: serves `files` {url path: bytes} with
    Range support; records request headers; can cut the first response short."""

    def __init__(self, files, headers=None, cut_after=None):
        self.files, self.extra_headers, self.cut_after = files, headers or {}, cut_after
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.respond(body=False)

            def do_GET(self):
                self.respond(body=True)

            def respond(self, body):
                server.requests.append((self.command, self.path, dict(self.headers)))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if "Range" in self.headers:
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                for key, value in server.extra_headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                if server.cut_after is not None:  # simulate a dropped connection, once
                    payload, server.cut_after = payload[: server.cut_after], None
                    self.wfile.write(payload)
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    servers = []

    def start(files, **kwargs):
        servers.append(FileServer(files, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """No test reads or writes the user's caches or reaches the Hugging Face Hub."""
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "gpt-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: fails at once


# ========================================================================================
# gpt.py: the model against Hugging Face transformers
# ========================================================================================


def test_logits_match_transformers_small(small_pair):
    reference, path = small_pair
    model = gpt.load_gpt2(path)
    assert model.cfg == gpt.GPTConfig(vocab_size=1000, context_length=64, emb_dim=128, n_heads=2, n_layers=2)
    idx = torch.randint(0, 1000, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(idx) - reference(idx).logits).abs().max().item()
    assert diff <= 1e-4


def test_logits_match_transformers_124m_shape(tmp_path):
    reference, path = save_hf_gpt2(tmp_path)
    model = gpt.load_gpt2(path)
    assert model.cfg == gpt.GPT_CONFIGS["gpt2"]
    assert gpt.count_parameters(model) == 124_439_808  # GPT-2 small, embeddings tied
    idx = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(idx) - reference(idx).logits).abs().max().item()
    assert diff <= 1e-4


def test_hub_style_file_without_prefix_or_config(small_pair, tmp_path):
    """Hub files name tensors without `transformer.`; without config.json the config
    comes from the shapes (heads: emb_dim / 64, which is 2 here)."""
    from safetensors.torch import save_file

    reference, path = small_pair
    tensors = gpt.read_safetensors(path)
    stripped = {k.removeprefix("transformer."): v.clone() for k, v in tensors.items()}
    # The hub's files also carry the old causal-mask buffers, which the loader skips.
    stripped["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(stripped, tmp_path / "model.safetensors")
    model = gpt.load_gpt2(tmp_path / "model.safetensors")
    assert model.cfg.n_heads == 2
    idx = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx) - reference(idx).logits).abs().max().item() <= 1e-4


def test_kv_cache_logits_equal_full_forward(small_pair):
    model = gpt.load_gpt2(small_pair[1])
    idx = torch.randint(0, 1000, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = gpt.KVCache(model.cfg)
        pieces = [model(idx[:, :10], kv_cache=cache), model(idx[:, 10:25], kv_cache=cache)]
        pieces += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(25, 30)]
    assert cache.length == 30
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_forward_longer_than_context_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than the model's context length \\(16\\)"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ========================================================================================
# gpt.py: generation
# ========================================================================================


def test_greedy_generation_equals_transformers(small_pair):
    reference, path = small_pair
    model = gpt.load_gpt2(path)
    prompt = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(3))
    ours = gpt.generate(model, prompt, 40)
    theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                                min_new_tokens=40, do_sample=False, pad_token_id=0)
    assert ours.shape == (1, 48)
    assert torch.equal(ours, theirs)


def test_generation_same_with_and_without_cache(small_pair):
    model = gpt.load_gpt2(small_pair[1])
    prompt = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(4))
    assert torch.equal(gpt.generate(model, prompt, 30), gpt.generate(model, prompt, 30, use_cache=False))
    sampled = [gpt.generate(model, prompt, 30, temperature=1.0, top_p=0.9, seed=7, use_cache=c) for c in (True, False)]
    assert torch.equal(*sampled)


def test_top_k_1_equals_greedy_and_seeded_sampling_is_reproducible(small_pair):
    model = gpt.load_gpt2(small_pair[1])
    prompt = torch.randint(0, 1000, (1, 4), generator=torch.Generator().manual_seed(5))
    greedy = gpt.generate(model, prompt, 20)
    assert torch.equal(gpt.generate(model, prompt, 20, temperature=1.0, top_k=1, seed=1), greedy)
    a = gpt.generate(model, prompt, 20, temperature=1.5, top_k=50, seed=123)
    b = gpt.generate(model, prompt, 20, temperature=1.5, top_k=50, seed=123)
    c = gpt.generate(model, prompt, 20, temperature=1.5, top_k=50, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    gen = torch.Generator().manual_seed(0)
    picks = {gpt.sample_next_token(logits, 1.0, top_p=0.7, generator=gen).item() for _ in range(300)}
    assert picks == {0, 1}  # 0.5 alone is below 0.7; 0.5 + 0.3 reaches it
    picks = {gpt.sample_next_token(logits, 1.0, top_p=0.5, generator=gen).item() for _ in range(50)}
    assert picks == {0}
    picks = {gpt.sample_next_token(logits, 1.0, top_k=3, generator=gen).item() for _ in range(300)}
    assert picks == {0, 1, 2}


def test_eos_stops_generation(small_pair):
    model = gpt.load_gpt2(small_pair[1])
    prompt = torch.randint(0, 1000, (1, 4), generator=torch.Generator().manual_seed(6))
    greedy = gpt.generate(model, prompt, 20)
    eos = greedy[0, 4 + 6].item()  # the 7th new token
    first = (greedy[0, 4:] == eos).nonzero()[0].item()
    stopped = gpt.generate(model, prompt, 20, eos_id=eos)
    assert torch.equal(stopped, greedy[:, : 4 + first + 1])


def test_generation_runs_past_the_context_length():
    model = tiny_model(context_length=8)
    prompt = torch.randint(0, 50257, (2, 3), generator=torch.Generator().manual_seed(7))
    out = gpt.generate(model, prompt, 30)
    assert out.shape == (2, 33)
    assert torch.equal(out, gpt.generate(model, prompt, 30, use_cache=False))
    # Past the context the window moves in steps of half the context length.
    assert [gpt.window_start(n, 8) for n in (8, 9, 12, 13, 16, 17)] == [0, 4, 4, 8, 8, 12]


def test_generate_streams_each_token():
    model = tiny_model()
    seen = []
    out = gpt.generate(model, torch.tensor([[1, 2, 3]]), 5, on_token=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out[:, 3:])


def test_bad_sampling_options_are_clear_errors():
    logits = torch.zeros(1, 10)
    with pytest.raises(ValueError, match="temperature"):
        gpt.sample_next_token(logits, -1.0)
    with pytest.raises(ValueError, match="top_k"):
        gpt.sample_next_token(logits, 1.0, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        gpt.sample_next_token(logits, 1.0, top_p=1.5)
    with pytest.raises(ValueError, match="prompt"):
        gpt.generate(tiny_model(), torch.zeros(1, 0, dtype=torch.long), 3)


def test_tokenizer_round_trip():
    ids = gpt.text_to_token_ids("Hello, world<|endoftext|>")
    assert ids.tolist() == [[15496, 11, 995, 50256]]
    assert gpt.token_ids_to_text(ids) == "Hello, world<|endoftext|>"


# ========================================================================================
# gpt.py: LoRA
# ========================================================================================


def test_lora_starts_from_the_model_and_merges_back():
    model = tiny_model()
    idx = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = model(idx)
    gpt.add_lora(model, rank=4, alpha=8)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"h.{i}.{t}.lora_{ab}" for i in range(2) for t in gpt.LORA_TARGETS for ab in "ab"}
    with torch.no_grad():
        assert torch.allclose(model(idx), before, atol=1e-6)  # B starts at zero
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
        adapted = model(idx)
    assert not torch.allclose(adapted, before, atol=1e-3)
    gpt.merge_lora(model)
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.allclose(model(idx), adapted, atol=1e-4)


# ========================================================================================
# gpt.py: safetensors reader and strict weight mapping
# ========================================================================================


def write_safetensors(path, header, data=b""):
    raw = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_read_safetensors_matches_the_reference_reader(small_pair):
    from safetensors.torch import load_file

    path = small_pair[1]
    ours, theirs = gpt.read_safetensors(path), load_file(path)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside the 4 data bytes"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12, "needs 8"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype 'Q4'"),
        ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "needs dtype, shape and two data_offsets"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed shape"),
    ],
)
def test_malformed_safetensors_headers(tmp_path, header, data, message):
    path = write_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ValueError, match=message):
        gpt.read_safetensors(path)


def test_truncated_and_garbage_safetensors(tmp_path, small_pair):
    raw = small_pair[1].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="outside the .* data bytes"):
        gpt.read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(raw[:100])
    with pytest.raises(ValueError, match="header length .* runs past the end"):
        gpt.read_safetensors(tmp_path / "head.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="shorter than the 8-byte header length"):
        gpt.read_safetensors(tmp_path / "tiny.safetensors")
    (tmp_path / "json.safetensors").write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        gpt.read_safetensors(tmp_path / "json.safetensors")


def test_weight_mapping_is_strict(small_pair, tmp_path):
    from safetensors.torch import save_file

    tensors = {k: v.clone() for k, v in gpt.read_safetensors(small_pair[1]).items()}
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    tensors["transformer.h.0.extra.weight"] = torch.zeros(3)
    tensors["transformer.ln_f.weight"] = torch.zeros(5)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000, "n_positions": 64, "n_embd": 128, "n_layer": 2, "n_head": 2}))
    with pytest.raises(ValueError) as error:
        gpt.load_gpt2(tmp_path / "model.safetensors")
    text = str(error.value)
    assert "missing: h.1.mlp.c_fc.bias" in text
    assert "unexpected: h.0.extra.weight" in text
    assert "ln_f.weight: file (5,), model (128,)" in text


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no model 'gpt3'"):
        gpt.load_gpt2("gpt3")


# ========================================================================================
# gpt.py: downloads (against a local HTTP server)
# ========================================================================================


def test_download_complete_file(file_server, tmp_path):
    data = bytes(range(256)) * 4000
    server = file_server({"/f.bin": data})
    path = gpt.download_file(server.url + "/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(data).hexdigest(), quiet=True)
    assert path.read_bytes() == data
    assert not (tmp_path / "f.bin.part").exists()


def test_download_resumes_after_a_cut(file_server, tmp_path):
    data = bytes(range(256)) * 4000
    server = file_server({"/f.bin": data}, cut_after=300_000)
    with pytest.raises(RuntimeError, match="run again to resume"):
        gpt.download_file(server.url + "/f.bin", tmp_path / "f.bin", retries=1, quiet=True)
    assert not (tmp_path / "f.bin").exists()
    kept = (tmp_path / "f.bin.part").stat().st_size
    assert 0 < kept <= 300_000
    gpt.download_file(server.url + "/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(data).hexdigest(), quiet=True)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.requests[-1][2]["Range"] == f"bytes={kept}-"


def test_download_retries_a_cut_within_one_call(file_server, tmp_path):
    data = b"x" * 500_000
    server = file_server({"/f.bin": data}, cut_after=200_000)
    gpt.download_file(server.url + "/f.bin", tmp_path / "f.bin", size=len(data), quiet=True)
    assert (tmp_path / "f.bin").read_bytes() == data
    ranges = [r[2].get("Range") for r in server.requests]
    assert ranges[0] is None and len(ranges) == 2 and ranges[1].startswith("bytes=")


def test_download_hash_mismatch_leaves_no_file(file_server, tmp_path):
    server = file_server({"/f.bin": b"corrupted"})
    with pytest.raises(RuntimeError, match="SHA-256"):
        gpt.download_file(server.url + "/f.bin", tmp_path / "f.bin", sha256="0" * 64, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_download_404_names_the_url(file_server, tmp_path):
    server = file_server({})
    with pytest.raises(RuntimeError, match=f"{server.url}/missing.bin failed: HTTP 404"):
        gpt.download_file(server.url + "/missing.bin", tmp_path / "m.bin", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_load_gpt2_downloads_from_hf_endpoint(file_server, small_pair, monkeypatch, tmp_path):
    data = small_pair[1].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    server = file_server({"/openai-community/gpt2/resolve/main/model.safetensors": data},
                         headers={"X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data))})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    model = gpt.load_gpt2("gpt2", quiet=True)
    assert model.cfg.emb_dim == 128
    cached = tmp_path / "gpt-cache" / "gpt2" / "model.safetensors"
    assert cached.read_bytes() == data
    count = len(server.requests)
    gpt.load_gpt2("gpt2", quiet=True)  # the second load reads the cache
    assert len(server.requests) == count


def test_load_gpt2_rejects_a_download_that_does_not_match_the_hub_hash(file_server, small_pair, monkeypatch, tmp_path):
    data = small_pair[1].read_bytes()
    server = file_server({"/openai-community/gpt2/resolve/main/model.safetensors": data},
                         headers={"X-Linked-Etag": '"' + "ab" * 32 + '"'})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with pytest.raises(RuntimeError, match="corrupt"):
        gpt.load_gpt2("gpt2", quiet=True)
    assert not (tmp_path / "gpt-cache" / "gpt2" / "model.safetensors").exists()
    assert not (tmp_path / "gpt-cache" / "gpt2" / "model.safetensors.part").exists()


def test_existing_hugging_face_cache_is_used(small_pair, tmp_path):
    snapshot = tmp_path / "hf-cache" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(small_pair[1].read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert gpt.download_gpt2("gpt2") == snapshot / "model.safetensors"
    assert gpt.load_gpt2("gpt2").cfg.emb_dim == 128  # HF_ENDPOINT points nowhere: no download


def test_offline_name_is_a_clear_error():
    with pytest.raises(RuntimeError, match="Offline\\? Pass a local .safetensors file"):
        gpt.load_gpt2("gpt2-medium", quiet=True)


def test_fetch_dataset_tries_each_url_and_names_the_flag(file_server, tmp_path):
    server = file_server({"/mirror/data.txt": b"hello"})
    path = gpt.fetch_dataset([server.url + "/main/data.txt", server.url + "/mirror/data.txt"], "data.txt", quiet=True)
    assert path.read_bytes() == b"hello"
    assert path.parent == tmp_path / "gpt-cache" / "data"
    with pytest.raises(RuntimeError, match="(?s)/a/x.txt.*/b/x.txt.*--data PATH"):
        gpt.fetch_dataset([server.url + "/a/x.txt", server.url + "/b/x.txt"], "x.txt", quiet=True)


# ========================================================================================
# gpt.py: checkpoints
# ========================================================================================


def test_checkpoint_round_trip_through_load_gpt2(tmp_path):
    model = tiny_model()
    gpt.save_checkpoint(tmp_path / "ckpt.pt", model, step=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left
    loaded = gpt.load_gpt2(tmp_path / "ckpt.pt")
    assert loaded.cfg == model.cfg
    assert gpt.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 7
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert loaded.lm_head.weight is loaded.wte.weight


def test_checkpoint_of_a_compiled_or_ddp_model_has_plain_keys(tmp_path):
    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

    gpt.save_checkpoint(tmp_path / "ckpt.pt", Wrapper(tiny_model()))
    keys = gpt.load_checkpoint(tmp_path / "ckpt.pt")["model"].keys()
    assert "wte.weight" in keys and not any(k.startswith("module.") for k in keys)


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        gpt.load_gpt2(tmp_path / "junk.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        gpt.load_gpt2(tmp_path / "other.pt")


# ========================================================================================
# load_gpt2.py
# ========================================================================================


def test_load_gpt2_script_streams_a_continuation(tmp_path, capsys):
    import load_gpt2

    model = tiny_model(context_length=64)
    gpt.save_checkpoint(tmp_path / "tiny.pt", model)
    load_gpt2.main(["--model", str(tmp_path / "tiny.pt"), "--prompt", "Hello", "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    expected = gpt.token_ids_to_text(gpt.generate(model, gpt.text_to_token_ids("Hello"), 12))
    assert "parameters" in out and "load time" in out
    assert out.rstrip("\n").endswith(expected)


def test_load_gpt2_script_bad_inputs_exit_with_a_message(capsys):
    import load_gpt2

    with pytest.raises(SystemExit, match="error: no model 'gpt5'"):
        load_gpt2.main(["--model", "gpt5"])
    with pytest.raises(SystemExit):
        load_gpt2.main(["--top-p", "2"])
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err


def test_load_gpt2_script_download_only_into_cache_dir(file_server, small_pair, monkeypatch, tmp_path, capsys):
    import load_gpt2

    data = small_pair[1].read_bytes()
    server = file_server({"/openai-community/gpt2-medium/resolve/main/model.safetensors": data},
                         headers={"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"'})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    load_gpt2.main(["--model", "gpt2-medium", "--download-only", "--cache-dir", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "gpt2-medium" / "model.safetensors").read_bytes() == data
    assert str(tmp_path / "mine" / "gpt2-medium" / "model.safetensors") in capsys.readouterr().out
