"""Hypothesis strategies: configs and inputs drawn from the small fixed sets of parity.suite.SPACE."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from parity.config import ACTIVATIONS, POSITIONS, TransformerConfig
from parity.names import aliases, canonical_shapes
from parity.suite import SPACE, Inputs, build_config, make_inputs, np_dtype


# Fields drawn beyond parity.suite.SPACE (whose activations are relu and gelu): every activation, every
# positional table and both embedding scalings (the layouts of Hugging Face Marian and FSMT checkpoints).
EXTRA: dict[str, tuple] = {"activation": ACTIVATIONS, "positions": POSITIONS, "scale_embedding": (True, False)}


@st.composite
def configs(draw: st.DrawFn, archs: tuple[str, ...] = ("seq2seq",), **fixed) -> TransformerConfig:
    """A random config (dropout off) of one of `archs`: SPACE's fields, with EXTRA's options; keyword
    arguments pin fields."""
    def choose(name: str, options) -> object:
        return draw(st.sampled_from(list(EXTRA.get(name, options))))

    cfg = build_config(choose, archs)
    cfg = cfg.replace(positions=choose("positions", ()), scale_embedding=choose("scale_embedding", ()))
    return cfg.replace(**fixed) if fixed else cfg


@st.composite
def inputs(draw: st.DrawFn, cfg: TransformerConfig, allow_empty_source: bool = True, packed: bool = False) -> Inputs:
    """A batch with right-padding: lengths drawn per row (0 allowed for the source: an empty row).
    `packed`: each row holds 1-3 examples (segment ids)."""
    batch = draw(st.sampled_from(SPACE["batch"]))
    src_len, tgt_len = draw(st.sampled_from(SPACE["src_len"])), draw(st.sampled_from(SPACE["tgt_len"]))
    low = 0 if allow_empty_source else 1
    src_lengths = draw(st.lists(st.integers(low, src_len), min_size=batch, max_size=batch))
    tgt_lengths = draw(st.lists(st.integers(1, tgt_len), min_size=batch, max_size=batch))
    segments = draw(st.lists(st.integers(1, 3), min_size=batch, max_size=batch)) if packed else None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return make_inputs(cfg, src_lengths, tgt_lengths, src_len, tgt_len, rng, segments)


def random_weights(cfg: TransformerConfig, dtype: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical weights drawn in float64 and cast (so every dtype has values that use all its bits);
    tied names share one array."""
    rng = np.random.default_rng(seed)
    out = {k: rng.standard_normal(s).astype(np_dtype(dtype)) for k, s in canonical_shapes(cfg).items()}
    for alias, owner in aliases(cfg).items():
        out[alias] = out[owner]
    return out
