"""Token embeddings (scaled by sqrt(d_model)) and the sinusoidal positional encoding (torch twin)."""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

from parity.numerics import position_table
from torch_tx.dropout import Dropout
from torch_tx.initializers import embedding_std


class TokenEmbedding(nn.Module):
    """ids (B, L) int -> (B, L, D) = weight[ids] * sqrt(D) (times 1 without `scale`). Out-of-range ids raise
    ValueError. `pad_id` (not None): that row gets no gradient from lookups (nn.Embedding's padding_idx)."""

    def __init__(self, vocab_size: int, d_model: int, scale: bool = True, pad_id: int | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.scale = scale
        self.pad_id = pad_id
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        nn.init.normal_(self.weight, std=embedding_std(d_model))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_index_range(ids, self.vocab_size, "token ids", str(self.vocab_size))
        x = self.weight[ids] if self.pad_id is None else F.embedding(ids, self.weight, padding_idx=self.pad_id)  # [B, L, D]
        return x * math.sqrt(self.d_model) if self.scale else x


class PositionalEncoding(nn.Module):
    """x (B, L, D) -> dropout(x + PE[offset:offset + L]), or dropout(x + PE[positions]) with positions (B, L).
    offset + L > max_len, or a position outside [0, max_len), raises ValueError.

    The table is parity.numerics.position_table(positions, ...) in float64, cast per (device, dtype) and
    cached, so that float64 runs use it at full precision whatever dtype the module was cast through before.
    """

    def __init__(self, d_model: int, max_len: int, dropout: float, positions: str = "paper", pad_id: int = 0):
        super().__init__()
        self.max_len = max_len
        self._table64 = position_table(positions, max_len, d_model, pad_id)  # [max_len, D]
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.drop = Dropout(dropout)

    def table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(self._table64).to(device=device, dtype=dtype)
        return self._cache[key]  # [max_len, D]

    def forward(self, x: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """`positions` (B, L) int (packed sequences, per-row offsets) replaces offset..offset + L."""
        length = x.shape[1]
        table = self.table(x.device, x.dtype)  # [max_len, D]
        if positions is not None:
            check_positions(positions, tuple(x.shape[:2]), self.max_len)
            return self.drop(x + table[positions.to(x.device)])  # [B, L, D]
        if offset + length > self.max_len:
            raise ValueError(f"sequence length {offset + length} exceeds max_len {self.max_len}")
        return self.drop(x + table[offset:offset + length])  # [B, L, D]


def check_positions(positions: torch.Tensor, expected: tuple[int, ...], max_len: int) -> None:
    """Raise unless `positions` is an integer tensor of shape `expected` (B, L) with values in [0, max_len)."""
    if tuple(positions.shape) != expected:
        raise ValueError(f"positions must have shape (B, L) = {expected}, got {tuple(positions.shape)}")
    check_index_range(positions, max_len, "positions", f"max_len={max_len}")


_IDS_CHECKED = contextvars.ContextVar("ids_checked", default=False)


@contextlib.contextmanager
def ids_checked():
    """Within it, the ids and positions the embeddings look up were range-checked already (the trainer checks each
    batch once on the host; decoding feeds back tokens it chose): no lookup reads min/max back from the device,
    which on a GPU is a device-to-host synchronisation per call."""
    token = _IDS_CHECKED.set(True)
    try:
        yield
    finally:
        _IDS_CHECKED.reset(token)


def check_index_range(values: torch.Tensor, size: int, what: str, bound: str) -> None:
    """TypeError unless `values` are integers; ValueError when they fall outside [0, size) (`bound` is how
    the message writes size). Under torch.compile the range is left to the compiled lookup's own bounds
    check (reading min/max on the host would split the graph at every call), and within `ids_checked` to the
    caller's check."""
    if values.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{what} must be an integer tensor, got {values.dtype}")
    if torch.compiler.is_compiling() or _IDS_CHECKED.get():
        return
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= size):
        raise ValueError(f"{what} must be in [0, {bound}), got values in [{int(values.min())}, {int(values.max())}]")
