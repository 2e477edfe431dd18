"""generate.py: one prompt from the command line, the interactive chat, streaming text."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import generate
import llama
import lora
from conftest import HF, ROOT
from tokenizer import Tokenizer

GQA, ADAPTER = HF / "gqa", HF / "gqa_peft_adapter"
TOKENIZER = Tokenizer.from_dir(GQA)


def expected_reply(messages, max_new_tokens, adapter=None, **load):
    """What the reply must be: greedy generate() on the chat-template prompt, decoded."""
    model = llama.from_pretrained(GQA, dtype=torch.float32, device="cpu", **{"quant": None, **load})
    if adapter is not None:
        lora.load_adapter(model, adapter)
    ids = TOKENIZER.encode(TOKENIZER.apply_chat_template(messages, add_generation_prompt=True))
    out = generate.generate(model, TOKENIZER, [ids], max_new_tokens)[0]
    return TOKENIZER.decode(out)


def test_prompt_from_the_command_line_streams_the_reply():
    # Defaults: NF4 base (float32 compute on the CPU) + the adapter; greedy for a reproducible reply.
    # --device cpu: the reference reply below is computed on the CPU (auto would pick a GPU where one is)
    r = subprocess.run([sys.executable, "generate.py", "--model", str(GQA), "--adapter", str(ADAPTER),
                        "--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
                       env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8"))
    assert r.returncode == 0, r.stderr
    want = expected_reply([{"role": "user", "content": "Hello there"}], 12, adapter=ADAPTER, quant="nf4")
    assert want and r.stdout == want + "\n"
    # the adapter changes the reply (so the comparison above saw it loaded)
    assert expected_reply([{"role": "user", "content": "Hello there"}], 12, quant="nf4") != want


def test_no_arguments_uses_the_latest_run(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "20240101-000000"
    run.mkdir(parents=True)
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(GQA.resolve())
    (run / "adapter_config.json").write_text(json.dumps(config))
    (run / "adapter_model.safetensors").write_bytes((ADAPTER / "adapter_model.safetensors").read_bytes())
    # the run's 4-bit settings (train.py's resolved flags) are how the base must be loaded again
    (run / "train_config.json").write_text(json.dumps({"quant": "fp4", "blocksize": 128, "double_quant": False,
                                                       "dtype": "float32"}))
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    text = generate.main(["--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"], out=out)
    messages = [{"role": "user", "content": "Hi"}]
    want = expected_reply(messages, 8, adapter=ADAPTER, quant="fp4", blocksize=128, double_quant=False)
    assert text == want and out.getvalue() == want + "\n"
    assert want != expected_reply(messages, 8, adapter=ADAPTER, quant="nf4")  # the settings mattered


def test_interactive_chat_keeps_the_conversation(monkeypatch):
    prompts = []
    real_generate = generate.generate

    def spy(model, tokenizer, prompt_ids, *args, **kwargs):
        prompts.append(list(prompt_ids[0]))
        return real_generate(model, tokenizer, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(generate, "generate", spy)
    stdin, out = io.StringIO("hello\nand again\n/reset\nfresh start\n"), io.StringIO()
    messages = generate.main(["--model", str(GQA), "--quant", "none", "--temperature", "0", "--device", "cpu",
                              "--max-new-tokens", "6", "--system", "be brief"], stdin=stdin, out=out)
    assert len(prompts) == 3
    system = {"role": "system", "content": "be brief"}

    def rendered(msgs):  # what each turn must have sent
        return TOKENIZER.encode(TOKENIZER.apply_chat_template(msgs, add_generation_prompt=True))

    u1 = {"role": "user", "content": "hello"}
    a1 = expected_reply([system, u1], 6)
    u2 = {"role": "user", "content": "and again"}
    a2 = expected_reply([system, u1, {"role": "assistant", "content": a1}, u2], 6)
    assert prompts[0] == rendered([system, u1])
    assert prompts[1] == rendered([system, u1, {"role": "assistant", "content": a1}, u2])  # history kept
    u3 = {"role": "user", "content": "fresh start"}
    assert prompts[2] == rendered([system, u3])  # /reset forgot all but the system message
    assert messages == [system, u3, {"role": "assistant", "content": expected_reply([system, u3], 6)}]
    shown = out.getvalue()
    assert f">>> {a1}\n>>> {a2}\n>>> >>> " in shown and shown.endswith(">>> \n")


def test_streamer_never_prints_half_a_character():
    ids = TOKENIZER.encode("naïve 日本語 ok")
    assert len(ids) > len("naïve 日本語 ok") // 2  # byte-level pieces: characters span several ids
    out = io.StringIO()
    streamer = generate.Streamer(TOKENIZER, out)
    seen = []
    for i in ids:
        streamer([i])
        seen.append(out.getvalue())
        assert "\ufffd" not in out.getvalue()
    streamer([None])  # the prompt ended (EOS): nothing more is printed
    assert streamer.finish() == "naïve 日本語 ok" and out.getvalue() == "naïve 日本語 ok\n"
    assert all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))  # printed text only grows


@pytest.mark.cuda
def test_cuda_reply_from_the_command_line():
    """--device auto picks the GPU where there is one. In float32 with the unquantized base the greedy reply
    equals the CPU's: on this prompt the smallest gap between the top two logits over the 12 steps is
    3.5e-3 (logit scale 4.8, measured on the CPU), ~700x the fp32 differences between two correct
    implementations (7e-7 of the scale against transformers; TF32 is off for matmuls by default)."""
    r = subprocess.run([sys.executable, "generate.py", "--model", str(GQA), "--quant", "none", "--dtype", "float32",
                        "--prompt", "Hello there", "--temperature", "0", "--max-new-tokens", "12"],
                       cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
                       env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8"))
    assert r.returncode == 0, r.stderr
    want = expected_reply([{"role": "user", "content": "Hello there"}], 12)
    assert r.stdout == want + "\n", (r.stdout, want)
