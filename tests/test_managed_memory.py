"""managed_memory.py: CUDA managed allocations through ctypes, their lifetime, and prefetch. The ctypes
binding test runs wherever a libcudart is installed; the rest needs a GPU (marked cuda)."""
import ctypes
import gc

import pytest
import torch

import managed_memory


def test_cudart_bindings_follow_the_runtime_version():
    # Runs wherever a libcudart is installed, GPU or not (calls without a GPU return error codes).

    lib = None
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        pytest.skip("no libcudart on this machine")
    rt = managed_memory._Cudart(lib, name)
    assert rt.version >= 11000
    location_arg = rt._prefetch.argtypes[2]
    assert location_arg is (managed_memory._MemLocation if rt.version >= 13000 else ctypes.c_int)
    assert ctypes.sizeof(managed_memory._MemLocation) == 8
    with pytest.raises(RuntimeError, match="CUDA error 1 "):
        rt.check(1, "cudaSomething")  # 1 = cudaErrorInvalidValue


def pointer_is_managed(t: torch.Tensor) -> bool:
    """Ask the CUDA runtime itself (cudaPointerGetAttributes) rather than managed_memory's bookkeeping."""

    class Attributes(ctypes.Structure):  # struct cudaPointerAttributes (CUDA >= 11)
        _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int), ("devicePointer", ctypes.c_void_p),
                    ("hostPointer", ctypes.c_void_p), ("reserved", ctypes.c_long * 16)]  # slack for newer CUDA
    lib = managed_memory._cudart().lib
    attrs = Attributes()
    assert lib.cudaPointerGetAttributes(ctypes.byref(attrs), ctypes.c_void_p(t.data_ptr())) == 0
    return attrs.type == 3  # cudaMemoryTypeManaged


@pytest.mark.cuda
def test_cuda_managed_alloc_view_lifetime_and_free():
    gc.collect()
    base = managed_memory.managed_bytes()
    t = managed_memory.managed_zeros((1000, 256), torch.float32, "cuda")
    assert t.is_cuda and t.dtype == torch.float32 and t.shape == (1000, 256)
    assert managed_memory.is_managed(t) and pointer_is_managed(t)
    assert managed_memory.managed_bytes() == base + 1000 * 256 * 4
    assert torch.count_nonzero(t).item() == 0
    t += torch.arange(256, device="cuda", dtype=torch.float32)
    view = t[10:20]
    del t
    gc.collect()
    assert managed_memory.managed_bytes() == base + 1000 * 256 * 4  # a view keeps the allocation alive
    torch.testing.assert_close(view.sum(0).cpu(), 10 * torch.arange(256, dtype=torch.float32))
    del view
    gc.collect()
    assert managed_memory.managed_bytes() == base
    u = managed_memory.managed_zeros((77,), torch.uint8, "cuda")
    assert u.dtype == torch.uint8 and pointer_is_managed(u)
    with pytest.raises(torch.OutOfMemoryError):
        managed_memory.managed_zeros((torch.cuda.mem_get_info()[1] // 4 + 1,), torch.float32, "cuda")


@pytest.mark.cuda
def test_cuda_prefetch_is_ordered_on_the_current_stream():
    t = managed_memory.managed_zeros((1 << 20,), torch.float32, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            managed_memory.prefetch(t)
            t.add_(1.0)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.all(t == 3.0).item()


# ---------------------------------------------------------------------------------------------
# Arenas: the layout is pure arithmetic, tested here on ordinary CPU tensors

def test_arena_layout_aligns_and_packs_in_order():
    specs = [((3,), torch.uint8), ((2, 5), torch.float32), ((0,), torch.float32), ((257,), torch.uint8),
             ((1,), torch.float32)]
    offsets, size = managed_memory.arena_layout(specs)
    assert offsets == [0, 256, 512, 512, 1024] and size == 1028  # 3 B, 40 B, 0 B, 257 B, 4 B
    assert all(o % managed_memory.ARENA_ALIGN == 0 for o in offsets)
    assert managed_memory.arena_layout([]) == ([], 1)  # cudaMallocManaged rejects 0 bytes
    assert managed_memory.arena_layout(specs, align=4) == ([0, 4, 44, 44, 304], 308)


def test_carve_gives_disjoint_views_of_the_arena():
    specs = [((3,), torch.uint8), ((2, 5), torch.float32), ((257,), torch.uint8), ((1,), torch.float32)]
    arena = torch.zeros(managed_memory.arena_layout(specs)[1], dtype=torch.uint8)
    views = managed_memory.carve(arena, specs)
    assert [(tuple(v.shape), v.dtype) for v in views] == [(tuple(s), d) for s, d in specs]
    assert all(v.untyped_storage().data_ptr() == arena.data_ptr() for v in views)
    for k, v in enumerate(views):
        v.fill_(k + 1)  # 1, 2.0, 3, 4.0: each byte of the arena is written by at most one view
    assert torch.equal(arena[:3], torch.ones(3, dtype=torch.uint8)) and torch.all(arena[3:256] == 0)
    assert torch.equal(arena[256:296].view(torch.float32), torch.full((10,), 2.0))
    assert torch.equal(arena[512:769], torch.full((257,), 3, dtype=torch.uint8)) and torch.all(arena[769:1024] == 0)
    assert arena[1024:1028].view(torch.float32).item() == 4.0
    with pytest.raises(ValueError, match="arena"):
        managed_memory.carve(arena[:100], specs)
