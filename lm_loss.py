"""The language-model loss: summed cross-entropy over the supervised positions, through the output head in chunks.

    loss = sum_{n: m_n = 1} CE(h_n @ W^T, y_n)        h (N, C) final hidden states, W (V, C) the head

At 7B and 4x512 tokens fp32 logits would be 4 x 512 x 32000 x 4 bytes = 262 MB, kept again for backward:
the largest tensor of the step. So only the supervised positions are gathered, and `LMHeadCrossEntropy`
runs the head chunk by chunk, computing each chunk's gradient in the same pass (as Liger's fused linear
cross-entropy does, arXiv:2410.10989): no logits are kept for backward. Logits and softmax are fp32 (an
explicit island); the matmuls run in the head's dtype. A trained head (LoRA on lm_head) cannot use the
closed-form gradient, so there each chunk is checkpointed and recomputed in backward instead.

The sum (not the mean) is returned with the count: train.py divides by the supervised tokens of the
whole accumulated batch, so gradient accumulation gives the gradient of one big batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data import IGNORE


class LMHeadCrossEntropy(torch.autograd.Function):
    """sum_n CE(h_n @ W^T, y_n) for a frozen head W [V, C], chunk by chunk over the rows of h [N, C].

    Each chunk's logits live only inside the loop: the forward pass also computes the gradient
    dL/dh = (softmax - onehot) @ W (exact, since the head is frozen) and keeps that [N, C] tensor
    instead of [N, V] logits. Logits and softmax are fp32; the matmuls run in W's dtype."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[0] else None
        for start in range(0, h.shape[0], chunk_rows):
            hc, yc = h[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = F.linear(hc.to(weight.dtype), weight).float()  # (n, V) fp32 island
            lse = logits.logsumexp(dim=-1)  # (n,)
            loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(yc), device=h.device), yc] -= 1.0
                grad[start:start + chunk_rows] = F.linear(probs.to(weight.dtype), weight.t()).float()  # (n, C)
        ctx.save_for_backward(grad)
        ctx.h_dtype = h.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.h_dtype), None, None, None


def loss_chunk_rows(vocab_size):
    """Rows per loss chunk: ~32 MB of fp32 logits (170 rows at vocab 49152, 262 at 32000) is still a
    large, efficient matmul, and keeps the loss's transient memory well under the model's."""
    return max(64, (1 << 23) // vocab_size)


def _chunk_ce(head, h, targets):
    return F.cross_entropy(head(h).float(), targets, reduction="sum")


def to_device(t, device):
    """A CPU tensor on `device` without making the host wait: CUDA copies from pinned (page-locked) host
    memory asynchronously, while from ordinary memory it may synchronize the stream first to stage it."""
    if t.device == device or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def lm_loss_sum(model, batch):
    """Summed cross-entropy over the batch's supervised positions (fp32 scalar) and their count.

    The positions are picked where collate built the targets, on the CPU: a boolean index on the device
    would make the host wait for the GPU (the result's size is data), once per micro-batch."""
    device = model.lm_head.weight.device if hasattr(model.lm_head, "weight") else next(model.parameters()).device
    targets = batch["targets"]  # (B, T)
    picked = (targets != IGNORE).flatten().nonzero().squeeze(1)  # (N,) flat indices of the trained positions
    # Padding is on the right and attention is causal, so real tokens never see a pad: no mask is needed.
    # Packed rows carry position ids that restart at each row, left on the CPU: the model finds the
    # document boundaries there, without waiting for the device, and moves them itself.
    kwargs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    hidden = model.hidden_states(to_device(batch["input_ids"], device), **kwargs)  # (B, T, C)
    device = hidden.device  # FSDP's CPU offload keeps the weights on the CPU but computes on the GPU
    y = to_device(targets.flatten()[picked], device)  # (N,)
    h = hidden.flatten(0, 1).index_select(0, to_device(picked, device))  # (B*T, C) -> (N, C)
    head = model.lm_head
    chunk_rows = loss_chunk_rows(model.config.vocab_size)
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        loss = LMHeadCrossEntropy.apply(h, head.weight, y, chunk_rows)
    else:  # a trained head (LoRA on lm_head): recompute each chunk's logits in backward instead
        loss = sum((checkpoint(_chunk_ce, head, h[s:s + chunk_rows], y[s:s + chunk_rows], use_reentrant=False)
                    for s in range(0, len(y), chunk_rows)), head(h[:0]).float().sum())  # 0 rows: 0, in the graph
    return loss, len(y)
