"""CUDA managed ("unified") memory from Python: the pages the paged optimizer lives in (QLoRA §3).

QLoRA's "paged optimizers" (arXiv:2305.14314 §3) keep the optimizer state in memory that the CUDA driver
can move between GPU and host on its own: `cudaMallocManaged`. The GPU reads and writes it like device
memory; when the card runs short (a long sequence's activation spike) the driver evicts pages to host RAM,
and a later access faults them back, instead of the run dying with an out-of-memory error. A
`cudaMemPrefetchAsync` before the optimizer touches the state moves the pages back in one bulk transfer,
ordered on a stream, rather than by one page fault at a time.

PyTorch has no public API for managed memory, and a C++ extension would need a compiler at install time.
So this file calls the CUDA runtime through ctypes, against the libcudart that PyTorch itself loaded, and
hands the pointer to torch through `__cuda_array_interface__`: the result is an ordinary CUDA tensor whose
storage happens to be pageable. The allocation is freed when the last tensor (or view) using it is gone.

    managed_zeros(shape, dtype, device)   a zero-filled managed CUDA tensor
    prefetch(t)                           move t's whole allocation to its GPU, on the current stream
    is_managed(t), managed_bytes()        bookkeeping: torch.cuda.memory_allocated() does not see these
    arena_layout(specs), carve(arena, specs)   many buffers as views into one allocation

An "arena" is one allocation that holds many buffers (each aligned, as cudaMalloc would align it): the
paged optimizer keeps its state in one per dtype, so paging it back costs a prefetch or two per step, not
one per tensor (Llama-2-7B's adapters have 448), and wastes less than hundreds of page-rounded allocations.

Traps named where they bite: the prefetch signature changed in CUDA 13 (a struct by value instead of an
int, so the binding follows the runtime's version); prefetching is an error on devices without concurrent
managed access (Windows, WSL), where it is skipped; the CPU may only read managed pages after a
synchronize; and freeing must wait until no kernel still uses the pages.
"""
import ctypes
import glob
import math
import os
import warnings

import torch

_TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1"}  # __cuda_array_interface__ element types we page
_MEM_ATTACH_GLOBAL = 1  # cudaMallocManaged flag: accessible from any stream on any device
_DEV_ATTR_CONCURRENT_MANAGED_ACCESS = 89  # cudaDevAttrConcurrentManagedAccess
_MEM_LOCATION_TYPE_DEVICE = 1  # cudaMemLocationTypeDevice (CUDA >= 13 prefetch signature)


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
        storage = t.untyped_storage()  # the whole allocation, also when t is a view into an arena
        rt.prefetch(storage.data_ptr(), storage.nbytes(), t.device.index,
                    torch.cuda.current_stream(t.device).cuda_stream)


_PAGING_OK = None  # None: not tried yet


def paging_available() -> bool:
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


def synchronize_managed() -> None:
    """CPU reads of managed pages the GPU may still be writing are only legal after a synchronize."""
    for device in {device for _, device in _LIVE.values()}:
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Arenas: many buffers in one allocation (pure layout; works on any device's uint8 tensor)

ARENA_ALIGN = 256  # bytes: what cudaMalloc guarantees, enough for every vectorized kernel's loads


def arena_layout(specs, align: int = ARENA_ALIGN):
    """Byte offsets of buffers [(shape, dtype), ...] packed in order into one allocation, each starting
    on a multiple of `align`, and the allocation's size in bytes (at least 1)."""
    offsets, end = [], 0
    for shape, dtype in specs:
        start = -(-end // align) * align
        offsets.append(start)
        end = start + math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return offsets, max(end, 1)


def carve(arena: torch.Tensor, specs, align: int = ARENA_ALIGN) -> list:
    """Views of the uint8 tensor `arena` (1-D, from offset 0) as the buffers of arena_layout(specs)."""
    offsets, size = arena_layout(specs, align)
    if arena.dtype != torch.uint8 or arena.dim() != 1 or arena.numel() < size:
        raise ValueError(f"an arena for these buffers is a 1-D uint8 tensor of >= {size} bytes; got "
                         f"{arena.dtype} {tuple(arena.shape)}")
    views = []
    for (shape, dtype), start in zip(specs, offsets):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        views.append(arena[start:start + nbytes].view(dtype).view(shape))
    return views
