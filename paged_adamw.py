"""Paged AdamW with 32-bit or 8-bit blockwise state: QLoRA's third pillar (QLoRA arXiv:2305.14314 §3).

AdamW (Loshchilov & Hutter, arXiv:1711.05101, Algorithm 2), for a parameter p with gradient g at step t:

    p   <- p * (1 - lr * wd)                           decoupled weight decay (not folded into g)
    m   <- b1 * m + (1 - b1) * g                        first moment
    v   <- b2 * v + (1 - b2) * g^2                      second moment
    p   <- p - lr * m_hat / (sqrt(v_hat) + eps),        m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)

32-bit state: m and v are float32 tensors of p's shape (8 bytes per parameter). The update performs the
same torch._foreach_* calls in the same order as `torch.optim.AdamW(foreach=True)`, so float32
parameters follow it bit for bit.

8-bit state (Dettmers et al., arXiv:2110.02861 §2, exactly as bitsandbytes' blockwise kernel, see
`spec/bnb_format.md` §5): m and v are stored as one byte per element, in blocks of 256 elements that
each keep one float32 absmax (2 + 8/256 = 2.03 bytes per parameter):

    m_i ~= DYNAMIC_SIGNED[state1_i] * absmax1[i // 256]      (signed "dynamic" map: m has both signs)
    v_i ~= DYNAMIC_UNSIGNED[state2_i] * absmax2[i // 256]    (unsigned map: v >= 0 gets all 256 codes)

Each step dequantizes, updates m and v in float32, takes the new per-block absmax, steps the parameter
with the fresh float32 m and v, and re-quantizes (nearest code, `double_quant.quantize_blockwise`).
Its update differs from the 32-bit one in two bitsandbytes details kept here: the weight decay is applied
*after* the Adam step (p <- (p - step) * (1 - lr * wd), equal to the above to second order), and eps is
folded as sqrt(v) + eps * sqrt(1 - b2^t) with step size lr * sqrt(1 - b2^t) / (1 - b1^t) (algebraically
the same). Parameters with fewer than `min_8bit_size` elements keep 32-bit state, as in bitsandbytes.

Paging (QLoRA §3 "Paged Optimizers"): on CUDA, state buffers of at least `page_threshold` elements live
in CUDA unified ("managed") memory from `cudaMallocManaged`, called through ctypes against the
libcudart that PyTorch already loaded. The GPU uses them like device memory; when the card runs short
(a long sequence's activation spike) the driver evicts their pages to host RAM and faults them back
when the optimizer next touches them, instead of the run dying with an out-of-memory error. Before each
parameter's update its buffers are prefetched to the GPU on the current stream. The allocations live
outside PyTorch's caching allocator (`torch.cuda.memory_allocated()` does not count them; see
`managed_bytes()`), and are freed when the last tensor viewing them is gone. On CPU, or with
paged=False, the same maths runs on ordinary tensors.

Parameter dtypes: all maths and all state are float32. A bfloat16/float16 parameter gets a float32
master copy in its state ("master"): the optimizer updates the master and rounds it into the parameter
once per step, so a bf16 parameter follows round_to_bf16(float32 AdamW trajectory) exactly, and updates
smaller than half a bf16 ulp (lr 1e-4 on a weight of 0.05 already is) accumulate instead of vanishing.
Cost: 4 more bytes per such parameter. If something else writes the parameter between steps, elements
that no longer equal their rounded master are re-seeded from the parameter before the next update.

Deliberately left out: AMSGrad, maximize, gradient scaling/clipping (the trainer clips before step()),
sparse gradients, float64 parameters, bitsandbytes' `max_unorm` / percentile clipping, and the 8-bit
state of bitsandbytes' non-blockwise optimizers.
"""
import ctypes
import glob
import math
import os
import struct
import warnings
from collections import defaultdict

import torch

from double_quant import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, dequantize_blockwise, quantize_blockwise

BLOCKSIZE = 256  # 8-bit state block length; fixed by bitsandbytes' blockwise optimizer kernels (spec §5.2)
_TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1"}  # __cuda_array_interface__ element types we page
_MEM_ATTACH_GLOBAL = 1  # cudaMallocManaged flag: accessible from any stream on any device
_DEV_ATTR_CONCURRENT_MANAGED_ACCESS = 89  # cudaDevAttrConcurrentManagedAccess
_MEM_LOCATION_TYPE_DEVICE = 1  # cudaMemLocationTypeDevice (CUDA >= 13 prefetch signature)


# --------------------------------------------------------------------------------------------------
# CUDA managed memory through ctypes (spec §6.2)

class _MemLocation(ctypes.Structure):  # struct cudaMemLocation { enum cudaMemLocationType type; int id; }
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Cudart:
    """The handful of CUDA runtime calls paging needs, with the argument types of the loaded version."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.lib, self.path = lib, path
        for name in ("cudaMallocManaged", "cudaFree", "cudaRuntimeGetVersion", "cudaDeviceGetAttribute",
                     "cudaMemPrefetchAsync", "cudaGetErrorString"):
            getattr(lib, name)  # AttributeError here means this is not a CUDA runtime library
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaRuntimeGetVersion.argtypes = [ctypes.POINTER(ctypes.c_int)]
        version = ctypes.c_int()
        self.check(lib.cudaRuntimeGetVersion(ctypes.byref(version)), "cudaRuntimeGetVersion")
        self.version = version.value  # 1000 * major + 10 * minor, e.g. 12080
        lib.cudaMallocManaged.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        # CUDA 13 replaced `int dstDevice` by a `cudaMemLocation` passed by value plus a flags word
        # (CUDA 12.2+ exports that form as cudaMemPrefetchAsync_v2). Calling one with the other's
        # arguments is not an error code but undefined behaviour, so the signature follows the version.
        if self.version >= 13000:
            self._prefetch = getattr(lib, "cudaMemPrefetchAsync_v2", None) or lib.cudaMemPrefetchAsync
            self._prefetch.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _MemLocation, ctypes.c_uint,
                                       ctypes.c_void_p]
        else:
            self._prefetch = lib.cudaMemPrefetchAsync
            self._prefetch.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        for fn in (lib.cudaMallocManaged, lib.cudaFree, lib.cudaRuntimeGetVersion, lib.cudaDeviceGetAttribute,
                   self._prefetch):
            fn.restype = ctypes.c_int
        self._concurrent = {}  # device index -> bool

    def check(self, err: int, what: str) -> None:
        if err != 0:
            msg = self.lib.cudaGetErrorString(err).decode(errors="replace")
            raise RuntimeError(f"{what} failed: CUDA error {err} ({msg})")

    def concurrent_managed_access(self, device: int) -> bool:
        # 0 on Windows, WSL and pre-Pascal GPUs: there prefetching is an error and the CPU must not touch
        # managed memory while any kernel runs. bitsandbytes skips the prefetch in that case; so do we.
        if device not in self._concurrent:
            value = ctypes.c_int()
            self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(value), _DEV_ATTR_CONCURRENT_MANAGED_ACCESS,
                                                       device), "cudaDeviceGetAttribute")
            self._concurrent[device] = value.value != 0
        return self._concurrent[device]

    def prefetch(self, ptr: int, nbytes: int, device: int, stream: int) -> None:
        if self.version >= 13000:
            err = self._prefetch(ptr, nbytes, _MemLocation(_MEM_LOCATION_TYPE_DEVICE, device), 0, stream)
        else:
            err = self._prefetch(ptr, nbytes, device, stream)
        self.check(err, "cudaMemPrefetchAsync")


_CUDART = None  # loaded on first use; None until then
_LIVE = {}  # data pointer of each live managed allocation -> (nbytes, device index)


def _cudart() -> _Cudart:
    """The CUDA runtime PyTorch uses (found among the loaded libraries first, so it is the same copy)."""
    global _CUDART
    if _CUDART is not None:
        return _CUDART
    torch.cuda.init()  # makes torch load its libcudart, so the copy below is the one already in memory
    candidates = []
    try:
        with open("/proc/self/maps") as f:
            candidates += [line.split()[-1] for line in f if "/libcudart.so" in line]
    except OSError:
        pass
    candidates += ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]  # dlopen by soname
    site = os.path.dirname(os.path.dirname(torch.__file__))
    candidates += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libcudart.so*")), reverse=True)
    candidates += sorted(glob.glob(os.path.join(site, "torch", "lib", "libcudart*.so*")), reverse=True)
    errors = []
    for path in dict.fromkeys(candidates):  # ordered, de-duplicated
        try:
            _CUDART = _Cudart(ctypes.CDLL(path), path)
            return _CUDART
        except (OSError, AttributeError, RuntimeError) as e:
            errors.append(f"{path}: {e}")
    raise RuntimeError("paged optimizer state needs the CUDA runtime library (libcudart) that PyTorch uses; "
                       "none could be loaded (pass paged=False to keep the state in ordinary GPU memory):\n  "
                       + "\n  ".join(errors))


class _ManagedBuffer:
    """Owns one cudaMallocManaged allocation and shows it to torch via __cuda_array_interface__.

    torch.as_tensor keeps a reference to this object for as long as any tensor (or view) uses the
    memory, so __del__ runs exactly when the last one is gone: that is where the memory is freed.
    """

    def __init__(self, shape: tuple, dtype: torch.dtype, device: int):
        rt = _cudart()
        self.nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self.device, self.ptr = device, None
        ptr = ctypes.c_void_p()
        with torch.cuda.device(device):  # CAI consumers read the owning device from the pointer
            rt.check(rt.lib.cudaMallocManaged(ctypes.byref(ptr), self.nbytes, _MEM_ATTACH_GLOBAL),
                     f"cudaMallocManaged({self.nbytes} bytes)")
        self.ptr = ptr.value
        _LIVE[self.ptr] = (self.nbytes, device)
        # No "stream" entry: torch would otherwise synchronize with it on import (version dependent).
        # torch parses "typestr" with NumPy, so this path needs numpy installed (a requirement anyway).
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": _TYPESTR[dtype],
                                         "data": (self.ptr, False), "version": 3, "strides": None}

    def __del__(self):
        ptr, self.ptr = self.ptr, None
        if not ptr:
            return
        try:
            _LIVE.pop(ptr, None)
            torch.cuda.synchronize(self.device)  # no kernel may still be using the pages
            _CUDART.lib.cudaFree(ptr)
        except Exception:  # interpreter shutdown: modules half torn down; the driver frees at exit anyway
            pass


def managed_bytes() -> int:
    """Bytes of CUDA managed memory currently held by paged optimizer state (0 on CPU)."""
    return sum(nbytes for nbytes, _ in _LIVE.values())


def is_managed(t: torch.Tensor) -> bool:
    """True if `t`'s storage is a managed (pageable) allocation made by this module."""
    return t.is_cuda and t.untyped_storage().data_ptr() in _LIVE


def managed_zeros(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A zero-filled CUDA tensor in managed memory (never larger than what the card has free)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"managed memory is CUDA memory; got device {device}")
    if dtype not in _TYPESTR:
        raise ValueError(f"managed_zeros supports {list(_TYPESTR)}, got {dtype}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    shape = tuple(shape)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        raise ValueError("managed_zeros needs at least one element (cudaMallocManaged rejects 0 bytes)")
    # Managed memory can oversubscribe the card, but asking for more than is free at allocation time
    # fails on systems without oversubscription and thrashes on the rest: refuse instead.
    free = torch.cuda.mem_get_info(index)[0]
    if nbytes > free:
        torch.cuda.empty_cache()  # blocks cached by torch's allocator count as used until released
        free = torch.cuda.mem_get_info(index)[0]
    if nbytes > free:
        raise torch.OutOfMemoryError(f"paged optimizer state: {nbytes} bytes of managed memory requested but "
                                     f"only {free} bytes are free on cuda:{index}")
    t = torch.as_tensor(_ManagedBuffer(shape, dtype, index), device=torch.device("cuda", index))
    return t.zero_()  # cudaMallocManaged does not zero; this also places the pages on the GPU


def prefetch(t: torch.Tensor) -> None:
    """Migrate a managed tensor's pages to its GPU, ordered on the current stream (no-op elsewhere).

    The current stream is the one the optimizer's kernels run on next, so they see the pages in place
    (bitsandbytes prefetches on stream 0, which orders with torch's work only on the legacy stream).
    """
    if not is_managed(t):
        return
    rt = _cudart()
    if rt.concurrent_managed_access(t.device.index):
        rt.prefetch(t.data_ptr(), t.untyped_storage().nbytes(), t.device.index,
                    torch.cuda.current_stream(t.device).cuda_stream)


_PAGING_OK = None  # None: not tried yet


def _paging_available() -> bool:
    """Whether libcudart loads; if not, warn once and let the state use ordinary GPU memory."""
    global _PAGING_OK
    if _PAGING_OK is None:
        try:
            _cudart()
            _PAGING_OK = True
        except RuntimeError as e:
            warnings.warn(f"PagedAdamW: paging disabled, optimizer state stays in ordinary GPU memory. {e}")
            _PAGING_OK = False
    return _PAGING_OK


def _synchronize_managed() -> None:
    """CPU reads of managed pages the GPU may still be writing are only legal after a synchronize."""
    for device in {device for _, device in _LIVE.values()}:
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# The optimizer

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
      8-bit: "state1", "state2" (uint8, p's shape), "absmax1", "absmax2" (float32 [ceil(n / 256)]);
      non-float32 parameters also: "master" (float32, p's shape).
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
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                self.param_groups.pop()
                raise ValueError(f"PagedAdamW keeps float32 state and updates float32, bfloat16 or float16 "
                                 f"parameters; got a {p.dtype} parameter of shape {tuple(p.shape)}")

    # ---- state allocation ----------------------------------------------------------------------

    def _zeros(self, p: torch.Tensor, shape, dtype: torch.dtype, group: dict, pageable: bool = True):
        """A zero state buffer on p's device: managed memory if paging applies to it, else ordinary."""
        numel = math.prod(shape)
        if (pageable and group["paged"] and p.is_cuda and numel > 0 and numel >= group["page_threshold"]
                and _paging_available()):
            return managed_zeros(shape, dtype, p.device)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = {"step": 0}
        if p.dtype != torch.float32:
            state["master"] = self._zeros(p, p.shape, torch.float32, group)
            state["master"].copy_(p)  # exact: every bf16/f16 value is a float32 value
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
            by_device = {}  # device -> the 32-bit-state tensors updated together with _foreach ops
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p, group))
                if _LIVE:
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            prefetch(value)
                master = state.get("master")
                if master is not None:
                    # elements written by someone else since the last step: the parameter wins
                    master.copy_(torch.where(master.to(p.dtype) == p, master, p.float()))
                state["step"] += 1
                if "state1" in state:
                    self._step_8bit(p, state, group)
                    continue
                lists = by_device.setdefault(p.device, ([], [], [], [], [], []))
                for lst, item in zip(lists, (p if master is None else master, p.grad.float(),
                                             state["exp_avg"], state["exp_avg_sq"], state["step"], p)):
                    lst.append(item)
            for params, grads, exp_avgs, exp_avg_sqs, steps, originals in by_device.values():
                self._step_32bit(group, params, grads, exp_avgs, exp_avg_sqs, steps)
                for p, p32 in zip(originals, params):
                    if p is not p32:
                        p.copy_(p32)  # round the float32 master into the bf16/f16 parameter (RNE)
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
        # Why the state is float32 whatever p's dtype: in bf16, b2 = 0.999 rounds to 1.0 (v never decays)
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
        """One bitsandbytes blockwise 8-bit AdamW update (spec §5.3), vectorized over the whole tensor."""
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

        target = state["master"] if "master" in state else p
        p32 = target.reshape(-1)  # (n,); a copy only if p is not contiguous
        new = p32 + m / (v.sqrt() + eps_c2) * step_size
        if wd > 0:
            new = new * _f32(1.0 - _f32(lr * wd))  # decay *after* the step, as the kernel does
        target.copy_(torch.where(finite, new, p32).view(target.shape))
        if target is not p:
            p.copy_(target)  # round the float32 master into the bf16/f16 parameter (RNE)

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
        _synchronize_managed()
        return super().state_dict()

    _CODE_STATE = ("state1", "state2")  # uint8, p's shape
    _ABSMAX_STATE = ("absmax1", "absmax2")  # float32, [ceil(n / 256)]

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state saved by state_dict() (also accepts torch.optim.AdamW's).

        Overrides torch's version, which casts floating state to the parameter's dtype and device: that
        would turn the float32 moments of bf16 parameters into bf16 and managed buffers into ordinary
        ones. Here every buffer is re-allocated as _init_state would (managed where paging applies),
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
        if keys - {"master"} not in ({"exp_avg", "exp_avg_sq"}, {"state1", "state2", "absmax1", "absmax2"}):
            raise ValueError(f"unrecognized optimizer state keys {sorted(saved)} for a parameter of shape "
                             f"{tuple(p.shape)}; expected exp_avg/exp_avg_sq or state1/state2/absmax1/absmax2")
        if "master" in keys and p.dtype == torch.float32:
            raise ValueError("saved state has a float32 master copy but the parameter is already float32")
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
        if p.dtype != torch.float32 and "master" not in state:
            state["master"] = self._zeros(p, p.shape, torch.float32, group)
            state["master"].copy_(p)
        return state


class PagedAdamW32bit(PagedAdamW):
    """PagedAdamW with float32 state (8 bytes per parameter)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, optim_bits=32, **kwargs)


class PagedAdamW8bit(PagedAdamW):
    """PagedAdamW with blockwise 8-bit state (2.03 bytes per parameter) -- HF's `paged_adamw_8bit`."""

    def __init__(self, params, **kwargs):
        super().__init__(params, optim_bits=8, **kwargs)
