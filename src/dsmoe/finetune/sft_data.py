"""Supervised finetuning data: jsonl rows -> token ids with a loss mask -> batches.

Rows (one JSON object per line):
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  {"prompt": "...", "completion": "..."}      (= one user turn and one assistant turn)

Design choices:
- The tokenizer's own chat template renders the conversation (deepseek-moe:
  "User: {u}\\n\\nAssistant: {a}<eos>"). Each assistant turn is cut where generation
  starts: the prompt is the template's generation prompt ("...Assistant:") and the
  target is the rest of the turn (" {a}<eos>"), each tokenized on its own, so training
  sees exactly the ids inference sees (a prompt ending in "Assistant:", then generated
  tokens up to EOS). Only target tokens carry loss; every other label is -100.
- Padding (default): one example per row, padded on the right. Causal attention never
  lets a real token see the padding after it, so no attention mask is needed; padded
  positions carry no loss. Batches are built from length-sorted buckets to waste little.
  Packing (``packing=True``): examples are concatenated into rows of up to ``max_len``
  tokens, once, deterministically; positions restart at 0 for each example (as at
  inference), but as the model has no per-document attention mask, a later example can
  attend to an earlier one in its row.
- Batches are a pure function of (seed, step), as in pretraining: resuming at a step
  gives the batches an uninterrupted run would see.
- Validation: a ``val_fraction`` of the rows chosen by a hash of their content (stable
  when rows are added), or a separate file.

Shapes: B batch, S padded row length.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from dsmoe.tokenizer import Tokenizer

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index
ROLES = ("system", "user", "assistant")
_BUCKET_BATCHES = 16  # length-sorting window, in batches


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]  # the whole conversation
    targets: tuple[bool, ...]  # per id: True where the model is trained to produce it

    @property
    def n_targets(self) -> int:
        return sum(self.targets)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S]: next token where it is a target, IGNORE_INDEX elsewhere
    real: torch.Tensor  # [B, S] bool: not padding
    position_ids: torch.Tensor | None = None  # [B, S] (packing), None = 0..S-1

    def to(self, device: torch.device) -> "Batch":
        """The same batch on ``device``."""
        return Batch(self.input_ids.to(device), self.labels.to(device), self.real.to(device),
                     None if self.position_ids is None else self.position_ids.to(device))

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.real.sum())


@dataclass
class SFTData:
    train: list[Example]
    val: list[Example]
    truncated: int  # examples cut to max_len
    dropped: int  # examples with no target token left after cutting

    def fingerprint(self) -> str:
        """sha256 of every example (ids and mask) of both splits, in order."""
        h = hashlib.sha256()
        for split in (self.train, self.val):
            h.update(b"|split|")
            for ex in split:
                h.update(json.dumps([ex.ids, ex.targets]).encode("ascii"))
        return h.hexdigest()


# --- rows -> messages ---------------------------------------------------------------------
def read_rows(path: str | os.PathLike) -> list[tuple[int, list[dict[str, str]]]]:
    """(line number, messages) for every non-blank line; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"finetuning data not found: {path}")
    rows = []
    with open(path, "rb") as fh:  # bytes: a bad encoding is reported with its line
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path} line {number}: not UTF-8 text (byte {exc.start + 1} "
                                 "of the line); finetuning data must be UTF-8 jsonl") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
            rows.append((number, row_messages(row, f"{path} line {number}")))
    if not rows:
        raise ValueError(f"{path} holds no rows (expected one JSON object per line)")
    return rows


def row_messages(row: Any, where: str) -> list[dict[str, str]]:
    """A row's conversation as chat messages, or a ValueError saying what is missing."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of "
                             "{role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"{where}: message {i} needs 'role' and 'content', got {m!r}")
            if m["role"] not in ROLES:
                raise ValueError(f"{where}: message {i} has role {m['role']!r}; expected one "
                                 f"of {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise ValueError(f"{where}: message {i} content must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: no assistant message, so nothing to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if key not in row:
                raise ValueError(f"{where}: has {'prompt' if key == 'completion' else 'completion'}"
                                 f" but no {key!r}")
            if not isinstance(row[key], str):
                raise ValueError(f"{where}: {key!r} must be a string")
        return [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]}]
    raise ValueError(f"{where}: a row needs 'messages' (a list of {{role, content}}) or "
                     f"'prompt' and 'completion'; found keys {sorted(row)}")


# --- messages -> ids + mask -----------------------------------------------------------------
def encode_example(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> Example:
    """Ids of the conversation in the chat format; targets = the assistant turns from where
    generation starts (see the module docstring) through their EOS."""
    ids: list[int] = []
    targets: list[bool] = []
    done = ""  # text rendered so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.chat_text(messages[:i], add_generation_prompt=True)
        full = tokenizer.chat_text(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not render conversations "
                             "turn by turn (a shorter conversation is not a prefix of a "
                             "longer one), so assistant turns cannot be located")
        for text, is_target in ((prompt[len(done):], False), (full[len(prompt):], True)):
            piece = tokenizer.encode_chat_text(text) if text else []
            ids += piece
            targets += [is_target] * len(piece)
        done = full
    rest = tokenizer.chat_text(messages, add_generation_prompt=False)[len(done):]
    if rest:  # turns after the last assistant one: context only
        piece = tokenizer.encode_chat_text(rest)
        ids += piece
        targets += [False] * len(piece)
    return Example(tuple(ids), tuple(targets))


def _split_score(messages: list[dict[str, str]]) -> float:
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def load_sft_data(path: str | os.PathLike, tokenizer: Tokenizer, max_len: int, *,
                  val_fraction: float = 0.1, val_path: str | os.PathLike | None = None
                  ) -> SFTData:
    """Read, validate, tokenize and split. ``max_len``: most ids per example (longer ones
    are cut at the end; one left without target tokens is dropped)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rows = read_rows(path)
    if val_path is not None:
        train_rows, val_rows = rows, read_rows(val_path)
    else:
        scores = [_split_score(messages) for _, messages in rows]
        is_val = [s < val_fraction for s in scores]
        if val_fraction > 0 and len(rows) >= 2 and not any(is_val):
            is_val[min(range(len(rows)), key=scores.__getitem__)] = True
        if all(is_val):
            is_val[max(range(len(rows)), key=scores.__getitem__)] = False
        train_rows = [r for r, v in zip(rows, is_val) if not v]
        val_rows = [r for r, v in zip(rows, is_val) if v]
    truncated = dropped = 0
    splits: list[list[Example]] = []
    for split_rows in (train_rows, val_rows):
        examples = []
        for _, messages in split_rows:
            ex = encode_example(tokenizer, messages)
            if len(ex.ids) > max_len:
                truncated += 1
                ex = Example(ex.ids[:max_len], ex.targets[:max_len])
            if ex.n_targets == 0 or len(ex.ids) < 2:
                dropped += 1
                continue
            examples.append(ex)
        splits.append(examples)
    if not splits[0]:
        raise ValueError(f"{path}: no training example has assistant tokens within "
                         f"{max_len} tokens")
    return SFTData(splits[0], splits[1], truncated, dropped)


# --- batches ------------------------------------------------------------------------------
def pack(examples: list[Example], max_len: int, seed: int) -> list[list[int]]:
    """Example indices grouped into rows of at most ``max_len`` ids (shuffled, first fit in
    order: a row is closed when the next example does not fit)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    rows: list[list[int]] = [[]]
    used = 0
    for i in order.tolist():
        n = len(examples[i].ids)
        if rows[-1] and used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def collate(examples: list[Example], rows: list[list[int]], pad_id: int,
            with_positions: bool = False) -> Batch:
    """Rows of example indices -> a right-padded batch; labels shifted by one."""
    seqs = []
    for row in rows:
        ids = [t for i in row for t in examples[i].ids]
        mask = [m for i in row for m in examples[i].targets]
        pos = [p for i in row for p in range(len(examples[i].ids))]
        seqs.append((ids, mask, pos))
    S = max(len(ids) for ids, _, _ in seqs) - 1
    B = len(seqs)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    labels = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
    real = torch.zeros(B, S, dtype=torch.bool)
    positions = torch.zeros(B, S, dtype=torch.long) if with_positions else None
    for b, (ids, mask, pos) in enumerate(seqs):
        n = len(ids) - 1
        input_ids[b, :n] = torch.tensor(ids[:-1])
        target = torch.tensor(ids[1:])
        labels[b, :n] = torch.where(torch.tensor(mask[1:]), target, IGNORE_INDEX)
        real[b, :n] = True
        if positions is not None:
            positions[b, :n] = torch.tensor(pos[:-1])
    return Batch(input_ids, labels, real, positions)


class SFTBatches:
    """Training batches as a pure function of (seed, micro-batch index)."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int, *,
                 packing: bool = False, max_len: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.packing = packing
        self.rows = pack(examples, max_len, seed) if packing else [[i] for i in
                                                                    range(len(examples))]
        self._epoch: tuple[int, list[list[int]]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """Row indices of each batch of ``epoch``: shuffle, sort windows of 16 batches by
        length (little padding), shuffle the batches."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.rows), generator=gen).tolist()
        length = [sum(len(self.examples[i].ids) for i in row) for row in self.rows]
        window = self.batch_size * _BUCKET_BATCHES
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=length.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk),
                                                                     self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=gen).tolist()
        self._epoch = (epoch, [batches[i] for i in shuffled])
        return self._epoch[1]

    def batch(self, index: int) -> Batch:
        epoch, j = divmod(index, self.batches_per_epoch)
        rows = [self.rows[r] for r in self._epoch_batches(epoch)[j]]
        return collate(self.examples, rows, self.pad_id, with_positions=self.packing)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Every example once, in length order (deterministic, little padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    for start in range(0, len(order), batch_size):
        yield collate(examples, [[i] for i in order[start:start + batch_size]], pad_id)
