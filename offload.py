"""Offloaded checkpoints: the input each checkpointed decoder layer keeps for backward waits in CPU memory.

With gradient checkpointing (Chen et al., arXiv:1604.06174) a decoder layer keeps only its input x_l
(B, T, C) for backward, which runs the layer again. At long context those L inputs are what is left of
the activations on the GPU: L * C * 2 bytes a token in bf16 (a 7B: 32 * 4096 * 2 = 256 KiB a token, 8 GiB
at 32k tokens). Offloading moves each x_l to pinned host memory as soon as it has been saved, and brings
it back one layer ahead of its recompute:

    forward,  layer l:  x_l --(side stream, non_blocking)--> pinned CPU copy; the GPU x_l can be freed
    backward, layer l:  wait for x_l's way back, recompute and backpropagate layer l; meanwhile copy
                        x_(l-1) back on the side stream, so the transfer hides behind layer l's work

Only copies move, so the gradients are bit-identical to plain checkpointing. The mechanism is torch's
saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`, the building block of `save_on_cpu`)
around each `checkpoint(layer, x, ...)` call: non-reentrant checkpointing saves the layer's inputs as
saved tensors of the outer graph, so the hooks see exactly those; what the layer saves inside belongs to
the checkpoint's own hooks and is never stored. Of the inputs only x itself moves: the rope tables and
masks are shared by every layer and stay. On the CPU (tests) the "offloaded" copy is a plain clone.
"""
from __future__ import annotations

import torch


class _Saved:
    """One offloaded layer input: its CPU copy, and a device copy while one is on its way back."""

    def __init__(self, index: int, device: torch.device, cpu: torch.Tensor, stored):
        self.index, self.device, self.cpu, self.stored = index, device, cpu, stored  # stored: D2H event
        self.back, self.arrived = None, None  # the device copy and its H2D event, once fetched


class OffloadedCheckpoints:
    """The layer inputs of one forward pass. Use one per forward:

        offload = OffloadedCheckpoints()
        for layer in layers:
            with offload.layer_input(x):
                x = checkpoint(layer, x, ..., use_reentrant=False)
    """

    def __init__(self):
        self.saved: list[_Saved] = []  # in forward order; backward unpacks them in reverse
        self.stream = None  # the side stream for both directions, made on the first CUDA tensor

    def layer_input(self, x: torch.Tensor):
        """Hooks that offload `x` when the checkpoint saves it; anything else saved is kept as it is."""
        # The graph keeps the hooks until backward, so they must not hold x itself (that would keep it on
        # the GPU): they know it by id, which is unique while the caller's x is alive (inside the `with`).
        target = id(x)
        return torch.autograd.graph.saved_tensors_hooks(lambda t: self._offload(t) if id(t) == target else t,
                                                        self._unpack)

    def _offload(self, t: torch.Tensor) -> _Saved:
        t = t.detach()
        if t.device.type != "cuda":
            entry = _Saved(len(self.saved), t.device, t.clone(), None)
        else:
            if self.stream is None:
                self.stream = torch.cuda.Stream(t.device)
            # pinned memory: the only kind a copy from the GPU can fill asynchronously
            cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully computed
            with torch.cuda.stream(self.stream):
                cpu.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # the allocator must not reuse t's memory before the copy read it
            entry = _Saved(len(self.saved), t.device, cpu, self.stream.record_event())
        self.saved.append(entry)
        return entry

    def _unpack(self, packed):
        if not isinstance(packed, _Saved):
            return packed
        if packed.back is None:  # not fetched ahead (the last layer, the first one backward reaches)
            self._fetch(packed)
        x, packed.back = packed.back, None  # the device copy lives only as long as the recompute uses it
        if packed.arrived is not None:
            current = torch.cuda.current_stream(packed.device)
            current.wait_event(packed.arrived)
            x.record_stream(current)  # made on the side stream, used on this one
        if packed.index > 0:  # backward reaches the layer below next: start its way back now
            self._fetch(self.saved[packed.index - 1])
        return x

    def _fetch(self, entry: _Saved):
        if entry.back is not None:
            return
        if entry.device.type != "cuda":
            entry.back = entry.cpu
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(entry.stored)  # the copy to the CPU is complete
            entry.back = entry.cpu.to(entry.device, non_blocking=True)
            entry.arrived = self.stream.record_event()
