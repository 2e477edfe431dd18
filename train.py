"""QLoRA fine-tuning, end to end: data -> masked token ids -> 4-bit base + LoRA -> paged AdamW -> adapters.

    python train.py                                   # offline demo (issue 8): a real model, an embedded task
    python train.py --model meta-llama/Llama-2-7b-hf  # the QLoRA recipe on mlabonne/guanaco-llama2-1k
    python train.py --model DIR --data rows.jsonl --output-dir out --max-steps 100 --resume auto

What one optimizer step computes (QLoRA arXiv:2305.14314 §3, LoRA arXiv:2106.09685 §4.1):

    y_t      = next token,  m_t = 1 if y_t is trained on (completion / assistant / text), else 0
    loss     = sum_{micro-batches} sum_t m_t * CE(lm_head(h_t), y_t)  /  sum_{micro-batches} sum_t m_t
    W_lora  <- AdamW(W_lora, clip(grad, 0.3), lr(step))       (frozen NF4 base, fp32 adapters)
    lr(s)    = lr * min(1, (s+1)/warmup) * {1 | cosine | linear decay}, warmup = ceil(3% of the steps)

The denominator counts supervised tokens across the whole accumulated batch, so gradient accumulation
gives the gradient of one big batch (averaging per micro-batch would weight short micro-batches up).

Defaults are the QLoRA recipe (§4, Appendix B: NF4 + double quant, LoRA r 64 / alpha 16 / dropout 0.1 on
every linear layer, lr 2e-4 constant, max grad norm 0.3, paged AdamW, gradient checkpointing, batch 16).

The file reads top to bottom: the setup (device, dtype, model, optimizer, data), checkpoints, one
training step, and the loop in `train`, which has nanoGPT's shape: one short block per stage. Elsewhere:
- train_config.py: the flags (one dataclass, the CLI generated from it) and how a run's settings layer.
- data.py: rows -> token ids with the "trained on" mask m_t (chat rows rendered prefix by prefix), packing.
- lm_loss.py: the loss without fp32 logits for the whole batch (the head runs chunk by chunk).
- Checkpoints hold everything a bit-exact resume needs: adapter (PEFT layout), optimizer state, step,
  data position (epoch, batch; the shuffle is a pure function of seed and epoch), RNG states. The LR
  schedule is a pure function of the step, so the step is its whole state.

Several devices: `torchrun --nproc-per-node N train.py ...` trains data-parallel, `--fsdp` shards with
FSDP2; each rank reads its share of every global micro-batch of N x --batch-size rows (distributed.py).

Left out on purpose: length-grouped sampling, evaluation beyond loss (the demo's accuracy).
"""
import dataclasses
import json
import math
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

import distributed
import hf_checkpoint
import llama
import lora
import nf4
from data import IGNORE, batch_order, make_batch, pack, read_rows, show_example, split_eval, tokenize_rows
from lm_loss import lm_loss_sum
from tokenizer import Tokenizer
from train_config import (TrainConfig, find_checkpoint, memory_estimate, resolve_config, resolve_device,
                          resolve_dtype)


# ---------------------------------------------------------------------------------------------------
# Setup: everything that can fail on bad input runs before the output directory exists.

def setup(cfg):
    """Threads, device and dtype resolved into cfg; returns (checkpoint directory, tokenizer)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.device = distributed.init(resolve_device(cfg.device), cfg.fsdp, cfg.dist_timeout)  # torchrun: one rank
    cfg.dtype = resolve_dtype(cfg.dtype, cfg.device)
    if cfg.fsdp and cfg.dtype == "float16":  # each rank would find overflows in its own shard only
        raise ValueError("--fsdp trains in bfloat16 or float32, not float16 (its loss scaling is per shard)")
    if cfg.fsdp_cpu_offload and not (cfg.fsdp and cfg.device == "cuda"):
        raise ValueError("--fsdp-cpu-offload keeps FSDP's shards in host RAM instead of GPU memory: it needs --fsdp "
                         "on CUDA")
    model_dir = hf_checkpoint.resolve_checkpoint(cfg.model, revision=cfg.revision)
    hf_checkpoint.checkpoint_files(model_dir)  # a directory without weights fails here, not after the data is read
    if Path(cfg.model).expanduser().is_dir():
        cfg.model = str(Path(cfg.model).expanduser().resolve())  # adapter_config's base path must outlive cwd
    tokenizer = Tokenizer.from_dir(model_dir)
    if not tokenizer.eos_ids:
        raise ValueError(f"{model_dir}: the tokenizer defines no EOS token, so the model could not learn to stop")
    return model_dir, tokenizer


def prepare_data(cfg, tokenizer):
    """(train examples, eval examples, a summary to print): rows read, tokenized with their masks, a
    held-out fraction split off, and packed into --seq-len blocks with --packing."""
    examples, counts = tokenize_rows(read_rows(cfg.data, cfg.data_split), tokenizer, cfg.seq_len)
    if not examples:
        raise ValueError(f"--data {cfg.data}: none of the {counts['rows']} rows has a token to train on "
                         f"within --seq-len {cfg.seq_len}")
    examples, eval_examples = split_eval(examples, cfg.eval_fraction, cfg.seed)
    if not examples:
        raise ValueError(f"--eval-fraction {cfg.eval_fraction} leaves no training rows")
    shown, n_rows = examples[0], len(examples)
    if cfg.packing:  # from here on an "example" is a block of rows that fills at most seq_len tokens
        examples, eval_examples = pack(examples, cfg.seq_len), pack(eval_examples, cfg.seq_len)
    summary = (f"data: {counts['rows']} rows -> {n_rows} train / {len(eval_examples)} eval"
               + (f" (packed into {len(examples)} train blocks)" if cfg.packing else "") + "; "
               f"{counts['truncated']} truncated to {cfg.seq_len} tokens, {counts['without_targets']} dropped "
               f"(nothing to train on)\nexample (text in [[...]] is context only, not trained on):\n"
               + show_example(*shown, tokenizer))
    return examples, eval_examples, summary


def lr_factor(step, total_steps, warmup_steps, kind):
    """Multiplier of --lr at optimizer step `step` (0-based): linear warmup, then constant/cosine/linear."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0


def make_optimizer(params, cfg):
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import paged_adamw
    bits = 8 if cfg.optim == "paged_adamw_8bit" else 32
    return paged_adamw.PagedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, optim_bits=bits, paged=True)


def load_model(cfg, model_dir, device, dtype):
    """The frozen base (4-bit unless --quant none) with fresh LoRA adapters, ready to train."""
    model = llama.from_pretrained(str(model_dir), quant=None if cfg.quant == "none" else cfg.quant,
                                  dtype=dtype, device=device, double_quant=cfg.double_quant,
                                  blocksize=cfg.blocksize)
    targets = cfg.lora_targets  # "all-linear", a regex, or "q_proj,v_proj" (a list of names)
    if "," in targets or targets.isidentifier():
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lora.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                  use_rslora=cfg.use_rslora)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.offload_activations = cfg.offload_activations
    # The compiled dequantize only exists for CUDA tensors (nf4 falls back to eager elsewhere).
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and cfg.device.startswith("cuda"))
    for module in model.modules():
        if isinstance(module, nf4.Linear4bit):
            module.compile = use_compile
    # Packed rows give each batch its own document boundaries, which a compiled layer would be
    # specialized (recompiled) for: those run eager.
    if use_compile and cfg.device.startswith("cuda") and not cfg.packing:
        compile_layers(model)
    return model


def compile_layers(model):
    """torch.compile each decoder layer, as torchtune does: its forward, checkpointed recompute and
    backward run as a few fused kernels (4-bit dequantize, LoRA, RMSNorm, RoPE, attention, SwiGLU), not
    as ~1000 small ops per layer and step whose launches the CPU issues more slowly than the GPU runs
    them. The layers share one graph (same code, parameters as inputs). fullgraph=False: a graph break
    splits the graph instead of failing. If compiling fails (no Triton, an Inductor bug), every layer
    runs eager from then on, after one warning: an optimization must not end a run."""
    failed = []

    def fall_back(error):
        if not failed:
            warnings.warn(f"torch.compile of the decoder layers failed ({type(error).__name__}: {error}); "
                          "running them eager (--compile off silences this)", stacklevel=3)
        failed.append(error)

    def guarded(eager, compiled):
        def forward(*args, **kwargs):
            if not failed:
                try:
                    return compiled(*args, **kwargs)
                except torch._dynamo.exc.TorchDynamoException as e:  # raised while compiling, before running
                    fall_back(e)
            return eager(*args, **kwargs)
        return forward

    for layer in model.model.layers:
        try:
            compiled = torch.compile(layer.forward, fullgraph=False)
        except Exception as e:  # torch.compile itself refused
            fall_back(e)
            return
        layer.forward = guarded(layer.forward, compiled)


def peak_memory_gb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource  # Unix only
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------
# Checkpoints: written into a temp dir and swapped in, so a checkpoint-<step>/ dir is always complete.

def save_checkpoint(out_dir, step, model, optimizer, scaler, state, base_name, keep):
    final, tmp = out_dir / f"checkpoint-{step}", out_dir / f".checkpoint-{step}.tmp"
    main_rank, sharded = distributed.is_main(), distributed.is_sharded(model)
    if main_rank:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    try:  # everything goes into a hidden temp dir first: a full disk or a crash never leaves half a checkpoint
        tmp.mkdir(parents=True, exist_ok=True)
        with distributed.full_adapters(model):  # FSDP: gathered whole on rank 0
            if main_rank:
                lora.save_adapter(model, tmp, base_name)
        if main_rank or sharded:  # data parallel: every rank holds the same optimizer state
            torch.save({"optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else None},
                       tmp / distributed.rank_file("optimizer.pt", per_rank=sharded))
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save(rng, tmp / distributed.rank_file("rng_state.pt", per_rank=True))
        if main_rank:
            if distributed.world_size() > 1 or sharded:  # what the per-rank files fit (check_resume)
                state = {**state, "world_size": distributed.world_size(), "fsdp": sharded}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        distributed.barrier()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not main_rank:
        distributed.barrier()  # rank 0 swaps the checkpoint in
        return
    lora.replace_dir(tmp, final)  # the same step saved again (a resumed run) is swapped, never lost
    distributed.barrier()
    if keep:
        for old in sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old)


def restore_checkpoint(resume_from, model, optimizer, scaler, device, steps_per_epoch):
    """The run's position {step, epoch, batch, tokens, elapsed_s}: zeros for a fresh run, else restored
    with everything the checkpoint holds (adapter, optimizer and loss-scaler state, RNG states)."""
    state = {"step": 0, "epoch": 0, "batch": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume_from is None:
        return state
    trainer_state = json.loads((resume_from / "trainer_state.json").read_text())
    distributed.check_resume(trainer_state, distributed.is_sharded(model))
    distributed.load_adapter(model, resume_from)
    optimizer_file = distributed.rank_file("optimizer.pt", per_rank=distributed.is_sharded(model))
    saved = torch.load(resume_from / optimizer_file, map_location=device, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    if saved["scaler"]:  # an fp16 run's loss scale (a no-op on a disabled scaler)
        scaler.load_state_dict(saved["scaler"])
    state.update({k: v for k, v in trainer_state.items() if k in state})
    rng = torch.load(resume_from / distributed.rank_file("rng_state.pt", per_rank=True), weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if state["batch"] >= steps_per_epoch:
        raise ValueError(f"{resume_from} stopped at batch {state['batch']} of epoch {state['epoch']}, but this "
                         f"data with these batch settings has {steps_per_epoch} steps per epoch: resume with the "
                         "run's settings")
    print(f"resumed from {resume_from} at step {state['step']}")
    return state


def trim_metrics(metrics_path, step):
    """Forget the logged steps after `step`: those of the run we resume (it died after its checkpoint),
    or of an older run in the same directory."""
    if metrics_path.exists():
        text = metrics_path.read_text()
        whole = text.splitlines()[:text.count("\n")]  # a last line without its newline was cut by a kill
        kept = [l for l in whole if json.loads(l)["step"] <= step]
        lora.atomic_write(metrics_path, lambda tmp: Path(tmp).write_text("".join(l + "\n" for l in kept)))


def plot_losses(out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.plot([m["step"] for m in lines], [m["loss"] for m in lines], label="train")
        evals = [m for m in lines if "eval_loss" in m]
        if evals:
            ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval")
        ax.set(xlabel="step", ylabel="loss", title=out_dir.name)
        ax.legend()
        # format="png": the temp file's name ends in .tmp, which matplotlib cannot infer a format from
        lora.atomic_write(out_dir / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return out_dir / "loss.png"


# ---------------------------------------------------------------------------------------------------
# One optimizer step, and the loop.

def rank_batch(rows, examples, pad_id, packing):
    """This rank's share of one global micro-batch (all of it on one process). A rank left without rows
    (a last micro-batch shorter than the rank count) runs one row with no targets: it adds nothing to
    the loss or the gradients, but takes part in the collectives of forward and backward."""
    mine = distributed.share(rows)
    batch = make_batch([examples[i] for i in (mine or rows[:1])], pad_id, packing)
    if not mine:
        batch["targets"].fill_(IGNORE)
        batch["tokens"] = 0
    return batch


def train_step(model, micro, scaler):
    """Forward and backward over one optimizer step's micro-batches; returns this rank's part of the
    step's loss (its mean over the step's supervised tokens) as a float64 device scalar, not read here:
    the host queues the whole step without waiting for the device. Each micro-batch's summed loss is
    divided by the token count of the whole step, so the accumulated gradient is that of one big batch."""
    # counted where collate built the targets, on the CPU (on the device, int() would wait for it)
    n_local = sum(int((b["targets"] != IGNORE).sum()) for b in micro)
    n_targets = distributed.sum_across([n_local])[0]  # torchrun: the whole global batch (distributed.py)
    total = None
    for batch in micro:
        loss, _ = lm_loss_sum(model, batch)
        loss = loss / n_targets
        scaler.scale(loss).backward()  # scaled only for fp16 (a disabled GradScaler returns loss itself)
        part = loss.detach().double()  # float64: summed as exactly as Python floats would be
        total = part if total is None else total + part
    return total


def read_loss(loss, grad_norm, step):
    """The step's loss as a float: the one point where the host waits for the device, at logging, eval
    and checkpoint steps only. A non-finite loss or gradient norm stops the run; NaN stays in the weights
    once there, so a step between two reads is caught at the next one, before anything is saved."""
    norm = loss.new_zeros(()) if grad_norm is None else grad_norm.to(loss.dtype)
    value, norm = torch.stack([loss, norm]).tolist()  # one transfer for both
    value = distributed.sum_across([value])[0]  # torchrun: every rank's part of the global batch
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss became {value} at step {step}; stopping "
                                 "(try a lower --lr, --dtype bfloat16/float32, or check the data)")
    if not math.isfinite(norm):
        raise FloatingPointError(f"the gradient norm became {norm} at step {step}")
    return value


def optimizer_step(optimizer, scaler, lr, max_grad_norm, params):
    """Clip the accumulated gradients of the trainable `params` to max_grad_norm, step the optimizer at
    `lr`, zero the gradients. Under torchrun the gradients are first summed over the ranks; under FSDP the
    optimizer steps views of this rank's shards, while the norm is taken over the whole (sharded) params.
    Returns the norm before clipping (a device scalar; None without clipping), checked by read_loss."""
    distributed.reduce_grads(params, [p for group in optimizer.param_groups for p in group["params"]])
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.unscale_(optimizer)  # fp16: clip the true gradients, not the scaled ones
    grad_norm = None
    if max_grad_norm > 0:
        grad_norm = distributed.clip_grad_norm_(params, max_grad_norm)  # FSDP: the norm over all shards
    scaler.step(optimizer)  # fp16: skips the step if the gradients overflowed; else optimizer.step()
    scaler.update()  # fp16: adjust the loss scale
    optimizer.zero_grad(set_to_none=True)
    for p in params:  # FSDP: the sharded params' own gradients (the optimizer holds views)
        p.grad = None
    return grad_norm


@torch.no_grad()
def eval_loss(model, examples, cfg, pad_id):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), cfg.batch_size):
        loss, n = lm_loss_sum(model, make_batch(examples[i:i + cfg.batch_size], pad_id, cfg.packing))
        total, count = total + loss.item(), count + n
    model.train()
    return total / count


def train(cfg: TrainConfig, model, optimizer, scaler, state, examples, eval_examples, pad_id, total_steps):
    """From the position in `state` to total_steps optimizer steps: log, evaluate and checkpoint."""
    out_dir = Path(cfg.output_dir)
    metrics_path = out_dir / "metrics.jsonl"
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    global_batch = cfg.batch_size * distributed.world_size()  # torchrun: N ranks x --batch-size rows
    order = batch_order(len(examples), global_batch, cfg.grad_accum, cfg.seed, state["epoch"])
    params = [p for p in model.parameters() if p.requires_grad]
    main_rank = distributed.is_main()
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", dynamic_ncols=True, disable=not main_rank)
    model.train()
    started = time.perf_counter() - state["elapsed_s"]
    window = (state["tokens"], time.perf_counter())  # tokens and time at the last log, for tok/s
    while state["step"] < total_steps:
        # this step's micro-batches (the row order is a pure function of seed and epoch)
        micro = [rank_batch(rows, examples, pad_id, cfg.packing) for rows in order[state["batch"]]]
        # forward and backward over all of them, then one optimizer step at this step's lr
        loss = train_step(model, micro, scaler)
        lr = cfg.lr * lr_factor(state["step"], total_steps, warmup_steps, cfg.lr_scheduler)
        grad_norm = optimizer_step(optimizer, scaler, lr, cfg.max_grad_norm, params)
        # advance the position in the data; a new epoch reshuffles
        state["step"] += 1
        state["batch"] += 1
        if state["batch"] == len(order):
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
            order = batch_order(len(examples), global_batch, cfg.grad_accum, cfg.seed, state["epoch"])
        state["tokens"] += int(distributed.sum_across([sum(b["tokens"] for b in micro)])[0])
        # log (evaluating every --eval-every steps) and checkpoint every --save-every steps, all at the end
        last = state["step"] == total_steps
        evaluate = eval_examples and ((cfg.eval_every and state["step"] % cfg.eval_every == 0) or last)
        log = evaluate or last or state["step"] % cfg.log_every == 0
        save = last or (cfg.save_every and state["step"] % cfg.save_every == 0)
        if log or save:  # the only reads from the device: between them the host never waits for it
            loss = read_loss(loss, None if scaler.is_enabled() else grad_norm, state["step"])  # fp16 may overflow
        state["elapsed_s"] = time.perf_counter() - started  # host time; exact at a read, where the device is done
        if log:
            record = {"step": state["step"], "loss": loss, "lr": lr, "tokens": state["tokens"],
                      "elapsed_s": round(state["elapsed_s"], 3)}
            if evaluate:
                record["eval_loss"] = eval_loss(model, eval_examples, cfg, pad_id)
            if main_rank:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            tok_s = (state["tokens"] - window[0]) / (time.perf_counter() - window[1])  # since the last log
            window = (state["tokens"], time.perf_counter())
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}",
                            mem=f"{peak_memory_gb(cfg.device):.2f}G", refresh=False)
        bar.update(1)
        if save:
            save_checkpoint(out_dir, state["step"], model, optimizer, scaler,
                            {**state, "total_steps": total_steps, "warmup_steps": warmup_steps,
                             "lr_scheduler": cfg.lr_scheduler, "config": dataclasses.asdict(cfg)},
                            cfg.model, cfg.save_total_limit)
    bar.close()


def main(argv=None):
    cfg, demo_rows = resolve_config(argv)
    model_dir, tokenizer = setup(cfg)
    examples, eval_examples, summary = prepare_data(cfg, tokenizer)
    global_batch = cfg.batch_size * distributed.world_size()  # torchrun: N ranks x --batch-size rows
    steps_per_epoch = len(batch_order(len(examples), global_batch, cfg.grad_accum, 0, 0))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    out_dir = Path(cfg.output_dir or distributed.broadcast(time.strftime("runs/%Y%m%d-%H%M%S")))  # rank 0's clock
    cfg.output_dir = str(out_dir)
    resume_from = find_checkpoint(cfg.resume, out_dir) if cfg.resume else None
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_ids[0]  # never a target

    out_dir.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(dataclasses.asdict(cfg), indent=2)
    if distributed.is_main():
        lora.atomic_write(out_dir / "train_config.json", lambda tmp: Path(tmp).write_text(config_json))
    print("config:", config_json)
    print(summary)
    print(f"{total_steps} steps of {cfg.batch_size} x {cfg.grad_accum} rows")
    print(memory_estimate(llama.LlamaConfig.from_file(Path(model_dir) / "config.json"), cfg, cfg.dtype))

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.fsdp:  # each rank loads on the CPU in turn and keeps its shards (distributed.load_in_turns)
        model = distributed.load_in_turns(lambda: load_model(cfg, model_dir, "cpu", nf4.DTYPES[cfg.dtype]), cfg.device,
                                          cfg.fsdp_cpu_offload)
    else:
        model = load_model(cfg, model_dir, cfg.device, nf4.DTYPES[cfg.dtype])
    if distributed.rank() > 0:  # the same LoRA init everywhere, but each rank its own dropout masks
        torch.manual_seed(cfg.seed + distributed.rank())
    if demo_rows is not None:
        import demo_task
        before = demo_task.report(model, tokenizer, demo_rows)  # B = 0: exactly the 4-bit base model
    optimizer = make_optimizer(distributed.optimizer_params([p for p in model.parameters() if p.requires_grad]), cfg)
    # fp16 needs loss scaling (its range ends at 65504); with bf16 or fp32 the scaler is a no-op
    scaler = torch.amp.GradScaler(cfg.device, enabled=cfg.dtype == "float16")
    state = restore_checkpoint(resume_from, model, optimizer, scaler, cfg.device, steps_per_epoch)
    if distributed.is_main():
        trim_metrics(out_dir / "metrics.jsonl", state["step"])

    train(cfg, model, optimizer, scaler, state, examples, eval_examples, pad_id, total_steps)

    with distributed.full_adapters(model):  # FSDP: gathered whole on rank 0, which alone writes
        if distributed.is_main():
            lora.save_adapter(model, out_dir, cfg.model)  # the final adapter at the top of the run directory
    plot = plot_losses(out_dir) if distributed.is_main() and (out_dir / "metrics.jsonl").exists() else None
    print(f"saved the adapter to {out_dir}/" + (f" and the loss curve to {plot}" if plot else ""))
    if demo_rows is not None:
        demo_task.report(model, tokenizer, demo_rows, before)
    return out_dir


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError, FloatingPointError) as e:
        sys.exit(f"train.py: error: {e}")  # under torchrun: this rank exits, and torchrun stops the others
    finally:
        distributed.close()
