"""train.py: masks per row format, the chunked loss against a full cross-entropy, packing without
cross-row attention, gradient accumulation, loss falling, bit-exact resume, adapters that load back,
the no-argument demo wiring, and bad input failing before anything is written."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import HF, ROOT

import data
import llama
import lm_loss
import lora
import train
import train_config
from tokenizer import Tokenizer

GQA = HF / "gqa"
pytestmark = pytest.mark.filterwarnings("ignore:training on the CPU")
# The in-process runs mean the CPU (float32, exact comparisons): on a GPU machine too. GPU runs: test_cuda_cli.py
FAST = ["--lora-r", "8", "--lora-alpha", "16", "--dtype", "float32", "--optim", "adamw", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The fixture models' matmuls are tiny: OpenMP fork/join costs more than it saves, and on a busy
    # 2-core machine a second thread waiting at a barrier makes each op ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(GQA)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def memorize_rows(n=8):
    return [{"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" It is {2 * i}."} for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Tokenization and masks

def split_by_mask(ids, trained, tok):
    """(untrained text, trained text), each the concatenation of its runs."""
    return (tok.decode([i for i, t in zip(ids, trained) if not t]), tok.decode([i for i, t in zip(ids, trained) if t]))


def test_prompt_completion_mask(tok):
    ids, trained = data.tokenize_row({"prompt": "Say hi:", "completion": " hi there"}, "x:1", tok)
    prompt, completion = tok.encode("Say hi:"), tok.encode(" hi there")
    assert ids == [tok.bos_id] + prompt + completion + [tok.eos_ids[0]]  # the fixture tokenizer adds BOS
    assert trained == [False] * (1 + len(prompt)) + [True] * (len(completion) + 1)  # EOS is trained on


def test_text_mask_trains_on_everything_but_the_first_token(tok):
    ids, trained = data.tokenize_row({"text": "hello world"}, "x:1", tok)
    assert ids == [tok.bos_id] + tok.encode("hello world") + [tok.eos_ids[0]]
    assert trained == [False] + [True] * (len(ids) - 1)
    # a text that already ends with EOS (guanaco's "... </s>") gets no second one, nor a second BOS
    ids2, _ = data.tokenize_row({"text": "<|begin_of_text|>hello world<|end_of_text|>"}, "x:1", tok)
    assert ids2 == ids


def test_instruction_mask_uses_the_alpaca_prompt(tok):
    row = {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}
    ids, trained = data.tokenize_row(row, "x:1", tok)
    untrained, trained_text = split_by_mask(ids, trained, tok)
    assert untrained == "<|begin_of_text|>" + data.ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 3")
    assert trained_text == "5<|end_of_text|>"
    ids, trained = data.tokenize_row({"instruction": "Say 5.", "output": "5"}, "x:1", tok)
    assert split_by_mask(ids, trained, tok)[0].endswith("### Instruction:\nSay 5.\n\n### Response: ")


def test_messages_mask_trains_on_assistant_turns_only(tok):
    # fixture template: {bos}<|role|>\n{content}{eos}\n per message; generation prompt "<|assistant|>\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye"}]
    ids, trained = data.tokenize_row({"messages": messages}, "x:1", tok)
    eos = "<|end_of_text|>"
    assert tok.decode(ids) == tok.apply_chat_template(messages)  # nothing added or lost
    runs, start = [], 0  # maximal runs of equal mask, decoded
    for t in range(1, len(ids) + 1):
        if t == len(ids) or trained[t] != trained[start]:
            runs.append((trained[start], tok.decode(ids[start:t])))
            start = t
    assert runs == [
        (False, f"<|begin_of_text|><|system|>\nBe brief.{eos}\n<|user|>\nHi{eos}\n<|assistant|>\n"),
        (True, f"Hello{eos}\n"),
        (False, f"<|user|>\nBye{eos}\n<|assistant|>\n"),
        (True, f"Goodbye{eos}\n"),
    ]
    assert ids.count(tok.bos_id) == 1 and ids[-2] == tok.eos_ids[0]  # the template's EOS; none appended


def test_collate_shifts_targets_and_pads(tok):
    examples = [([5, 6, 7, 8], [False, False, True, True]), ([9, 10], [False, True])]
    batch = data.collate(examples, pad_id=2)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 8], [9, 10, 2, 2]]))
    I = data.IGNORE
    assert torch.equal(batch["targets"], torch.tensor([[I, 7, 8, I], [10, I, I, I]]))
    assert batch["tokens"] == 6


def test_truncation_is_counted_and_rows_without_targets_dropped(tok):
    rows = [({"prompt": "a " * 50, "completion": "b"}, "f:1"), ({"prompt": "x", "completion": "y " * 50}, "f:2"),
            ({"prompt": "x", "completion": "y"}, "f:3")]
    examples, counts = data.tokenize_rows(rows, tok, seq_len=20)
    assert counts == {"rows": 3, "truncated": 2, "without_targets": 1}
    assert [len(ids) for ids, _ in examples] == [20, len(data.tokenize_row(rows[2][0], "", tok)[0])]


def test_file_formats_and_hub_style_splits(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"prompt": "a", "completion": "b"}, {"text": "c"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.txt").write_text("first paragraph\nstill first\n\n\nsecond\n")
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["a", None], "completion": ["b", None], "text": [None, "c"]}),
                   hub / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), hub / "test-00000-of-00001.parquet")
    assert data.read_rows(str(tmp_path / "rows.json")) == [(rows[0], f"{tmp_path / 'rows.json'}: row 0"),
                                                          (rows[1], f"{tmp_path / 'rows.json'}: row 1")]
    txt = tmp_path / "rows.txt"
    assert data.read_rows(str(txt)) == [({"text": "first paragraph\nstill first"}, f"{txt}:1"),
                                         ({"text": "second"}, f"{txt}:5")]
    # parquet has one schema for all rows: the text row comes back with prompt/completion null
    assert [r for r, _ in data.read_rows(str(tmp_path / "hub"))] == [  # the "train" split by default
        {"prompt": "a", "completion": "b", "text": None}, {"prompt": None, "completion": None, "text": "c"}]
    assert [r for r, _ in data.read_rows(str(tmp_path / "hub"), "test")] == rows[:1]
    tok = Tokenizer.from_dir(GQA)
    assert data.tokenize_row({"prompt": None, "completion": None, "text": "c"}, "", tok) == \
        data.tokenize_row({"text": "c"}, "", tok)
    with pytest.raises(FileNotFoundError, match="no data files for split 'validation'"):
        data.read_rows(str(tmp_path / "hub"), "validation")
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(ValueError, match=r"bad.json:2: malformed JSON"):
        data.read_rows(str(tmp_path / "bad.json"))


# ---------------------------------------------------------------------------------------------------
# Loss

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_full_logits(dtype):
    torch.manual_seed(0)
    N, C, V = 37, 16, 50
    h = torch.randn(N, C, dtype=dtype, requires_grad=True)
    w = torch.randn(V, C, dtype=dtype)
    y = torch.randint(0, V, (N,))
    loss = lm_loss.LMHeadCrossEntropy.apply(h, w, y, 8)  # 5 chunks, the last one partial
    (loss / N).backward()
    h_ref = h.detach().clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h_ref, w).float(), y, reduction="sum")
    (ref / N).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    # the gradient's only difference from autograd's is fp32 vs `dtype` storage of softmax - onehot
    tol = {torch.float32: (1e-6, 1e-7), torch.bfloat16: (1e-2, 1e-3)}[dtype]
    torch.testing.assert_close(h.grad.float(), h_ref.grad.float(), rtol=tol[0], atol=tol[1])


def test_trained_head_falls_back_to_checkpointed_chunks(tok):
    model = llama.from_pretrained(GQA, quant=None, dtype=torch.float32, device="cpu")
    lora.add_lora(model, r=4, alpha=8, dropout=0.0)
    for p in model.parameters():  # non-zero B, so the adapters' gradients are not trivially equal
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    rows = [{"prompt": "one two", "completion": " three four"}, {"text": "five six seven"}]
    batch = data.collate([data.tokenize_row(r, "", tok) for r in rows], tok.pad_id)

    def loss_and_grads():
        model.zero_grad()
        loss, n = lm_loss.lm_loss_sum(model, batch)
        (loss / n).backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fused, fused_grads = loss_and_grads()  # frozen head: LMHeadCrossEntropy
    model.lm_head.weight.requires_grad_(True)  # a trained head: the checkpointed F.cross_entropy path
    plain, plain_grads = loss_and_grads()
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    assert len(plain_grads) == len(fused_grads) + 1  # the head's own gradient comes last
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # fp32 sums in a different order


def test_packing_has_no_attention_across_rows(tok):
    model = llama.from_pretrained(GQA, quant=None, dtype=torch.float32, device="cpu")
    rows = [{"prompt": "one two", "completion": " three"}, {"text": "four five six seven"},
            {"prompt": "eight", "completion": " nine ten"}]
    examples = [data.tokenize_row(r, "", tok) for r in rows]
    blocks = data.pack(examples * 2, seq_len=sum(len(ids) for ids, _ in examples) + 1)
    assert [len(b) for b in blocks] == [3, 3]
    packed = data.collate_packed(blocks[:1], tok.pad_id)
    assert "attention_mask" not in packed  # rows are told apart by position ids restarting at 0: no (T, T) mask
    loss, n = lm_loss.lm_loss_sum(model, packed)
    separate = [lm_loss.lm_loss_sum(model, data.collate([e], tok.pad_id)) for e in examples]
    assert n == sum(k for _, k in separate)
    torch.testing.assert_close(loss, sum(l for l, _ in separate), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Schedule

def test_lr_schedules():
    f = train.lr_factor
    assert [f(s, 100, 4, "constant") for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert f(4, 100, 4, "cosine") == 1.0 and f(52, 100, 4, "cosine") == pytest.approx(0.5)
    assert f(99, 100, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 95 / 96)))
    assert f(4, 100, 4, "linear") == 1.0 and f(52, 100, 4, "linear") == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------
# Whole runs (in-process)

def test_loss_falls_and_adapter_loads_back(tmp_path, tok):
    data_file = write_jsonl(tmp_path / "d.jsonl", memorize_rows())
    out = tmp_path / "run"
    train.main(["--model", str(GQA), "--data", str(data_file), "--output-dir", str(out), "--max-steps", "40",
                "--lr", "1e-2", "--lora-r", "8", "--lora-dropout", "0", "--batch-size", "4", "--grad-accum", "1",
                "--dtype", "float32", "--eval-fraction", "0.25", "--eval-every", "20",
                "--device", "cpu"])  # default optimizer
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 41))
    assert m[-1]["loss"] < 0.2 * m[0]["loss"], (m[0]["loss"], m[-1]["loss"])
    assert {"step", "loss", "lr", "tokens", "elapsed_s"} <= set(m[0]) and "eval_loss" in m[19] and "eval_loss" in m[39]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-40"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(GQA.resolve()) and config["r"] == 8
    assert json.loads((out / "train_config.json").read_text())["quant"] == "nf4"

    # a fresh 4-bit model with the saved adapter reproduces the run's final eval loss
    model = llama.from_pretrained(GQA, quant="nf4", dtype=torch.float32, device="cpu")
    lora.load_adapter(model, out)
    saved = load_file(out / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"],
                       model.model.layers[1].mlp.down_proj.lora_B.weight)
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B moved away from zero
    cfg = train.TrainConfig(**json.loads((out / "train_config.json").read_text()))
    examples, _ = data.tokenize_rows(data.read_rows(str(data_file)), tok, cfg.seq_len)
    _, held_out = data.split_eval(examples, cfg.eval_fraction, cfg.seed)
    assert len(held_out) == 2
    torch.testing.assert_close(train.eval_loss(model, held_out, cfg, tok.pad_id), m[-1]["eval_loss"],
                               rtol=1e-6, atol=1e-6)


def test_resume_equals_uninterrupted_run(tmp_path):
    data_file = write_jsonl(tmp_path / "d.jsonl", memorize_rows(12))
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--model", str(GQA), "--data", str(data_file), "--max-steps", "6", "--save-every", "2",
            "--save-total-limit", "2", "--batch-size", "2", "--grad-accum", "2", "--lr", "5e-3",
            "--lr-scheduler", "cosine", "--warmup-ratio", "0.3", "--lora-r", "4", "--dtype", "bfloat16",
            "--device", "cpu"]  # bit-exact resume is a CPU promise; the GPU's is in test_cuda_cli.py
    train.main(args + ["--output-dir", str(full)])  # dropout 0.1 and a 2-epoch data order: RNG and position
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")  # as if the run had died after step 4
    train.main(["--resume", str(resumed / "checkpoint-4")])  # every other setting comes from the checkpoint
    a, b = metrics(full), metrics(resumed)
    assert [r["step"] for r in b] == [5, 6]
    assert [(r["loss"], r["lr"], r["tokens"]) for r in b] == [(r["loss"], r["lr"], r["tokens"]) for r in a[4:]]
    fa, fb = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)  # bit-exact
    oa = torch.load(full / "checkpoint-6" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    ob = torch.load(resumed / "checkpoint-6" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)


def test_accumulation_normalizes_by_all_supervised_tokens(tmp_path):
    # rows of very different lengths: averaging per micro-batch would weight them differently
    rows = [{"prompt": "p", "completion": " x" * (1 + 7 * (i % 2))} for i in range(8)]
    data_file = write_jsonl(tmp_path / "d.jsonl", rows)
    common = ["--model", str(GQA), "--data", str(data_file), "--max-steps", "2", "--lr", "1e-2",
              "--lora-dropout", "0", "--save-every", "0", *FAST]
    train.main(common + ["--output-dir", str(tmp_path / "a"), "--batch-size", "4", "--grad-accum", "1"])
    train.main(common + ["--output-dir", str(tmp_path / "b"), "--batch-size", "1", "--grad-accum", "4"])
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    # The two runs sum the same fp32 terms in a different order (matmuls of 4 rows vs 1 row), so their
    # gradients differ by ulps of the tensor's gradient scale G: |dg| <~ 1e-5 G (~100 eps_fp32, for sums
    # over ~100 tokens and two layers). AdamW turns a gradient g into lr * m_hat / (sqrt(v_hat) + eps),
    # whose slope in g is ~lr / (sqrt(v_hat) + eps): an element whose gradient is near 0 (|g| ~ eps = 1e-8,
    # a cancellation) turns that ulp noise into an update difference of up to lr * 1e-5 G / eps, which
    # differs between CPUs (AVX-512 vs AMX kernels block the sums differently). The run is on the CPU
    # (FAST) on every machine: the normalization it checks is device-independent, and on a GPU the two
    # runs' matmuls (4 rows vs 1) may take different kernels and reduction splits, whose rounding is not
    # bounded by the CPU argument here (1.45e-6 against 1e-6 on an H200); the GPU path is exercised by
    # test_cuda_cli.py instead, against what a GPU run can promise. So each element's
    # tolerance is that slope times the noise, read from run a's own optimizer state; a mis-normalized
    # accumulation changes the gradients by O(1), i.e. most elements by ~lr/10, far outside it.
    fa, fb = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    state = torch.load(tmp_path / "a" / "checkpoint-2" / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    model = llama.from_pretrained(GQA, quant=None, dtype=torch.float32, device="cpu")
    lora.add_lora(model, r=8, alpha=16, dropout=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's parameter order
    assert sorted(lora.KEY_PREFIX + n for n in names) == sorted(fa)
    lr, eps, beta2, steps = 1e-2, 1e-8, 0.999, 2
    for i, name in enumerate(names):
        v_hat = state[i]["exp_avg_sq"] / (1 - beta2 ** steps)
        g_scale = v_hat.sqrt().max()
        tolerance = 1e-6 + steps * lr * 1e-5 * g_scale / (v_hat.sqrt() + eps)
        diff = (fa[lora.KEY_PREFIX + name] - fb[lora.KEY_PREFIX + name]).abs()
        assert (diff <= tolerance).all(), (name, diff.max().item(), (diff / tolerance).max().item())
        # and the test keeps its teeth: most elements are held to under lr / 300
        assert tolerance.median() < lr / 300, (name, tolerance.median().item())


def test_packed_messages_run_and_nan_stop(tmp_path, tok):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(12)]
    data_file = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "packed"
    lengths = [len(data.tokenize_row(r, "", tok)[0]) for r in rows]
    seq_len = 3 * max(lengths)  # 3 rows per block: 4 blocks, 2 steps of 2 blocks per epoch
    train.main(["--model", str(GQA), "--data", str(data_file), "--output-dir", str(out), "--packing", "--seq-len",
                str(seq_len), "--batch-size", "2", "--grad-accum", "1", "--epochs", "2", *FAST])
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4] and m[-1]["tokens"] == 2 * sum(lengths)
    with pytest.raises(FloatingPointError, match="loss became"):
        train.main(["--model", str(GQA), "--data", str(data_file), "--output-dir", str(tmp_path / "o"), "--lr", "1e30",
                    "--max-steps", "4", "--max-grad-norm", "0", *FAST])


@pytest.mark.cuda
def test_gpu_run_learns_in_bf16_with_the_paged_optimizer(tmp_path):
    data_file = write_jsonl(tmp_path / "d.jsonl", memorize_rows())
    out = tmp_path / "run"
    train.main(["--model", str(GQA), "--data", str(data_file), "--output-dir", str(out), "--max-steps", "40",
                "--lr", "1e-2", "--lora-r", "8", "--lora-dropout", "0", "--batch-size", "4", "--grad-accum", "1",
                "--device", "cuda"])  # dtype auto: bf16 (or fp16 with loss scaling), paged_adamw_32bit
    m = metrics(out)
    assert json.loads((out / "train_config.json").read_text())["dtype"] in ("bfloat16", "float16")
    assert m[-1]["loss"] < 0.2 * m[0]["loss"], (m[0]["loss"], m[-1]["loss"])


def test_no_argument_run_uses_the_demo(tmp_path, monkeypatch, capsys):
    rows = [{"messages": [{"role": "user", "content": f"n{i}"}, {"role": "assistant", "content": f"{i}"}]}
            for i in range(6)]
    calls = []

    def evaluate(model, tokenizer, eval_rows):
        calls.append(model.training)
        return 50.0 * len(calls), [r["messages"][-1]["content"] for r in eval_rows]

    import demo_task  # its report() runs as in the real demo, around these stand-ins for the slow parts
    monkeypatch.setattr(demo_task, "prepare", lambda: (GQA, write_jsonl(tmp_path / "demo.jsonl", rows), rows[:2]))
    monkeypatch.setattr(demo_task, "evaluate", evaluate)
    monkeypatch.setattr(demo_task, "DEMO_TRAIN_DEFAULTS",
                        {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "lora_r": 4, "dtype": "float32",
                         "device": "cpu"})
    monkeypatch.chdir(tmp_path)
    out = train.main(["--lora-r", "2"])  # a flag typed by the user beats the demo's value
    assert out.parent.name == "runs" and (out / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert len(metrics(out)) == 2 and calls == [False, False]  # evaluated in eval mode, before and after
    printed = capsys.readouterr().out
    assert "before 50.0% -> after 100.0%" in printed and printed.count("--- sample") == 2


# ---------------------------------------------------------------------------------------------------
# Bad input: a clear error, and no output directory

def test_bad_inputs_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--model", str(GQA), "--output-dir", str(out), *FAST]
    good = write_jsonl(tmp_path / "good.jsonl", memorize_rows(2))

    with pytest.raises(SystemExit) as e:
        train.main(base + ["--data", str(good), "--lerning-rate", "1"])
    assert e.value.code == 2 and "unrecognized arguments: --lerning-rate" in capsys.readouterr().err

    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        train.main(base + ["--data", str(tmp_path / "missing.jsonl")])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        train.main(base + ["--data", str(bad)])

    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "ok"}, {"question": "?"}])
    with pytest.raises(ValueError, match=r"wrong.jsonl:2: unrecognised row with keys \['question'\]"):
        train.main(base + ["--data", str(wrong)])

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="the dataset is empty"):
        train.main(base + ["--data", str(empty)])

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(GQA / name, no_weights / name)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        train.main(["--model", str(no_weights), "--data", str(good), "--output-dir", str(out)])

    with pytest.raises(ValueError, match="--lora-r must be > 0"):
        train.main(base + ["--data", str(good), "--lora-r", "0"])
    assert not out.exists()


def test_cli_help_and_unknown_flag():
    help_run = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_run.returncode == 0
    for name in train_config.FIELDS:
        assert "--" + name.replace("_", "-") in help_run.stdout
    assert "--no-gradient-checkpointing" in help_run.stdout
    assert "(default: paged_adamw_32bit)" in " ".join(help_run.stdout.split())  # help text is line-wrapped
    bad = subprocess.run([sys.executable, "train.py", "--model", str(GQA), "--bogus"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr


@pytest.mark.parametrize("choice,expected", [("auto", False), ("on", True), ("off", False)])
def test_compile_flag_reaches_every_4bit_layer(choice, expected):
    # auto means compiled dequantize on CUDA only; on the CPU "on" is accepted and nf4 runs eager.
    cfg = train.TrainConfig(model=str(HF / "gqa"), lora_r=4, compile=choice)
    model = train.load_model(cfg, HF / "gqa", "cpu", torch.float32)
    flags = {m.compile for m in model.modules() if isinstance(m, train.nf4.Linear4bit)}
    assert flags == {expected}
    ids = torch.tensor([[0, 5, 9, 3]])
    reference = train.load_model(train.TrainConfig(model=str(HF / "gqa"), lora_r=4, compile="off"), HF / "gqa",
                                 "cpu", torch.float32)
    torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)


def test_full_disk_mid_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    cfg = train.TrainConfig(model=str(HF / "gqa"), lora_r=4)
    model = train.load_model(cfg, HF / "gqa", "cpu", torch.float32)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # as train.py builds it for fp32
    train.save_checkpoint(tmp_path, 1, model, optimizer, scaler, {"step": 1}, "gqa", keep=3)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.torch, "save", disk_full)
    for step in (1, 2):  # re-saving the same step, and a new one
        with pytest.raises(OSError, match="No space"):
            train.save_checkpoint(tmp_path, step, model, optimizer, scaler, {"step": step}, "gqa", keep=3)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert json.loads((tmp_path / "checkpoint-1" / "trainer_state.json").read_text()) == {"step": 1}


@pytest.mark.parametrize("failure", ["at_compile", "at_first_call"])
def test_compile_failure_falls_back_to_eager_with_one_warning(failure, monkeypatch):
    # torch.compile refusing outright, or (the usual case: no Triton, an Inductor bug) the compiled layer
    # failing while it compiles at its first call: either way every layer runs eager after one warning.
    cfg = train.TrainConfig(model=str(GQA), lora_r=4, lora_dropout=0.0, compile="off")
    calls = []

    def broken_compile(fn, **kwargs):
        if failure == "at_compile":
            raise RuntimeError("no compiler here")

        def compiled(*args, **kw):
            calls.append(fn)
            raise torch._dynamo.exc.TorchDynamoException("inductor crashed")
        return compiled

    def loss_and_grads(model):
        model.train()
        model.zero_grad()
        batch = data.collate([([0, 5, 9, 3, 7], [False, True, True, True, True])], pad_id=0)
        loss, n = lm_loss.lm_loss_sum(model, batch)
        (loss / n).backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    torch.manual_seed(0)  # the same LoRA init for both models
    expected, expected_grads = loss_and_grads(train.load_model(cfg, GQA, "cpu", torch.float32))
    torch.manual_seed(0)
    model = train.load_model(cfg, GQA, "cpu", torch.float32)
    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile of the decoder layers failed") as caught:
        train.compile_layers(model)
        runs = [loss_and_grads(model) for _ in range(2)]  # forward, checkpointed recompute, backward, twice
    assert len([w for w in caught if "decoder layers failed" in str(w.message)]) == 1
    assert len(calls) == (1 if failure == "at_first_call" else 0)  # never retried once it failed
    for loss, grads in runs:
        assert torch.equal(loss, expected) and all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


@pytest.mark.cuda
@pytest.mark.parametrize("quant,optim", [("none", "adamw"), ("nf4", "adamw"), ("nf4", "paged_adamw_32bit"),
                                         ("nf4", "paged_adamw_8bit")])
def test_training_step_never_waits_for_the_gpu(tok, quant, optim):
    # A step (2 micro-batches: forward, chunked loss, checkpointed backward, clipping, optimizer) queued
    # with the sync debug mode at "error": any .item(), device-to-host copy, blocking host-to-device copy
    # or data-dependent shape (a boolean index) raises. Only read_loss, at logging steps, may wait.
    cfg = train.TrainConfig(model=str(GQA), quant=quant, optim=optim, lora_r=4, dtype="bfloat16", compile="off")
    model = train.load_model(cfg, GQA, "cuda", torch.bfloat16)
    optimizer = train.make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    rows = memorize_rows(4)
    examples = [data.tokenize_row(r, "", tok) for r in rows]
    micro = [data.collate(examples[:2], tok.pad_id), data.collate(examples[2:], tok.pad_id)]
    model.train()

    def step():
        loss = train.train_step(model, micro, scaler)
        return loss, train.optimizer_step(optimizer, scaler, 1e-3, 0.3, [p for p in model.parameters()
                                                                          if p.requires_grad])

    step()  # first use: lazy allocations, cuBLAS handles, optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, grad_norm = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert grad_norm is not None and 0 < train.read_loss(loss, grad_norm, 2) < 20


def test_offload_activations_flag(tmp_path, monkeypatch):
    # --offload-activations parks each checkpointed layer input in CPU memory (llama.py): the same run,
    # bit for bit (on the CPU the offload is a copy to pinned memory and back).
    data_file = write_jsonl(tmp_path / "d.jsonl", memorize_rows(4))
    args = ["--model", str(GQA), "--data", str(data_file), "--max-steps", "3", "--batch-size", "2",
            "--grad-accum", "1", "--lr", "1e-2", *FAST]
    offloads = []
    monkeypatch.setattr(llama, "OffloadedCheckpoints",
                        lambda *a, _cls=llama.OffloadedCheckpoints, **k: offloads.append(1) or _cls(*a, **k))
    train.main(args + ["--output-dir", str(tmp_path / "plain")])
    assert not offloads
    train.main(args + ["--output-dir", str(tmp_path / "offload"), "--offload-activations"])
    assert len(offloads) == 3  # one per training forward
    assert json.loads((tmp_path / "offload" / "train_config.json").read_text())["offload_activations"] is True
    assert [r["loss"] for r in metrics(tmp_path / "offload")] == [r["loss"] for r in metrics(tmp_path / "plain")]
    fa, fb = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "offload"))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    cfg = train.TrainConfig(model=str(GQA), lora_r=4, offload_activations=True)
    assert train.load_model(cfg, GQA, "cpu", torch.float32).offload_activations is True
    with pytest.raises(ValueError, match="needs --gradient-checkpointing"):
        train.main(args + ["--output-dir", str(tmp_path / "x"), "--offload-activations", "--no-gradient-checkpointing"])


def test_decoder_layer_traces_as_one_graph():
    # What --compile relies on for its speed: a whole decoder layer (4-bit linears with their dequantize,
    # LoRA with dropout, RMSNorm, RoPE, attention, SwiGLU) is one graph for torch.compile, with no graph
    # break (a .item(), a data-dependent branch or a host tensor would split it and sync the GPU).
    cfg = train.TrainConfig(model=str(GQA), lora_r=4, compile="on")
    model = train.load_model(cfg, GQA, "cpu", torch.float32).train()
    x = torch.randn(2, 8, model.config.hidden_size)
    cos, sin = model._rope(torch.arange(8)[None].expand(2, 8), x.dtype)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.model.layers[0].forward)(x, cos, sin)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_resume_drops_a_metrics_line_cut_short_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-write
    train.trim_metrics(path, 5)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]


def test_a_rank_without_trained_rows_still_backpropagates_through_a_trained_head():
    # torchrun: a short last micro-batch leaves one rank a fully masked row; with LoRA on lm_head its loss
    # must still be part of the graph (0, with zero gradients), or its backward (and FSDP's) would fail
    model = llama.from_pretrained(GQA, quant=None, dtype=torch.float32, device="cpu")
    lora.add_lora(model, r=4, alpha=8, dropout=0, targets="lm_head")
    ids = torch.tensor([[1, 2, 3, 4]])
    loss, n = lm_loss.lm_loss_sum(model, {"input_ids": ids, "targets": torch.full_like(ids, data.IGNORE)})
    loss.backward()
    assert n == 0 and loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)
