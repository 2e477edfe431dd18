"""Fold trained LoRA adapters into a Hugging Face checkpoint: one plain FP16 model every runtime loads.

LoRA (arXiv:2106.09685, §4.1) learns a low-rank update of each targeted weight; merging applies it once:

    W' = W + s * B @ A        A: [r, in], B: [out, r], s = alpha / r   (rsLoRA: alpha / sqrt(r))

summed in float32 and rounded once to the output dtype, so the merged model computes the adapted model
with a single rounding per weight. A value that does not fit the output dtype (|x| > 65504 in float16)
is an error naming the tensor, never a silent inf.

Which W (`--base`):
  original     the checkpoint's own FP16/BF16/FP32 weights. What the QLoRA recipe ships (arXiv:2305.14314
               trains against NF4 but merges into the 16-bit model); it differs from the trained model by
               the NF4 quantization error the adapters never saw.
  dequantized  dequant(quant(W)) with the run's 4-bit settings (NF4, blocksize 64, double quant unless
               the run's train_config.json says otherwise): exactly the weights the adapters were trained
               against, so the merged model reproduces the trained 4-bit+LoRA model up to one rounding.
               Every weight the run held in 4 bits goes through the round trip, targeted or not.
A base checkpoint that is itself bitsandbytes-4bit is dequantized first (the two modes then coincide).

Streaming: nothing holds the whole model. Tensor shapes and dtypes come from the safetensors headers,
so the output shards are planned before any data is read; then each tensor is read, merged and
written straight into its shard (a safetensors file is an 8-byte header length, a JSON header and
the raw little-endian bytes, so a shard can be written one tensor at a time). Input shards are mapped
per tensor and the adapter is read per module. Peak memory is a small multiple of the largest tensor
(its float32 merge), whatever the model or shard size: a 7B merge fits in well under 16 GB of RAM.

Output (the transformers layout): `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards of
at most `--max-shard-size` plus `model.safetensors.index.json`; `config.json` with the new dtype and no
`quantization_config`; the tokenizer files; `generation_config.json` listing every EOS id. Tensors
keep the base checkpoint's keys. Floating tensors the adapter does not touch are byte-identical when
their dtype already equals `--dtype`, else cast once: a runtime expects one dtype throughout a float16
checkpoint. Everything is written into a temporary directory next to the output and renamed at the end.

GGUF (`--format gguf`): the same merged tensors, streamed the same way, written as one llama.cpp file
`model-F16.gguf` (or BF16, Q8_0 with `--gguf-type`) in the output directory instead; see gguf_export.py.

Left out: DoRA, embedding adapters, rank/alpha patterns (lora.adapter_config refuses them), and base
checkpoints in `.bin` (pickle) format.
"""
import argparse
import functools
import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
from safetensors import safe_open

import gguf_export
import hf_checkpoint
import llama
import lora
import train_config
import nf4
from nf4 import DTYPES, Linear4bit
from tokenizer import Tokenizer

# safetensors' dtype names (https://github.com/huggingface/safetensors, "Format").
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
VERIFY_PROMPTS = ["The capital of France is", "def fibonacci(n):",
                  "Write a short poem about the sea.\n"]


class Adapter:
    """A PEFT LoRA adapter on disk: its validated config, its scaling and, per adapted module, the
    shapes of A [r, in] and B [out, r]. The tensors are read only when their module is merged (a 7B
    r=64 adapter is ~0.6 GB of float32)."""

    def __init__(self, adapter_dir):
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / lora.ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: pass --adapter pointing at a "
                                    "training run (or a checkpoint-<step>/ dir inside one)")
        self.config = lora.adapter_config(adapter_dir)  # refuses what we cannot merge (DoRA, patterns, ...)
        r, alpha = self.config["r"], self.config["lora_alpha"]
        self.scaling = lora.lora_scaling(r, alpha, bool(self.config.get("use_rslora")))
        self.file = adapter_dir / lora.ADAPTER_WEIGHTS
        if self.file.is_file():
            with safe_open(self.file, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            self._tensors = None
        elif (adapter_dir / lora.ADAPTER_WEIGHTS_BIN).is_file():  # older PEFT adapters (torch pickle)
            self.file = adapter_dir / lora.ADAPTER_WEIGHTS_BIN
            self._tensors = torch.load(self.file, map_location="cpu", weights_only=True)
            shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            raise FileNotFoundError(f"no {lora.ADAPTER_WEIGHTS} in {adapter_dir}")
        pairs = {}
        for key, shape in shapes.items():
            # base_model.model.<module>.lora_A.weight (PEFT strips the adapter name when saving)
            module, _, leaf = key.removeprefix(lora.KEY_PREFIX).rpartition(".lora_")
            if leaf not in ("A.weight", "B.weight"):
                raise ValueError(f"{self.file}: unsupported adapter tensor {key!r} (only lora_A/lora_B weights "
                                 "of linear layers can be merged)")
            pairs.setdefault(module, {})[leaf[0]] = (key, shape)
        self.keys, self.shapes = {}, {}  # module -> (A key, B key); module -> (out, in) of B @ A
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{self.file}: {module} has lora_{'B' if 'A' in ab else 'A'} missing")
            (a_key, a_shape), (b_key, b_shape) = ab["A"], ab["B"]
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
                raise ValueError(f"{self.file}: {module} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, "
                                 f"expected [{r}, in] and [out, {r}] for r={r}")
            self.keys[module] = (a_key, b_key)
            self.shapes[module] = (b_shape[0], a_shape[1])

    def pair(self, module):
        """(A [r, in], B [out, r]) of one module, as stored (float32 when written by PEFT or lora.py)."""
        if self._tensors is not None:
            return tuple(self._tensors[k] for k in self.keys[module])
        with safe_open(self.file, framework="pt") as f:
            return tuple(f.get_tensor(k) for k in self.keys[module])


class Checkpoint:
    """Read access to a (sharded) safetensors checkpoint, tensor by tensor, plain or bitsandbytes-4bit.
    `keys` lists the logical tensors (a 4-bit weight and its constants count as one float `P.weight`)."""

    def __init__(self, directory):
        self.files = hf_checkpoint.checkpoint_files(directory)
        self.file_of, self.header = {}, {}  # key -> shard file, key -> (safetensors dtype, shape)
        for file in self.files:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensor_slice = f.get_slice(key)
                    self.file_of[key] = file
                    self.header[key] = (tensor_slice.get_dtype(), tuple(tensor_slice.get_shape()))
        # bitsandbytes' reader rule (nf4.quantized_modules, docs/bnb_format.md §4): a layer is 4-bit iff
        # its quant_state key exists; its other tensors (nf4.BNB_SUFFIXES) belong to the one `P.weight`.
        self.quantized = {m + ".weight" for m in nf4.quantized_modules(self.file_of)}
        companions = {q.removesuffix("weight") + s for q in self.quantized for s in nf4.BNB_SUFFIXES if s != "weight"}
        self.keys = [k for k in self.file_of if k not in companions]  # shard order, then key order

    def _raw(self, key):
        # safe_open maps the whole shard; the pages a read touches count in our RSS until the map is
        # closed, so open per tensor: only the tensor's own copy outlives the read.
        with safe_open(self.file_of[key], framework="pt") as f:
            return f.get_tensor(key)

    def quant_state(self, key):
        prefix = key.removesuffix("weight")
        name = next(prefix + s for s in nf4.BNB_SUFFIXES
                    if s.startswith(nf4.QUANT_STATE_KEY) and prefix + s in self.file_of)
        return nf4.parse_quant_state(self._raw(name), where=f"{self.file_of[name]}: {name}")

    def shape_dtype(self, key):
        if key in self.quantized:
            state = self.quant_state(key)
            return tuple(state["shape"]), nf4.DTYPES[state["dtype"]]
        st_dtype, shape = self.header[key]
        if st_dtype not in TORCH_DTYPES:
            raise ValueError(f"{self.file_of[key]}: tensor {key} has dtype {st_dtype}, which merge.py cannot "
                             "pass through")
        return shape, TORCH_DTYPES[st_dtype]

    def get(self, key):
        """The tensor, a 4-bit weight dequantized to float32 (its stored float values, widened exactly)."""
        if key not in self.quantized:
            return self._raw(key)
        prefix = key.removesuffix("weight")
        parts = {s: self._raw(prefix + s) for s in nf4.BNB_SUFFIXES if prefix + s in self.file_of}
        return Linear4bit.from_quantized(parts).dequantize(torch.float32)


def plan_shards(entries, max_shard_size):
    """Greedy split of [(key, shape, dtype)] into shards of at most max_shard_size bytes (a tensor larger
    than that gets a shard of its own), the rule transformers' save_pretrained follows."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def write_safetensors(path, entries, produce):
    """Write a safetensors file tensor by tensor: the header is built from the planned shapes and dtypes,
    then produce(key) is called once per tensor and its bytes appended, so only one tensor is alive."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian bytes; this writer assumes a little-endian host")
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # transformers requires format=pt
    for key, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header with spaces to 8-byte alignment
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype in entries:
            tensor = produce(key)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise AssertionError(f"{key}: produced {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # (numel * itemsize,)
        f.flush()
        os.fsync(f.fileno())


def quantize_roundtrip(weight, settings):
    """dequant(quant(W)) in float32: the weight a 4-bit run computed with. Cast to the run's dtype first,
    as llama.from_pretrained does, so blocks, absmax and codes are the run's own."""
    if settings["quant_type"] is None:
        return weight
    linear = Linear4bit.from_weight(weight.to(DTYPES[settings["dtype"]]), quant_type=settings["quant_type"],
                                    blocksize=settings["blocksize"], double_quant=settings["double_quant"])
    return linear.dequantize(torch.float32)


def is_quantized_on_load(key, shape):
    """The weights llama.from_pretrained stores in 4 bits: every decoder-layer linear (not lm_head,
    embeddings or norms)."""
    return key.startswith("model.layers.") and key.endswith("_proj.weight") and len(shape) == 2


def finite_or_raise(key, out, before):
    """A value the output dtype cannot hold becomes inf: refuse it, naming the tensor and the fix."""
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        if not bool(torch.isfinite(before).all()):
            raise ValueError(f"{key}: {bad} values are not finite already before the cast to {out.dtype}: "
                             "the base checkpoint or the adapter holds inf/NaN (a diverged training run?)")
        raise ValueError(f"{key}: {bad} values are not finite after the cast to {out.dtype} (largest |value| "
                         f"{float(before.abs().max()):.6g}; float16 holds at most 65504): use --dtype bfloat16 "
                         "(--gguf-type bf16 for GGUF)")


def output_config(base_dir, dtype_name):
    """config.json with the new dtype, under the key(s) the source used (transformers 4 `torch_dtype`,
    5 `dtype`), and without the quantization block of a 4-bit base."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    config.pop("quantization_config", None)
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = dtype_name
    return config


def generation_config(base_dir):
    """generation_config.json of the base with `eos_token_id` listing every EOS id the tokenizer knows
    (Llama 3 chat models stop on several)."""
    path = Path(base_dir) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if (Path(base_dir) / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_dir(base_dir)
        eos = list(dict.fromkeys(tokenizer.eos_ids))
        if eos:
            config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        if tokenizer.bos_id is not None:
            config.setdefault("bos_token_id", tokenizer.bos_id)
        if tokenizer.pad_id is not None:
            config.setdefault("pad_token_id", tokenizer.pad_id)
    return config or None


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_hf_checkpoint(directory, base_dir, entries, produce, dtype_name, max_shard_size):
    """The transformers layout in `directory`: shards (each tensor from produce(key)), index, config.json,
    the base's tokenizer files and generation_config.json."""
    shards = plan_shards(entries, max_shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        write_safetensors(directory / name, shard, produce)
    if len(shards) > 1:
        write_json(directory / "model.safetensors.index.json", {
            "metadata": {"total_size": sum(math.prod(s) * d.itemsize for _, s, d in entries),
                         "total_parameters": sum(math.prod(s) for _, s, _ in entries)},
            "weight_map": {key: name for name, shard in zip(names, shards) for key, _, _ in shard}})
    write_json(directory / "config.json", output_config(base_dir, dtype_name))
    for path in sorted(Path(base_dir).iterdir()):  # tokenizer, chat template, licence, ...
        if (path.is_file() and not path.name.endswith(WEIGHT_FILES) and not path.name.startswith(".")
                and path.name not in ("config.json", "model.safetensors.index.json", "generation_config.json")):
            shutil.copy2(path, directory / path.name)
    gen = generation_config(base_dir)
    if gen is not None:
        write_json(directory / "generation_config.json", gen)


def plan_entries(ckpt, adapter, base_dir, dtype):
    """[(key, shape, dtype)] of every output tensor, from the headers alone (floats become `dtype`),
    after checking that every adapted module exists in the base with the adapter's shape."""
    entries = []
    for key in ckpt.keys:
        shape, source_dtype = ckpt.shape_dtype(key)
        entries.append((key, shape, dtype if source_dtype.is_floating_point else source_dtype))
    shapes = {key: shape for key, shape, _ in entries}
    for module, shape in adapter.shapes.items():
        key = module + ".weight"
        if key not in shapes:
            raise ValueError(f"the adapter targets {module}, but {base_dir} has no {key}: wrong --model?")
        if shapes[key] != shape:
            raise ValueError(f"shape mismatch for {key}: base {list(shapes[key])}, adapter lora_B @ lora_A "
                             f"{list(shape)}: the adapter was trained on another model; wrong --model?")
    return entries


def merged_tensor(ckpt, adapter, settings, key, out_dtype):
    """One output tensor: the base tensor (through the NF4 round trip first with --base dequantized, i.e.
    `settings` given), plus the adapter's update where it has one, rounded once to out_dtype (integer
    tensors as stored)."""
    tensor = ckpt.get(key)
    module = key.removesuffix(".weight")
    roundtrip = settings is not None and key not in ckpt.quantized and is_quantized_on_load(key, tensor.shape)
    changed = module in adapter.keys or roundtrip
    if changed:
        tensor = tensor.float()  # exact widening: the sum below runs in float32, rounded once
        if roundtrip:
            tensor = quantize_roundtrip(tensor, settings)
        if module in adapter.keys:
            a, b = adapter.pair(module)
            tensor = lora.merge_weight(tensor, a.float(), b.float(), adapter.scaling)
    if not tensor.is_floating_point() or (tensor.dtype == out_dtype and not changed):
        return tensor  # an untouched tensor already in the output dtype stays byte-identical
    out = tensor.to(out_dtype)  # the one rounding (a no-op for float32 output)
    finite_or_raise(key, out, tensor)
    return out


def merge_checkpoint(adapter_dir, output_dir, model, dtype_name, base, max_shard_size, force, verify,
                     fmt="safetensors", gguf_type="f16"):
    """Merge the adapter in adapter_dir into its base checkpoint and write the result to output_dir: a HF
    checkpoint (fmt "safetensors") or one GGUF file of type `gguf_type` (fmt "gguf")."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    adapter = Adapter(adapter_dir)
    if fmt == "gguf" and verify:
        raise ValueError("--verify loads a HF checkpoint; it does not read GGUF: drop it with --format gguf")
    if output_dir.exists() and not force:
        raise FileExistsError(f"{output_dir} already exists: pass --force to replace it, or --output DIR")
    model = model or adapter.config.get("base_model_name_or_path")
    if not model:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path: pass --model")
    base_dir = hf_checkpoint.resolve_checkpoint(model)
    if output_dir.resolve() in (Path(base_dir).resolve(), adapter_dir.resolve()):
        raise ValueError(f"--output {output_dir} is the base or adapter directory itself: choose another")
    dtype = DTYPES[dtype_name]
    settings = train_config.quant_settings(train_config.run_config(adapter_dir)) if base == "dequantized" else None
    ckpt = Checkpoint(base_dir)

    entries = plan_entries(ckpt, adapter, base_dir, dtype)
    produce = functools.partial(merged_tensor, ckpt, adapter, settings)  # produce(key, out_dtype)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        print(f"merging {adapter_dir} into {base_dir} ({base} weights, scaling {adapter.scaling:g}, "
              f"{len(adapter.keys)} adapted tensors) -> {output_dir} "
              f"({'GGUF ' + gguf_type if fmt == 'gguf' else dtype_name})", file=sys.stderr)
        if fmt == "gguf":
            gguf_export.write_gguf(tmp / gguf_export.file_name(gguf_type), base_dir,
                                   [(key, shape) for key, shape, _ in entries], produce, gguf_type,
                                   model_name=Path(str(model)).name)
        else:
            write_hf_checkpoint(tmp, base_dir, entries, lambda key: produce(key, dtype), dtype_name,
                                max_shard_size)
        lora.replace_dir(tmp, output_dir)  # --force: the old output stays whole until the new one is in
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {output_dir}", file=sys.stderr)

    n_params = sum(math.prod(s) for _, s, _ in entries)
    if fmt != "gguf" and (verify or (verify is None and n_params < 1e9)):
        verify_merge(output_dir, base_dir, adapter_dir, settings)
    return output_dir


@torch.no_grad()
def verify_merge(output_dir, base_dir, adapter_dir, settings):
    """Largest logit difference between the merged model and base + adapter on a few prompts (float32
    maths on CPU; the base 4-bit when the merge used --base dequantized). -> the difference."""
    tokenizer = Tokenizer.from_dir(output_dir) if (Path(output_dir) / "tokenizer.json").is_file() else None
    if tokenizer is not None:
        prompts = [tokenizer.encode(p, add_bos=True) for p in VERIFY_PROMPTS]
    else:
        vocab = llama.LlamaConfig.from_file(Path(output_dir) / "config.json").vocab_size
        prompts = torch.randint(vocab, (3, 16), generator=torch.Generator().manual_seed(0)).tolist()

    def logits(model):
        model.eval()
        return [model(torch.tensor([ids]))[0].float() for ids in prompts]

    if settings is None or settings["quant_type"] is None:
        reference = llama.from_pretrained(base_dir, quant=None, dtype=torch.float32, device="cpu")
    else:  # quantized exactly as the run did (from its dtype), then run in float32 like the merged model
        reference = llama.from_pretrained(base_dir, quant=settings["quant_type"], dtype=DTYPES[settings["dtype"]],
                                          blocksize=settings["blocksize"], double_quant=settings["double_quant"],
                                          device="cpu").float()
        for module in reference.modules():
            if isinstance(module, Linear4bit):
                module.compute_dtype = torch.float32
    lora.load_adapter(reference, adapter_dir)
    expected = logits(reference)
    del reference
    got = logits(llama.from_pretrained(output_dir, quant=None, dtype=torch.float32, device="cpu"))
    diff = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    scale = max(float(e.abs().max()) for e in expected)
    print(f"verify: largest |logit difference| merged vs base + adapter = {diff:.4g} "
          f"(largest |logit| {scale:.4g}; {sum(map(len, prompts))} tokens)", file=sys.stderr)
    return diff


def parse_size(text):
    """'2GB' / '500MB' / '1000000' -> bytes (decimal units, as transformers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    try:
        unit = next((u for u in sorted(units, key=len, reverse=True) if t.endswith(u)), None)
        size = int(float(t[:-len(unit)]) * units[unit]) if unit else int(t)
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 2GB, 500MB or 1000000")
    return size


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--adapter", default=None,
                   help="training run or adapter dir (PEFT layout); default: the newest finished run under runs/")
    p.add_argument("--model", default=None,
                   help="base checkpoint (hub id or local dir); default: the adapter's base_model_name_or_path")
    p.add_argument("--output", default=None, help="output directory; default: <adapter>/merged (<adapter>/gguf "
                   "with --format gguf)")
    p.add_argument("--format", default="safetensors", choices=["safetensors", "gguf"],
                   help="safetensors: a transformers checkpoint; gguf: one llama.cpp file (default %(default)s)")
    p.add_argument("--gguf-type", default="f16", choices=list(gguf_export.GGUF_TYPES),
                   help="type of the GGUF's weight matrices (norms stay F32): f16, bf16, or q8_0 (8.5 bits a weight; "
                        "rows that are not whole 32-blocks stay f16). For Q4_K_M and other k-quants, run llama.cpp's "
                        "llama-quantize on the f16 file (default %(default)s)")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES),
                   help="dtype of the merged safetensors checkpoint (default %(default)s)")
    p.add_argument("--base", default="original", choices=["original", "dequantized"],
                   help="original: fold into the checkpoint's own weights (the QLoRA recipe; differs from the "
                        "trained model by the 4-bit quantization error); dequantized: into dequant(quant(W)) with "
                        "the run's 4-bit settings, i.e. exactly the weights the adapters were trained against "
                        "(default %(default)s)")
    p.add_argument("--max-shard-size", default="2GB", type=parse_size,
                   help="largest output shard, e.g. 2GB, 500MB (default 2GB)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="compare merged logits with base + adapter; default: on below 1B parameters")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    adapter = Path(args.adapter) if args.adapter else train_config.latest_run()
    output = Path(args.output) if args.output else adapter / ("gguf" if args.format == "gguf" else "merged")
    return merge_checkpoint(adapter, output, args.model, args.dtype, args.base, args.max_shard_size,
                            args.force, args.verify, args.format, args.gguf_type)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, PermissionError, ConnectionError, ValueError) as e:
        sys.exit(f"merge.py: error: {e}")
