"""Numerics shared by both twins, in numpy so that neither framework is needed to compute them."""

from __future__ import annotations

import numpy as np


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """The paper's positional table, float64 [max_len, d_model].

    PE[p, 2i] = sin(p / 10000^(2i/d_model)), PE[p, 2i+1] = cos(p / 10000^(2i/d_model)).
    Both twins cast this one float64 table to their compute dtype, so the tables agree bit for bit.
    """
    position = np.arange(max_len, dtype=np.float64)[:, None]  # [L, 1]
    inv_freq = 10000.0 ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)  # [D/2]
    angles = position * inv_freq  # [L, D/2]
    table = np.empty((max_len, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    return table
