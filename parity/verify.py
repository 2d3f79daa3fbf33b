"""`twin convert --verify`: load a converted checkpoint with the target framework's own loader, check
that it holds exactly the weights that were converted, and run the parity checks of `twin parity` on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from parity.config import TransformerConfig
from parity.convert import aliases, flax_to_canonical, to_numpy
from parity.formats import DIR_FILES, output_layout, quiet_orbax
from parity.formats.nn_transformer import OUTSIDE_STACKS, from_nn_state_dict
from parity.suite import Check, compare_nn_transformer, compare_twins, random_inputs


def _weights_file(dst: Path, target: str) -> tuple[str, Path]:
    container, is_file = output_layout(dst, target)
    return container, dst if is_file or container == "orbax" else dst / DIR_FILES[target]


def load_native(dst: str | Path, target: str, cfg: TransformerConfig) -> tuple[dict[str, np.ndarray], object]:
    """(canonical weights, the loaded model or variables), read the way a user of the target would.

    torch / safetensors: `torch.load(weights_only=True)` or `safetensors.torch.load_file`, then
    `torch_tx.model_for(cfg).load_state_dict(strict=True)` (Transformer, EncoderOnly or DecoderOnly);
    nn-transformer: the same file into `torch.nn.Transformer` (`nn.TransformerEncoder` for an encoder)
    `.load_state_dict(strict=True)`; flax: orbax `StandardCheckpointer.restore` or
    `flax.serialization.from_bytes` into the structure of `jax_tx.model_for(cfg).init`.
    """
    container, path = _weights_file(Path(dst), target)
    if target == "flax":
        import jax

        import jax_tx

        model = jax_tx.model_for(cfg)
        template = jax.eval_shape(model.init, jax.random.key(0), *jax_tx.model.init_inputs(cfg))
        if container == "orbax":
            import orbax.checkpoint as ocp

            with quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
                variables = checkpointer.restore(path.resolve())
            if jax.tree_util.tree_structure(variables) != jax.tree_util.tree_structure(template):
                raise ValueError(f"{path}: the restored tree is not jax_tx.{type(model).__name__}'s variables")
        else:
            from flax import serialization

            variables = serialization.from_bytes(template, path.read_bytes())
        for got, want in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(template)):
            if np.shape(got) != want.shape:
                raise ValueError(f"{path}: a restored leaf has shape {np.shape(got)}, expected {want.shape}")
        return flax_to_canonical(variables, cfg), variables
    import torch

    if container == "safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(path)
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if target == "nn-transformer":
        from parity.formats.nn_transformer import build_nn

        module = build_nn(cfg.without_dropout()).double()
        module.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith(OUTSIDE_STACKS)},
                               strict=True)
        return from_nn_state_dict(state_dict, cfg), module
    import torch_tx

    model = torch_tx.model_for(cfg).double()
    model.load_state_dict(state_dict, strict=True)
    return {k: to_numpy(v) for k, v in state_dict.items()}, model


def verify_ct2(dst: str | Path, expected: Mapping[str, np.ndarray], seed: int = 0, device: str = "cpu") -> list[Check]:
    """Rows: DST loaded with CTranslate2 against the installed twin (torch first) on the converted weights
    (`parity.ct2.compare`: log-probabilities, hidden states or logits, greedy tokens)."""
    from parity import ct2
    from parity.extras import default_framework
    from parity.translate import read_ct2_dir

    model = ct2.CT2Model.load(dst, device=device)
    twin = default_framework("twin convert --verify")
    if model.cfg.arch == "seq2seq":
        tokenizer = read_ct2_dir(dst)[1]
        bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
    elif model.cfg.arch == "decoder":
        bos_id, eos_id = model.ids[model.start_token], model.ids[ct2.ct2_config(dst)["eos_token"]]
    else:
        bos_id = eos_id = 0  # an encoder generates nothing
    weights = {k: np.asarray(v, np.float64) for k, v in expected.items()}
    return ct2.compare(model, weights, bos_id=bos_id, eos_id=eos_id, twin=twin, seed=seed)


def verify(dst: str | Path, target: str, cfg: TransformerConfig, expected: Mapping[str, np.ndarray],
           seed: int = 0, device: str = "cpu") -> list[Check]:
    """Rows: DST reloads bit-exactly; the twins agree on it (float64, float32), source = the target's twin;
    for nn-transformer also nn.Transformer (nn.TransformerEncoder) against the torch twin's stacks; for
    ctranslate2 CTranslate2 against a twin (`verify_ct2`)."""
    if target == "ctranslate2":
        return verify_ct2(dst, expected, seed, device)
    weights, loaded = load_native(dst, target, cfg)
    keys = [k for k in expected if k not in aliases(cfg)]
    exact = set(weights) >= set(keys) and all(
        weights[k].dtype == expected[k].dtype and weights[k].shape == expected[k].shape
        and np.array_equal(np.ascontiguousarray(weights[k]).view(np.uint8),
                           np.ascontiguousarray(expected[k]).view(np.uint8)) for k in keys)
    dtypes = "/".join(sorted({str(expected[k].dtype) for k in keys}))
    rows = [Check(f"{target} reload bit-exact ({len(keys)} tensors)", dtypes, 0.0, 0.0 if exact else float("inf"),
                  0.0)]
    cfg = cfg.without_dropout()
    rng = np.random.default_rng(seed)
    length = min(cfg.max_len, 7)
    inputs = random_inputs(cfg, 3, length, length, rng, empty_source_row=True)
    source = "jax" if target == "flax" else "torch"
    for dtype in ("float64", "float32"):
        rows += compare_twins(cfg, weights, inputs, dtype, source, device)
    if target == "nn-transformer":
        rows.append(compare_nn_transformer(cfg, loaded, weights, random_inputs(cfg, 3, length, length, rng), rng))
    return rows
