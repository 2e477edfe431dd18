"""Training on several devices with torch.distributed: data parallel, and FSDP2 sharding of the 4-bit base.

    torchrun --nproc-per-node N train.py --model ID ...          data parallel: a full model per device
    torchrun --nproc-per-node N train.py --model ID ... --fsdp   FSDP2: each rank keeps 1/N of everything

`torchrun` starts N processes and gives each RANK, LOCAL_RANK, WORLD_SIZE and a rendezvous address; `init`
joins them into one process group (NCCL on `cuda:LOCAL_RANK`, gloo on the CPU). Nothing here talks to
another process except through torch.distributed's collectives and FSDP2.

One optimizer step, N ranks, per-device micro-batch b (`--batch-size`), accumulation k. The data order
deals global micro-batches of N*b rows; rank r reads rows [r*b, (r+1)*b) of each (a short last one is split
evenly), so the ranks together see exactly the batches one process with `--batch-size N*b` would. With
m_t = 1 on supervised tokens,

    n        = sum_ranks sum_micro sum_t m_t                       (all-reduced before the first backward)
    loss_r   = sum_micro sum_t m_t * CE_t  /  n                    (this rank's share, summed over ranks)
    grad     = sum_ranks grad(loss_r)                              (all-reduce SUM / FSDP2 reduce-scatter SUM)

which is the gradient of the single-process loss: the denominator counts the whole global batch, and
gradients are summed, not averaged (an average would divide by N a second time). Only the summation
order of floating-point terms differs from one process, so results agree to fp32 rounding, not bit for bit.
Gradient clipping uses the norm of the whole gradient (under FSDP2: squares summed over every rank's shards).

Data parallel: every rank holds the whole model; after the last micro-batch the LoRA gradients (the only
trainable tensors) are all-reduced in a few flat buckets. `DistributedDataParallel` is not used: it only
synchronizes work done inside its own `forward`, while the trainer runs `model.hidden_states` and a
chunked loss head, and it averages where this sum is needed. Every rank then takes the same AdamW step.

FSDP2 (`torch.distributed.fsdp.fully_shard`, per decoder layer and once on the root for the embeddings,
final norm and lm_head): every parameter is a DTensor sharded on dim 0; a layer's shards are all-gathered
just before it runs and freed after (again for the checkpointed recompute in backward), gradients are
reduce-scattered. What FSDP2 needs from the 4-bit layers (found with torch 2.13, gloo, see the tests):
- It shards parameters only. `nf4.Linear4bit` keeps its packed codes (uint8 [(n+1)/2, 1]), absmax
  (uint8 with double quant, else float32) and nested_absmax (float32) as buffers, which fully_shard would
  silently replicate; `shard` re-registers them as frozen Parameters (requires_grad=False) first.
- No float storage trick is needed (Answer.AI's FSDP1 QLoRA stored the 4-bit bytes as bf16 because FSDP1
  flattens a unit into one tensor of one dtype): FSDP2 keeps each parameter separate and, when a group
  mixes dtypes, all-gathers them all as raw uint8 bytes and views each back. Shards are padded on dim 0, so
  an uneven split (a 1-element nested_absmax on 2 ranks: 1 and 0 elements) is fine.
- Integer Parameters need a torch whose fully_shard passes requires_grad=False when it re-creates them
  (pytorch issue 177844): torch 2.13 does; torch 2.11 fails with "only Tensors of floating point dtype can
  require gradients", which `shard` turns into a message asking for a newer torch.
- It refuses 0-d parameters: the scalar `nested_offset` stays a replicated buffer (4 bytes a layer).
- Gradients are summed (divide factor 1, SUM collectives: gloo has no AVG / PREMUL_SUM).
- The trainer's forward is `hidden_states`, registered with `register_fsdp_forward_method`; the root is not
  resharded after forward, so the loss head can read `lm_head.weight` whole after hidden_states returns.
- Optimizers see plain tensors: `optimizer_params` gives one Parameter per DTensor aliasing its local
  shard, so PagedAdamW (paged or 8-bit state) and torch's AdamW both step the shard in place with state of
  the shard's size. 8-bit state then forms its 256-element blocks within each shard, not the full tensor.

Loading under --fsdp: the ranks load in turns (`load_in_turns`): rank r streams and quantizes the
checkpoint on the CPU (llama.from_pretrained), adds the adapters, shards (keeping 1/N on its device), frees
the rest, then rank r+1 starts. Host RAM peaks at one 4-bit copy (~35 GB for 70B) instead of N, and a
device never holds more than its shards plus one layer; the price is N sequential loads. Measured on the
CPU (gloo, a synthetic 220M-parameter bf16 checkpoint, 2 ranks): the ranks' summed RSS peaked at 1554 MiB
against 1830 MiB for data parallel (each rank loads everything at once) and 941 MiB for one process.
Every rank draws the same LoRA init (same seed), so the shards fit together; it is drawn on the CPU, so a
CUDA --fsdp run starts from another (equally distributed) init than a one-GPU run with the same seed.

Memory per rank under FSDP2 (P_4 = linear weights at 4.127 bits, E = embedding + lm_head in bf16,
P_A = adapter parameters, L layers): (P_4 + E) / N  +  16 * P_A / N (fp32 A/B, grads, two AdamW moments)
+ E + 2 * P_4 / L (the unsharded root and two layers in flight) + activations of one micro-batch (as on one
device). With CPUOffloadPolicy (`--fsdp-cpu-offload`) the sharded terms move to host RAM.

Rank 0 alone prints (stdout of the other ranks goes to /dev/null), logs, and writes adapters (gathered
whole: `full_adapters`), which are then the same PEFT files as a one-device run. Checkpoints add one
optimizer/RNG file per rank (`rank_file`) and resume only at the same world size and mode.
A failing rank exits with its error; torchrun then stops the others. A rank stuck in a collective gives up
after the process-group timeout (`--dist-timeout`).
Tested: 2 CPU processes with gloo (tests/test_distributed.py); one H200 with NCCL at world size 1 (FSDP2,
CPU offload, resume, 8-bit state), on that machine's torch 2.11 patched with the one-line fix of pytorch
177844 (stock 2.11 refuses, see `shard`). Not yet run: several GPUs.
Left out: tensor/pipeline parallelism, several nodes' specifics (torchrun handles rendezvous), HSDP,
resharding a checkpoint to another world size, and evaluation split over the ranks (each rank computes the
eval loss on all held-out rows; FSDP2 needs every rank in every forward anyway).
"""
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import lora
import nf4

BUCKET_ELEMENTS = 1 << 24  # 64 MB of fp32 gradients per all-reduce: large messages, bounded extra memory
_stdout = None  # the real stdout of a rank > 0 while it is silenced


def launched() -> bool:
    """True in a process started by torchrun (or any launcher that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init(device: str, fsdp: bool = False, timeout_minutes: float = 30.0) -> str:
    """Join torchrun's process group (a no-op for a plain `python train.py`). Returns the device to use:
    "cuda" then means cuda:LOCAL_RANK (made the current device), so every `.to("cuda")` lands there."""
    if not launched():
        if fsdp:
            raise ValueError("--fsdp shards the model over several processes: start them with torchrun, e.g. "
                             "torchrun --nproc-per-node 2 train.py --model ... --fsdp")
        return device
    if dist.is_initialized():  # a second run in the same processes (tests) keeps the group
        return device
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if device == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local}, but this machine has {torch.cuda.device_count()} CUDA devices: "
                             "use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    global _stdout
    if dist.get_rank() != 0:  # one voice: rank 0 prints; errors and warnings still reach stderr
        _stdout, sys.stdout = sys.stdout, open(os.devnull, "w")
    return device


def close():
    global _stdout
    if _stdout is not None:
        sys.stdout.close()
        sys.stdout, _stdout = _stdout, None
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def _device() -> torch.device:
    # NCCL collectives need CUDA tensors, gloo takes CPU ones
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across(values: list[float]) -> list[float]:
    """Each value summed over the ranks (float64: token counts stay exact integers up to 2^53)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast(value):
    """Rank 0's value of a picklable object, on every rank (e.g. the default run directory's timestamp)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def rank_file(name: str, per_rank: bool) -> str:
    """A checkpoint file name: "optimizer.pt" on one process, "optimizer.rank1.pt" for state each rank
    holds differently (RNG always; optimizer state under FSDP, where it is sharded)."""
    if not per_rank or world_size() == 1:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.rank{rank()}.{suffix}"


# ---------------------------------------------------------------------------------------------------
# Data parallel

@torch.no_grad()
def all_reduce_grads(params):
    """Sum the gradients of `params` over the ranks, in place, through a few flat buckets."""
    buckets, sizes = [], []
    for g in (p.grad for p in params if p.grad is not None):
        if buckets and buckets[-1][0].dtype == g.dtype and sizes[-1] + g.numel() <= BUCKET_ELEMENTS:
            buckets[-1].append(g)
            sizes[-1] += g.numel()
        else:
            buckets.append([g])
            sizes.append(g.numel())
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])  # (size,)
        dist.all_reduce(flat)  # SUM
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))


# ---------------------------------------------------------------------------------------------------
# FSDP2

def _fsdp():
    # imported on use: torch.distributed.tensor takes seconds to import, which a one-device run never needs
    from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)
    return CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard, register_fsdp_forward_method


def _dtensor_type():
    """FSDP2's parameter type, or a type nothing is an instance of when there is no process group (then
    nothing can be sharded, and the import is skipped)."""
    if not dist.is_initialized():
        return type(None)
    from torch.distributed.tensor import DTensor
    return DTensor


def frozen_storage_as_parameters(model: nn.Module):
    """Re-register each Linear4bit's packed weight, absmax and nested_absmax (buffers) as frozen
    Parameters, so that fully_shard shards them; the 0-d nested_offset stays a buffer (see the docstring)."""
    for m in model.modules():
        if isinstance(m, nf4.Linear4bit):
            for name in ("weight", "absmax", "nested_absmax"):
                t = m._buffers.get(name)
                if t is not None:
                    del m._buffers[name]
                    m.register_parameter(name, nn.Parameter(t, requires_grad=False))


def shard(model: nn.Module, device: str, cpu_offload: bool = False) -> nn.Module:
    """fully_shard every decoder layer, then the root (embeddings, final norm, lm_head), in place."""
    CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard, register_fsdp_forward_method = _fsdp()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device, (world_size(),))
    frozen_storage_as_parameters(model)
    policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    try:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, offload_policy=policy)
        fully_shard(model, mesh=mesh, offload_policy=policy)
    except RuntimeError as e:  # older FSDP2 built every sharded Parameter with requires_grad=True first
        if "only Tensors of floating point dtype can require gradients" not in str(e):
            raise
        raise ValueError(f"torch {torch.__version__}'s FSDP2 cannot shard the uint8 4-bit storage (pytorch issue "
                         "177844, fixed in later releases; 2.13 works): upgrade torch, or train data-parallel "
                         "without --fsdp") from e
    register_fsdp_forward_method(model, "hidden_states")  # the trainer's forward (see the docstring)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # the loss is already normalized by the global token count
            m.set_force_sum_reduction_for_comms(True)
    return model


def load_in_turns(build, device: str, cpu_offload: bool = False) -> nn.Module:
    """Rank by rank: `build()` (the whole model, on the CPU), then shard it; the next rank starts once
    this one holds only its shards, so host RAM sees one full copy at a time."""
    model = None
    for turn in range(world_size()):
        if turn == rank():
            model = shard(build(), device, cpu_offload)
            held = local_bytes(model)  # every rank reports (stderr: rank 0 alone has a stdout)
            print(f"[rank {rank()}/{world_size()}] after loading, this rank holds: 4-bit base {held['4bit']:,} B, "
                  f"other frozen {held['frozen']:,} B, adapters {held['trainable']:,} B", file=sys.stderr, flush=True)
        barrier()
    return model


def is_sharded(model: nn.Module) -> bool:
    return dist.is_initialized() and isinstance(model, _fsdp()[1])


def clip_grad_norm_(params: list, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm over all gradients, scaled by min(1, max_norm / (norm + 1e-6))),
    also for FSDP2's sharded gradients: each rank's sum of squares over its shards, all-reduced on the
    communication device (also with CPU offload, where the shards live on the CPU). Returns the norm there."""
    DTensor = _dtensor_type()
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).to(_device()) ** 2 for g in local])
    total = squares.sum()
    dist.all_reduce(total)  # SUM of every rank's shards
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # torch's formula
    for g in local:  # the shards of the gradients, in place
        g.mul_(coef.to(g.device))
    return norm


def optimizer_params(params: list) -> list:
    """What the optimizer should step: `params` themselves, or under FSDP2 one plain Parameter per
    DTensor sharing its local shard's memory (so any optimizer updates the shard in place)."""
    DTensor = _dtensor_type()
    if not any(isinstance(p, DTensor) for p in params):
        return params
    return [nn.Parameter(p.to_local(), requires_grad=True) if isinstance(p, DTensor) else p for p in params]


def reduce_grads(params: list, opt_params: list):
    """After the last backward of a step: data parallel sums the gradients over the ranks; under FSDP2
    they are already reduce-scattered, and the optimizer's shard views get their local gradient."""
    if all(local is p for p, local in zip(params, opt_params, strict=True)):
        if world_size() > 1:
            all_reduce_grads(params)
        return
    with torch.no_grad():  # to_local() then returns the gradient's own local tensor (clipping reaches it)
        for p, local in zip(params, opt_params):
            local.grad = None if p.grad is None else p.grad.to_local()


@contextlib.contextmanager
def full_adapters(model: nn.Module, everywhere: bool = False):
    """Inside: the LoRA weights are whole tensors (what lora.save_adapter writes and load_adapter fills),
    on rank 0 only (for saving) or on every rank (`everywhere`, for loading: what they hold on leaving is
    copied back into the shards). Every rank must enter: the gather is collective. No-op without FSDP."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.tensor import DTensor, distribute_tensor
    swapped = []  # (module, its sharded Parameter, the whole one standing in for it)
    try:
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                for sub in (m.lora_A, m.lora_B):
                    p = sub.weight
                    if isinstance(p, DTensor):
                        # all-gather (every rank takes part) on the communication device: with CPU offload
                        # the shard itself lives on the CPU; shape/stride: FSDP2 splits unevenly
                        local = p.detach().to_local().to(_device())
                        full = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                                                  stride=p.stride()).full_tensor()
                        if everywhere or is_main():
                            whole = nn.Parameter(full if everywhere else full.cpu(), requires_grad=False)
                            sub._parameters["weight"] = whole
                            swapped.append((sub, p, whole))
        yield
        with torch.no_grad():
            for sub, p, whole in swapped if everywhere else ():
                # the same Shard(0) split FSDP2 made; src_data_rank=None: every rank has `whole`, no traffic
                mine = distribute_tensor(whole.detach(), p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(mine.to_local())
    finally:
        for sub, p, _ in swapped:
            sub._parameters["weight"] = p


def load_adapter(model: nn.Module, directory):
    """lora.load_adapter, also into an FSDP2-sharded model (each rank keeps its shard of the file's tensors)."""
    with full_adapters(model, everywhere=True):
        return lora.load_adapter(model, directory)


def share(rows: list) -> list:
    """This rank's contiguous share of one global micro-batch's rows (b each when it holds N*b rows;
    a short last micro-batch is split as evenly as it goes, so a rank gets none only if rows < ranks)."""
    n, r, k = world_size(), rank(), len(rows)
    return rows[r * k // n:(r + 1) * k // n]


def check_resume(saved: dict, fsdp: bool):
    """Refuse a checkpoint written at another world size or mode: its optimizer and RNG files are per rank
    (and sharded under FSDP), so they only fit the run that wrote them."""
    was = (saved.get("world_size", 1), bool(saved.get("fsdp", False)))
    if was != (world_size(), bool(fsdp)):
        how = lambda n, f: (f"torchrun --nproc-per-node {n} train.py" if n > 1 or f else "python train.py") + (
            " --fsdp" if f else "")
        raise ValueError(f"this checkpoint was written by {was[0]} process(es){' with --fsdp' if was[1] else ''}; "
                         f"this run has {world_size()}{' with --fsdp' if fsdp else ''}. Resharding is not supported: "
                         f"resume with `{how(*was)} --resume ...`, or start a new run from its adapter")


def local_bytes(model: nn.Module) -> dict:
    """Bytes this rank holds, by kind: 4-bit storage of the frozen linears, other frozen, trainable."""
    DTensor = _dtensor_type()
    out = {"4bit": 0, "frozen": 0, "trainable": 0}
    four_bit = {id(t) for m in model.modules() if isinstance(m, nf4.Linear4bit)
                for name, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)) if name != "bias"}
    for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values():
        local = t.to_local() if isinstance(t, DTensor) else t
        kind = "trainable" if t.requires_grad else "4bit" if id(t) in four_bit else "frozen"
        out[kind] += local.numel() * local.element_size()
    return out
