"""Framework-neutral batches: numpy arrays that both trainers consume unchanged.

Each example is `src + [eos]` for the encoder, `[bos] + tgt` as decoder input and `tgt + [eos]` as
labels. Examples are grouped by length into buckets (lengths rounded up to a multiple of
`bucket_step`) and a bucket's batch holds `max_tokens // max(S, T)` rows, the last batch of a bucket
padded with empty rows. So every batch has one of a few fixed shapes (JAX compiles each once) and
about `max_tokens` positions. The order is a pure function of (seed, epoch): the same in both
frameworks, and a resumed run picks it up at (epoch, index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class Batch:
    """One teacher-forced batch (int32, pad = 0 rows allowed)."""

    src: np.ndarray  # [B, S]
    tgt_in: np.ndarray  # [B, T]
    labels: np.ndarray  # [B, T]
    pad_id: int = 0

    @property
    def tokens(self) -> int:
        """Non-pad labels: the tokens the loss counts."""
        return int(np.count_nonzero(self.labels != self.pad_id))


@dataclass(frozen=True)
class Position:
    """Where a batch stream is: batch `index` of `epoch`."""

    epoch: int = 0
    index: int = 0


class Batcher:
    """Length-bucketed batches of encoded sentence pairs with a token budget."""

    def __init__(self, src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], *, pad_id: int, bos_id: int,
                 eos_id: int, max_tokens: int, max_len: int, bucket_step: int = 8, seed: int = 0,
                 shuffle: bool = True) -> None:
        if len(src) != len(tgt):
            raise ValueError(f"{len(src)} sources but {len(tgt)} targets")
        if max_tokens < 1 or bucket_step < 1:
            raise ValueError("max_tokens and bucket_step must be positive")
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.max_tokens, self.bucket_step, self.seed, self.shuffle = max_tokens, bucket_step, seed, shuffle
        keep = [i for i in range(len(src)) if len(src[i]) + 1 <= max_len and len(tgt[i]) + 1 <= max_len]
        self.dropped = len(src) - len(keep)
        if not keep:
            raise ValueError(f"no example fits max_len={max_len} (of {len(src)})")
        self.src = [src[i] for i in keep]
        self.tgt = [tgt[i] for i in keep]
        self.max_len = max_len
        shapes = [(self._round(len(s) + 1), self._round(len(t) + 1)) for s, t in zip(self.src, self.tgt)]
        self.buckets: dict[tuple[int, int], np.ndarray] = {}
        for shape in sorted(set(shapes)):
            self.buckets[shape] = np.array([i for i, s in enumerate(shapes) if s == shape], dtype=np.int64)

    def __len__(self) -> int:
        """Batches per epoch."""
        return sum(-(-len(ids) // self.rows(shape)) for shape, ids in self.buckets.items())

    @property
    def num_examples(self) -> int:
        return len(self.src)

    def _round(self, length: int) -> int:
        return min(-(-length // self.bucket_step) * self.bucket_step, self.max_len)

    def rows(self, shape: tuple[int, int]) -> int:
        return max(1, self.max_tokens // max(shape))

    def epoch(self, epoch: int) -> list[tuple[tuple[int, int], np.ndarray]]:
        """The batches of one epoch as (shape, example indices), shuffled by (seed, epoch) when training."""
        rng = np.random.default_rng([self.seed, epoch])
        plan = []
        for shape, ids in self.buckets.items():
            ids = rng.permutation(ids) if self.shuffle else ids
            rows = self.rows(shape)
            plan += [(shape, ids[i:i + rows]) for i in range(0, len(ids), rows)]
        if self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def make(self, shape: tuple[int, int], ids: np.ndarray) -> Batch:
        s_len, t_len = shape
        rows = self.rows(shape)
        src = np.full((rows, s_len), self.pad_id, dtype=np.int32)  # [B, S]
        tgt_in = np.full((rows, t_len), self.pad_id, dtype=np.int32)  # [B, T]
        labels = np.full((rows, t_len), self.pad_id, dtype=np.int32)  # [B, T]
        for row, i in enumerate(ids):
            s, t = self.src[i], self.tgt[i]
            src[row, :len(s) + 1] = np.append(s, self.eos_id)
            tgt_in[row, :len(t) + 1] = np.insert(t, 0, self.bos_id)
            labels[row, :len(t) + 1] = np.append(t, self.eos_id)
        return Batch(src, tgt_in, labels, pad_id=self.pad_id)

    def stream(self, start: Position = Position()) -> Iterator[tuple[Position, Batch]]:
        """Endless batches from `start`; each yielded with the position of the batch after it."""
        epoch, index = start.epoch, start.index
        while True:
            plan = self.epoch(epoch)
            for i in range(index, len(plan)):
                following = Position(epoch, i + 1) if i + 1 < len(plan) else Position(epoch + 1, 0)
                yield following, self.make(*plan[i])
            epoch, index = epoch + 1, 0

    def once(self) -> Iterator[Batch]:
        """Every example once, in bucket order (evaluation)."""
        for shape, ids in self.epoch(0):
            yield self.make(shape, ids)
