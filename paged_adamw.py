"""Paged AdamW with 32-bit or 8-bit blockwise state: QLoRA's third pillar (QLoRA arXiv:2305.14314 §3).

AdamW (Loshchilov & Hutter, arXiv:1711.05101, Algorithm 2), for a parameter p with gradient g at step t:

    p   <- p * (1 - lr * wd)                           decoupled weight decay (not folded into g)
    m   <- b1 * m + (1 - b1) * g                        first moment
    v   <- b2 * v + (1 - b2) * g^2                      second moment
    p   <- p - lr * m_hat / (sqrt(v_hat) + eps),        m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)

32-bit state: m and v are float32 tensors of p's shape (8 bytes per parameter). The update performs the
same torch._foreach_* calls in the same order as `torch.optim.AdamW(foreach=True)`, so float32
parameters follow it bit for bit.

8-bit state (Dettmers et al., arXiv:2110.02861 §2, exactly as bitsandbytes' blockwise kernel): m and v
are stored as one byte per element, in blocks of 256 elements that each keep one float32 absmax
(2 + 8/256 = 2.03 bytes per parameter):

    m_i ~= DYNAMIC_SIGNED[state1_i] * absmax1[i // 256]      (signed "dynamic" map: m has both signs)
    v_i ~= DYNAMIC_UNSIGNED[state2_i] * absmax2[i // 256]    (unsigned map: v >= 0 gets all 256 codes)

Each step dequantizes, updates m and v in float32, takes the new per-block absmax, steps the parameter
with the fresh float32 m and v, and re-quantizes (nearest code, `double_quant`'s encoder). The 8-bit
states of all parameters lie end to end in one flat buffer (each padded to whole blocks), so a step is a
few dozen tensor operations over all of them (`adamw_8bit`), not a few dozen per tensor.
Its update differs from the 32-bit one in two bitsandbytes details kept here: the weight decay is applied
*after* the Adam step (p <- (p - step) * (1 - lr * wd), equal to the above to second order), and eps is
folded as sqrt(v) + eps * sqrt(1 - b2^t) with step size lr * sqrt(1 - b2^t) / (1 - b1^t) (algebraically
the same). Parameters with fewer than `min_8bit_size` elements keep 32-bit state, as in bitsandbytes.

Paging (QLoRA §3 "Paged Optimizers"): on CUDA, with paged=True, state buffers of at least
`page_threshold` elements live in CUDA managed memory (`managed_memory.py`), which the driver evicts to
host RAM when the GPU runs short instead of failing with out-of-memory. All the state that starts
together (normally: every parameter, at the first step) is carved from one allocation per dtype (an
"arena"), so each step costs one prefetch back to the GPU, not one per tensor, and nothing else while
nothing was evicted. On CPU, or with paged=False, the same maths runs on ordinary tensors.

Parameters must be float32: all maths and all state are float32, and a bf16 weight would round away
most small Adam updates (lr 1e-4 on a weight of 0.05 is below half a bf16 ulp). LoRA keeps its adapters
in float32 for that reason (lora.py) and casts them to the compute dtype inside the forward.

Deliberately left out: AMSGrad, maximize, gradient scaling/clipping (the trainer clips before step()),
sparse gradients, bf16/f16/float64 parameters, bitsandbytes' `max_unorm` / percentile clipping, and the
8-bit state of bitsandbytes' non-blockwise optimizers.
"""
import math
import struct
from collections import defaultdict
from itertools import accumulate
from typing import NamedTuple

import torch

from double_quant import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, _tables_8bit, encode
from managed_memory import (arena_layout, carve, is_managed, managed_bytes, managed_zeros, paging_available, prefetch,
                            synchronize_managed)

__all__ = ["PagedAdamW", "PagedAdamW32bit", "PagedAdamW8bit", "BLOCKSIZE", "managed_bytes", "is_managed"]

BLOCKSIZE = 256  # 8-bit state block length; fixed by bitsandbytes' blockwise optimizer kernels
# Lanes per adamw_8bit call: bounds its ~40 bytes per lane of float32 temporaries. On a CPU a chunk about
# the L2 size is fastest; on a GPU large chunks mean few kernel launches.
CHUNK_LANES = {"cpu": 1 << 18, "cuda": 1 << 24}


def _f32(x: float) -> float:
    """Round a Python float to float32. For +, -, *, /, sqrt of float32 inputs, computing in double and
    rounding once gives exactly the float32 result, so the 8-bit path's scalar maths is float32 maths."""
    return struct.unpack("f", struct.pack("f", x))[0]


# --------------------------------------------------------------------------------------------------
# The 8-bit update, over a flat run of whole blocks
#
# One call updates many parameters at once: their gradients, parameters and states are laid end to end,
# each parameter padded to whole blocks of 256 lanes, so a block never straddles two parameters and every
# operation below runs once over the whole run instead of once per tensor (448 tensors for Llama-2-7B's
# adapters). Pad lanes carry what bitsandbytes' kernel reads past the end of a tensor: gradient 0,
# state1 code 128 and state2 code 0; their results are thrown away.

class _Maps(NamedTuple):
    """The 8-bit maps and their encode tables on one device, made once (never copied per step)."""
    signed: torch.Tensor  # DYNAMIC_SIGNED, float32 [256]
    unsigned: torch.Tensor  # DYNAMIC_UNSIGNED, float32 [256]
    signed_tables: tuple  # double_quant.encode's (boundary, code) tables for each map
    unsigned_tables: tuple


_MAPS = {}  # torch.device -> _Maps


def _maps(device: torch.device) -> _Maps:
    if device not in _MAPS:
        tables = [tuple(t.to(device) for t in _tables_8bit(code)) for code in (DYNAMIC_SIGNED, DYNAMIC_UNSIGNED)]
        _MAPS[device] = _Maps(DYNAMIC_SIGNED.to(device), DYNAMIC_UNSIGNED.to(device), *tables)
    return _MAPS[device]


def _dequantize(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """code[q] * absmax of q's block, float32 (N,) -- double_quant.dequantize_blockwise on whole blocks."""
    values = torch.index_select(code, 0, q.int()).view(-1, BLOCKSIZE)  # (N / 256, 256)
    return (values * absmax.view(-1, 1)).view(-1)


def _quantize(x: torch.Tensor, tables: tuple):
    """Nearest codes and per-block absmax of float32 x (N,): double_quant.quantize_blockwise on whole
    blocks, without its host-side checks. NaN lanes are left out of the absmax, as CUDA's fmaxf does."""
    blocks = x.view(-1, BLOCKSIZE)  # (N / 256, 256)
    absmax = torch.nan_to_num(blocks.abs(), nan=0.0, posinf=math.inf).amax(dim=1)
    scaled = torch.mul(blocks, (1.0 / absmax).unsqueeze(1)).view(-1)  # float32 reciprocal, then multiply
    return encode(scaled, tables), absmax


def _hyper_8bit(group: dict, step: int) -> tuple:
    """The kernel's float32 scalars for one step: it gets every hyperparameter as float32 and derives
    the bias corrections in float32, with eps folded as eps * sqrt(1 - b2^t)."""
    b1, b2 = (_f32(b) for b in group["betas"])
    lr, eps, wd = _f32(group["lr"]), _f32(group["eps"]), _f32(group["weight_decay"])
    c1 = _f32(1.0 - _f32(b1 ** step))
    c2 = _f32(math.sqrt(_f32(1.0 - _f32(b2 ** step))))
    step_size = _f32(_f32(-lr * c2) / c1)
    decay = _f32(1.0 - _f32(lr * wd)) if wd > 0 else None
    return b1, b2, _f32(1.0 - b1), _f32(1.0 - b2), step_size, _f32(c2 * eps), decay


def adamw_8bit(p, g, state1, state2, absmax1, absmax2, hyper, maps: _Maps):
    """One bitsandbytes blockwise 8-bit AdamW update of a flat run of whole blocks.

    p, g: float32 (N,), N a multiple of 256; state1, state2: uint8 codes (N,); absmax1, absmax2: float32
    (N / 256,); hyper from _hyper_8bit. Returns the new (p, state1, state2, absmax1, absmax2).
    """
    b1, b2, one_minus_b1, one_minus_b2, step_size, eps_c2, decay = hyper
    m = _dequantize(state1, absmax1, maps.signed)  # (N,)
    v = _dequantize(state2, absmax2, maps.unsigned)  # (N,)
    v = v * b2 + g * one_minus_b2 * g  # float32 ops in the kernel's order: ((1 - b2) * g) * g
    m = m * b1 + g * one_minus_b1
    # A NaN/inf gradient element zeroes its m and v and leaves its parameter alone (the kernel's guard);
    # without it one bad element would poison the absmax, hence the state, of its whole block.
    finite = torch.isfinite(g)
    m = torch.where(finite, m, 0.0)
    v = torch.where(finite, v, 0.0)
    new = p + m / (v.sqrt() + eps_c2) * step_size
    if decay is not None:
        new = new * decay  # decay *after* the step, as the kernel does
    new = torch.where(finite, new, p)

    # Re-quantize with the new per-block absmax. A pad lane's m is code 128 (+5.5e-7) * old absmax * b1:
    # it only matters when a tail block's m all but vanishes, and then the bytes follow the kernel.
    q1, absmax1 = _quantize(m, maps.signed_tables)
    q2, absmax2 = _quantize(v, maps.unsigned_tables)
    # Sign fix: a tiny negative m (|m| < 2.75e-7 * absmax) rounds to the code 0.0, whose sign bit is
    # clear; the kernel moves it one code down, to -5.5e-7, so the momentum keeps its sign. An all-zero
    # block (absmax 0 -> 0 * inf = NaN -> code 0 = -0.99) lands here too and wraps to 255, as in the kernel.
    # Codes 0..126 of the signed map are the negative ones: (q1 < 127) is the sign bit of signed[q1].
    flip = (q1 < 127) != torch.signbit(m)
    q1 = torch.where(flip, torch.where(m > 0, q1 + 1, q1 - 1), q1)  # uint8: 0 - 1 wraps to 255
    return new, q1, q2, absmax1, absmax2


class _Bucket:
    """The 8-bit state of some parameters of one device as four flat buffers: parameter i's codes in
    lanes [starts[i], starts[i] + numels[i]) of state1/state2, padded to lanes[i] (whole blocks), its
    absmax in the matching blocks. Each parameter's state entries are views into these buffers.

    Steps run over `chunks`: runs of whole parameters of at most `chunk` lanes (one parameter may be
    longer), which bound the float32 temporaries of adamw_8bit (and keep them cache-sized on a CPU).
    """

    def __init__(self, params: list, state1, state2, absmax1, absmax2, chunk: int):
        self.params, self.state1, self.state2, self.absmax1, self.absmax2 = params, state1, state2, absmax1, absmax2
        self.numels = [p.numel() for p in params]
        self.lanes = [-(-n // BLOCKSIZE) * BLOCKSIZE for n in self.numels]
        self.starts = list(accumulate(self.lanes, initial=0))[:-1]
        zeros = torch.zeros(BLOCKSIZE, device=state1.device)
        self.pads = [zeros[:lanes - n] for n, lanes in zip(self.numels, self.lanes)]  # float32 pad lanes
        self.chunks, first = [], 0  # (members range, state1 pad lanes of the chunk, from its first lane)
        for i in range(1, len(params) + 1):
            if i == len(params) or self.starts[i] - self.starts[first] + self.lanes[i] > chunk:
                run = range(first, i)
                pads = [self.starts[j] - self.starts[first] + torch.arange(self.numels[j], self.lanes[j]) for j in run]
                self.chunks.append((run, torch.cat(pads).to(state1.device)))
                first = i
        for run, pad_lanes in self.chunks:  # pad lanes read as code 128, as the kernel reads past a tensor's end
            self.state1[self.span(run)].index_fill_(0, pad_lanes, 128)

    def span(self, run: range) -> slice:
        """The lanes of members run.start .. run.stop - 1."""
        return slice(self.starts[run.start], self.starts[run.stop - 1] + self.lanes[run.stop - 1])

    def views(self, i: int) -> dict:
        """Parameter i's state entries: views into the flat buffers, in the parameter's shape."""
        lo, n, shape = self.starts[i], self.numels[i], self.params[i].shape
        blocks = slice(lo // BLOCKSIZE, (lo + self.lanes[i]) // BLOCKSIZE)
        return {"state1": self.state1[lo:lo + n].view(shape), "state2": self.state2[lo:lo + n].view(shape),
                "absmax1": self.absmax1[blocks], "absmax2": self.absmax2[blocks]}


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with float32 maths, 32-bit (optim_bits=32) or 8-bit blockwise (optim_bits=8) state, and
    state buffers of >= page_threshold elements in CUDA managed memory when paged=True (CUDA only).

    Every argument is also a per-parameter-group option. Parameters without a gradient are skipped;
    frozen parameters (requires_grad=False) never get state. weight_decay defaults to 0 here
    (bitsandbytes and torch default to 0.01).

    State per parameter (state_dict() round-trips it exactly; see load_state_dict):
      "step" (int), 32-bit: "exp_avg", "exp_avg_sq" (float32, p's shape);
      8-bit: "state1", "state2" (uint8, p's shape), "absmax1", "absmax2" (float32 [ceil(n / 256)]).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, optim_bits=32,
                 paged=True, min_8bit_size=4096, page_threshold=100_000):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, optim_bits=optim_bits,
                        paged=paged, min_8bit_size=min_8bit_size, page_threshold=page_threshold)
        super().__init__(params, defaults)
        self._buckets = {}  # parameter with 8-bit state -> (its _Bucket, its index there)
        self._arenas = []  # the managed allocations holding the state (see _buffers)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        b1, b2 = group["betas"]
        checks = [(group["lr"] >= 0, "lr must be >= 0"), (0 <= b1 < 1 and 0 <= b2 < 1, "betas must be in [0, 1)"),
                  (group["eps"] >= 0, "eps must be >= 0"), (group["weight_decay"] >= 0, "weight_decay must be >= 0"),
                  (group["optim_bits"] in (8, 32), "optim_bits must be 32 or 8"),
                  (group["min_8bit_size"] >= 0 and group["page_threshold"] >= 0,
                   "min_8bit_size and page_threshold must be >= 0")]
        for ok, message in checks:
            if not ok:
                self.param_groups.pop()
                raise ValueError(f"PagedAdamW: {message}; got group options "
                                 f"{ {k: v for k, v in group.items() if k != 'params'} }")
        for p in group["params"]:
            if p.dtype != torch.float32:
                self.param_groups.pop()
                raise ValueError(f"PagedAdamW updates float32 parameters (keep a float32 copy of a low-precision "
                                 f"weight and cast it in the forward, as lora.py does); got a {p.dtype} "
                                 f"parameter of shape {tuple(p.shape)}")

    # ---- state allocation ----------------------------------------------------------------------

    @staticmethod
    def _is_8bit(p: torch.Tensor, group: dict) -> bool:
        return group["optim_bits"] == 8 and p.numel() >= max(1, group["min_8bit_size"])

    @staticmethod
    def _paging(device: torch.device, group: dict) -> bool:
        """Whether this group's state on `device` goes to managed memory (CUDA, paged=True, libcudart found)."""
        return group["paged"] and device.type == "cuda" and paging_available()

    def _buffers(self, device: torch.device, specs: list, pageable: list, group: dict) -> list:
        """Zero buffers [(shape, dtype), ...] on `device` as views into a few allocations ("arenas"): the
        pageable buffers of >= page_threshold elements in CUDA managed memory when paging applies, the
        rest in ordinary memory; one arena per kind of memory and dtype (torch.save refuses tensors that
        view one storage as different dtypes). A managed arena is prefetched once per step."""
        pages = self._paging(device, group)
        managed = [pages and ok and math.prod(shape) >= max(1, group["page_threshold"])
                   for (shape, _), ok in zip(specs, pageable)]
        arenas = defaultdict(list)  # (managed?, dtype) -> indices of its buffers
        for i, ((_, dtype), in_managed) in enumerate(zip(specs, managed)):
            arenas[in_managed, dtype].append(i)
        out = [None] * len(specs)
        for (in_managed, _), members in arenas.items():
            mine = [specs[i] for i in members]
            size = arena_layout(mine)[1]
            if in_managed:
                arena = managed_zeros((size,), torch.uint8, device)
                self._arenas.append(arena)
            else:
                arena = torch.zeros(size, dtype=torch.uint8, device=device)
            for i, view in zip(members, carve(arena, mine)):
                out[i] = view
        return out

    def _allocate(self, params: list, eight_bit: list, group: dict) -> None:
        """Zero state for `params` (all without state yet); eight_bit[i] says which kind each gets. Per
        device: the 32-bit moments and one _Bucket's flat 8-bit buffers, all carved from one arena."""
        by_device = defaultdict(lambda: ([], []))  # device -> (32-bit params, 8-bit params)
        for p, is_8bit in zip(params, eight_bit):
            by_device[p.device][is_8bit].append(p)
        for device, (plain, eights) in by_device.items():
            lanes = sum(-(-p.numel() // BLOCKSIZE) * BLOCKSIZE for p in eights)
            specs = [(p.shape, torch.float32) for p in plain for _ in ("exp_avg", "exp_avg_sq")]
            if eights:  # state1, state2 (uint8 codes), then absmax1, absmax2
                specs += [((lanes,), torch.uint8)] * 2 + [((lanes // BLOCKSIZE,), torch.float32)] * 2
            # absmax stays ordinary device memory, as in bitsandbytes: it is 1/256 of the size
            buffers = self._buffers(device, specs, [True] * (len(specs) - 2 * bool(eights)) + [False] * 2, group)
            for i, p in enumerate(plain):
                self.state[p].update(step=0, exp_avg=buffers[2 * i], exp_avg_sq=buffers[2 * i + 1])
            if eights:
                bucket = _Bucket(eights, *buffers[-4:], chunk=CHUNK_LANES.get(device.type, 1 << 24))
                for i, p in enumerate(eights):
                    self.state[p].update(step=0, **bucket.views(i))
                    self._buckets[p] = (bucket, i)

    # ---- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update of every parameter with a gradient.

        The host never waits for the GPU here (once the first step has allocated the state and put the
        8-bit maps on the device): scalars are Python floats computed on the host, step counts are
        Python ints, nothing is read back (.item(), bool(tensor)) and no host tensor is copied in, so
        the step's kernels queue behind the backward pass while the host moves on.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for arena in self._arenas:  # pages the driver evicted come back in one bulk copy, on this stream
            prefetch(arena)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.requires_grad]
            if any(p.grad.is_sparse for p in params):
                raise ValueError("PagedAdamW does not support sparse gradients")
            fresh = [p for p in params if not self.state[p]]
            self._allocate(fresh, [self._is_8bit(p, group) for p in fresh], group)
            plain, buckets = defaultdict(list), defaultdict(dict)  # device -> params; bucket -> {index: p}
            for p in params:
                state = self.state[p]
                state["step"] += 1
                if "state1" in state:
                    bucket, i = self._buckets[p]
                    buckets[bucket][i] = p
                else:
                    plain[p.device].append(p)
            for params in plain.values():
                states = [self.state[p] for p in params]
                self._step_32bit(group, params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                 [s["exp_avg_sq"] for s in states], [s["step"] for s in states])
            for bucket, members in buckets.items():
                self._step_8bit(bucket, members, group)
        return loss

    @staticmethod
    def _step_32bit(group, params, grads, exp_avgs, exp_avg_sqs, steps):
        """torch.optim.adam._multi_tensor_adam (decoupled, not capturable), call for call, so float32
        parameters match torch.optim.AdamW(foreach=True) bit for bit. Scalars are Python doubles that
        the kernels round to float32, as torch's are."""
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)  # decay first (AdamW Algorithm 2, line 12)
        # Why the state is float32, not bf16 to save memory: in bf16, b2 = 0.999 rounds to 1.0 (v never decays)
        # and the increment (1 - b2) * g^2 ~ 0.001 * v is below half an ulp of v (>= 0.002 * v), so it
        # vanishes: v stops tracking the gradient altogether.
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        bias_correction1 = [1 - beta1 ** t for t in steps]  # per parameter: steps differ when a
        bias_correction2 = [1 - beta2 ** t for t in steps]  # parameter had no gradient on some step
        step_size = [(lr / bc) * -1 for bc in bias_correction1]
        bias_correction2_sqrt = [bc ** 0.5 for bc in bias_correction2]
        denom = torch._foreach_sqrt(exp_avg_sqs)  # sqrt(v_hat) = sqrt(v) / sqrt(1 - b2^t), eps added after
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)

    def _step_8bit(self, bucket: _Bucket, members: dict, group: dict) -> None:
        """Update the bucket's parameters that have a gradient (members: index -> parameter): one
        adamw_8bit call per chunk whose parameters all take part at the same step count (training's
        normal case), one call per parameter otherwise."""
        maps = _maps(bucket.state1.device)
        for run, pad_lanes in bucket.chunks:
            steps = {self.state[bucket.params[i]]["step"] for i in run if i in members}
            if len(steps) == 1 and all(i in members for i in run):
                self._update_run(bucket, run, pad_lanes, _hyper_8bit(group, steps.pop()), maps)
                continue
            for i in (i for i in run if i in members):  # a parameter without a gradient, or steps differ
                pad_lanes = torch.arange(bucket.numels[i], bucket.lanes[i], device=bucket.state1.device)
                self._update_run(bucket, range(i, i + 1), pad_lanes,
                                 _hyper_8bit(group, self.state[bucket.params[i]]["step"]), maps)

    @staticmethod
    def _update_run(bucket: _Bucket, run: range, pad_lanes, hyper: tuple, maps: _Maps) -> None:
        """adamw_8bit over bucket members run.start .. run.stop - 1: gather their parameters and
        gradients into flat padded lanes, step, write the state and the parameters back."""
        params, pads = bucket.params[run.start:run.stop], bucket.pads[run.start:run.stop]
        flat = [q.reshape(-1) for q in params]  # views, or copies of non-contiguous parameters
        p = torch.cat([x for q, pad in zip(flat, pads) for x in (q, pad)])  # (N,)
        g = torch.cat([x for q, pad in zip(params, pads) for x in (q.grad.reshape(-1), pad)])  # (N,)
        lanes = bucket.span(run)
        blocks = slice(lanes.start // BLOCKSIZE, lanes.stop // BLOCKSIZE)
        state1, state2 = bucket.state1[lanes], bucket.state2[lanes]  # (N,) views
        absmax1, absmax2 = bucket.absmax1[blocks], bucket.absmax2[blocks]  # (N / 256,) views
        new, q1, q2, a1, a2 = adamw_8bit(p, g, state1, state2, absmax1, absmax2, hyper, maps)
        state1.copy_(q1).index_fill_(0, pad_lanes, 128)
        state2.copy_(q2)
        absmax1.copy_(a1)
        absmax2.copy_(a2)
        parts = new.split([x for i in run for x in (bucket.numels[i], bucket.lanes[i] - bucket.numels[i])])[::2]
        if all(q.is_contiguous() for q in params):
            torch._foreach_copy_(flat, parts)
        else:
            torch._foreach_copy_(params, [part.view(q.shape) for part, q in zip(parts, params)])

    # ---- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's layout ({"state": {index: {...}}, "param_groups": [...]}); tensors are the live state
        (as in torch), so copy or save them before stepping again."""
        synchronize_managed()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state saved by state_dict() (also accepts torch.optim.AdamW's).

        Overrides torch's version, which casts floating state to the parameter's dtype and device: that
        would turn managed buffers into ordinary ones (and the moments of a low-precision parameter into
        its dtype). Here every buffer is re-allocated as step() would (managed where paging applies),
        keeps its saved dtype, and is filled by copy. Hyperparameters come from the saved groups (as in
        torch); the state dict's tensors are not aliased. (torch's load_state_dict hooks are not run.)
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}: build the optimizer with the same groups")
        merged, index = [], {}
        for group, saved in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"a parameter group has {len(group['params'])} parameters, its saved "
                                 f"counterpart {len(saved['params'])}")
            options = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            merged.append(options)
            index.update({i: (p, len(merged) - 1) for i, p in zip(saved["params"], group["params"])})
        restored = []  # (parameter, its saved state, its group's index)
        for i, saved in state_dict["state"].items():
            if i not in index:
                raise ValueError(f"state_dict has state for parameter index {i}, which no group lists")
            p, g = index[i]
            self._check_saved(p, saved)
            restored.append((p, saved, g))
        for group, options in zip(self.param_groups, merged):  # commit only once everything validated
            group.update(options)
        self.state, self._buckets, self._arenas = defaultdict(dict), {}, []
        for g, group in enumerate(self.param_groups):  # allocate as step() would (buckets, managed memory), fill
            mine = [(p, saved) for p, saved, k in restored if k == g and set(saved) - {"step"}]
            self._allocate([p for p, _ in mine], ["state1" in saved for _, saved in mine], group)
            for p, saved in mine:
                state = self.state[p]
                for key, value in saved.items():
                    if key == "step":
                        state["step"] = int(value)  # int() also reads torch.optim.AdamW's tensor step
                    else:
                        state[key].copy_(value)

    _CODE_STATE = ("state1", "state2")  # uint8, p's shape
    _ABSMAX_STATE = ("absmax1", "absmax2")  # float32, [ceil(n / 256)]

    def _check_saved(self, p: torch.Tensor, saved: dict) -> None:
        keys = set(saved) - {"step"}
        if not keys:
            return
        if keys not in ({"exp_avg", "exp_avg_sq"}, {"state1", "state2", "absmax1", "absmax2"}):
            raise ValueError(f"unrecognized optimizer state keys {sorted(saved)} for a parameter of shape "
                             f"{tuple(p.shape)}; expected exp_avg/exp_avg_sq or state1/state2/absmax1/absmax2")
        for key in sorted(keys):
            value = saved[key]
            shape = (-(-p.numel() // BLOCKSIZE),) if key in self._ABSMAX_STATE else tuple(p.shape)
            if tuple(value.shape) != shape:
                raise ValueError(f"saved {key!r} has shape {tuple(value.shape)}, expected {shape} for a parameter "
                                 f"of shape {tuple(p.shape)}")
            if key in self._CODE_STATE and value.dtype != torch.uint8:
                raise ValueError(f"saved {key!r} must be uint8 8-bit codes, got {value.dtype}")
            if not value.is_floating_point() and key not in self._CODE_STATE:
                raise ValueError(f"saved {key!r} must be floating point, got {value.dtype}")


class PagedAdamW32bit(PagedAdamW):
    """PagedAdamW with float32 state (8 bytes per parameter)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, optim_bits=32, **kwargs)


class PagedAdamW8bit(PagedAdamW):
    """PagedAdamW with blockwise 8-bit state (2.03 bytes per parameter) -- HF's `paged_adamw_8bit`."""

    def __init__(self, params, **kwargs):
        super().__init__(params, optim_bits=8, **kwargs)
