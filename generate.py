"""Try a model: one prompt, or an interactive chat, with a base checkpoint plus an optional LoRA adapter.

    python generate.py                                    # the latest training run: its base + adapter
    python generate.py --model ID_OR_DIR [--adapter DIR] --prompt "Hello"
    python generate.py --model runs/<run>/merged --quant none

The base loads in 4 bits as the adapter's training run loaded it (its train_config.json: format,
blocksize, double quant, dtype; else NF4 with double quantization, QLoRA arXiv:2305.14314 §3), so the
adapter runs on exactly the weights it was trained against; `--quant none` keeps 16-bit weights (for
a merged checkpoint). Prompts go through the model's chat
template when it has one (the conversation is kept across turns; `/reset` clears it, `/exit` or end of
input leaves); otherwise the raw text is continued. Text is printed as it is generated; every EOS id of
the model (Llama 3 has several) stops a reply. Sampling: temperature, then nucleus (top-p) truncation
(Holtzman et al., arXiv:1904.09751); temperature 0 is greedy.

The library half, `generate(model, tokenizer, prompts, max_new_tokens, ...)`, decodes with the model's KV
cache (`llama.KVCache`: one forward over the prompt, then one token per step) and runs several prompts
as one left-padded batch whose rows each give what they give alone; `sample_token` is one draw.
"""
from __future__ import annotations

import argparse
import sys

import torch

import hf_checkpoint
import llama
import lora
import train_config
from nf4 import DTYPES
from tokenizer import Tokenizer


def sample_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, V): argmax when temperature is 0, else a draw from
    softmax(logits / temperature) restricted to the smallest set of tokens whose mass reaches top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V) fp32
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
        # drop a token once the tokens before it already reach top_p; the most likely one always stays
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)  # multinomial renormalizes
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(model: llama.Llama, tokenizer: Tokenizer | None, prompt_ids: list[int] | list[list[int]],
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, stream=None,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each prompt until one of the tokenizer's EOS ids (not included in the output) or
    `max_new_tokens`. Several prompts run as one batch, left-padded, with an attention mask and positions
    counted from each prompt's first real token, so each row gives what it would give alone.
    `stream(step_ids)` is called after every step with one new id per prompt (None once a prompt is done).
    Returns one list of new token ids per prompt (a single flat prompt counts as one prompt)."""
    prompts = [list(prompt_ids)] if prompt_ids and isinstance(prompt_ids[0], int) else [list(p) for p in prompt_ids]
    if not prompts or not all(prompts):
        raise ValueError("every prompt needs at least one token (e.g. the BOS id)")
    eos = set(tokenizer.eos_ids if tokenizer is not None else
              [model.config.eos_token_id] if isinstance(model.config.eos_token_id, int)
              else model.config.eos_token_id or [])
    device = model.model.embed_tokens.weight.device
    B, L = len(prompts), max(map(len, prompts))
    pad = (tokenizer.pad_id if tokenizer is not None else None) or 0  # any id: padding is masked out
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts], device=device)  # (B, L)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)  # (B, L)
    padded = bool((mask == 0).any())  # without padding the mask is dropped: SDPA's fast causal path

    was_training = model.training
    model.eval()
    out, done = [[] for _ in prompts], [False] * B
    try:  # restore the caller's train/eval mode even when a stream callback or Ctrl-C stops us early
        cache = llama.KVCache(model, B, L + max_new_tokens)
        logits = model(ids, attention_mask=mask if padded else None, cache=cache)[:, -1]  # (B, V)
        for step in range(max_new_tokens):
            next_ids = sample_token(logits, temperature, top_p, generator)  # (B,)
            new = []
            for row, token in enumerate(next_ids.tolist()):
                if not done[row] and token in eos:
                    done[row] = True
                new.append(None if done[row] else token)
                if not done[row]:
                    out[row].append(token)
            if stream is not None:
                stream(new)
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, S)
            logits = model(next_ids[:, None], attention_mask=mask if padded else None,  # (B, 1) -> (B, V)
                           cache=cache)[:, -1]
    finally:
        model.train(was_training)
    return out


class Streamer:
    """Prints generated text as ids arrive. Tokens are byte pieces, so a character can span several of
    them: decode everything so far and print only what is new, holding back while the text ends in an
    incomplete UTF-8 sequence (decoded as U+FFFD)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids, self.printed = [], 0

    def __call__(self, step_ids):  # generate(): one new id per prompt, None once that prompt ended
        token_id = step_ids[0]
        if token_id is None:
            return
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)

    def finish(self):
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()
        return text


def resolve_model_and_adapter(model, adapter):
    """--model and --adapter as given; an adapter alone brings its base; neither = the latest run."""
    if model is None and adapter is None:
        adapter = train_config.latest_run()
    if model is None:
        model = lora.adapter_config(adapter).get("base_model_name_or_path")
        if not model:
            raise ValueError(f"{adapter}/adapter_config.json names no base_model_name_or_path: pass --model")
    return model, adapter


def load(model_id, adapter, quant, dtype, device, run):
    """The model as the run trained it: its 4-bit format, blocksize, double quant (`run` = its
    train_config.json, {} when unknown), unless --quant says otherwise."""
    # The run's blocksize and double quant belong to the run's own format; another --quant gets the
    # defaults (the QLoRA recipe, as merge.py's --base dequantized falls back to as well).
    same_format = quant == run.get("quant", train_config.FIELDS["quant"].default)
    settings = train_config.quant_settings(run if same_format else {"quant": quant})
    model = llama.from_pretrained(model_id, quant=settings["quant_type"], dtype=dtype, device=device,
                                  blocksize=settings["blocksize"], double_quant=settings["double_quant"])
    if adapter is not None:
        lora.load_adapter(model, adapter)  # A and B land on the base layer's device
    model.eval()
    tokenizer = Tokenizer.from_dir(hf_checkpoint.resolve_checkpoint(model_id))
    return model, tokenizer


def prompt_ids(tokenizer, messages, use_template):
    """Token ids of the conversation so far, ending where the assistant's reply starts."""
    if use_template:
        # The template writes BOS itself (as transformers' apply_chat_template, tokenized without specials).
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return tokenizer.encode(text, add_bos=False)
    text = "".join(m["content"] for m in messages if m["role"] != "system")
    return tokenizer.encode(text, add_bos=True)


def reply(model, tokenizer, messages, args, use_template, out, generator=None, interruptible=False):
    ids = prompt_ids(tokenizer, messages, use_template)
    limit = model.config.max_position_embeddings - args.max_new_tokens
    # Forget the oldest turns (never the system prompt) once the conversation outgrows the context.
    while len(ids) > limit and sum(m["role"] != "system" for m in messages) > 1:
        messages.pop(next(i for i, m in enumerate(messages) if m["role"] != "system"))
        ids = prompt_ids(tokenizer, messages, use_template)
    streamer = Streamer(tokenizer, out)
    try:
        generate(model, tokenizer, [ids], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                 stream=streamer, generator=generator)
    except KeyboardInterrupt:  # in a chat, Ctrl-C cuts this reply short and keeps the conversation
        if not interruptible:
            raise
    return streamer.finish()


def chat(model, tokenizer, args, use_template, stdin=None, out=None, generator=None):
    """Read a line, answer it, keep the conversation; `/reset` clears it, `/exit` or EOF ends."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    out.write("Chat with the model: /reset clears the conversation, /exit (or Ctrl-D) quits.\n")
    while True:
        out.write(">>> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            out.write("\n")
            return messages
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(system)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, args, use_template, out, generator, interruptible=True)
        messages.append({"role": "assistant", "content": answer})


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=None,
                   help="hub id or local checkpoint dir; default: the adapter's base_model_name_or_path")
    p.add_argument("--adapter", default=None,
                   help="LoRA adapter dir (PEFT layout); default with no --model: the latest run under runs/")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit; none: interactive chat")
    p.add_argument("--system", default=None, help="system message for chat templates that take one")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: keep the smallest set of "
                   "tokens whose probability reaches top-p (default %(default)s)")
    p.add_argument("--quant", default=None, choices=["nf4", "fp4", "none"],
                   help="4-bit format of the base; default: the adapter's training run's (train_config.json), "
                        "else nf4")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="weights/compute dtype; default: the training run's, else bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else the CPU), cuda, cuda:N or cpu (default %(default)s)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the raw prompt text")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible replies)")
    return p


def main(argv=None, stdin=None, out=None):
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    # the script chooses for its user (the library itself stays on the CPU unless told): see llama.from_pretrained
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}, but torch sees no CUDA GPU (is the CUDA build of torch installed?)")
    model_id, adapter = resolve_model_and_adapter(args.model, args.adapter)
    run = train_config.run_config(adapter) if adapter is not None else {}
    quant = args.quant or run.get("quant", train_config.FIELDS["quant"].default)
    dtype_name = args.dtype or run.get("dtype") or ("bfloat16" if device.type == "cuda" else "float32")
    model, tokenizer = load(model_id, adapter, quant, DTYPES[dtype_name], device, run)
    use_template = tokenizer.chat_template is not None and not args.no_chat_template
    out = out or sys.stdout
    # Sampling draws from this generator (on the model's device), so --seed makes replies reproducible.
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        return reply(model, tokenizer, messages, args, use_template, out, generator)
    return chat(model, tokenizer, args, use_template, stdin, out, generator)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, PermissionError, ConnectionError, ValueError) as e:
        sys.exit(f"generate.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
