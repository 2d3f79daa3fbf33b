"""Framework-neutral batches: numpy arrays that both trainers consume unchanged.

The layout of an example, per arch:
- seq2seq: `src + [eos]` for the encoder, `[bos] + tgt` as decoder input and `tgt + [eos]` as labels;
- encoder (classifier): `src + [eos]`, and the class id as label;
- decoder (language model): `[bos] + tgt` as input and `tgt + [eos]` as labels.

Unpacked, examples are grouped by length into buckets (lengths rounded up to a multiple of
`bucket_step`) and a bucket's batch holds `max_tokens // max(S, T)` rows, the last batch of a bucket
padded with empty rows. So every batch has one of a few fixed shapes (JAX compiles each once) and
about `max_tokens` positions. With `shared_length` (seq2seq) both sides take the longer side's
rounded length, S = T: at most max_len / bucket_step shapes instead of up to its square (on a corpus
of 20,000 pairs of 3..126 tokens, max_len 128: 16 shapes instead of 72, and 11.7% padding instead of
13.6%, as fewer buckets leave fewer part-filled last batches).

Packed (`pack=True`, as in Flax's WMT example), several examples share a row of `max_len` positions
(on each side): `*_segments` number the examples of a row 1, 2, ... (0 = padding; for seq2seq the same
id on both sides) and `*_positions` count from 0 in each example. Rows are filled first-fit from a pool
of one batch's rows; when an example fits in none, the fullest row leaves the pool. Every batch has the
one shape (max_tokens // max_len, max_len).

Class labels are (B,) unpacked and (B, S) packed (each example's class at its first position); the
positions and rows without a label hold NO_CLASS. Token labels use pad_id. Either way the loss sees
every label exactly once. The order is a pure function of (seed, epoch): the same in both frameworks,
and a resumed run picks it up at (epoch, index).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator, Sequence

import numpy as np

NO_CLASS = -1
PACKING = ("src_segments", "tgt_segments", "src_positions", "tgt_positions")


def label_pad(arch: str, pad_id: int) -> int:
    """The label value the loss skips: NO_CLASS for the encoder's classes, pad_id for next-token labels."""
    return NO_CLASS if arch == "encoder" else pad_id


@dataclass(frozen=True)
class Batch:
    """One batch (int32 arrays, empty rows allowed). The fields an arch has no use for are None: the encoder
    has no tgt_in, the decoder no src, and only packed batches have segments and positions."""

    src: np.ndarray | None  # [B, S]
    tgt_in: np.ndarray | None  # [B, T]
    labels: np.ndarray  # [B, T] next tokens; classes [B], packed [B, S]
    pad_id: int = 0
    src_segments: np.ndarray | None = None  # [B, S]
    tgt_segments: np.ndarray | None = None  # [B, T]
    src_positions: np.ndarray | None = None  # [B, S]
    tgt_positions: np.ndarray | None = None  # [B, T]

    @property
    def ignore(self) -> int:
        """The label value the loss skips."""
        return label_pad("encoder" if self.tgt_in is None else "seq2seq", self.pad_id)

    @property
    def tokens(self) -> int:
        """The labels the loss counts: non-pad target tokens, or examples for a classifier."""
        return int(np.count_nonzero(self.labels != self.ignore))

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays the batch has, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), np.ndarray)}

    def pad_rows(self, multiple: int) -> "Batch":
        """This batch with empty rows appended until B is a multiple of `multiple` (so it splits evenly over
        devices or processes); the loss skips them, so loss sums and gradients are unchanged."""
        extra = -len(self.labels) % multiple
        if not extra:
            return self
        fill = {"labels": self.ignore, "src": self.pad_id, "tgt_in": self.pad_id}
        return replace(self, **{name: np.concatenate([array, np.full((extra, *array.shape[1:]), fill.get(name, 0),
                                                                      array.dtype)])  # [B + extra, ...]
                                for name, array in self.arrays().items()})

    def part(self, index: int, count: int) -> "Batch":
        """Rows [index * B / count, (index + 1) * B / count) of a batch whose B is a multiple of `count`: one
        process's share of a global batch."""
        rows = len(self.labels)
        if rows % count:
            raise ValueError(f"a batch of {rows} rows does not split into {count} equal parts; pad_rows({count}) first")
        size = rows // count
        return replace(self, **{name: array[index * size:(index + 1) * size]  # [B / count, ...]
                                for name, array in self.arrays().items()})


@dataclass(frozen=True)
class Position:
    """Where a batch stream is: batch `index` of `epoch`."""

    epoch: int = 0
    index: int = 0


def pack_rows(lengths: np.ndarray, row_length: int, pool: int) -> list[np.ndarray]:
    """Pack examples, in order, into rows of `row_length` positions (on every side).

    lengths (N,) or (N, sides): the positions each example takes. First fit among at most `pool` open
    rows; when an example fits in none, the fullest open row is closed. Returns each row's example
    indices, rows in the order they were closed (the last open ones at the end).
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(len(lengths), -1)  # [N, sides]
    too_long = np.flatnonzero((lengths > row_length).any(1))
    if too_long.size:
        first = int(too_long[0])
        raise ValueError(f"example {first} takes {int(lengths[first].max())} positions, more than a packed row of "
                         f"{row_length} ({too_long.size} example{'s' if too_long.size > 1 else ''} too long)")
    free = np.zeros((0, lengths.shape[1]), dtype=np.int64)  # [R, sides]
    open_rows: list[list[int]] = []
    closed: list[list[int]] = []
    for i, need in enumerate(lengths):
        fits = np.flatnonzero((free >= need).all(1))
        if fits.size:
            j = int(fits[0])
        elif len(open_rows) < pool:
            j = len(open_rows)
            open_rows.append([])
            free = np.concatenate([free, np.full((1, lengths.shape[1]), row_length)])  # [R + 1, sides]
        else:
            j = int(np.argmin(free.sum(1)))
            closed.append(open_rows[j])
            open_rows[j], free[j] = [], row_length
        open_rows[j].append(i)
        free[j] -= need
    return [np.asarray(row, dtype=np.int64) for row in closed + open_rows if row]


class Batcher:
    """Batches of encoded examples with a token budget: length-bucketed, or packed.

    seq2seq: `src` and `tgt`; encoder: `src` and `classes` (class ids); decoder: `tgt` alone.
    """

    def __init__(self, src: Sequence[np.ndarray] | None, tgt: Sequence[np.ndarray] | None, *, pad_id: int,
                 bos_id: int, eos_id: int, max_tokens: int, max_len: int, bucket_step: int = 8, seed: int = 0,
                 shuffle: bool = True, classes: Sequence[int] | None = None, pack: bool = False,
                 shared_length: bool = False) -> None:
        if src is None and tgt is None:
            raise ValueError("need src (encoder), tgt (decoder) or both (seq2seq)")
        if (classes is not None) != (tgt is None):
            raise ValueError("classes come with src alone (the encoder), and only then")
        sides = [side for side in (src, tgt) if side is not None]
        count = len(sides[0])
        if len(sides[-1]) != count:
            raise ValueError(f"{len(src)} sources but {len(tgt)} targets")
        if classes is not None and len(classes) != count:
            raise ValueError(f"{count} sources but {len(classes)} classes")
        if max_tokens < 1 or bucket_step < 1:
            raise ValueError("max_tokens and bucket_step must be positive")
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.max_tokens, self.bucket_step, self.seed, self.shuffle = max_tokens, bucket_step, seed, shuffle
        self.max_len, self.pack, self.shared_length = max_len, pack, shared_length
        lengths = np.array([[len(side[i]) + 1 for side in sides] for i in range(count)],
                           dtype=np.int64).reshape(count, len(sides))  # [N, sides]
        keep = np.flatnonzero((lengths <= max_len).all(1))
        self.dropped = count - len(keep)
        if not len(keep):
            raise ValueError(f"no example fits max_len={max_len} (of {count})")
        self.src = None if src is None else [src[i] for i in keep]
        self.tgt = None if tgt is None else [tgt[i] for i in keep]
        self.classes = None if classes is None else np.asarray(classes, dtype=np.int64)[keep]
        self.lengths = lengths[keep]  # [N, sides]
        self.buckets: dict[tuple[int, ...], np.ndarray] = {}
        if not pack:
            longest = self.lengths.max(1, keepdims=True) if shared_length else self.lengths  # [N, 1 or sides]
            shapes = np.minimum(-(-longest // bucket_step) * bucket_step, max_len)  # [N, 1 or sides]
            shapes = np.broadcast_to(shapes, self.lengths.shape)  # [N, sides]
            for shape in sorted({tuple(int(v) for v in s) for s in shapes}):
                self.buckets[shape] = np.flatnonzero((shapes == shape).all(1))
        self._plans: dict[int, list] = {}

    def repacked(self, pack: bool) -> "Batcher":
        """A Batcher of the same examples (those that fit) and settings, packed or bucketed."""
        return Batcher(self.src, self.tgt, pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id,
                       max_tokens=self.max_tokens, max_len=self.max_len, bucket_step=self.bucket_step, seed=self.seed,
                       shuffle=self.shuffle, classes=self.classes, pack=pack, shared_length=self.shared_length)

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.pack:
            return len(self.epoch(0))
        return sum(-(-len(ids) // self.rows(shape)) for shape, ids in self.buckets.items())

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    @property
    def packed_shape(self) -> tuple[int, ...]:
        """The one shape of packed batches: max_len on each side."""
        return (self.max_len,) * self.lengths.shape[1]

    def rows(self, shape: tuple[int, ...]) -> int:
        return max(1, self.max_tokens // max(shape))

    def epoch(self, epoch: int) -> list[tuple[tuple[int, ...], np.ndarray | list[np.ndarray]]]:
        """The batches of one epoch as (shape, example indices), shuffled by (seed, epoch) when training.

        Unpacked, the indices are one array, an example a row; packed, a list of rows' index arrays.
        """
        if epoch not in self._plans:
            self._plans = {epoch: self._plan(epoch)}
        return self._plans[epoch]

    def _plan(self, epoch: int) -> list:
        rng = np.random.default_rng([self.seed, epoch])
        if self.pack:
            order = rng.permutation(self.num_examples) if self.shuffle else np.arange(self.num_examples)
            shape = self.packed_shape
            rows = self.rows(shape)
            packed = [order[row] for row in pack_rows(self.lengths[order], self.max_len, rows)]
            return [(shape, packed[i:i + rows]) for i in range(0, len(packed), rows)]
        plan = []
        for shape, ids in self.buckets.items():
            ids = rng.permutation(ids) if self.shuffle else ids
            rows = self.rows(shape)
            plan += [(shape, ids[i:i + rows]) for i in range(0, len(ids), rows)]
        if self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def padding(self, epoch: int = 0) -> float:
        """The share of an epoch's batch positions (all sides, empty rows included) that hold no token."""
        total = sum(self.rows(shape) * sum(shape) for shape, _ in self.epoch(epoch))
        return 1.0 - float(self.lengths.sum()) / total

    def make(self, shape: tuple[int, ...], ids: np.ndarray | list[np.ndarray]) -> Batch:
        """The batch of one plan entry: unpacked, example ids[r] in row r; packed, the examples ids[r] in row r."""
        rows, packed = self.rows(shape), self.pack
        lengths = {"src": shape[0], "tgt": shape[-1]}
        sides = [side for side in lengths if getattr(self, side) is not None]
        segments = {side: np.zeros((rows, lengths[side]), dtype=np.int32) for side in sides}  # [B, L] per side
        positions = {side: np.zeros((rows, lengths[side]), dtype=np.int32) for side in sides}  # [B, L] per side
        src = np.full((rows, shape[0]), self.pad_id, dtype=np.int32) if "src" in sides else None  # [B, S]
        tgt_in = np.full((rows, shape[-1]), self.pad_id, dtype=np.int32) if "tgt" in sides else None  # [B, T]
        if tgt_in is not None:
            labels = np.full((rows, shape[-1]), self.pad_id, dtype=np.int32)  # [B, T]
        else:
            labels = np.full((rows, shape[0]) if packed else (rows,), NO_CLASS, dtype=np.int32)  # [B, S] or [B]
        at: dict[str, int] = {}

        def place(side: str, row: int, segment: int, n: int) -> slice:
            window = slice(at[side], at[side] + n)
            segments[side][row, window], positions[side][row, window] = segment, np.arange(n)
            at[side] += n
            return window

        for row, examples in enumerate(ids if packed else np.asarray(ids)[:, None]):
            at.update(dict.fromkeys(sides, 0))
            for segment, i in enumerate(examples, start=1):
                if src is not None:
                    window = place("src", row, segment, len(self.src[i]) + 1)
                    src[row, window] = np.append(self.src[i], self.eos_id)
                    if self.classes is not None:
                        labels[(row, window.start) if packed else row] = self.classes[i]
                if tgt_in is not None:
                    window = place("tgt", row, segment, len(self.tgt[i]) + 1)
                    tgt_in[row, window] = np.insert(self.tgt[i], 0, self.bos_id)
                    labels[row, window] = np.append(self.tgt[i], self.eos_id)
        extra = {}
        if packed:
            for side in sides:
                extra[f"{side}_segments"], extra[f"{side}_positions"] = segments[side], positions[side]
        return Batch(src, tgt_in, labels, pad_id=self.pad_id, **extra)

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
        """Every example once, in bucket (or packing) order (evaluation)."""
        for shape, ids in self.epoch(0):
            yield self.make(shape, ids)
