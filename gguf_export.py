"""GGUF export: the merged model as one llama.cpp file, for llama.cpp, Ollama and LM Studio.

A GGUF file (github.com/ggml-org/ggml/blob/master/docs/gguf.md) is, little-endian:

    "GGUF", version 3, tensor count, key-value count
    key-values     typed metadata: general.*, llama.* hyperparameters, tokenizer.*
    tensor infos   name, dims fastest first ([C_in, C_out] for a [C_out, C_in] weight), ggml type, offset
    data           each tensor's bytes, every one aligned to 32 bytes

The header fixes every tensor's type and byte size, and both follow from the safetensors headers alone,
so the whole header is written first and the tensors after it, each merged, encoded and appended in
turn (the `gguf` package's GGUFWriter, the writer llama.cpp's own converter uses, driven one tensor at
a time: `add_tensor_info` for all, then `write_tensor_data` per tensor). Peak memory is one tensor and
its float32 merge, as for merge.py's safetensors output.

What llama.cpp's `convert_hf_to_gguf.py` (class `LlamaModel`) writes for a Llama, we write too:
  metadata    general.architecture "llama", name, file_type; llama.context_length, embedding_length,
              block_count, feed_forward_length, attention.head_count(_kv), attention.layer_norm_rms_epsilon,
              rope.freq_base, rope.dimension_count (= head_dim), vocab_size; attention.key_length and
              value_length only where head_dim != hidden/heads; rope.scaling.type/factor for linear scaling.
  names       token_embd, output_norm, output; blk.{i}.attn_{q,k,v,output}, blk.{i}.ffn_{gate,up,down},
              blk.{i}.attn_norm, blk.{i}.ffn_norm (gguf_convert's table, read backwards: one table).
  types       2-D weights in the chosen type; norms, biases and rope_freqs always F32 (much of ggml takes
              1-D tensors in F32 only, so llama.cpp's converter keeps them so). Q8_0 needs rows of whole 32-weight blocks; a weight whose rows are
              not falls back to F16, as llama.cpp's converter does.
  rotary      HF's rope rotates the two halves of each head (x_j with x_{j+D/2}); llama.cpp's LLAMA rope
              rotates adjacent pairs (x_2j with x_2j+1). So the rows of q_proj / k_proj (and their biases)
              are reordered inside every head, row s*D/2 + j -> row 2j + s:
                  gguf = hf.reshape(n_head, 2, D/2, C).transpose(1, 2).reshape(n_head*D, C)
              (n_head = kv heads for k_proj); q·k is unchanged because both sides move alike.
              `gguf_convert.unpermute_rope` is its inverse.
  llama3 rope Llama 3.1 scaling has no metadata key: llama.cpp divides each rotary frequency by the
              matching entry of an F32 tensor `rope_freqs.weight` [D/2] (1 for high frequencies, `factor`
              for low ones, a smooth blend between), so that tensor is written, from llama.rope_inv_freq.
  Q8_0        per block of 32 weights along a row: d = max|x| / 127 (float32), q = roundf(x * (1/d)) as
              int8 (ties away from zero), stored as fp16 d then the 32 q (34 bytes); x ~= d * q. The exact
              float32 steps of ggml's `quantize_row_q8_0_ref`, so the bytes equal gguf.quants' and ggml's.
  tokenizer   tokens (every id below config.vocab_size; gaps padded "[PAD{i}]", type UNUSED), token types
              (1 normal, 2 unknown, 3 control = special added tokens, 4 user-defined = other added tokens,
              5 unused, 6 byte), BOS/EOS/UNK/pad ids, add_bos/add_eos, add_space_prefix, chat template,
              in one of the two tokenizer families the project loads from tokenizer.json:
      "gpt2"   byte-level BPE (Llama 3, SmolLM2, ...): the merges as "left right" strings and a `pre`
               name for llama.cpp's pre-tokenizer regex, read from the tokenizer.json pre-tokenizer:
               GPT-2's ("gpt-2"), digits split first ("smollm"), Llama 3's regex ("llama-bpe").
      "llama"  SentencePiece BPE with byte fallback, as transformers converts Llama 1/2 and Mistral:
               scores instead of merges. llama.cpp's SentencePiece tokenizer repeatedly joins the adjacent
               pair whose joined token has the highest score; giving the token made by merge r the score
               -r (tokens no merge makes score below all) makes that the BPE's own merge order.
               (llama.cpp's converter writes -1000 for every token of a tokenizer.json-only model.)

Other types are left out on purpose: F32 doubles the file for a precision the 16-bit checkpoints it
comes from never had; Q4_0/Q4_1/Q5_x are legacy formats that K-quants beat at the same size; K-quants and i-quants
(Q4_K_M, IQ4_XS, ...) need llama.cpp's own search and importance matrices, which the `gguf` package does
not implement -- quantize the F16 file with `llama-quantize model-F16.gguf out.gguf Q4_K_M`. Also left
out: rope scaling llama.cpp's llama architecture cannot express ("dynamic" NTK), and every non-Llama
config; both stop with an error before any file is written.

References: llama.cpp `convert_hf_to_gguf.py` (`LlamaModel.permute`, `set_gguf_parameters`,
`generate_extra_tensors`, `_set_vocab_gpt2`, `_set_vocab_llama_hf`), `gguf-py/gguf/constants.py`
(key and tensor names), ggml `quantize_row_q8_0_ref`.
"""
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import torch

import gguf_convert
import llama
from tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
TOKEN = gguf.TokenType
# --gguf-type -> (ggml type of the 2-D weights, general.file_type)
GGUF_TYPES = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
              "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
              "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
# the dtype each ggml type is made from: Q8_0 quantizes the float32 merge itself (one rounding, not two)
TORCH_DTYPE = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16, Q.Q8_0: torch.float32}
Q8_BLOCK, Q8_BLOCK_BYTES = 32, 34  # weights per Q8_0 block; bytes per block (fp16 scale + 32 int8)

# HF name -> GGUF name: gguf_convert's GGUF -> HF tables, inverted
_TOP_LEVEL = {hf: name for name, hf in gguf_convert._TOP_LEVEL.items()}
_PER_BLOCK = {hf: name for name, hf in gguf_convert._PER_BLOCK.items()}
# Llama 3's pre-tokenizer regex, as its tokenizer.json states it (llama.cpp's "llama-bpe")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPIECE = "\u2581"  # "▁", SentencePiece's visible space


def file_name(gguf_type):
    """`model-F16.gguf`: llama.cpp's habit of naming the type in the file name."""
    return f"model-{GGUF_TYPES[gguf_type][0].name}.gguf"


def gguf_tensor_name(key):
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (and the top-level names)."""
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    parts = key.split(".")  # model.layers.{i}.{module path}.{weight|bias}
    module = ".".join(parts[3:-1])
    if parts[:2] == ["model", "layers"] and parts[2].isdecimal() and module in _PER_BLOCK \
            and parts[-1] in ("weight", "bias"):
        return f"blk.{parts[2]}.{_PER_BLOCK[module]}.{parts[-1]}"
    raise ValueError(f"checkpoint tensor {key!r} has no place in a GGUF llama model (it holds embeddings, "
                     "attention, MLP, norms and the output head only)")


def permute_rope(w, n_head):
    """q/k rows (or a bias) from HF's rotate-half order to llama.cpp's interleaved pairs, per head."""
    head_dim = w.shape[0] // n_head
    return (w.reshape(n_head, 2, head_dim // 2, *w.shape[1:])  # (H, 2, D/2, C): row s*D/2 + j of a head
            .transpose(1, 2)                                   # (H, D/2, 2, C): row 2j + s
            .reshape(w.shape))                                 # (H*D, C)


def tensor_type(name, shape, weight_type):
    """llama.cpp's rule: 1-D tensors, norms and anything but a `.weight` (biases) stay F32; Q8_0 falls back
    to F16 for rows that are not whole blocks (a block never crosses a row)."""
    if len(shape) == 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    if weight_type == Q.Q8_0 and shape[-1] % Q8_BLOCK:
        return Q.F16
    return weight_type


def nbytes(shape, qtype):
    n = int(np.prod(shape))
    return n // Q8_BLOCK * Q8_BLOCK_BYTES if qtype == Q.Q8_0 else n * TORCH_DTYPE[qtype].itemsize


def quantize_q8_0(w, chunk=1 << 20):
    """[R, C] float -> [R, C/32*34] uint8 Q8_0 bytes, bit-identical to ggml's reference quantizer. Rows go
    through in chunks of ~`chunk` weights: the float32 temporaries stay a few MB, whatever the tensor."""
    out = torch.empty(w.shape[0], w.shape[1] // Q8_BLOCK * Q8_BLOCK_BYTES, dtype=torch.uint8)
    step = max(1, chunk // w.shape[1])
    for i in range(0, w.shape[0], step):
        blocks = w[i:i + step].float().reshape(-1, Q8_BLOCK)   # (rows*C/32, 32)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127       # float32 scale, as ggml
        x = blocks * torch.where(d == 0, 0.0, 1.0 / d)         # x * (1/d), not x / d: ggml's exact steps
        a = x.abs()
        # C roundf (ties away from zero) without floor(a + 0.5), which rounds twice just below .5
        q = torch.sign(x) * (a.floor() + (2 * (a - a.floor())).floor())
        packed = torch.cat([d.to(torch.float16).view(torch.uint8),       # (n_blocks, 2) little-endian fp16
                            q.to(torch.int8).view(torch.uint8)], dim=1)  # (n_blocks, 34)
        out[i:i + step] = packed.view(-1, out.shape[1])        # (rows, C/32*34)
    return out


def encode(tensor, qtype):
    """The tensor's bytes in ggml type `qtype`, as the numpy array GGUFWriter writes."""
    if qtype == Q.Q8_0:
        return quantize_q8_0(tensor).numpy()
    if qtype == Q.BF16:  # numpy has no bfloat16: hand over its bits
        return tensor.contiguous().view(torch.int16).numpy()
    return tensor.contiguous().numpy()


# ---------------------------------------------------------------------------------------------------
# Metadata


def add_hyperparameters(writer, config):
    """The llama.* keys. -> the rope_freqs tensor for Llama 3.1 scaling, else None."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.hidden_size // config.num_attention_heads:  # llama.cpp's default otherwise
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    kind = (config.rope_scaling or {}).get("rope_type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling["factor"])
    elif kind == "llama3":
        # llama.cpp computes theta_i / rope_freqs[i]: the factor is plain theta_i over the scaled one
        return llama.rope_inv_freq(replace(config, rope_scaling=None)) / llama.rope_inv_freq(config)
    elif kind is not None:
        raise ValueError(f"config.json has rope scaling {kind!r}, which llama.cpp's llama architecture cannot "
                         "express (GGUF holds linear and llama3 scaling): export with --format safetensors")
    return None


def _pieces(component, key):
    """A tokenizer.json normalizer / pre-tokenizer as a list of its parts (a Sequence's, or itself)."""
    if not component:
        return []
    return component[key] if component["type"] == "Sequence" else [component]


def _gpt2_pre(pre_tokenizer):
    """(llama.cpp `pre` name, add_space_prefix) of a byte-level BPE pre-tokenizer."""
    parts = _pieces(pre_tokenizer, "pretokenizers")
    kinds = [p["type"] for p in parts]
    if kinds == ["ByteLevel"] and parts[0]["use_regex"]:
        name = "gpt-2"  # llama.cpp's spelling; "gpt2" is unknown to it
    elif kinds == ["Digits", "ByteLevel"] and parts[0]["individual_digits"] and parts[1]["use_regex"]:
        name = "smollm"  # each digit alone, then GPT-2's regex (= llama.cpp's "starcoder"/"smollm")
    elif (kinds == ["Split", "ByteLevel"] and parts[0]["pattern"].get("Regex") == LLAMA3_REGEX
          and parts[0]["behavior"] == "Isolated" and not parts[1]["use_regex"]):
        name = "llama-bpe"
    else:
        raise ValueError(f"tokenizer.json's pre-tokenizer {json.dumps(pre_tokenizer)[:300]} is not one this "
                         "exporter can name for llama.cpp (known: GPT-2's, digits + GPT-2's, Llama 3's)")
    return name, bool(parts[-1]["add_prefix_space"])


def _spm_space_prefix(normalizer, pre_tokenizer):
    """Does a SentencePiece-style tokenizer.json put "▁" before the text (llama.cpp's add_space_prefix)?"""
    norms = _pieces(normalizer, "normalizers")
    kinds = [n["type"] for n in norms]
    escapes = bool(norms) and norms[-1]["type"] == "Replace" and norms[-1]["pattern"] == {"String": " "} \
        and norms[-1]["content"] == SPIECE
    if pre_tokenizer is None and escapes and kinds in (["Prepend", "Replace"], ["Replace"]):
        return kinds[0] == "Prepend" and norms[0]["prepend"] == SPIECE  # legacy Llama 2: Prepend + Replace
    if (not norms and pre_tokenizer and pre_tokenizer["type"] == "Metaspace"
            and pre_tokenizer["replacement"] == SPIECE and pre_tokenizer.get("split") is False):
        return pre_tokenizer.get("prepend_scheme", "always") != "never"  # transformers' legacy=False layout
    raise ValueError("tokenizer.json looks like a SentencePiece BPE (byte_fallback) but its normalizer / "
                     "pre-tokenizer is neither Llama 2's (Prepend + Replace ' ' -> '▁') nor a Metaspace; "
                     "llama.cpp could not reproduce its splitting")


def _merges(model):
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    for left, right in merges:
        if " " in left or " " in right:
            raise ValueError(f"merge {left!r} + {right!r} contains a space, which GGUF's 'left right' merge "
                             "strings cannot hold")
    return merges


def _scores(tokens, merges):
    """SentencePiece scores that reproduce the BPE merge order (see the module docstring)."""
    rank = {}
    for r, (left, right) in enumerate(merges):
        rank.setdefault(left + right, r)
    return [-float(rank.get(t, len(merges))) for t in tokens]


def _token_list(tok, spm, unk_id, vocab_size):
    """(tokens, types) for every id below vocab_size: the ids the tokenizer leaves unused (an embedding
    padded to a multiple of 64...) still need a token, "[PAD{i}]" of type UNUSED, as llama.cpp writes."""
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)  # token -> id
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())}, but config.json's vocab_size is "
                         f"{vocab_size}: the embedding has no row for them")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [TOKEN.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = TOKEN.BYTE if spm and re.fullmatch(r"<0x[0-9A-F]{2}>", token) else TOKEN.NORMAL
    for i, added in tok.tokenizer.get_added_tokens_decoder().items():
        types[i] = TOKEN.CONTROL if added.special else TOKEN.USER_DEFINED
    if spm and unk_id is not None:
        types[unk_id] = TOKEN.UNKNOWN  # what sentencepiece calls it
    return tokens, types


def add_tokenizer(writer, model_dir, vocab_size):
    """The tokenizer.* keys, from tokenizer.json, tokenizer_config.json and the chat template."""
    model_dir = Path(model_dir)
    tok = Tokenizer.from_dir(model_dir)  # special tokens, every EOS id, chat template: the project's reading
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tc_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json holds a {model.get('type')} model: only BPE tokenizers (byte-level, or "
                         "SentencePiece BPE with byte fallback) can be written for llama.cpp's llama vocab")
    spm = bool(model.get("byte_fallback"))
    merges = _merges(model)
    if spm:
        kind, pre = "llama", "default"
        space_prefix = _spm_space_prefix(spec.get("normalizer"), spec.get("pre_tokenizer"))
    else:
        kind, (pre, space_prefix) = "gpt2", _gpt2_pre(spec.get("pre_tokenizer"))
    unk = tokenizer_config.get("unk_token") or model.get("unk_token")
    unk_id = tok.tokenizer.token_to_id(unk["content"] if isinstance(unk, dict) else unk) if unk else None
    tokens, types = _token_list(tok, spm, unk_id, vocab_size)

    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        writer.add_token_scores(_scores(tokens, merges))
    else:
        writer.add_token_merges([f"{left} {right}" for left, right in merges])
    # the tokenizer's own EOS; llama.cpp itself adds the other end-of-turn tokens (<|eot_id|>, ...) by text
    eos_id = tok.eos_ids[0] if tok.eos_ids else None
    for add, value in ((writer.add_bos_token_id, tok.bos_id), (writer.add_eos_token_id, eos_id),
                       (writer.add_unk_token_id, unk_id), (writer.add_pad_token_id, tok.pad_id)):
        if value is not None:
            add(value)
    # transformers rebuilds a Llama post-processor from tokenizer_config's flags, so those win
    add_bos = tokenizer_config.get("add_bos_token")
    writer.add_add_bos_token(add_bos if isinstance(add_bos, bool) else tok.adds_bos)
    if isinstance(tokenizer_config.get("add_eos_token"), bool):
        writer.add_add_eos_token(tokenizer_config["add_eos_token"])
    writer.add_add_space_prefix(space_prefix)
    if tok.chat_template is not None:
        writer.add_chat_template(tok.chat_template)


# ---------------------------------------------------------------------------------------------------
# The file


def write_gguf(path, model_dir, entries, produce, gguf_type="f16", model_name=None):
    """Write one GGUF file at `path`: metadata from model_dir's config.json and tokenizer files, then each
    checkpoint tensor of `entries` [(key, shape)] as `produce(key, torch_dtype)` returns it, one at a time.
    Every refusal (non-Llama config, unsupported rope scaling or tokenizer) comes before the file opens."""
    weight_type, file_type = GGUF_TYPES[gguf_type]
    config = llama.LlamaConfig.from_file(Path(model_dir) / "config.json")  # refuses non-Llama configs
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("model")
    writer.add_name(model_name or Path(model_dir).name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope_freqs = add_hyperparameters(writer, config)
    add_tokenizer(writer, model_dir, config.vocab_size)

    plan = [] if rope_freqs is None else [("rope_freqs.weight", None, tuple(rope_freqs.shape), Q.F32)]
    for key, shape in entries:
        # a rope buffer older transformers saved, a tied model's stray lm_head copy: not weights (llama.cpp's
        # converter and our loader skip them too)
        if key.endswith(".rotary_emb.inv_freq") or (config.tie_word_embeddings and key == "lm_head.weight"):
            continue
        name = gguf_tensor_name(key)
        plan.append((name, key, tuple(shape), tensor_type(name, shape, weight_type)))
    for name, _, shape, qtype in plan:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, qtype), raw_dtype=qtype)

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, key, shape, qtype in plan:
            tensor = rope_freqs if key is None else produce(key, TORCH_DTYPE[qtype])
            if name.startswith("blk.") and name.split(".")[2] in ("attn_q", "attn_k"):
                heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
                tensor = permute_rope(tensor, heads)
            writer.write_tensor_data(encode(tensor, qtype))
            del tensor  # nothing of this tensor outlives its write
        for f in writer.fout:
            f.flush()
            os.fsync(f.fileno())
    finally:
        writer.close()
    return Path(path)
