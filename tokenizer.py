"""Tokenizer: a Hugging Face checkpoint's tokenizer.json, its special tokens and its chat template.

The byte-pair encoding itself runs in the `tokenizers` library (the Rust core transformers uses), read
from tokenizer.json. What transformers keeps beside that file is read here: the BOS/EOS/pad tokens
(tokenizer_config.json, special_tokens_map.json, generation_config.json, which may list several EOS ids,
as Llama 3's does) and the jinja chat template (chat_template.jinja or tokenizer_config.json), rendered
the way transformers renders it: a sandboxed environment (hub templates are untrusted code),
`raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, and `{% generation %}` blocks.

BOS is added by `encode(add_bos=True)` only, never by tokenizer.json's post-processor, so a rendered chat
template (which writes BOS itself) is never given a second one. Left out: "slow" tokenizers (a
sentencepiece tokenizer.model without tokenizer.json).
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers


class Tokenizer:
    """tokenizer.json through the `tokenizers` library, plus what transformers keeps beside it: the special
    tokens (tokenizer_config.json, special_tokens_map.json, generation_config.json) and the chat template."""

    def __init__(self, tokenizer, bos_token=None, eos_token=None, pad_token=None, eos_ids=(), pad_id=None,
                 bos_id=None, chat_template=None):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = self._id(bos_token) if bos_token is not None else bos_id
        self.pad_id = self._id(pad_token) if pad_token is not None else pad_id
        # every id that ends a turn: the tokenizer's eos first, then generation_config's (Llama 3 lists
        # <|end_of_text|>, <|eom_id|> and <|eot_id|> there)
        ids = ([self._id(eos_token)] if eos_token is not None else []) + list(eos_ids)
        self.eos_ids = list(dict.fromkeys(ids))
        self.chat_template = chat_template
        # Does tokenizer.json's post-processor prepend BOS by itself (Llama's TemplateProcessing does)?
        # encode() always bypasses the post-processor and adds BOS on request, so BOS is never doubled.
        with_special = tokenizer.encode("a", add_special_tokens=True).ids
        plain = tokenizer.encode("a", add_special_tokens=False).ids
        self.adds_bos = self.bos_id is not None and with_special[:1] == [self.bos_id] and plain[:1] != [self.bos_id]

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"special token {token!r} is not in tokenizer.json's vocabulary")
        return i

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{directory} has no tokenizer.json (the 'fast' tokenizer file); "
                                    "save one with transformers' AutoTokenizer(...).save_pretrained(dir)")

        def read(name):
            path = directory / name
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

        config, special, generation = read("tokenizer_config.json"), read("special_tokens_map.json"), \
            read("generation_config.json")

        def token(name):  # a plain string, or an AddedToken dict {"content": ...} in older files
            value = config.get(name) or special.get(name)
            return value.get("content") if isinstance(value, dict) else value

        eos = generation.get("eos_token_id")
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: transformers uses "default"
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (directory / "chat_template.jinja").is_file():  # transformers 4.43+ writes it here; it wins
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")),
                   bos_token=token("bos_token"), eos_token=token("eos_token"), pad_token=token("pad_token"),
                   eos_ids=eos if isinstance(eos, list) else [eos] if eos is not None else [],
                   bos_id=generation.get("bos_token_id"), pad_id=generation.get("pad_token_id"),
                   chat_template=template)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it (e.g. a rendered chat template's
        "<|begin_of_text|>") become their ids. BOS is prepended only when asked and not already there."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render `messages` ([{"role", "content"}]) with the model's jinja template, the way transformers
        does: a sandboxed environment, `raise_exception`, `strftime_now`, a non-escaping `tojson`, the
        special-token strings as variables. Encode the result with add_bos=False: templates write BOS."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (no chat_template.jinja and no "
                             "'chat_template' in tokenizer_config.json); format the prompt yourself")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in variables.items() if v is not None}, **kwargs)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text (transformers uses it for loss masks);
    here it renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@functools.lru_cache(maxsize=8)  # data preparation renders thousands of conversations with one template
def _compile_template(template: str):
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt text
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # chat templates from the hub are untrusted code: the sandbox keeps them from reaching Python internals
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
