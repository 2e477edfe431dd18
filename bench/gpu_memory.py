"""How much GPU memory a QLoRA step needs, computed from the model shape alone (no GPU, no weights).

One device: frozen base (NF4 + double-quant linears, bf16 embeddings/norms/lm_head) + LoRA adapters, their
gradients and AdamW state + activations of a gradient-checkpointed step. The base and adapter/optimizer bytes
are exact counts of what nf4.Linear4bit and paged_adamw.PagedAdamW allocate (bench/gpu.py checks the count
against the built model and the live optimizer); the activations are an estimate (a count of the tensors
autograd keeps per token, listed in `activation_bytes`), so every total is an estimate too.

Several devices with FSDP2 (`fully_shard` per decoder layer and on the root, train.py --fsdp): every
parameter, its gradient and its optimizer state are split evenly over the N ranks; while a layer runs, its
full parameters are all-gathered (FSDP2 prefetches the next layer, so two are in flight), and the root's
(embeddings, final norm, lm_head) stay gathered across the step because the root's forward spans it. With
CPU offload of the sharded parameters (FSDP2's CPUOffloadPolicy) the shards, their gradients and the
optimizer step live in host memory: the GPU keeps only what is gathered and the activations.

    per rank, no offload:   (base + adapters + grads + state) / N + gathered + activations(b, T)
    per rank, CPU offload:                                          gathered + activations(b, T)
                            host: (base + adapters + grads + state) / N

QLoRA arXiv:2305.14314 §3 (4.127 bits per NF4 + DQ parameter); FSDP2: torch.distributed.fsdp.fully_shard.
"""


GB = 1e9

# HF config.json fields. Llama-2 has untied embeddings; 70B uses GQA (8 kv heads).
SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                intermediate_size=13824, vocab_size=32000),
    "70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=176, vocab_size=512),
}


def quantized_linear_bytes(out_features: int, in_features: int) -> int:
    """Device bytes of one NF4 + double-quant linear weight as nf4.Linear4bit holds it (blocksize 64):
    packed 4-bit pairs + an 8-bit absmax per 64 weights + a float32 nested absmax per 256 absmax + the
    float32 offset. (A checkpoint also stores the two code books, 16 and 256 float32, per module; the
    layer in memory does not.)"""
    n = out_features * in_features
    nblocks = -(-n // 64)
    return (n + 1) // 2 + nblocks + 4 * -(-nblocks // 256) + 4


def linear_shapes(shape: dict) -> list[tuple[int, int]]:
    """(out, in) of every decoder linear, layer after layer: the LoRA targets and the quantized weights."""
    c, i = shape["hidden_size"], shape["intermediate_size"]
    d = c // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    per_layer = [(c, c), (kv, c), (kv, c), (c, c), (i, c), (i, c), (c, i)]  # q k v o gate up down
    return per_layer * shape["num_hidden_layers"]


def optimizer_state_bytes(shapes: list[tuple[int, int]], r: int, optim_bits: int) -> int:
    """PagedAdamW state for the r-rank adapters of `shapes`: two fp32 moments, or two uint8 moments plus a
    float32 absmax per 256 values (tensors of >= 4096 elements, which every adapter of these models is)."""
    if optim_bits == 32:
        return sum(8 * r * (o + n) for o, n in shapes)
    return sum(2 * k + 2 * 4 * -(-k // 256) for o, n in shapes for k in (r * n, r * o))


def activation_bytes(shape: dict, batch: int, seq: int, r: int, dropout: float) -> int:
    """Estimated bytes autograd holds at the peak of a checkpointed step, per token:
     - checkpoints: one bf16 residual [C] per layer, kept for the whole backward
     - one layer recomputed during its backward: RMSNorm fp32 input + bf16 output (6C, twice), q k v (6C),
       rotated q k (4C), attention output (2C), residual outputs (4C), gate/up/silu/product (8I), and per
       LoRA target the bf16 dropout output + its bool mask (3 bytes per input feature) and the bf16 rank-r
       intermediate (lora.py runs the adapter matmuls in the activations' dtype)
     - gradients in flight through that layer: about its largest bf16 tensors (two [I] and two [C])
     - the loss (train.LMHeadCrossEntropy): final hidden state + the gathered rows (bf16) and the fp32
       dL/dh it keeps, plus one chunk of fp32 logits and their bf16 softmax"""
    c, i, v, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    per_in = 3 if dropout > 0 else 0  # without dropout the adapter reuses the base's saved input
    lora_in = sum(per_in * n + 2 * r for _, n in linear_shapes(shape)[:7])
    layer = 2 * 6 * c + 6 * c + 4 * c + 2 * c + 4 * c + 8 * i + lora_in
    grads = 2 * (2 * i + 2 * c)
    tokens = batch * seq
    chunk = max(64, (1 << 25) // v)  # train.loss_chunk_rows
    return tokens * (2 * c * L + layer + grads + 4 * c + 4 * c) + min(chunk, tokens) * v * 6


def memory_estimate(shape: dict, batch: int, seq: int, optim_bits: int, r: int = 64, dropout: float = 0.1) -> dict:
    """Bytes a one-device QLoRA step needs, by part (see the module docstring)."""
    c, v, L = shape["hidden_size"], shape["vocab_size"], shape["num_hidden_layers"]
    shapes = linear_shapes(shape)
    base_4bit = sum(quantized_linear_bytes(o, n) for o, n in shapes)
    base_bf16 = 2 * (2 * v * c + (2 * L + 1) * c)  # embed_tokens + lm_head + norms
    lora_params = sum(r * (o + n) for o, n in shapes)
    state = optimizer_state_bytes(shapes, r, optim_bits)
    adapters = 4 * lora_params * 2 + state  # fp32 adapters and their fp32 gradients, plus the state
    activations = activation_bytes(shape, batch, seq, r, dropout)
    return dict(base_4bit=base_4bit, base_bf16=base_bf16, lora_params=lora_params, optimizer_state=state,
                adapters_and_optimizer=adapters, activations_estimate=activations,
                total_estimate=base_4bit + base_bf16 + adapters + activations,
                bits_per_linear_param=8 * base_4bit / sum(o * n for o, n in shapes))


def fsdp_estimate(shape: dict, world: int, batch: int, seq: int, optim_bits: int, cpu_offload: bool,
                  r: int = 64, dropout: float = 0.1) -> dict:
    """Bytes per rank of an FSDP2 QLoRA step on `world` GPUs, micro-batch `batch` x `seq` per rank."""
    one = memory_estimate(shape, batch, seq, optim_bits, r, dropout)
    shapes = linear_shapes(shape)
    per_layer = shapes[:7]
    layer_4bit = sum(quantized_linear_bytes(o, n) for o, n in per_layer)
    layer_lora = 4 * sum(r * (o + n) for o, n in per_layer)  # fp32 adapters of one layer
    # gathered while running: two decoder layers (the current one and the prefetched next; in backward
    # also the current layer's full fp32 adapter gradients before their reduce-scatter) and the root
    gathered = 2 * (layer_4bit + layer_lora) + layer_lora + one["base_bf16"]
    sharded = -(-(one["base_4bit"] + one["base_bf16"] + one["adapters_and_optimizer"]) // world)
    gpu = gathered + one["activations_estimate"] + (0 if cpu_offload else sharded)
    return dict(world=world, cpu_offload=cpu_offload, sharded_per_rank=sharded, gathered=gathered,
                activations_estimate=one["activations_estimate"], gpu_per_rank=gpu,
                host_per_rank=sharded if cpu_offload else 0, lora_params=one["lora_params"],
                base_4bit=one["base_4bit"], base_bf16=one["base_bf16"],
                adapters_and_optimizer=one["adapters_and_optimizer"])


def estimate_rows(r: int = 64, dropout: float = 0.1, tiny: bool = False) -> dict:
    """The README's table: 7B and 13B on one GPU; 70B over 2 and 4 GPUs of 24 GB with FSDP2."""
    out = {}
    for name in ("7b", "13b"):
        for batch, seq in ((1, 512), (4, 512), (1, 2048)):
            for bits in (32, 8):
                out[f"{name}_{batch}x{seq}_adamw{bits}"] = memory_estimate(SHAPES[name], batch, seq, bits, r, dropout)
    for world in (2, 4):
        for offload in (False, True):
            for bits in (32, 8):
                key = f"70b_fsdp{world}_1x2048_adamw{bits}{'_offload' if offload else ''}"
                out[key] = fsdp_estimate(SHAPES["70b"], world, 1, 2048, bits, offload, r, dropout)
    if tiny:  # to check the exact parts against what the tiny run really allocates
        for bits in (32, 8):
            out[f"tiny_2x32_adamw{bits}"] = memory_estimate(SHAPES["tiny"], 2, 32, bits, r, dropout)
    return out


def estimate_table(est: dict, card_bytes: float = 24e9) -> list[str]:
    """Text lines of the estimate (GB = 1e9 bytes); rows missing from `est` are left out."""
    lines = []
    if "7b_1x512_adamw32" in est:
        lines.append("memory ESTIMATES, one GPU (computed, not measured; GB = 1e9 bytes; base = NF4+DQ linears + "
                     "bf16 embed/lm_head/norms; lora+opt = fp32 adapters, grads, AdamW state):")
        lines.append(f"  {'model':5} {'batch':7} {'base':>6} {'lora+opt32':>10} {'lora+opt8':>9} {'activ.':>7} "
                     f"{'total32':>8} {'total8':>7}")
        for name in ("7b", "13b"):
            for b, t in ((1, 512), (4, 512), (1, 2048)):
                e32, e8 = est[f"{name}_{b}x{t}_adamw32"], est[f"{name}_{b}x{t}_adamw8"]
                lines.append(f"  {name:5} {f'{b}x{t}':7} {(e32['base_4bit'] + e32['base_bf16']) / GB:6.2f} "
                             f"{e32['adapters_and_optimizer'] / GB:10.2f} {e8['adapters_and_optimizer'] / GB:9.2f} "
                             f"{e32['activations_estimate'] / GB:7.2f} {e32['total_estimate'] / GB:8.2f} "
                             f"{e8['total_estimate'] / GB:7.2f}")
    if "70b_fsdp2_1x2048_adamw32" in est:
        lines.append(f"70B with FSDP2, 1x2048 per rank, per-rank GB (estimate; 'fits' against "
                     f"{card_bytes / GB:.0f} GB):")
        lines.append(f"  {'ranks':5} {'params':8} {'shard32':>7} {'gathered':>8} {'activ.':>6} {'GPU32':>6} "
                     f"{'GPU8':>6} {'host32':>6} fits32/8")
        for world in (2, 4):
            for offload in (False, True):
                tag = "_offload" if offload else ""
                e32, e8 = est[f"70b_fsdp{world}_1x2048_adamw32{tag}"], est[f"70b_fsdp{world}_1x2048_adamw8{tag}"]
                fits = "/".join("yes" if e["gpu_per_rank"] <= card_bytes else "no" for e in (e32, e8))
                lines.append(f"  {world:<5} {'CPU' if offload else 'GPU':8} {e32['sharded_per_rank'] / GB:7.2f} "
                             f"{e32['gathered'] / GB:8.2f} {e32['activations_estimate'] / GB:6.2f} "
                             f"{e32['gpu_per_rank'] / GB:6.2f} {e8['gpu_per_rank'] / GB:6.2f} "
                             f"{e32['host_per_rank'] / GB:6.2f} {fits}")
    return lines
