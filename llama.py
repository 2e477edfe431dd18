"""Llama: a handwritten Hugging Face Llama that loads hub checkpoints, quantizing them as they stream in.

The decoder-only transformer of Llama 1/2/3 (arXiv:2302.13971, arXiv:2307.09288, arXiv:2407.21783),
with module names equal to the keys of a transformers checkpoint, so loading is a shape-checked copy:

    x_0     = embed_tokens[ids]
    h_l     = x_l + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),   n = RMSNorm(x_l)
    x_(l+1) = h_l + down_proj(silu(gate_proj(m)) * up_proj(m)),                        m = RMSNorm(h_l)
    logits  = lm_head(RMSNorm(x_L))

    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)                                      (statistics in fp32)
    rope(q)    = q cos(p theta) + rotate_half(q) sin(p theta),   theta_i = base^(-2i/D),  i < D/2
    rotate_half([a, b]) = [-b, a] over the two halves of each head: HF's layout, so HF q/k weights need
    no permutation (Meta's original code rotates interleaved pairs instead).

Grouped-query attention shares each of the K key/value heads among H/K adjacent query heads. Rope scaling
("linear", "dynamic" NTK, Llama 3.1's "llama3") only changes the inverse frequencies theta_i.

Around the model, what it takes to use a hub checkpoint: `LlamaConfig` (transformers-4 and -5 config.json
layouts) and `from_pretrained` (local directory or hub id; single or sharded safetensors; plain or
bitsandbytes-4-bit), which builds the model on the meta device and lets hf_checkpoint.py stream the
weights in one tensor at a time, quantizing each linear weight on arrival so the float model never exists
in memory (QLoRA, arXiv:2305.14314 §3). The tokenizer and chat template are in tokenizer.py, sampling and
generation in generate.py.

Long context: no activation grows with T^2, nor with T x F beyond a chunk. Causal attention runs in SDPA's
flash/efficient kernels; packed rows (position_ids restarting at 0, no mask) attend document by document
(`packed_attention`, no (T, T) mask); the MLP runs in chunks of `MLP.chunk_size` tokens; under
`gradient_checkpointing` a layer keeps only its input, which `offload_activations` parks in CPU memory.

The model classes know nothing of quantization or LoRA: those replace `nn.Linear` modules afterwards.
Left out on purpose: dropout (0 in every Llama), other rope types (yarn, longrope), `.bin` and 8-bit
checkpoints, tensor parallelism.

Shape legend: B batch, T tokens in this call, S key positions (cached + new), C hidden size,
H query heads, K key/value heads, D head dim, F intermediate size, V vocab.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import MISSING, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import hf_checkpoint
from offload import OffloadedCheckpoints

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class LlamaConfig:
    """The config.json fields that change the maths, named as in config.json."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: int | None = None  # None: = num_attention_heads (no GQA)
    head_dim: int | None = None  # None: = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None: plain rope; else {"rope_type": "linear"|"dynamic"|"llama3", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    torch_dtype: str | None = None  # the checkpoint's dtype name ("bfloat16", ...)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    quantization_config: dict | None = None  # present in bitsandbytes-quantized checkpoints
    model_type: str = "llama"

    def __post_init__(self):
        if self.model_type != "llama":
            raise ValueError(f"model_type {self.model_type!r} is not supported: this file implements Llama only "
                             "(config.json must say \"model_type\": \"llama\")")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (Llama uses 'silu')")
        # derived values only fill what config.json leaves out
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        """Both layouts found on the hub: transformers 5 nests every rope setting (rope_theta included) in
        `rope_parameters` and writes `dtype`; transformers 4 has a top-level `rope_theta`, a `rope_scaling`
        dict or null (its kind under `rope_type`, or `type` in older files) and `torch_dtype`. Keys that do
        not change the maths (architectures, use_cache, ...) are ignored."""
        d = dict(d)
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None)
        if rope:
            rope = dict(rope)
            d["rope_theta"] = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
            d["rope_scaling"] = rope
        if "dtype" in d:
            d.setdefault("torch_dtype", d.pop("dtype"))
        if d.get("model_type", "llama") == "llama":  # another model_type fails in __post_init__ instead
            missing = [f.name for f in fields(cls) if f.default is MISSING and d.get(f.name) is None]
            if missing:
                raise ValueError(f"config.json lacks {missing}: not a complete Llama config")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LlamaConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _normalize_rope_scaling(rope: dict | None, max_position_embeddings: int) -> dict | None:
    """One spelling for every hub variant: the kind under `rope_type` (older files say `type`), None for
    plain rope, and the fields each kind needs checked here rather than deep inside a forward pass."""
    if not rope:
        return None
    kind = rope.get("rope_type") or rope.get("type") or "default"
    rope = {k: v for k, v in rope.items() if k not in ("type", "rope_theta")} | {"rope_type": kind}
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    needs = ["factor"] + (["low_freq_factor", "high_freq_factor"] if kind == "llama3" else [])
    for key in needs:
        if key not in rope:
            raise ValueError(f"rope scaling {kind!r} needs {key!r} in config.json")
    if kind == "llama3":  # transformers falls back to the same value when the field is absent
        rope.setdefault("original_max_position_embeddings", max_position_embeddings)
    return rope


def rope_inv_freq(config: LlamaConfig, seq_len: int | None = None) -> torch.Tensor:
    """Rotary inverse frequencies theta_i = base^(-2i/D) after the config's scaling: float32 [D/2] on the CPU.
    `seq_len` only matters for "dynamic" (NTK-aware) scaling, which raises the base once a sequence runs
    past max_position_embeddings. Same formulas and float32 evaluation order as transformers'
    modeling_rope_utils, so the values are bit-identical to its `inv_freq`."""
    D, base = config.head_dim, config.rope_theta
    scaling = config.rope_scaling or {"rope_type": "default"}
    kind = scaling["rope_type"]
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor = scaling["factor"]
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (D / (D - 2))
    # device="cpu" even under a meta-device context: this buffer is not in any checkpoint, so nothing
    # would ever fill a meta copy in (the meta-init trap for non-persistent buffers)
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))  # (D/2,)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]  # same as dividing the positions: position interpolation
    elif kind == "llama3":
        # Llama 3.1: wavelengths longer than the pre-training context are stretched by `factor`, those
        # shorter than context/high_freq_factor are kept, and the band between is interpolated smoothly.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        stretched = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * stretched / factor + smooth * stretched
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(is_medium, smoothed, stretched)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] over the last dim: HF's rope pairs element i with element i + D/2."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


# ----------------------------------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        # fp32 statistics: mean(x^2) of bf16 activations loses the small components. The normalized value
        # is cast back *before* the weight multiply, exactly as transformers does, so bf16 runs round alike.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        C, H, K, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim, self.layer_idx = H, K, D, layer_idx
        self.q_proj = nn.Linear(C, H * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, K * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, K * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=config.attention_bias)

    def forward(self, x, cos, sin, mask=None, cache=None, docs=None):
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        if H != K:  # GQA: query head h reads kv head h // (H/K), so repeat each for *adjacent* query heads
            k = k.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
        if docs is not None:  # packed rows: causal inside each document, nothing across
            y = packed_attention(q, k, v, docs)  # (B, H, T, D)
        else:
            # mask None: plain causal when T == S; a single new token (T == 1) may see every cached key.
            # SDPA's is_causal aligns the triangle top-left, which is wrong for T < S, hence the explicit
            # mask the model builds for that case.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)
        return self.o_proj(y)


def packed_attention(q, k, v, docs: list[list[int]]) -> torch.Tensor:
    """Causal attention within each document of a packed row and never across documents. docs[b] lists
    row b's document boundaries [0, s_1, ..., T]. One causal SDPA call per document (a variable-length
    kernel by loop), so neither a (T, T) mask nor a (T, T) score matrix exists at any length: SDPA's
    flash/efficient kernels keep the memory linear in T."""
    rows = []
    for b, cuts in enumerate(docs):
        parts = [F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                is_causal=True)  # (1, H, e - s, D)
                 for s, e in zip(cuts, cuts[1:])]
        rows.append(torch.cat(parts, dim=2))  # (1, H, T, D)
    return torch.cat(rows)  # (B, H, T, D)


def document_boundaries(position_ids: torch.Tensor) -> list[list[int]] | None:
    """Packed rows mark each document by restarting position_ids at 0. Returns each row's boundaries
    [0, s_1, ..., T], or None when no row restarts (one document a row: plain causal attention)."""
    restarts = (position_ids[:, 1:] == 0).cpu()  # (B, T - 1); a GPU sync only if the ids live there
    if not restarts.any():
        return None
    T = position_ids.shape[1]
    return [[0] + (row.nonzero().flatten() + 1).tolist() + [T] for row in restarts]


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, Fi = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(C, Fi, bias=config.mlp_bias)
        self.up_proj = nn.Linear(C, Fi, bias=config.mlp_bias)
        self.down_proj = nn.Linear(Fi, C, bias=config.mlp_bias)
        # At long context the (tokens, F) gate/up intermediates are a layer's largest tensors (F ~ 2.7 C).
        # A call with more than `chunk_size` tokens (B * T) runs them chunk by chunk; tokens are independent
        # here, so no value changes. None: never split. 8192 leaves ordinary batches on the plain path.
        self.chunk_size: int | None = 8192

    def forward(self, x):
        B, T, C = x.shape
        if self.chunk_size is None or B * T <= self.chunk_size:
            return self.swiglu(x)
        chunks = x.reshape(B * T, C).split(self.chunk_size)  # (chunk_size, C) each, the last shorter
        if torch.is_grad_enabled():
            # each chunk checkpointed: backward (and a layer checkpoint's recompute) keeps one chunk's
            # intermediates at a time instead of all of them
            chunks = [checkpoint(self.swiglu, c, use_reentrant=False) for c in chunks]
        else:
            chunks = [self.swiglu(c) for c in chunks]
        return torch.cat(chunks).view(B, T, C)  # (B, T, C)

    def swiglu(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, cache=None, docs=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, docs)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated for `max_len` positions.
    Keys are stored after rope, so a cached position is never rotated again."""

    def __init__(self, model: Llama, batch_size: int, max_len: int):
        cfg = model.config
        ref = model.model.embed_tokens.weight  # activations run in the embeddings' dtype
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)  # (B, K, max_len, D)
        self.k = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=ref.dtype, device=ref.device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # positions filled; the model advances it after the last layer

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        if end > self.k[layer_idx].shape[2]:
            raise ValueError(f"KV cache holds {self.k[layer_idx].shape[2]} positions, {end} needed")
        self.k[layer_idx][:, :, self.length:end] = k
        self.v[layer_idx][:, :, self.length:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]  # (B, K, S, D) each


class Llama(nn.Module):
    """LlamaForCausalLM with HF's module names: `model.embed_tokens`, `model.layers.{i}`, `model.norm`,
    `lm_head` (sharing the embedding matrix when `tie_word_embeddings`, and then absent from the state dict
    as in the HF checkpoint)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.name_or_path = ""
        self.gradient_checkpointing = False  # recompute each decoder layer in backward (training only)
        self.offload_activations = False  # with checkpointing: keep the layer inputs in CPU memory (offload.py)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)  # (D/2,) fp32
        if config.tie_word_embeddings:
            self.tie_weights()
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_fill_tied_head)
            self.register_load_state_dict_post_hook(lambda module, incompatible: module.tie_weights())

    def tie_weights(self):
        """Point lm_head at the embedding matrix again (after anything that replaced either Parameter)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """input_ids (B, T) -> logits (B, T, V) in the model dtype. See `hidden_states` for the rest."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """The final-norm output (B, T, C) that lm_head maps to logits: training computes its loss from
        this in chunks, so the (B, T, V) fp32 logits of the whole batch never exist at once.

        attention_mask (B, S): 1 real token, 0 padding, covering the cached positions too with a `cache`.
        position_ids (B, T): rope positions. Packed rows (several documents in one row) give positions
        that restart at 0 at each document and no attention_mask and no cache: every restart is then a
        document boundary that no token attends across, without any (T, T) mask (`packed_attention`).
        Still accepted: a ready boolean (B, 1, T, S) attention_mask, True = may attend, with position_ids.
        Index tensors on another device than the model (CPU ids, CUDA model) are moved to the model's."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        dense = attention_mask is not None and attention_mask.dim() == 4
        if dense and position_ids is None:
            raise ValueError("a (B, 1, T, S) attention_mask needs explicit position_ids")
        docs = None
        if position_ids is not None and attention_mask is None and cache is None:
            docs = document_boundaries(position_ids)  # before the move: CPU ids cost no device sync
        device = self.model.embed_tokens.weight.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        if position_ids is not None:
            position_ids = position_ids.to(device)
        elif attention_mask is None:
            position_ids = torch.arange(past, past + T, device=device).expand(B, T)  # (B, T)
        else:
            # count real tokens only, so a left-padded prompt gets the positions it has unpadded
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self._rope(position_ids, x.dtype)

        mask = None
        if dense:
            mask = attention_mask.to(dtype=torch.bool)  # (B, 1, T, S) built by the caller
        elif attention_mask is not None or (past > 0 and T > 1):
            mask = self._attention_mask(attention_mask, past, T, device)

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        offload = OffloadedCheckpoints() if checkpointing and self.offload_activations else None
        for layer in self.model.layers:
            if checkpointing:
                # non-reentrant: works when no input requires grad (frozen embeddings, LoRA-only params)
                # and keeps only the layer input (in CPU memory when offloading); the layer runs again
                # during backward
                with offload.layer_input(x) if offload else contextlib.nullcontext():
                    x = checkpoint(layer, x, cos, sin, mask, None, docs, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, docs)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def _rope(self, position_ids, dtype):
        """cos and sin (B, 1, T, D) of the rope angles p * theta_i, in fp32 (positions up to 1e5+ times
        theta need the mantissa) and cast to the activations' dtype once."""
        inv_freq = self.inv_freq
        if (self.config.rope_scaling or {}).get("rope_type") == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, seq_len)
        angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D) broadcast over heads
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def _attention_mask(attention_mask, past, T, device):
        """Boolean (B or 1, 1, T, S) mask, True = may attend: causal over absolute slots, padding keys off."""
        S = past + T
        q_slot = torch.arange(past, S, device=device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = (k_slot <= q_slot)[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :S].bool()  # (B, 1, T, S)
            # A padding query would see no key at all; SDPA turns such a row into NaN, and NaN values then
            # leak into real tokens as 0 * NaN through the next layer's (masked) keys. Let it see itself.
            allowed = allowed | (k_slot == q_slot)
        return allowed


def _drop_tied_head(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "lm_head.weight", None)


def _fill_tied_head(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                    error_msgs):
    embed = state_dict.get(prefix + "model.embed_tokens.weight")
    if embed is not None:
        state_dict.setdefault(prefix + "lm_head.weight", embed)


# ----------------------------------------------------------------------------------------------------
# Loading: hub id or local directory -> config.json -> model on the meta device -> tensors streamed in


def from_pretrained(name_or_path: str | os.PathLike, quant: str | None = "nf4",
                    dtype: torch.dtype | None = torch.bfloat16, device: str | torch.device | None = None,
                    double_quant: bool = True, blocksize: int = 64, revision: str | None = None,
                    token: str | None = None) -> Llama:
    """Load a HF Llama checkpoint (local directory or hub id) without ever holding its float weights.

    Every linear layer but lm_head is quantized on arrival, on `device`, to `quant` ("nf4", "fp4") with
    `blocksize` and (`double_quant`) 8-bit absmax constants, or kept in `dtype` when quant is None; its float
    copy is dropped at once. Embeddings, norms and lm_head are kept in `dtype` (None: the checkpoint's).
    Float weights are cast to `dtype` before quantizing, as transformers does, so the bytes match a
    bitsandbytes model loaded with torch_dtype=dtype. A checkpoint already quantized by bitsandbytes
    (transformers' 4-bit layout) keeps its own 4-bit format, or is dequantized to `dtype` when quant is None.
    Returns the model in eval mode.

    Device convention (as torch and transformers): the model lands on the CPU unless `device` names
    another ("cuda", "cuda:1"); a library call never moves work to a GPU by itself. The command-line
    scripts choose for their users instead (`--device auto`: CUDA when available). The forward accepts
    token ids, masks and positions on any device and moves them to the model's.
    """
    if quant not in ("nf4", "fp4", None):
        raise ValueError(f"quant must be 'nf4', 'fp4' or None, not {quant!r}")
    device = torch.device(device if device is not None else "cpu")
    directory = hf_checkpoint.resolve_checkpoint(name_or_path, revision, token)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    config = LlamaConfig.from_file(directory / "config.json")
    if dtype is None:
        dtype = getattr(torch, config.torch_dtype or "float32")
    hf_checkpoint.check_quantization_config(config.quantization_config)
    files = hf_checkpoint.checkpoint_files(directory)

    with torch.device("meta"):
        model = Llama(config)  # no memory: every parameter is a placeholder until its tensor arrives
    hf_checkpoint.load_weights(model, files, quant, dtype, device, double_quant, blocksize,
                               tied=config.tie_word_embeddings)
    if config.tie_word_embeddings:
        model.tie_weights()
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:  # the strict key check should make this unreachable
        raise RuntimeError(f"{directory}: tensors never arrived: {meta}")
    model.inv_freq = model.inv_freq.to(device)  # computed on the CPU at init, even under meta
    model.name_or_path = str(name_or_path)
    return model.eval()
