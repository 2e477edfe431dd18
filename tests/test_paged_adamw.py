"""PagedAdamW against its references: torch.optim.AdamW (32-bit), bitsandbytes' 8-bit blockwise kernel
(tests/fixtures/bnb/adamw8bit.safetensors), and itself across a checkpoint (resume). CUDA-only tests cover
paged state and paging under pressure (managed memory itself: test_managed_memory.py)."""
import gc
import io
import json
import math

import pytest
import torch
from safetensors import safe_open

import managed_memory
import paged_adamw
from conftest import BNB
from double_quant import DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, dequantize_blockwise, quantize_blockwise
from test_managed_memory import pointer_is_managed
from paged_adamw import BLOCKSIZE, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit


def ulps(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor = None) -> float:
    """max |a - b| in float32 ulps of `scale` (default: max(|a|, |b|) elementwise)."""
    a, b = a.detach().float(), b.detach().float()
    s = torch.maximum(a.abs(), b.abs()) if scale is None else scale.detach().float().abs()
    ulp = torch.nextafter(s, torch.full_like(s, math.inf)) - s
    return ((a - b).abs() / ulp).max().item()


def make_params(shapes, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(step, *param_lists, skip=()):
    """Same random gradient for the i-th parameter of every list; indices in `skip` get none."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, group in enumerate(zip(*param_lists)):
        g = torch.randn(group[0].shape, generator=gen)
        for p in group:
            p.grad = None if i in skip else g.to(device=p.device, dtype=p.dtype)


def state_tensors(opt, params):
    return [(k, v) for p in params for k, v in sorted(opt.state[p].items())]


# ---------------------------------------------------------------------------------------------
# 32-bit state: torch.optim.AdamW step for step

def test_32bit_matches_torch_adamw_for_50_steps():
    shapes = [(16, 576), (576, 16), (300, 33), (7,)]
    ref, mine = make_params(shapes), make_params(shapes)
    groups = lambda ps: [{"params": ps[:2]},  # noqa: E731
                         {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}]
    torch_opt = torch.optim.AdamW(groups(ref), lr=1e-3, weight_decay=0.01, foreach=True)
    opt = PagedAdamW32bit(groups(mine), lr=1e-3, weight_decay=0.01)
    warmup_cosine = lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / 50))  # noqa: E731
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine) for o in (torch_opt, opt)]
    for step in range(50):
        # the 1-D parameter misses some steps, so the parameters' step counts (bias corrections) differ
        set_grads(step, ref, mine, skip=(3,) if step % 7 == 3 else ())
        torch_opt.step()
        opt.step()
        for s in scheds:
            s.step()
        for r, m in zip(ref, mine):
            assert ulps(m, r) <= 4, f"step {step}"
    assert opt.state[mine[3]]["step"] == 50 - len([s for s in range(50) if s % 7 == 3])
    for r, m in zip(ref, mine):
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[m][key].dtype == torch.float32
            assert ulps(opt.state[m][key], torch_opt.state[r][key]) <= 4


def test_loads_torch_adamw_state_and_continues_identically():
    shapes = [(33, 20), (5,)]
    ref, mine = make_params(shapes), make_params(shapes)
    torch_opt = torch.optim.AdamW(ref, lr=2e-3, weight_decay=0.05, foreach=True)
    for step in range(5):
        set_grads(step, ref)
        torch_opt.step()
    with torch.no_grad():
        for r, m in zip(ref, mine):
            m.copy_(r)
    opt = PagedAdamW(mine)
    opt.load_state_dict(torch_opt.state_dict())
    assert opt.param_groups[0]["lr"] == 2e-3 and opt.state[mine[0]]["step"] == 5
    for step in range(5, 10):
        set_grads(step, ref, mine)
        torch_opt.step()
        opt.step()
    for r, m in zip(ref, mine):
        assert ulps(m, r) <= 4


# ---------------------------------------------------------------------------------------------
# Parameter dtypes: float32 only (LoRA keeps its adapters in float32; see lora.py)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_non_float32_params_are_a_clear_error(dtype):
    p = make_params([(8, 8)], dtype=dtype)
    with pytest.raises(ValueError, match=f"float32 parameters.*{str(dtype).split('.')[1]}"):
        PagedAdamW(p)


# ---------------------------------------------------------------------------------------------
# 8-bit state: bitsandbytes' blockwise kernel (fixture)

def _fixture():
    with safe_open(BNB / "adamw8bit.safetensors", "pt") as f:
        return json.loads(f.metadata()["info"]), {k: f.get_tensor(k) for k in f.keys()}


def test_8bit_matches_bitsandbytes_fixture():
    info, t = _fixture()
    p = t["param0"].clone().requires_grad_()  # [3, 257]: 3 full blocks and a 3-element one
    opt = PagedAdamW8bit([p], lr=info["lr"], betas=info["betas"], eps=info["eps"],
                         weight_decay=info["weight_decay"], min_8bit_size=0)
    assert torch.equal(paged_adamw.DYNAMIC_SIGNED, t["qmap1"]) and torch.equal(paged_adamw.DYNAMIC_UNSIGNED, t["qmap2"])
    prev = t["param0"]
    for step in (1, 2, 3):  # step 3 has an all-zero gradient in block 0
        p.grad = t[f"step{step}.grad"].clone()
        opt.step()
        state = opt.state[p]
        for key in ("state1", "state2", "absmax1", "absmax2"):
            assert state[key].dtype == t[f"step{step}.{key}"].dtype
            assert torch.equal(state[key], t[f"step{step}.{key}"]), f"step {step} {key}"
        ref = t[f"step{step}.param"]
        # the kernel's float32 op order is followed but pow/sqrt/div may round differently: a few ulps
        # of the larger of the parameter and its update (a decay-before-step order is ~1000 ulps off)
        assert ulps(p, ref, scale=torch.maximum(ref.abs(), (ref - prev).abs())) <= 4, f"step {step}"
        prev = ref


def test_8bit_only_for_params_of_min_8bit_size():
    small, big, odd = make_params([(4095,), (16, 256), (300, 20)])
    opt = PagedAdamW8bit([small, big, odd])  # min_8bit_size 4096
    set_grads(0, [small, big, odd])
    opt.step()
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    assert opt.state[big]["state1"].dtype == torch.uint8 and opt.state[big]["state1"].shape == big.shape
    assert opt.state[big]["absmax1"].shape == (16,)
    assert opt.state[odd]["absmax2"].shape == (-(-6000 // BLOCKSIZE),)
    state_bytes = sum(v.numel() * v.element_size() for k, v in opt.state[big].items() if k != "step")
    assert state_bytes / big.numel() == 2 + 8 / BLOCKSIZE


def test_8bit_tracks_32bit_adamw():
    # 8-bit state is an approximation: over 30 steps the parameters must stay near the 32-bit run's,
    # relative to the distance travelled (a wrong sign fix or map would drift by far more).
    shapes = [(64, 128)]
    p8, p32, start = make_params(shapes) + make_params(shapes) + make_params(shapes)
    opt8, opt32 = PagedAdamW8bit([p8], lr=1e-2), PagedAdamW32bit([p32], lr=1e-2)
    for step in range(30):
        set_grads(step, [p8], [p32])
        opt8.step()
        opt32.step()
    travelled = (p32 - start).norm()
    assert (p8 - p32).norm() / travelled < 0.05


def test_8bit_nonfinite_gradient_is_skipped_elementwise():
    p = make_params([(2, 256)])[0]
    opt = PagedAdamW8bit([p], min_8bit_size=0, weight_decay=0.1)
    set_grads(0, [p])
    opt.step()
    before = p.detach().clone()
    set_grads(1, [p])
    p.grad[0, 5], p.grad[1, 7] = float("inf"), float("nan")
    opt.step()
    state = opt.state[p]
    assert p[0, 5] == before[0, 5] and p[1, 7] == before[1, 7]  # not stepped, not decayed
    assert torch.isfinite(p).all() and torch.isfinite(state["absmax1"]).all() and torch.isfinite(state["absmax2"]).all()
    m = dequantize_blockwise(state["state1"].view(-1), state["absmax1"], paged_adamw.DYNAMIC_SIGNED)
    v = dequantize_blockwise(state["state2"].view(-1), state["absmax2"], paged_adamw.DYNAMIC_UNSIGNED)
    assert m.view(2, 256)[0, 5].abs() <= 1e-6 * state["absmax1"][0] and v.view(2, 256)[1, 7] == 0
    assert (p != before).float().mean() > 0.99  # everything else moved


def reference_step_8bit(p: torch.Tensor, state: dict, group: dict):
    """The 8-bit update one tensor at a time, through double_quant's public quantizer: paged_adamw's
    implementation before it ran over flat runs of many tensors (it matches the bitsandbytes fixture)."""
    f32 = paged_adamw._f32
    b1, b2 = (f32(b) for b in group["betas"])
    lr, eps, wd = f32(group["lr"]), f32(group["eps"]), f32(group["weight_decay"])
    t = state["step"]
    c1 = f32(1.0 - f32(b1 ** t))
    c2 = f32(math.sqrt(f32(1.0 - f32(b2 ** t))))
    step_size, eps_c2 = f32(f32(-lr * c2) / c1), f32(c2 * eps)
    n = p.numel()
    g = p.grad.reshape(-1).float()  # (n,)
    m = dequantize_blockwise(state["state1"].view(-1), state["absmax1"], DYNAMIC_SIGNED)  # (n,)
    v = dequantize_blockwise(state["state2"].view(-1), state["absmax2"], DYNAMIC_UNSIGNED)  # (n,)
    v = v * b2 + g * f32(1.0 - b2) * g
    m = m * b1 + g * f32(1.0 - b1)
    finite = torch.isfinite(g)
    m, v = torch.where(finite, m, 0.0), torch.where(finite, v, 0.0)
    p32 = p.reshape(-1)  # (n,)
    new = p32 + m / (v.sqrt() + eps_c2) * step_size
    if wd > 0:
        new = new * f32(1.0 - f32(lr * wd))
    p.copy_(torch.where(finite, new, p32).view(p.shape))
    m_lanes = m  # the kernel's lanes past n: state1 code 128 and gradient 0
    if n % BLOCKSIZE:
        m_lanes = torch.cat([m, (DYNAMIC_SIGNED[128] * state["absmax1"][-1] * b1).expand(BLOCKSIZE - n % BLOCKSIZE)])
    q1, absmax1 = quantize_blockwise(m_lanes, DYNAMIC_SIGNED)
    q2, absmax2 = quantize_blockwise(v, DYNAMIC_UNSIGNED)
    q1 = q1[:n].long()
    flip = torch.signbit(DYNAMIC_SIGNED[q1]) != torch.signbit(m)
    q1 = torch.where(flip, (q1 + torch.where(m > 0, 1, -1)) & 255, q1)
    for key, value in (("state1", q1), ("state2", q2), ("absmax1", absmax1), ("absmax2", absmax2)):
        state[key].view(-1).copy_(value)


@pytest.mark.parametrize("chunk_lanes", [1 << 18, 1024])  # 1024: many chunks, tensors longer than a chunk
def test_8bit_flat_runs_equal_the_per_tensor_reference(monkeypatch, chunk_lanes):
    # Many tensors in one flat run (tails of 1..255 lanes, a 1-element tensor, gradients with inf/NaN, a
    # tail block whose m vanishes so the kernel's pad lanes decide its absmax, parameters that miss steps
    # so their step counts differ): every byte of state and every parameter bit must equal the reference.
    monkeypatch.setitem(paged_adamw.CHUNK_LANES, "cpu", chunk_lanes)
    shapes = [(16, 576), (1,), (3, 257), (576, 16), (7, 300), (255,), (2, 256), (64, 80), (1, 5000)]
    mine, ref = make_params(shapes), make_params(shapes)
    group = dict(lr=2e-3, betas=(0.85, 0.995), eps=1e-6, weight_decay=0.05)
    opt = PagedAdamW8bit(mine, min_8bit_size=0, **group)
    codes = lambda p: torch.zeros(p.shape, dtype=torch.uint8)  # noqa: E731
    blocks = lambda p: torch.zeros(-(-p.numel() // BLOCKSIZE))  # noqa: E731
    ref_state = [dict(step=0, state1=codes(p), state2=codes(p), absmax1=blocks(p), absmax2=blocks(p)) for p in ref]
    for step in range(8):
        skip = (1, 5) if step in (2, 3) else (4,) if step == 5 else ()
        set_grads(step, mine, ref, skip=skip)
        if step == 4:
            for p in (mine[0], ref[0]):
                p.grad[3, 7], p.grad[0, 0] = float("inf"), float("nan")
        if step in (4, 5):  # the [3, 257]'s 3-lane tail block loses all its m: its pad lanes set the absmax
            for p in (mine[2], ref[2]):
                p.grad[2, -3:] = float("nan")
        opt.step()
        with torch.no_grad():
            for i, (p, state) in enumerate(zip(ref, ref_state)):
                if i not in skip:
                    state["step"] += 1
                    reference_step_8bit(p, state, group)
        for i, (a, b) in enumerate(zip(mine, ref)):
            assert torch.equal(a, b), f"step {step} parameter {i}"
            for key in ("state1", "state2", "absmax1", "absmax2"):
                assert torch.equal(opt.state[a][key], ref_state[i][key]), f"step {step} parameter {i} {key}"
            assert opt.state[a]["step"] == ref_state[i]["step"]
    assert len({id(opt._buckets[p][0]) for p in mine}) == 1  # one flat bucket for all nine


def test_8bit_sign_of_a_code_is_its_index_below_127():
    # adamw_8bit's sign fix reads the sign of DYNAMIC_SIGNED[q] as q < 127 (no table lookup)
    assert torch.equal(torch.signbit(DYNAMIC_SIGNED), torch.arange(256) < 127)


# ---------------------------------------------------------------------------------------------
# Resume: state_dict -> disk -> new optimizer -> same trajectory

@pytest.mark.parametrize("optim_bits", [32, 8])
def test_resume_gives_the_same_trajectory(optim_bits):
    shapes = [(64, 80), (10,)]  # 5120 elements -> 8-bit state; 10 -> 32-bit state
    def build(params):
        return PagedAdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=1e-3,
                          weight_decay=0.02, optim_bits=optim_bits)
    make = lambda: make_params(shapes) + make_params([(70, 64)], seed=1)  # noqa: E731
    straight, resumed = make(), make()
    opt = build(straight)
    for step in range(10):
        set_grads(step, straight)
        if step == 3:
            opt.param_groups[0]["lr"] = 5e-3  # a schedule change the checkpoint must carry
        opt.step()

    first = build(resumed)
    for step in range(5):
        set_grads(step, resumed)
        if step == 3:
            first.param_groups[0]["lr"] = 5e-3
        first.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in resumed], "optimizer": first.state_dict()}, buf)
    del first
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in ckpt["params"]]
    second = build(resumed)  # built with lr 1e-3; the checkpoint's 5e-3 must win
    second.load_state_dict(ckpt["optimizer"])
    assert second.param_groups[0]["lr"] == 5e-3
    second_group_state = second.state[resumed[2]]
    moment, dtype = ("state1", torch.uint8) if optim_bits == 8 else ("exp_avg", torch.float32)
    assert second_group_state[moment].dtype == dtype
    for step in range(5, 10):
        set_grads(step, resumed)
        second.step()

    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    for (ka, va), (kb, vb) in zip(state_tensors(opt, straight), state_tensors(second, resumed)):
        assert ka == kb and (va == vb if ka == "step" else torch.equal(va, vb) and va.dtype == vb.dtype), ka


def test_load_state_dict_rejects_a_mismatched_checkpoint():
    a = make_params([(64, 80)])
    opt = PagedAdamW8bit(a)
    set_grads(0, a)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="shape"):
        PagedAdamW8bit(make_params([(80, 64)])).load_state_dict(sd)
    with pytest.raises(ValueError, match="groups"):
        PagedAdamW8bit([{"params": make_params([(64, 80)])}, {"params": make_params([(3,)])}]).load_state_dict(sd)
    bad = {"state": {0: {"step": 1, "state1": sd["state"][0]["state1"].float()}}, "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match="state keys"):
        PagedAdamW8bit(make_params([(64, 80)])).load_state_dict(bad)


# ---------------------------------------------------------------------------------------------
# Which parameters get stepped

@pytest.mark.parametrize("optim_bits", [32, 8])
def test_skips_params_without_grad_and_frozen_params(optim_bits):
    no_grad, frozen, trained = make_params([(64, 80)] * 3)
    frozen.requires_grad_(False)
    frozen.grad = torch.ones_like(frozen)  # a stale gradient must not move a frozen parameter
    before = [p.detach().clone() for p in (no_grad, frozen, trained)]
    opt = PagedAdamW([no_grad, frozen, trained], weight_decay=0.1, optim_bits=optim_bits)
    trained.grad = torch.ones_like(trained)
    opt.step()
    assert torch.equal(no_grad, before[0]) and torch.equal(frozen, before[1])
    assert set(opt.state) == {trained}
    # first Adam step with g = 1: every element moves by lr (times 1 - lr * wd for the decay)
    torch.testing.assert_close(trained.detach(), before[2] * (1 - 1e-4) - 1e-3, rtol=0, atol=1e-6)


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_non_contiguous_params_step_like_contiguous_ones(optim_bits):
    base = make_params([(80, 64)])[0]
    contiguous = base.detach().t().contiguous().requires_grad_()  # [64, 80]
    transposed = base.detach().clone().t().requires_grad_()  # [64, 80] view with strides (1, 64)
    opts = [PagedAdamW([p], optim_bits=optim_bits, weight_decay=0.1) for p in (contiguous, transposed)]
    for step in range(3):
        set_grads(step, [contiguous], [transposed])
        for opt in opts:
            opt.step()
    assert not transposed.is_contiguous() and torch.equal(contiguous, transposed)


def test_bad_arguments_are_clear_errors():
    p = make_params([(4,)])
    with pytest.raises(ValueError, match="optim_bits"):
        PagedAdamW(p, optim_bits=4)
    with pytest.raises(ValueError, match="lr"):
        PagedAdamW(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="float64"):
        PagedAdamW([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(ValueError, match="sparse"):
        q = make_params([(4,)])[0]
        q.grad = torch.ones(4).to_sparse()
        PagedAdamW([q]).step()


def test_cpu_state_is_ordinary_memory():
    p = make_params([(400, 300)])[0]  # 120k elements: above page_threshold, but on the CPU
    opt = PagedAdamW([p], paged=True)
    set_grads(0, [p])
    opt.step()
    assert not any(managed_memory.is_managed(v) for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    assert managed_memory.managed_bytes() == 0


def storages(opt, params, keys):
    """The distinct allocations (storage pointers) behind the given state entries."""
    return {opt.state[p][k].untyped_storage().data_ptr() for p in params for k in keys if k in opt.state[p]}


def test_state_is_carved_from_one_allocation_per_dtype():
    # 448 tensors' state in 448 x 2 allocations would cost 448 prefetches a step once paged; the state of
    # all parameters that start together lives in one arena per dtype (torch.save needs one dtype per storage)
    shapes = [(16, 576), (576, 16), (300, 33), (7,)]
    p32 = make_params(shapes)
    opt32 = PagedAdamW(p32)
    set_grads(0, p32)
    opt32.step()
    assert len(storages(opt32, p32, ("exp_avg", "exp_avg_sq"))) == 1
    p8 = make_params(shapes)
    opt8 = PagedAdamW8bit(p8)  # the [7] keeps 32-bit state (min_8bit_size 4096)
    set_grads(0, p8)
    opt8.step()
    assert len(storages(opt8, p8, ("state1", "state2"))) == 1
    assert len(storages(opt8, p8, ("absmax1", "absmax2", "exp_avg", "exp_avg_sq"))) == 1
    assert "exp_avg" in opt8.state[p8[3]] and "state1" in opt8.state[p8[2]]
    buf = io.BytesIO()
    torch.save(opt8.state_dict(), buf)  # views of one storage as one dtype: savable
    assert buf.tell() > 0


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_paged_state_bookkeeping_on_cpu(monkeypatch, optim_bits):
    # The CUDA-only calls swapped for CPU stand-ins, so the bookkeeping around them runs here: the
    # pageable state goes to one "managed" arena per dtype (absmax never), each step prefetches each
    # arena once (not once per tensor), load_state_dict allocates managed arenas again, and the results
    # equal an unpaged optimizer's bit for bit.
    allocated, prefetched = [], []
    monkeypatch.setattr(PagedAdamW, "_paging", staticmethod(lambda device, group: group["paged"]))
    monkeypatch.setattr(paged_adamw, "managed_zeros",
                        lambda shape, dtype, device: allocated.append(torch.zeros(shape, dtype=dtype)) or allocated[-1])
    monkeypatch.setattr(paged_adamw, "prefetch", lambda t: prefetched.append(t.data_ptr()))
    shapes = [(64, 80), (80, 64), (3, 257), (7,)]
    paged, plain = make_params(shapes), make_params(shapes)
    opts = [PagedAdamW(ps, optim_bits=optim_bits, min_8bit_size=0, page_threshold=100, paged=flag, weight_decay=0.1)
            for ps, flag in ((paged, True), (plain, False))]
    for step in range(3):
        set_grads(step, paged, plain)
        for opt in opts:
            opt.step()
    arena_ptrs = [a.data_ptr() for a in allocated]
    assert len(allocated) == 1 and prefetched == arena_ptrs * 2  # steps 2 and 3 (step 1 allocated it)
    big = ("state1", "state2") if optim_bits == 8 else ("exp_avg", "exp_avg_sq")
    assert storages(opts[0], paged[:3], big) == set(arena_ptrs)
    assert not storages(opts[0], paged, ("absmax1", "absmax2")) & set(arena_ptrs)
    if optim_bits == 32:  # the [7] is under page_threshold: ordinary memory
        assert not storages(opts[0], paged[3:], big) & set(arena_ptrs)
    for a, b in zip(paged, plain):
        assert torch.equal(a, b)
    again = PagedAdamW(paged, optim_bits=optim_bits, min_8bit_size=0, page_threshold=100)
    again.load_state_dict(opts[0].state_dict())
    assert len(allocated) == 2 and storages(again, paged[:3], big) == {allocated[-1].data_ptr()}
    for p in paged:
        for key, value in opts[0].state[p].items():
            assert value == again.state[p][key] if key == "step" else torch.equal(value, again.state[p][key])


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_step_reads_nothing_back_into_python(optim_bits):
    # The CPU half of the CUDA sync test below: in a steady-state step (including one where a parameter
    # has no gradient) no op reads a tensor's value into Python (item, is_nonzero, nonzero: each one a
    # host-device synchronization on a GPU). Host-to-device copies are invisible on a CPU: the CUDA test.
    params = make_params([(64, 80), (80, 64), (3, 257), (7,)])
    opt = PagedAdamW(params, optim_bits=optim_bits, min_8bit_size=0, weight_decay=0.1)
    set_grads(0, params)
    opt.step()
    names = set()
    for step, skip in ((1, (0,)), (2, ())):
        set_grads(step, params, skip=skip)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        names |= {e.name for e in prof.events()}
    assert {"aten::cat", "aten::index_select"} <= names if optim_bits == 8 else "aten::_foreach_addcdiv_" in names
    assert not names & {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero",
                        "aten::masked_select"}


# ---------------------------------------------------------------------------------------------
# CUDA: paged state, paging under memory pressure (skipped without a GPU)

@pytest.mark.cuda
def test_cuda_paged_32bit_equals_torch_adamw():
    shapes = [(512, 256), (256, 64), (33,)]
    ref, mine = make_params(shapes, device="cuda"), make_params(shapes, device="cuda")
    torch_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.01, foreach=True)
    opt = PagedAdamW(mine, lr=1e-3, weight_decay=0.01, page_threshold=10_000)
    for step in range(10):
        set_grads(step, ref, mine)
        torch_opt.step()
        opt.step()
    assert [managed_memory.is_managed(opt.state[p]["exp_avg"]) for p in mine] == [True, True, False]
    for r, m in zip(ref, mine):
        assert ulps(m, r) <= 4


@pytest.mark.cuda
def test_cuda_paged_8bit_matches_cpu():
    shapes = [(512, 257), (64, 80)]
    cpu, gpu = make_params(shapes), make_params(shapes, device="cuda")
    opt_cpu = PagedAdamW8bit(cpu, weight_decay=0.01)
    opt_gpu = PagedAdamW8bit(gpu, weight_decay=0.01, page_threshold=100_000)
    for step in range(5):
        set_grads(step, cpu, gpu)
        opt_cpu.step()
        opt_gpu.step()
    assert managed_memory.is_managed(opt_gpu.state[gpu[0]]["state1"])
    assert not managed_memory.is_managed(opt_gpu.state[gpu[0]]["absmax1"])
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-5, atol=1e-7)
        codes_equal = (opt_gpu.state[g]["state1"].cpu() == opt_cpu.state[c]["state1"]).float().mean()
        assert codes_equal > 0.999  # GPU sqrt/div may move a value across a code midpoint, rarely


@pytest.mark.cuda
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_cuda_paged_state_round_trip(optim_bits):
    shapes = [(400, 300), (70,)]
    straight, resumed = make_params(shapes, device="cuda"), make_params(shapes, device="cuda")
    opt = PagedAdamW(straight, optim_bits=optim_bits, weight_decay=0.01)
    first = PagedAdamW(resumed, optim_bits=optim_bits, weight_decay=0.01)
    for step in range(3):
        set_grads(step, straight, resumed)
        opt.step()
        first.step()
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    del first
    buf.seek(0)
    second = PagedAdamW(resumed, optim_bits=optim_bits, weight_decay=0.01)
    second.load_state_dict(torch.load(buf, weights_only=True, map_location="cpu"))  # host copy -> paged again
    big = second.state[resumed[0]]
    key = "state1" if optim_bits == 8 else "exp_avg"
    assert big[key].is_cuda and managed_memory.is_managed(big[key]) and pointer_is_managed(big[key])
    assert big[key].dtype == (torch.uint8 if optim_bits == 8 else torch.float32)
    for step in range(3, 6):
        set_grads(step, straight, resumed)
        opt.step()
        second.step()
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_paging_under_memory_pressure():
    # 32M float32 parameters -> 256 MiB of managed 32-bit state. Once it is resident on the GPU, an
    # ordinary allocation asks for all the memory that was free *before* the state existed, less half
    # the state: it can only succeed if the driver evicts managed pages to host RAM -- the paging QLoRA
    # relies on -- and the next step must fault them back unchanged. The managed allocation itself never
    # exceeds what is free; the card is oversubscribed by only 128 MiB (held in host RAM).
    n = 32 * 2**20
    p = torch.randn(n, device="cuda").requires_grad_()
    ref = p.detach().clone().requires_grad_()
    opt = PagedAdamW([p], lr=1e-3, weight_decay=0.01)
    torch_opt = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.01, foreach=True)
    grads = [torch.randn(n, device="cuda", generator=torch.Generator("cuda").manual_seed(s)) for s in range(2)]
    ref.grad = grads[0]
    torch_opt.step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_before_state = torch.cuda.mem_get_info()[0]
    p.grad = grads[0]
    opt.step()
    allocations = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()  # m and v share one arena
                   for v in opt.state[p].values() if isinstance(v, torch.Tensor)}
    state_bytes = sum(allocations.values())
    assert state_bytes == 8 * n and managed_memory.managed_bytes() >= state_bytes
    assert all(managed_memory.is_managed(opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq"))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    try:
        hog = torch.empty(free_before_state - state_bytes // 2, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as e:
        pytest.fail(f"the driver did not evict managed optimizer pages to make room: {e}")
    hog.fill_(1)
    torch.cuda.synchronize()
    del hog
    torch.cuda.empty_cache()
    p.grad, ref.grad = grads[1], grads[1]
    opt.step()  # prefetch / page faults bring the evicted pages back
    torch_opt.step()
    assert ulps(p, ref) <= 4
    assert ulps(opt.state[p]["exp_avg_sq"], torch_opt.state[ref]["exp_avg_sq"]) <= 4


def managed_allocations(opt, params) -> set:
    """Storage pointers of every pageable state entry (moments, codes), asserting each is managed."""
    keys = ("exp_avg", "exp_avg_sq", "state1", "state2")
    views = [opt.state[p][k] for p in params for k in keys if k in opt.state[p]]
    assert views and all(managed_memory.is_managed(v) and pointer_is_managed(v) for v in views)
    return {v.untyped_storage().data_ptr() for v in views}


@pytest.mark.cuda
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_cuda_paged_equals_plain_in_one_managed_allocation(optim_bits):
    # (a) paging changes where the state lives, never a bit of the result; (b) all of it in one managed
    # allocation (one prefetch per step); absmax stays ordinary device memory, as in bitsandbytes
    shapes = [(64, 4096), (4096, 64), (64, 11008), (11008, 64), (3, 257)]
    paged, plain = make_params(shapes, device="cuda"), make_params(shapes, device="cuda")
    gc.collect()  # earlier tests' optimizers: freed now, not while this one is measured
    before = managed_memory.managed_bytes()
    opts = [PagedAdamW(ps, optim_bits=optim_bits, weight_decay=0.01, min_8bit_size=0, page_threshold=0, paged=flag)
            for ps, flag in ((paged, True), (plain, False))]
    for step in range(5):
        set_grads(step, paged, plain, skip=(4,) if step == 2 else ())  # a skipped step: the per-tensor path too
        for opt in opts:
            opt.step()
    for a, b in zip(paged, plain):
        assert torch.equal(a, b)
        for key, value in opts[0].state[a].items():
            assert value == opts[1].state[b][key] if key == "step" else torch.equal(value, opts[1].state[b][key]), key
    assert len(managed_allocations(opts[0], paged)) == 1 and len(opts[0]._arenas) == 1
    state_bytes = sum(v.numel() * v.element_size() for p in paged for k, v in opts[0].state[p].items()
                      if k in ("exp_avg", "exp_avg_sq", "state1", "state2"))
    assert state_bytes <= managed_memory.managed_bytes() - before <= state_bytes + 256 * 4 * len(shapes)
    if optim_bits == 8:
        assert not managed_memory.is_managed(opts[0].state[paged[0]]["absmax1"])
    assert not any(managed_memory.is_managed(v) for p in plain for v in opts[1].state[p].values()
                   if isinstance(v, torch.Tensor))


@pytest.mark.cuda
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_cuda_load_state_dict_keeps_state_managed_in_one_allocation(optim_bits):
    # (c) torch's Optimizer.load_state_dict would cast the state to the parameter's device: ordinary
    # memory. Ours re-allocates it as step() would: managed, one arena, from a host-side checkpoint.
    shapes = [(64, 4096), (4096, 64), (33,)]
    params = make_params(shapes, device="cuda")
    opt = PagedAdamW(params, optim_bits=optim_bits, min_8bit_size=0, page_threshold=0)
    set_grads(0, params)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = PagedAdamW(params, optim_bits=optim_bits, min_8bit_size=0, page_threshold=0)
    again.load_state_dict(torch.load(buf, weights_only=True, map_location="cpu"))
    assert len(managed_allocations(again, params)) == 1 and len(again._arenas) == 1
    for p in params:
        for key, value in opt.state[p].items():
            if key != "step":
                assert again.state[p][key].is_cuda and torch.equal(again.state[p][key], value), key


@pytest.mark.cuda
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_cuda_step_never_waits_for_the_gpu(optim_bits, paged):
    # (d) no .item(), no host copies, no synchronize inside step(): the host stays ahead of the GPU.
    # The first step allocates the state and uploads the 8-bit maps once; every later one runs under
    # torch's sync debug mode set to raise, including a step where one parameter has no gradient.
    shapes = [(64, 4096), (4096, 64), (3, 257), (33,)]
    params = make_params(shapes, device="cuda")
    opt = PagedAdamW(params, optim_bits=optim_bits, paged=paged, page_threshold=0, weight_decay=0.01)
    set_grads(0, params)
    opt.step()
    grads = [[torch.randn(p.shape, device="cuda") for p in params] for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, gs in enumerate(grads):
            for i, (p, g) in enumerate(zip(params, gs)):
                p.grad = None if (step == 1 and i == 0) else g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in params)
