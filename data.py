"""Training data: rows from files or the hub -> token ids with a "trained on" mask -> padded or packed batches.

    rows      {text} | {prompt, completion} | {instruction, input, output} (QLoRA's Alpaca prompt) | {messages}
    segments  [(text, trained?)] whose concatenation is the training text
    example   (ids, trained): trained[t] = 1 if ids[t] is predicted in the loss (m_t in train.py's formula)
    batch     input_ids (B, T) right-padded, targets (B, T) = the next token where it is trained, else IGNORE

Masks are built while tokenizing: each row is a list of (text, trained?) segments tokenized one by one;
chat rows are rendered prefix by prefix with the chat template (never by searching for template text in
the output). EOS is appended and trained on, whatever the pad token is (pad = eos with the eos masked
out trains a model that never stops). Packing concatenates rows into --seq-len blocks whose position
ids restart at 0 at each row, which the model reads as document boundaries: no row attends to another.

The data order is a pure function of (seed, epoch), so a resumed run regenerates it from its position.
Left out on purpose: streaming datasets, length-grouped sampling, on-the-fly augmentation.
"""
import json
from pathlib import Path

import torch

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
IGNORE = -100  # target id for positions that are not trained on
# QLoRA's own prompt for Alpaca-style rows (qlora.py ALPACA_PROMPT_DICT, after Stanford Alpaca).
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")


def _data_files(root, split):
    """The data files of `split` under a directory laid out like a hub dataset (data/train-*.parquet,
    train.jsonl, train/part-0.json ...); a directory with no split names at all is one split."""
    files = sorted(p for p in Path(root).rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))

    def split_of(p):
        for part in [*p.relative_to(root).parent.parts, p.stem]:
            name = part.split("-")[0].split("_")[0].split(".")[0]
            if name in ("train", "test", "validation", "valid", "dev", "eval"):
                return name
        return None

    chosen = [p for p in files if split_of(p) == split]
    if not chosen and split == "train" and files and all(split_of(p) is None for p in files):
        chosen = files
    if not chosen:
        found = ", ".join(str(p.relative_to(root)) for p in files[:8]) or "none"
        raise FileNotFoundError(f"no data files for split {split!r} in {root} (found: {found}); "
                                f"pick one with --data-split")
    return chosen


def read_rows(source, split="train"):
    """[(row dict, "file:line")] from a local file or directory, or a hub dataset id."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = _data_files(path, split)
    elif path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ValueError(f"--data {source}: unsupported file type; use one of {', '.join(DATA_SUFFIXES)}")
        files = [path]
    elif path.suffix in DATA_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"--data {source}: no such file (and not a hub dataset id like owner/name)")
    else:
        import huggingface_hub
        try:
            snapshot = huggingface_hub.snapshot_download(
                source, repo_type="dataset", allow_patterns=[f"*{s}" for s in DATA_SUFFIXES])
        except Exception as e:  # offline, unknown repo, gated ... all mean the same to the user
            raise FileNotFoundError(f"--data {source}: could not get this hub dataset ({type(e).__name__}: "
                                    f"{e}); check the id, your network / HF_HUB_OFFLINE, or pass a local file") from e
        files = _data_files(snapshot, split)
    rows = []
    for f in files:
        rows += _read_file(f)
    if not rows:
        raise ValueError(f"--data {source}: the dataset is empty (no rows in {', '.join(map(str, files))})")
    return rows


def _read_file(path):
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((json.loads(line), f"{path}:{number}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of row objects, got {type(data).__name__}")
        return [(row, f"{path}: row {i}") for i, row in enumerate(data)]
    if path.suffix == ".parquet":
        import pyarrow.parquet
        return [(row, f"{path}: row {i}") for i, row in enumerate(pyarrow.parquet.read_table(path).to_pylist())]
    # .txt: paragraphs (separated by blank lines) are rows of plain text, trained on entirely
    rows, start, lines = [], None, path.read_text(encoding="utf-8").splitlines() + [""]
    for number, line in enumerate(lines, 1):
        if line.strip() and start is None:
            start = number
        elif not line.strip() and start is not None:
            rows.append(({"text": "\n".join(lines[start - 1:number - 1])}, f"{path}:{start}"))
            start = None
    return rows


def _segments(row, where, tokenizer):
    """The row as [(text, trained?)] pieces whose concatenation is the training text."""
    def text(key):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(row.get(key)).__name__}")
        return row[key]

    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object per row, got {type(row).__name__}")
    row = {k: v for k, v in row.items() if v is not None}  # parquet gives every row every column, as null
    if "messages" in row:
        return _chat_segments(row["messages"], where, tokenizer)
    if "prompt" in row and "completion" in row:
        return [(text("prompt"), False), (text("completion"), True)]
    if "instruction" in row and "output" in row:
        template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=text("instruction"), input=row.get("input") or "")
        return [(prompt, False), (text("output"), True)]
    if "text" in row:
        return [(text("text"), True)]
    raise ValueError(f"{where}: unrecognised row with keys {sorted(row)}; expected {{text}}, "
                     "{prompt, completion}, {instruction, input, output} or {messages}")


def _chat_segments(messages, where, tokenizer):
    """Render the conversation prefix by prefix: the text a prefix adds is one segment, trained on only
    when it is an assistant turn (its generation prompt, e.g. "<|assistant|>\\n", is not)."""
    if tokenizer.chat_template is None:
        raise ValueError(f"{where}: a messages row needs a chat template, and this model's tokenizer has none")
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} string objects")
    segments, done = [], ""
    for i, message in enumerate(messages):
        pieces = []
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            pieces.append((prompt, False))
        full = tokenizer.apply_chat_template(messages[:i + 1])
        pieces.append((full, message["role"] == "assistant"))
        for rendered, trained in pieces:
            if not rendered.startswith(done):
                raise ValueError(f"{where}: the chat template does not render this conversation prefix by "
                                 f"prefix (turn {i} changes earlier text), so its masks can't be built")
            segments.append((rendered[len(done):], trained))
            done = rendered
    return segments


def tokenize_row(row, where, tokenizer):
    """(ids, trained) lists: trained[t] says whether ids[t] is a target (predicted from ids[:t])."""
    ids, trained = [], []
    # BOS as the model's own tokenizer adds it (Llama 2/3 yes, SmolLM2 no); chat templates write their own
    bos = tokenizer.adds_bos and not (isinstance(row, dict) and "messages" in row)
    piece, train = [], False
    for text, train in _segments(row, where, tokenizer):
        piece = tokenizer.encode(text, add_bos=bos and not ids)  # no second BOS if the text starts with one
        ids += piece
        trained += [train] * len(piece)
    # Learning to stop is learning too: a trained ending gets an EOS unless it has one already (a chat
    # template's end of turn, or a text ending in "</s>"). pad = eos does not matter: masks come from here.
    if train and not any(t in tokenizer.eos_ids for t in piece):
        ids.append(tokenizer.eos_ids[0])
        trained.append(True)
    if ids:
        trained[0] = False  # nothing predicts the first token
    return ids, trained


def tokenize_rows(rows, tokenizer, seq_len):
    """Tokenize every row, truncating to seq_len; returns (examples, counts)."""
    examples, truncated, empty = [], 0, 0
    for row, where in rows:
        ids, trained = tokenize_row(row, where, tokenizer)
        if len(ids) > seq_len:
            ids, trained, truncated = ids[:seq_len], trained[:seq_len], truncated + 1
        if not any(trained):
            empty += 1  # e.g. a prompt longer than seq_len: nothing left to learn from
            continue
        examples.append((ids, trained))
    return examples, {"rows": len(rows), "truncated": truncated, "without_targets": empty}


def collate(examples, pad_id):
    """Right-pad examples into a batch dict: input_ids (B, T), targets (B, T) (IGNORE where untrained)."""
    longest = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(examples), longest), IGNORE, dtype=torch.long)  # (B, T)
    for b, (ids, trained) in enumerate(examples):
        row = torch.tensor(ids)
        input_ids[b, :len(ids)] = row
        # targets[t] = the token at t+1 if that token is trained on
        targets[b, :len(ids) - 1] = torch.where(torch.tensor(trained[1:]), row[1:], IGNORE)
    return {"input_ids": input_ids, "targets": targets, "tokens": sum(len(ids) for ids, _ in examples)}


def pack(examples, seq_len):
    """Blocks (lists of examples) of at most seq_len tokens, filled greedily in order."""
    blocks, size = [], seq_len + 1
    for ex in examples:
        if size + len(ex[0]) > seq_len:
            blocks.append([])
            size = 0
        blocks[-1].append(ex)
        size += len(ex[0])
    return blocks


def collate_packed(blocks, pad_id):
    """A batch of packed blocks: each block's rows concatenated, with position ids that restart at 0 at
    every row. The model reads each restart as a document boundary that no token attends across (no
    (B, 1, T, T) mask is built: llama.packed_attention). The padding after the last row counts on from 0
    as one more document, so it costs one attention call, not one per pad. No target crosses a border:
    a row's first token is never trained on (tokenize_row), so the previous row's last position already
    has target IGNORE."""
    batch = collate([(sum((ids for ids, _ in blk), []), sum((tr for _, tr in blk), [])) for blk in blocks], pad_id)
    B, T = batch["input_ids"].shape
    position_ids = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    for b, block in enumerate(blocks):
        t = 0
        for ids, _ in block:
            position_ids[b, t:t + len(ids)] = torch.arange(len(ids))
            t += len(ids)
        position_ids[b, t:] = torch.arange(T - t)  # the padding: one trailing document
    batch["position_ids"] = position_ids
    return batch


def make_batch(items, pad_id, packing):
    return collate_packed(items, pad_id) if packing else collate(items, pad_id)


def show_example(ids, trained, tokenizer):
    """Decode a row with its untrained part in [[double brackets]]."""
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or trained[t] != trained[start]:
            piece = tokenizer.decode(ids[start:t])
            out.append(piece if trained[start] else f"[[{piece}]]")
            start = t
    return "".join(out)


def batch_order(n_rows, batch_size, grad_accum, seed, epoch):
    """Optimizer steps of one epoch as lists of micro-batches of row indices; a pure function of its
    arguments, so a resumed run regenerates the same order."""
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    micro = [order[i:i + batch_size] for i in range(0, n_rows, batch_size)]
    return [micro[i:i + grad_accum] for i in range(0, len(micro), grad_accum)]


def split_eval(examples, fraction, seed):
    """(train, eval) examples: a seeded random `fraction` held out, both kept in file order."""
    n_eval = int(len(examples) * fraction)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in sorted(order[n_eval:])], [examples[i] for i in sorted(order[:n_eval])]
