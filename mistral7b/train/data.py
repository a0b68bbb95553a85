"""Fine-tuning data: JSONL files encoded into token ids with a loss mask, packed into micro-batches.

Two kinds of line, told apart per line:
* `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation in the model's own chat
  format (`tokenizer.encode_chat`); only the assistant's tokens (its answer and end-of-turn token)
  are trained on.
* `{"text": "..."}`: plain text for continued pre-training; every token is trained on.

Packing: samples are laid back to back up to `seq_len` tokens per row, and a micro-batch is
`batch_size` rows; each sample stays its own sequence in the packed forward's `seqlens`, so packed
samples never attend to each other and no padding is spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, Mistral7BError
from ..tokenizer.base import ROLES, role_error

_FILLER_TURN = {"role": "user", "content": "."}  # closes a conversation so that the answer before it is rendered


@dataclass
class Sample:
    ids: list[int]
    target: list[bool]  # target[j]: token j is predicted (from token j-1) and counts in the loss


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [T] samples packed back to back
    seqlens: list[int]  # one entry per sample
    positions: torch.Tensor  # [N] packed indices whose next token is a target
    targets: torch.Tensor  # [N] those next tokens

    @property
    def n_targets(self) -> int:
        return self.targets.numel()


def _answer(tokenizer, messages: list[dict], prompt_len: int) -> list[int]:
    """Tokens of the assistant reply `messages[-1]`, end-of-turn token included, as the format renders them."""
    rendered = tokenizer.encode_chat([*messages, _FILLER_TURN])
    answer = rendered[prompt_len:]
    stops = set(tokenizer.stop_ids)
    end = next((j for j, t in enumerate(answer) if t in stops), None)
    if end is None:
        raise InputError("the chat format does not end the assistant's turn with a stop token")
    return answer[:end + 1]


def encode_conversation(tokenizer, messages: list[dict]) -> list[Sample]:
    """One sample holding the whole conversation when the format renders it turn by turn (each prompt
    extends the previous one); else, e.g. Mistral formats that move the system prompt to the last user
    turn, one sample per assistant turn, each exactly what the model sees when answering that turn."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InputError("'messages' must be a list of objects")
    for i, message in enumerate(messages):  # checked first: a bad role could otherwise pass for a missing answer
        if message.get("role") not in ROLES:
            raise InputError(role_error(message, i))
    # Answers are located without system messages, whose placement some formats change turn by turn.
    plain = [m for m in messages if m.get("role") != "system"]
    samples, ids, target = [], [], []
    j = -1  # index of the current message in `plain`
    for i, message in enumerate(messages):
        j += message.get("role") != "system"
        if message.get("role") != "assistant":
            continue
        if not any(m.get("role") == "user" for m in messages[:i]):
            raise InputError(f"assistant message {i} has no user message before it")
        prompt = tokenizer.encode_chat(messages[:i])
        answer = _answer(tokenizer, plain[:j + 1], len(tokenizer.encode_chat(plain[:j])))
        if prompt[:len(ids)] != ids:
            samples.append(Sample(ids, target))
            ids, target = [], []
        target += [False] * (len(prompt) - len(ids)) + [True] * len(answer)
        ids = prompt + answer
    if not ids:
        raise InputError("the conversation has no assistant message to learn from")
    return samples + [Sample(ids, target)]


def encode_text(tokenizer, text: str) -> list[Sample]:
    ids = tokenizer.encode(text, bos=tokenizer.add_bos) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    return [Sample(ids, [False] + [True] * (len(ids) - 1))]


def read_jsonl(path: str | Path, tokenizer, seq_len: int) -> list[Sample]:
    """Every sample of a JSONL file, each cut to `seq_len` tokens; errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read ({e})") from None
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if isinstance(record, dict) and "messages" in record:
                found = encode_conversation(tokenizer, record["messages"])
            elif isinstance(record, dict) and isinstance(record.get("text"), str):
                found = encode_text(tokenizer, record["text"])
            else:
                raise InputError('expected an object with "messages" (a list) or "text" (a string)')
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        except Mistral7BError as e:
            raise InputError(f"{path}:{number}: {e}") from None
        for sample in found:
            sample = Sample(sample.ids[:seq_len], sample.target[:seq_len])
            if any(sample.target):
                samples.append(sample)
    if not samples:
        raise InputError(f"{path}: holds no sample with tokens to train on")
    return samples


def pack(samples: list[Sample], seq_len: int) -> list[list[Sample]]:
    """Greedy packing in order: rows of at most `seq_len` tokens."""
    rows, row, used = [], [], 0
    for sample in samples:
        if row and used + len(sample.ids) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(sample)
        used += len(sample.ids)
    return rows + ([row] if row else [])


def collate(rows: list[list[Sample]]) -> MicroBatch:
    samples = [s for row in rows for s in row]
    ids = [t for s in samples for t in s.ids]
    # Packed index p predicts token p+1 when p+1 is a target of the same sample (a target is never a
    # sample's first token, so p+1 never crosses into the next sample).
    target = [t for s in samples for t in s.target]
    positions = [p - 1 for p, is_target in enumerate(target) if is_target]
    return MicroBatch(input_ids=torch.tensor(ids), seqlens=[len(s.ids) for s in samples],
                      positions=torch.tensor(positions), targets=torch.tensor([ids[p + 1] for p in positions]))


class Batches:
    """The micro-batches of a training set, epoch after epoch, each epoch shuffled by (seed, epoch).

    Micro-batch k of the whole run is a pure function of (samples, seed, k): resuming at a step needs
    no saved iterator, and data-parallel ranks pick their share of a step by index.
    """

    def __init__(self, samples: list[Sample], *, seq_len: int, batch_size: int, seed: int, shuffle: bool = True):
        self.samples, self.seq_len, self.batch_size, self.seed, self.shuffle = samples, seq_len, batch_size, seed, shuffle
        self._starts = [0]  # index of the first micro-batch of each epoch laid out so far
        self._epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> list[list[list[Sample]]]:
        order = range(len(self.samples))
        if self.shuffle:
            order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        rows = pack([self.samples[i] for i in order], self.seq_len)
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def _locate(self, k: int) -> tuple[int, int]:
        """-> (epoch, index within it) of micro-batch k; epochs may differ in length (packing varies)."""
        while self._starts[-1] <= k:
            self._starts.append(self._starts[-1] + len(self._epoch_batches(len(self._starts) - 1)))
        epoch = next(e for e in range(len(self._starts) - 1) if k < self._starts[e + 1])
        return epoch, k - self._starts[epoch]

    @property
    def per_epoch(self) -> int:
        """Micro-batches in the first epoch."""
        self._locate(0)
        return self._starts[1]

    def __getitem__(self, k: int) -> MicroBatch:
        epoch, index = self._locate(k)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return collate(self._batches[index])

    def epoch(self) -> list[MicroBatch]:
        """All micro-batches of epoch 0 (for evaluation, with shuffle=False)."""
        return [collate(b) for b in self._epoch_batches(0)]
