"""Long context, the model side: packed rows without a dense (T, T) mask, the MLP computed in chunks of
tokens, and checkpointed layer inputs offloaded to CPU memory; each exact against the plain path."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import llama
from conftest import HF

T = 200  # no dimension of the gqa fixture is 200 (C 64, F 176, V 512, D 16), so a (T, T) shape is unambiguous
DOCS = [[70, 50, 80], [30, 100, 45, 25]]  # document lengths of the two packed rows, each summing to T


def load():
    return llama.from_pretrained(HF / "gqa", quant=None, dtype=torch.float32)


def packed_batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (len(DOCS), T), generator=gen)  # (B, T)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in DOCS])  # (B, T) restarts at 0
    return ids, pos


def documents(ids):
    """(row, start, end) of every packed document."""
    out = []
    for b, row in enumerate(DOCS):
        start = 0
        for n in row:
            out.append((b, start, start + n))
            start += n
    return out


def doc_loss(logits, ids):
    """Next-token cross-entropy summed over one document (no target crosses a document boundary)."""
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum")


class TensorSpy(TorchDispatchMode):
    """Records (op, shape) of every tensor that any aten op produces, in forward and backward, for which
    `suspect(shape)` is true."""

    def __init__(self, suspect):
        super().__init__()
        self.suspect, self.seen = suspect, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and self.suspect(tuple(t.shape)):
                self.seen.append((str(func), tuple(t.shape)))
        return out


def square(shape):
    """Two dims equal to T: a (T, T) mask or score matrix, whatever its leading dims."""
    return shape.count(T) >= 2


# ----------------------------------------------------------------------------------------------------
# packed rows: position_ids that restart at 0, no attention_mask


def test_packed_rows_equal_documents_alone():
    """Each document of a packed row gets the logits and loss it gets alone, and the gradients of the
    summed loss equal those of the documents run one by one. fp32 throughout; the two computations differ
    only in the shapes the matmuls and SDPA see (blocking/summation order), so they agree to fp32
    round-off: 1e-5 of the logits' scale, as the transformers parity tests."""
    model = load()
    ids, pos = packed_batch()
    logits = model(ids, position_ids=pos)  # (B, T, V)
    packed_loss = 0
    alone_loss = 0
    for b, s, e in documents(ids):
        alone = model(ids[b:b + 1, s:e])[0]  # (e - s, V)
        scale = alone.abs().max().item()
        torch.testing.assert_close(logits[b, s:e], alone, rtol=0, atol=1e-5 * scale)
        a, p = doc_loss(alone, ids[b, s:e]), doc_loss(logits[b, s:e], ids[b, s:e])
        torch.testing.assert_close(p, a, rtol=1e-5, atol=0)  # a mean CE of logits equal within 1e-5 of scale
        packed_loss, alone_loss = packed_loss + p, alone_loss + a
    params = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[1].mlp.down_proj.weight,
              model.model.embed_tokens.weight]
    g_packed = torch.autograd.grad(packed_loss, params)
    g_alone = torch.autograd.grad(alone_loss, params)
    for gp, ga in zip(g_packed, g_alone):
        torch.testing.assert_close(gp, ga, rtol=0, atol=1e-5 * ga.abs().max().item())
    # and a row that is not packed is untouched: the packed call above also equals the dense-mask path
    seg = torch.cat([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])[None] for row in DOCS])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    dense = (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]  # (B, 1, T, T)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=dense, position_ids=pos), logits.detach(),
                                   rtol=0, atol=1e-5 * logits.abs().max().item())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_rows_allocate_nothing_quadratic(checkpointing):
    """Forward and backward of a packed batch produce no tensor with two dims of length T (no mask, no
    scores): SDPA's causal kernel runs per document. The dense-mask path is the control that the check
    sees such tensors when they exist."""
    model = load()
    model.gradient_checkpointing = checkpointing
    model.train()
    ids, pos = packed_batch()
    with TensorSpy(square) as spy:
        model(ids, position_ids=pos).float().logsumexp(-1).mean().backward()
    assert spy.seen == []
    seg = torch.cat([torch.cat([torch.full((n,), i) for i, n in enumerate(row)])[None] for row in DOCS])
    with TensorSpy(square) as control:
        dense = (seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
        model(ids, attention_mask=dense[:, None], position_ids=pos).float().logsumexp(-1).mean().backward()
    assert control.seen  # the (B, 1, T, T) mask and what SDPA derives from it


def test_document_boundaries():
    assert llama.document_boundaries(torch.arange(6).expand(2, 6)) is None  # no restart: plain causal
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert llama.document_boundaries(pos) == [[0, 3, 5, 6], [0, 6]]


# ----------------------------------------------------------------------------------------------------
# the MLP in chunks of tokens

CHUNK = 100  # tokens; a batch of 2 x 200 runs as 4 chunks. > C (64), so no weight-shaped tensor looks like a chunk


def mlp_chunks(model, size):
    for layer in model.model.layers:
        layer.mlp.chunk_size = size


def wide(shape):
    """More than CHUNK tokens' worth of F = 176 (intermediate_size) values: a (tokens, F) gate/up
    intermediate bigger than one chunk."""
    return 176 in shape and math.prod(shape) // 176 > CHUNK


def lora_like(model):
    """Only a few inner weights train, as with LoRA: no layer input requires grad."""
    model.requires_grad_(False)
    params = [model.model.layers[0].mlp.up_proj.weight, model.model.layers[1].mlp.gate_proj.weight,
              model.model.layers[1].self_attn.v_proj.weight]
    for p in params:
        p.requires_grad_(True)
    return params


@pytest.mark.parametrize("checkpointing", [False, True])
def test_chunked_mlp_equals_unchunked(checkpointing):
    """Same logits and gradients with the MLP in chunks as in one piece, with and without layer
    checkpointing (chunks then checkpointed inside a checkpointed layer). Tokens are independent in the
    MLP, so the forward values are the same numbers (bit-identical on the development CPU; a GEMM library
    may still block a 100-row product differently from a 400-row one, hence 1e-5 of the scale, as for packed rows). The
    weight gradients sum over tokens chunk by chunk instead of in one GEMM: a reordered fp32 sum whose
    error is bounded by ~(chunks + log2 terms) * 2^-24 * sum|terms|; measured 6e-7 of the gradient's
    scale here, allowed 4e-6 (about 32 fp32 ulps at the scale)."""
    ids, _ = packed_batch()
    results = {}
    for size in (None, CHUNK):
        model = load()
        mlp_chunks(model, size)
        params = lora_like(model)
        model.gradient_checkpointing = checkpointing
        model.train()
        with TensorSpy(wide) as spy:
            logits = model(ids)
            logits.float().logsumexp(-1).mean().backward()
        results[size] = logits.detach(), [p.grad for p in params], spy.seen
    (plain, g_plain, seen_plain), (chunked, g_chunked, seen_chunked) = results[None], results[CHUNK]
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-5 * plain.abs().max().item())
    for a, b in zip(g_chunked, g_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=4e-6 * b.abs().max().item())
    assert seen_chunked == [] and seen_plain  # chunking bounds the intermediates; the check sees them unbounded
    with torch.no_grad():  # inference takes the chunked path without checkpoints
        model.eval()
        torch.testing.assert_close(model(ids), plain, rtol=0, atol=1e-5 * plain.abs().max().item())


def test_short_calls_take_the_plain_path():
    """The default chunk size leaves ordinary batches alone: bit-identical to an unchunked MLP."""
    model = load()
    ids, _ = packed_batch()
    with torch.no_grad():
        default = model(ids)
        mlp_chunks(model, None)
        assert torch.equal(model(ids), default)
    assert llama.MLP(model.config).chunk_size >= 8192


# ----------------------------------------------------------------------------------------------------
# checkpointed layer inputs offloaded to CPU memory


def train_grads(model, ids, pos=None):
    model.train()
    loss = model(ids, position_ids=pos).float().logsumexp(-1).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("trainable", ["lora_like", "all"])
def test_offloaded_checkpoints_give_identical_gradients(trainable, monkeypatch):
    """Offloading only moves copies of the layer inputs, so loss and gradients are bit-identical to plain
    checkpointing, whether the layer inputs require grad (every weight trains) or not (LoRA-like). Every
    layer's input is offloaded once and fetched back before its recompute, the one below it while the
    layer above is backpropagated: the CPU path runs the same bookkeeping as the CUDA one."""
    import offload
    events = []
    real_offload, real_unpack, real_fetch = (offload.OffloadedCheckpoints._offload,
                                             offload.OffloadedCheckpoints._unpack, offload.OffloadedCheckpoints._fetch)
    monkeypatch.setattr(offload.OffloadedCheckpoints, "_offload",
                        lambda self, t: events.append("offload") or real_offload(self, t))
    monkeypatch.setattr(offload.OffloadedCheckpoints, "_unpack",
                        lambda self, p: events.append(("unpack", p.index if isinstance(p, offload._Saved) else None))
                        or real_unpack(self, p))
    monkeypatch.setattr(offload.OffloadedCheckpoints, "_fetch",
                        lambda self, e: events.append(("fetch", e.index)) or real_fetch(self, e))
    ids, pos = packed_batch()
    results = {}
    for offloading in (False, True):
        model = load()
        if trainable == "lora_like":
            lora_like(model)
        mlp_chunks(model, CHUNK)  # the chunk checkpoints nest inside the offloaded layer checkpoints
        model.gradient_checkpointing, model.offload_activations = True, offloading
        results[offloading] = train_grads(model, ids, pos)
    (loss, grads), (loss_off, grads_off) = results[False], results[True]
    assert torch.equal(loss_off, loss)
    assert len(grads) == len(grads_off) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads_off, grads))
    offloaded = [e for e in events if e == "offload"]
    moved = [e for e in events if e != "offload" and e[1] is not None]
    assert len(offloaded) == 2  # one input per decoder layer
    # backward reaches layer 1 first: its input comes back then, and layer 0's starts back at once, before
    # layer 1's recompute and backward run (not only when layer 0's recompute asks for it)
    assert moved == [("unpack", 1), ("fetch", 1), ("fetch", 0), ("unpack", 0)]


def test_offloaded_layer_inputs_are_not_kept():
    """After the forward, nothing keeps the offloaded layer inputs themselves alive (on a GPU: their memory
    is free), while plain checkpointing keeps every one of them for backward (the control)."""
    import gc
    import weakref
    ids, _ = packed_batch()
    for offloading in (False, True):
        model = load()
        lora_like(model)
        model.gradient_checkpointing, model.offload_activations = True, offloading
        model.train()
        inputs = []
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
        loss = model(ids).float().logsumexp(-1).mean()
        gc.collect()
        alive = [r() is not None for r in inputs]
        assert alive == [not offloading] * 2, (offloading, alive)
        loss.backward()


def test_offload_needs_checkpointing_and_training():
    """Without gradient checkpointing (or in eval/no_grad) there is no checkpointed input to move: the
    flag changes nothing."""
    ids, _ = packed_batch()
    model = load()
    model.offload_activations = True
    loss, grads = train_grads(model, ids)
    model.offload_activations = False
    loss_plain, grads_plain = train_grads(model, ids)
    assert torch.equal(loss, loss_plain) and all(torch.equal(a, b) for a, b in zip(grads, grads_plain))


def cuda_model(layers=8, hidden=512):
    """A random Llama big enough for activations to show in CUDA memory (bf16)."""
    cfg = llama.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=4, intermediate_size=1408, vocab_size=512)
    torch.manual_seed(0)
    return llama.Llama(cfg).to(device="cuda", dtype=torch.bfloat16)


@pytest.mark.cuda
def test_cuda_offload_frees_the_layer_inputs_and_keeps_gradients():
    """On the GPU: after the forward the layer inputs no longer occupy GPU memory (plain checkpointing keeps
    L of them, L * B * T * C * 2 bytes), and the side-stream copies give bit-identical gradients. Bit
    identity needs a deterministic backward to compare against: the math SDPA kernel (the flash/efficient
    backward kernels accumulate with atomics) and a frozen embedding (index_add); checked by a second
    plain run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = cuda_model()
    B, T, C, L = 1, 4096, 512, 8
    ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(0))
    model.model.embed_tokens.weight.requires_grad_(False)
    model.gradient_checkpointing = True
    model.train()
    kept, grads = {}, {}
    for run, offloading in (("plain", False), ("plain again", False), ("offloaded", True)):
        model.offload_activations = offloading
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with sdpa_kernel(SDPBackend.MATH):
            hidden = model.hidden_states(ids)
            torch.cuda.synchronize()
            torch.empty(1, device="cuda")  # lets the allocator process the side stream's finished events
            kept[run] = torch.cuda.memory_allocated() - base
            model.lm_head(hidden).float().logsumexp(-1).mean().backward()
        torch.cuda.synchronize()
        grads[run] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    layer_input = B * T * C * 2
    assert kept["plain"] - kept["offloaded"] >= (L - 1) * layer_input, (kept, layer_input)
    assert all(torch.equal(a, b) for a, b in zip(grads["plain again"], grads["plain"])), "backward not deterministic"
    assert len(grads["offloaded"]) == len(grads["plain"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads["offloaded"], grads["plain"]))
