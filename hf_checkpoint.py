"""Hugging Face checkpoints: finding one (a local directory or a hub id) and streaming its safetensors into
a model built on the meta device, quantizing each linear weight as it arrives.

The float model never exists in memory (QLoRA, arXiv:2305.14314 §3): each tensor is read from its shard,
cast to the compute dtype (as transformers does before bitsandbytes quantizes, so the bytes match) and,
for a linear layer other than lm_head, replaced at once by a frozen 4-bit `nf4.Linear4bit`, its float copy
dropped. Peak memory is the quantized model plus one float tensor. A checkpoint that bitsandbytes already
quantized (transformers' 4-bit layout, docs/bnb_format.md §4) is read as
it is: its packed codes and constants become the `Linear4bit`, or are dequantized when no quantization
is asked for.

Loading is strict, from the headers alone and before any data is read: a missing or unexpected key or a
wrong shape stops with the list of them. Only safetensors are read (pickled .bin files can run code).
Hub failures (gated repository, no token, offline, a typo) become errors that say what to do.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                   RepositoryNotFoundError, RevisionNotFoundError)
from safetensors import safe_open
from torch import nn

import nf4

try:  # glibc, for _return_freed_heap; None elsewhere (macOS, musl without the symbol)
    _LIBC = ctypes.CDLL(None)
except OSError:
    _LIBC = None

# What a hub snapshot needs; everything else in a repo (.bin/.pth duplicates, original/ folders) is skipped.
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "model.safetensors.index.json",
             "model*.safetensors"]
_ITEMSIZE = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4}  # safetensors dtype -> bytes (quant_storage)


# ----------------------------------------------------------------------------------------------------
# Where the files are


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None,
                       token: str | None = None) -> Path:
    """A local directory as it is, otherwise a hub id downloaded (or found in the HF cache) as a snapshot
    of just the files in HUB_FILES. Failures say what to do about them."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise ValueError(f"{name} is a file; pass the checkpoint directory that holds config.json")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise FileNotFoundError(f"no such directory: {name} (a hub id looks like 'owner/name')")

    token = token or os.environ.get("HF_TOKEN")
    login = "pass token=... (or set HF_TOKEN, or run `hf auth login`)"
    try:
        directory = Path(huggingface_hub.snapshot_download(name, revision=revision, token=token,
                                                           allow_patterns=HUB_FILES))
    except GatedRepoError as e:  # a subclass of RepositoryNotFoundError: check it first
        raise PermissionError(f"{name} is a gated repository: accept its license at https://huggingface.co/{name} "
                              f"with your account, then {login}") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{name}: no such repository on the Hugging Face Hub, or it is private (then "
                                f"{login}); for a local checkpoint pass its directory") from e
    except RevisionNotFoundError as e:
        raise ValueError(f"{name} has no revision {revision!r} (a branch, tag or commit hash)") from e
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise ConnectionError(f"{name} is not in the local Hugging Face cache and {why}: connect to the network "
                              "(and unset HF_HUB_OFFLINE) to download it once, or pass a local directory") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise PermissionError(f"{name}: access denied (HTTP {status}); {login} with a token that may "
                                  "read this repository") from e
        raise
    if not any(directory.glob("*.safetensors")):
        try:  # only to name the .bin files in the message
            files = huggingface_hub.HfApi().list_repo_files(name, revision=revision, token=token)
            bins = [f for f in files if f.endswith(".bin")]
        except Exception:  # offline (a cached snapshot) or listing refused: the message just lacks the detail
            bins = []
        raise _no_safetensors_error(name, bins)
    return directory


def _no_safetensors_error(where: str, bin_files: list) -> Exception:
    if bin_files:
        return ValueError(f"{where} holds only PyTorch .bin weights ({bin_files[0]}, ...); this loader reads "
                          "safetensors only (pickle files can run code). Use a revision with safetensors (the "
                          "hub's conversion bot often opened one: revision='refs/pr/N'), or convert once: "
                          "transformers' AutoModelForCausalLM.from_pretrained(...).save_pretrained(dir)")
    return FileNotFoundError(f"{where}: no model.safetensors or model.safetensors.index.json")


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by model.safetensors.index.json, else
    model.safetensors."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [directory / n for n in names]
        absent = [n for n in names if not (directory / n).is_file()]
        if absent:
            raise FileNotFoundError(f"{directory}: the index names shards that are missing: {absent}")
        return files
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise _no_safetensors_error(str(directory), sorted(p.name for p in directory.glob("*.bin")))


# ----------------------------------------------------------------------------------------------------
# Streaming them into a model


def load_weights(model: nn.Module, files: list[Path], quant: str | None, dtype: torch.dtype,
                 device: torch.device, double_quant: bool = True, blocksize: int = 64, tied: bool = False):
    """Fill `model` (built on the meta device, HF module names) from the safetensors `files`, one tensor at
    a time: float tensors cast to `dtype` on `device`; every linear weight but lm_head quantized on arrival
    to `quant` ("nf4", "fp4"; None keeps it in `dtype`); bitsandbytes 4-bit layers kept 4-bit, or
    dequantized when quant is None. `tied`: lm_head shares the embedding matrix (a stray lm_head.weight in
    the file is skipped). The strict key and shape check runs on the headers before any data is read."""
    shapes = {}  # key -> (file, shape, dtype) from the headers alone, to fail before reading any data
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                shapes[key] = (file, s.get_shape(), s.get_dtype())
    parts = _check_keys(model, shapes, tied)

    pending = {}  # 4-bit module -> {suffix: tensor} while its pieces arrive (they may span shards)
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if _ignored(key, tied):
                    continue
                tensor = f.get_tensor(key)
                module_name = _module_of(key)
                if module_name in parts:  # a bitsandbytes 4-bit layer: gather its pieces, then build it
                    pending.setdefault(module_name, {})[key[len(module_name) + 1:]] = tensor
                    if pending[module_name].keys() == parts[module_name]:
                        layer = _load_4bit(pending.pop(module_name), device, dtype, keep_4bit=quant is not None)
                        _swap_in(model, module_name, layer)
                    continue
                _load_tensor(model, module_name, key.rpartition(".")[2], tensor, quant, dtype, device,
                             double_quant, blocksize)
    if pending:  # _check_keys should make this unreachable
        raise RuntimeError(f"4-bit layers never completed: {sorted(pending)}")


def _load_tensor(model, module_name, name, tensor, quant, dtype, device, double_quant, blocksize):
    """One float tensor into its module: a linear weight to be quantized becomes a Linear4bit at once."""
    module = model.get_submodule(module_name)
    value = tensor.to(device=device, dtype=dtype)
    quantize = quant is not None and isinstance(module, nn.Linear) and module_name != "lm_head"
    if quantize and name == "weight":
        bias = None if module.bias is None or module.bias.is_meta else module.bias.data
        layer = nf4.Linear4bit.from_weight(value, bias=bias, quant_type=quant, blocksize=blocksize,
                                           double_quant=double_quant, compute_dtype=dtype)
        del tensor, value  # the float weight dies here: peak memory stays one tensor above 4-bit
        _swap_in(model, module_name, layer)
        if layer.weight.device.type == "cpu":
            _return_freed_heap()
        return
    value = _own(value, tensor)
    del tensor
    frozen = isinstance(module, nf4.Linear4bit)  # a bias arriving after its 4-bit weight
    setattr(module, name, nn.Parameter(value, requires_grad=not frozen))


def _return_freed_heap():
    """Give glibc's freed-but-kept heap back to the OS. The quantizer's short-lived buffers interleave with
    the packed weights that stay, so without this the freed holes pile up (~100 MB on a 1B model) and
    peak memory overshoots "quantized model + one float tensor". A no-op where libc has no malloc_trim."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _own(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`value` (source.to(device, dtype)) in memory of its own. When .to() had nothing to do, it is still a
    view into safetensors' private mmap of the file: the model would then break (SIGBUS) if the file were
    rewritten in place, and its size would hide in the page cache."""
    return value.clone() if value.data_ptr() == source.data_ptr() else value


def _module_of(key: str) -> str:
    """model.layers.0.mlp.up_proj for ...up_proj.weight, ...up_proj.bias and ...up_proj.weight.absmax."""
    return key.split(".weight", 1)[0] if ".weight" in key else key.rpartition(".")[0]


def _ignored(key: str, tied: bool) -> bool:
    # older transformers saved the rope buffer; it is recomputed from the config. A tied checkpoint that
    # still carries lm_head.weight gets the embedding matrix instead, as in transformers.
    return key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight")


def check_quantization_config(qc: dict | None):
    if qc is None:
        return
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        kind = qc.get("quant_method", "?") + (" 8-bit" if qc.get("load_in_8bit") else "")
        raise ValueError(f"checkpoint quantized with {kind!r}: only bitsandbytes 4-bit checkpoints and plain "
                         "float checkpoints can be loaded; use the original float checkpoint")


def _check_keys(model: nn.Module, shapes: dict, tied: bool) -> dict[str, set]:
    """Strict key and shape check of the checkpoint headers against the model. Returns, for each module
    stored in bitsandbytes' 4-bit layout, the set of its key suffixes ("weight", "weight.absmax", ...)."""
    parts = {m: set() for m in nf4.quantized_modules(shapes)}  # bitsandbytes' reader rule, docs/bnb_format.md §4.1
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # tied: no lm_head.weight
    unexpected, wrong = [], []
    for key, (_, shape, dtype) in shapes.items():
        if _ignored(key, tied):
            continue
        module_name = _module_of(key)
        if module_name in parts:  # every key of a 4-bit layer: weight, weight.absmax, ..., bias
            suffix = key[len(module_name) + 1:]
            parts[module_name].add(suffix)
            if module_name + ".weight" not in expected:
                unexpected.append(key)
                continue
            out_f, in_f = expected[module_name + ".weight"]
            nbytes = (out_f * in_f + 1) // 2  # two 4-bit codes a byte, whatever quant_storage dtype holds them
            if suffix == "weight" and math.prod(shape) * _ITEMSIZE.get(dtype, 0) != nbytes:
                wrong.append(f"{key}: {dtype} {shape}, but the 4-bit packing of [{out_f}, {in_f}] takes "
                             f"{nbytes} bytes")
            elif suffix == "bias" and tuple(shape) != expected.get(key):
                wrong.append(f"{key}: checkpoint {shape}, config.json implies {list(expected.get(key, ()))}")
            continue
        if key not in expected:
            unexpected.append(key)
        elif tuple(shape) != expected[key]:
            wrong.append(f"{key}: checkpoint {shape}, config.json implies {list(expected[key])}")
    present = {k for k in shapes} | {m + ".weight" for m in parts}
    missing = [k for k in expected if k not in present]
    incomplete = [f"{m}: {sorted(p)}" for m, p in parts.items()
                  if not {"weight", "weight.absmax", "weight.quant_map"} <= p]
    problems = [(missing, "missing"), (unexpected, "unexpected"), (wrong, "wrong shape"),
                (incomplete, "incomplete 4-bit layers")]
    if any(keys for keys, _ in problems):
        lines = [f"{what} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}"
                 for keys, what in problems if keys]
        raise ValueError("checkpoint does not match config.json:\n  " + "\n  ".join(lines))
    return parts


def _load_4bit(parts: dict, device, dtype, keep_4bit: bool) -> nn.Module:
    """A layer stored by bitsandbytes (transformers' 4-bit layout), kept 4-bit or dequantized to `dtype`."""
    bias = parts.pop("bias", None)
    bias = None if bias is None else _own(bias.to(device=device, dtype=dtype), bias)
    # the JSON blob stays on the CPU: it is parsed there
    layer = nf4.Linear4bit.from_quantized(
        {k: t if "quant_state" in k else _own(t.to(device), t) for k, t in parts.items()},
        bias=bias, compute_dtype=dtype)
    if keep_4bit:
        return layer
    linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(layer.dequantize(dtype))
    if bias is not None:
        linear.bias = nn.Parameter(bias)
    return linear


def _swap_in(model: nn.Module, name: str, module: nn.Module):
    """Replace the placeholder linear `name` by a loaded layer of the same shape (a 4-bit layer's shape comes
    from its quant-state JSON, which the header check cannot see)."""
    old = model.get_submodule(name)
    if (getattr(old, "out_features", None), getattr(old, "in_features", None)) != (module.out_features,
                                                                                 module.in_features):
        raise ValueError(f"{name}: checkpoint layer is {module.out_features}x{module.in_features}, "
                         f"config.json implies {old.out_features}x{old.in_features}")
    model.set_submodule(name, module)
