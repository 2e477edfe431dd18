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
with the fresh float32 m and v, and re-quantizes (nearest code, `double_quant.quantize_blockwise`).
Its update differs from the 32-bit one in two bitsandbytes details kept here: the weight decay is applied
*after* the Adam step (p <- (p - step) * (1 - lr * wd), equal to the above to second order), and eps is
folded as sqrt(v) + eps * sqrt(1 - b2^t) with step size lr * sqrt(1 - b2^t) / (1 - b1^t) (algebraically
the same). Parameters with fewer than `min_8bit_size` elements keep 32-bit state, as in bitsandbytes.

Paging (QLoRA §3 "Paged Optimizers"): on CUDA, with paged=True, state buffers of at least
`page_threshold` elements live in CUDA managed memory (`managed_memory.py`), which the driver evicts to
host RAM when the GPU runs short instead of failing with out-of-memory; they are prefetched back to the
GPU before each update. On CPU, or with paged=False, the same maths runs on ordinary tensors.

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

import torch

from double_quant import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, dequantize_blockwise, quantize_blockwise
from managed_memory import is_managed, managed_bytes, managed_zeros, paging_available, prefetch, synchronize_managed

__all__ = ["PagedAdamW", "PagedAdamW32bit", "PagedAdamW8bit", "BLOCKSIZE", "managed_bytes", "is_managed"]

BLOCKSIZE = 256  # 8-bit state block length; fixed by bitsandbytes' blockwise optimizer kernels


def _f32(x: float) -> float:
    """Round a Python float to float32. For +, -, *, /, sqrt of float32 inputs, computing in double and
    rounding once gives exactly the float32 result, so the 8-bit path's scalar maths is float32 maths."""
    return struct.unpack("f", struct.pack("f", x))[0]


_MAPS = {}  # device -> (DYNAMIC_SIGNED, DYNAMIC_UNSIGNED) on that device


def _maps(device: torch.device):
    if device not in _MAPS:
        _MAPS[device] = (DYNAMIC_SIGNED.to(device), DYNAMIC_UNSIGNED.to(device))
    return _MAPS[device]


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

    def _zeros(self, p: torch.Tensor, shape, dtype: torch.dtype, group: dict, pageable: bool = True):
        """A zero state buffer on p's device: managed memory if paging applies to it, else ordinary."""
        numel = math.prod(shape)
        if (pageable and group["paged"] and p.is_cuda and numel > 0 and numel >= group["page_threshold"]
                and paging_available()):
            return managed_zeros(shape, dtype, p.device)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = {"step": 0}
        if group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"]:
            nblocks = -(-p.numel() // BLOCKSIZE)
            state["state1"] = self._zeros(p, p.shape, torch.uint8, group)  # code 0 * absmax 0 = m of 0
            state["state2"] = self._zeros(p, p.shape, torch.uint8, group)
            # absmax stays ordinary device memory, as in bitsandbytes: it is 1/256 of the size
            state["absmax1"] = self._zeros(p, (nblocks,), torch.float32, group, pageable=False)
            state["absmax2"] = self._zeros(p, (nblocks,), torch.float32, group, pageable=False)
        else:
            state["exp_avg"] = self._zeros(p, p.shape, torch.float32, group)
            state["exp_avg_sq"] = self._zeros(p, p.shape, torch.float32, group)
        return state

    # ---- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            plain = {}  # device -> parameters with 32-bit state, updated together with _foreach ops
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group))
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        prefetch(value)  # a no-op unless the buffer is managed memory
                state["step"] += 1
                if "state1" in state:
                    self._step_8bit(p, state, group)
                else:
                    plain.setdefault(p.device, []).append(p)
            for params in plain.values():
                states = [self.state[p] for p in params]
                self._step_32bit(group, params, [p.grad for p in params], [s["exp_avg"] for s in states],
                                 [s["exp_avg_sq"] for s in states], [s["step"] for s in states])
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

    @staticmethod
    def _step_8bit(p: torch.Tensor, state: dict, group: dict):
        """One bitsandbytes blockwise 8-bit AdamW update, vectorized over the whole tensor."""
        # the kernel receives every hyperparameter as float32 and derives the rest in float32
        b1, b2 = (_f32(b) for b in group["betas"])
        lr, eps, wd = _f32(group["lr"]), _f32(group["eps"]), _f32(group["weight_decay"])
        t = state["step"]
        c1 = _f32(1.0 - _f32(b1 ** t))
        c2 = _f32(math.sqrt(_f32(1.0 - _f32(b2 ** t))))
        step_size = _f32(_f32(-lr * c2) / c1)
        eps_c2 = _f32(c2 * eps)
        one_minus_b1, one_minus_b2 = _f32(1.0 - b1), _f32(1.0 - b2)
        signed, unsigned = _maps(p.device)

        n = p.numel()
        g = p.grad.reshape(-1).float()  # (n,)
        m = dequantize_blockwise(state["state1"].view(-1), state["absmax1"], signed, BLOCKSIZE)  # (n,)
        v = dequantize_blockwise(state["state2"].view(-1), state["absmax2"], unsigned, BLOCKSIZE)  # (n,)
        v = v * b2 + g * one_minus_b2 * g  # float32 ops in the kernel's order: ((1 - b2) * g) * g
        m = m * b1 + g * one_minus_b1
        # A NaN/inf gradient element zeroes its m and v and leaves its parameter alone (the kernel's guard);
        # without it one bad element would poison the absmax, hence the state, of its whole block.
        finite = torch.isfinite(g)
        m = torch.where(finite, m, 0.0)
        v = torch.where(finite, v, 0.0)

        p32 = p.reshape(-1)  # (n,); a copy only if p is not contiguous
        new = p32 + m / (v.sqrt() + eps_c2) * step_size
        if wd > 0:
            new = new * _f32(1.0 - _f32(lr * wd))  # decay *after* the step, as the kernel does
        p.copy_(torch.where(finite, new, p32).view(p.shape))

        # Re-quantize with the new per-block absmax. The kernel reduces the max over all 256 lanes of
        # the last, partial block; lanes past n hold state1 = 128 (+5.5e-7) and g = 0, so they add
        # |5.5e-7 * old_absmax1 * b1| to the max. It only matters when a tail block's m all but vanishes,
        # but it is one small pad, so the bytes follow the kernel there too.
        tail = n % BLOCKSIZE
        m_lanes = m
        if tail:
            pad_value = signed[128] * state["absmax1"][-1] * b1
            m_lanes = torch.cat([m, pad_value.expand(BLOCKSIZE - tail)])
        q1, absmax1 = quantize_blockwise(m_lanes, signed, BLOCKSIZE)
        q2, absmax2 = quantize_blockwise(v, unsigned, BLOCKSIZE)
        q1 = q1[:n].long()
        # Sign fix: a tiny negative m (|m| < 2.75e-7 * absmax) rounds to the code 0.0, whose sign bit is
        # clear; the kernel moves it one code down, to -5.5e-7, so the momentum keeps its sign. An all-zero
        # block (absmax 0 -> 0 * inf = NaN -> code 0 = -0.99) lands here too and wraps to 255, as in the kernel.
        flip = torch.signbit(signed[q1]) != torch.signbit(m)
        q1 = torch.where(flip, (q1 + torch.where(m > 0, 1, -1)) & 255, q1)  # uint8 wrap-around
        state["state1"].view(-1).copy_(q1)
        state["state2"].view(-1).copy_(q2)
        state["absmax1"].copy_(absmax1)
        state["absmax2"].copy_(absmax2)

    # ---- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """torch's layout ({"state": {index: {...}}, "param_groups": [...]}); tensors are the live state
        (as in torch), so copy or save them before stepping again."""
        synchronize_managed()
        return super().state_dict()

    _CODE_STATE = ("state1", "state2")  # uint8, p's shape
    _ABSMAX_STATE = ("absmax1", "absmax2")  # float32, [ceil(n / 256)]

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state saved by state_dict() (also accepts torch.optim.AdamW's).

        Overrides torch's version, which casts floating state to the parameter's dtype and device: that
        would turn managed buffers into ordinary ones (and the moments of a low-precision parameter into
        its dtype). Here every buffer is re-allocated as _init_state would (managed where paging applies),
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
            index.update({i: (p, options) for i, p in zip(saved["params"], group["params"])})
        new_state = defaultdict(dict)
        for i, saved in state_dict["state"].items():
            if i not in index:
                raise ValueError(f"state_dict has state for parameter index {i}, which no group lists")
            p, options = index[i]
            new_state[p] = self._restore_state(p, saved, options)
        for group, options in zip(self.param_groups, merged):  # commit only once everything validated
            group.update(options)
        self.state = new_state

    def _restore_state(self, p: torch.Tensor, saved: dict, group: dict) -> dict:
        keys = set(saved) - {"step"}
        if not keys:
            return {}
        nblocks = -(-p.numel() // BLOCKSIZE)
        if keys not in ({"exp_avg", "exp_avg_sq"}, {"state1", "state2", "absmax1", "absmax2"}):
            raise ValueError(f"unrecognized optimizer state keys {sorted(saved)} for a parameter of shape "
                             f"{tuple(p.shape)}; expected exp_avg/exp_avg_sq or state1/state2/absmax1/absmax2")
        state = {"step": int(saved.get("step", 0))}  # int() also reads torch.optim.AdamW's tensor step
        for key in sorted(keys):
            value = saved[key]
            shape = (nblocks,) if key in self._ABSMAX_STATE else tuple(p.shape)
            dtype = torch.uint8 if key in self._CODE_STATE else torch.float32
            if tuple(value.shape) != shape:
                raise ValueError(f"saved {key!r} has shape {tuple(value.shape)}, expected {shape} for a parameter "
                                 f"of shape {tuple(p.shape)}")
            if key in self._CODE_STATE and value.dtype != torch.uint8:
                raise ValueError(f"saved {key!r} must be uint8 8-bit codes, got {value.dtype}")
            if not value.is_floating_point() and key not in self._CODE_STATE:
                raise ValueError(f"saved {key!r} must be floating point, got {value.dtype}")
            state[key] = self._zeros(p, shape, dtype, group, pageable=key not in self._ABSMAX_STATE)
            state[key].copy_(value)
        return state


class PagedAdamW32bit(PagedAdamW):
    """PagedAdamW with float32 state (8 bytes per parameter)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, optim_bits=32, **kwargs)


class PagedAdamW8bit(PagedAdamW):
    """PagedAdamW with blockwise 8-bit state (2.03 bytes per parameter) -- HF's `paged_adamw_8bit`."""

    def __init__(self, params, **kwargs):
        super().__init__(params, optim_bits=8, **kwargs)
