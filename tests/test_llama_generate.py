"""tokenizer.Tokenizer (special tokens, BOS handling, chat templates as transformers renders them) and
generate.generate() (KV cache vs. step-by-step argmax, batching, EOS, sampling)."""
import json
import shutil

import jinja2
import pytest
import torch
from safetensors.torch import load_file

import llama
from conftest import HF
from generate import generate, sample_token
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    return llama.from_pretrained(HF / "gqa", quant=None, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(HF / "gqa")


# ----------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_special_tokens_and_round_trip(tok):
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.adds_bos) == (0, [1], 2, True)
    # reference ids: transformers' AutoTokenizer on this directory ("Hello world" -> [0, 42, 71, ...])
    assert tok.encode("Hello world") == [42, 71, 281, 81, 275, 284, 288]
    assert tok.encode("Hello world", add_bos=True) == [0, 42, 71, 281, 81, 275, 284, 288]
    # tokenizer.json's post-processor would add BOS too; it is bypassed, so BOS is never doubled
    assert tok.encode("<|begin_of_text|>Hello world", add_bos=True) == [0, 42, 71, 281, 81, 275, 284, 288]
    text = "The quick brown fox, 42 times: naïve café!\n  indented"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([0] + tok.encode("hi") + [1], skip_special_tokens=True) == "hi"


def test_tokenizer_files(tmp_path):
    """Special tokens also come from special_tokens_map.json (AddedToken dicts) and generation_config.json
    (every EOS id, e.g. Llama 3's list); the chat template from tokenizer_config.json."""
    shutil.copy(HF / "gqa" / "tokenizer.json", tmp_path)
    template = "{{ bos_token }}{{ messages[0]['content'] }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False}, "eos_token": "<|end_of_text|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2], "pad_token_id": 2}))
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_id, t.eos_ids, t.pad_id) == (0, [1, 2], 2)
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "<|begin_of_text|>x"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "special_tokens_map.json").unlink()
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_id, t.eos_ids, t.chat_template) == (None, [1, 2], None)
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_chat_template_matches_transformers(tok):
    """Reference strings and ids: transformers 5.24 apply_chat_template on the fixture's chat_template.jinja."""
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True) == \
        "<|begin_of_text|><|system|>\nBe brief.<|end_of_text|>\n<|user|>\nHi there<|end_of_text|>\n<|assistant|>\n"
    assert tok.apply_chat_template(MESSAGES) == \
        "<|begin_of_text|><|system|>\nBe brief.<|end_of_text|>\n<|user|>\nHi there<|end_of_text|>\n"
    assert tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True)) == [
        0, 30, 94, 85, 91, 85, 86, 400, 94, 32, 201, 36, 71, 305, 318, 16, 1, 201, 30, 94, 87, 85, 270, 94, 32,
        201, 42, 75, 261, 338, 1, 201, 30, 94, 67, 322, 75, 85, 86, 268, 86, 94, 32, 201]


# A Llama-2-style template exercising what hub templates use: whitespace control, trim_blocks and
# lstrip_blocks, raise_exception, a tojson that does not HTML-escape, loop controls, bos/eos variables.
LLAMA2_STYLE = """{%- if messages[0]['role'] == 'system' %}
    {%- set sys = messages[0]['content'] %}{%- set messages = messages[1:] %}
{%- else %}{%- set sys = '' %}{%- endif %}
{{- bos_token }}
{%- if sys %}<<SYS>>{{ sys | tojson }}<</SYS>>
{% endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] | trim + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] | trim + eos_token }}
    {%- endif %}
    {%- if loop.index > 10 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %} {{ '<a&b>' }}{% endif %}
"""


def test_chat_template_helpers_match_transformers(tok):
    t = Tokenizer(tok.tokenizer, "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", chat_template=LLAMA2_STYLE)
    msgs = [{"role": "system", "content": 'Say "<ok>" & stop'}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    # reference: transformers 5.24 apply_chat_template(msgs, chat_template=LLAMA2_STYLE, add_generation_prompt=True)
    assert t.apply_chat_template(msgs, add_generation_prompt=True) == \
        '<|begin_of_text|><<SYS>>"Say \\"<ok>\\" & stop"<</SYS>>\n' \
        '[INST] Hi [/INST] Hello<|end_of_text|>[INST] Bye [/INST] <a&b>'
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
        t.apply_chat_template([msgs[1], msgs[1]])
    # {% generation %} (assistant-mask markers in some hub templates) renders its body
    marked = Tokenizer(tok.tokenizer, chat_template="{% for m in messages %}{% generation %}"
                             "{{ m['content'] }}{% endgeneration %}|{% endfor %}")
    assert marked.apply_chat_template(msgs[:2]) == 'Say "<ok>" & stop| Hi |'
    # the sandbox: templates cannot reach Python internals
    evil = Tokenizer(tok.tokenizer, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template(msgs)


# ----------------------------------------------------------------------------------------------------
# generation


def argmax_without_cache(model, prompt, n):
    """The definition of greedy decoding: rerun the whole sequence every step, take the argmax."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


class NoEos:
    eos_ids, pad_id = [], 2


def test_greedy_with_cache_equals_stepwise_argmax(model):
    prompt = load_file(HF / "expected" / "gqa.safetensors")["input_ids"][0, :12].tolist()
    out = generate(model, NoEos(), prompt, max_new_tokens=20)
    assert out == [argmax_without_cache(model, prompt, 20)]


def test_batched_equals_unbatched(model):
    ids = load_file(HF / "expected" / "gqa.safetensors")["input_ids"]
    prompts = [ids[0, :5].tolist(), ids[1, :17].tolist(), ids[0, :11].tolist()]
    batched = generate(model, NoEos(), prompts, max_new_tokens=12)
    assert batched == [generate(model, NoEos(), p, max_new_tokens=12)[0] for p in prompts]
    assert batched[0] == argmax_without_cache(model, prompts[0], 12)  # the most-padded row


def test_stops_on_every_eos_and_streams(model):
    prompt = [0, 42, 71, 281]
    free = generate(model, NoEos(), prompt, max_new_tokens=16)[0]
    # two EOS ids that greedy decoding first produces at steps `cut` < `later`: it must stop at the first
    cut = min(i for i in range(3, len(free)) if free[i] not in free[:i])
    later = next(i for i in range(cut + 1, len(free)) if free[i] not in free[:i])

    class Tok:
        eos_ids, pad_id = [free[later], free[cut]], None

    steps = []
    out = generate(model, Tok(), [prompt, prompt[:2]], max_new_tokens=16, stream=steps.append)
    assert out[0] == free[:cut]  # the EOS itself is not returned
    assert [s[0] for s in steps[:cut]] == free[:cut] and steps[cut][0] is None
    assert len(steps) <= 16 and all(len(s) == 2 for s in steps)
    assert [s[1] for s in steps if s[1] is not None] == out[1]
    model.train()
    generate(model, Tok(), prompt, max_new_tokens=2)
    assert model.training  # the caller's mode is restored
    model.eval()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, Tok(), [prompt, []], max_new_tokens=2)


def test_sample_token():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    assert sample_token(logits).tolist() == [0, 3]
    gen = torch.Generator().manual_seed(0)
    draws = sample_token(logits[:1].expand(2000, 4), 1.0, 0.6, gen)
    # top_p 0.6: the smallest set reaching 0.6 is {0.4, 0.3}; renormalized 4/7 vs 3/7
    counts = torch.bincount(draws, minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0].item() / 2000 - 4 / 7) < 0.04
    # top_p tiny keeps only the most likely token; temperature 1 without top_p follows the softmax
    assert (sample_token(logits.repeat(50, 1), 1.0, 1e-6, gen) == torch.tensor([0, 3]).repeat(50)).all()
    counts = torch.bincount(sample_token(logits[:1].expand(4000, 4), 1.0, 1.0, gen), minlength=4) / 4000
    torch.testing.assert_close(counts, torch.tensor([0.4, 0.3, 0.2, 0.1]), rtol=0, atol=0.03)
    # a high temperature flattens the distribution
    counts = torch.bincount(sample_token(logits[:1].expand(4000, 4), 100.0, 1.0, gen), minlength=4) / 4000
    torch.testing.assert_close(counts, torch.full((4,), 0.25), rtol=0, atol=0.03)


def test_sampled_generation_is_reproducible(model, tok):
    prompt = tok.encode("Hello", add_bos=True)
    a = generate(model, tok, prompt, 10, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = generate(model, tok, prompt, 10, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert a == b and len(a[0]) >= 1
