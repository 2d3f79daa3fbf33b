"""Three-way parity against transformers' own implementation: a Hugging Face model (Marian or FSMT) is the
reference, and both twins run on the weights converted from it, in the same process.

Rows compare the encoder memory, the logits and every parameter's gradient of sum(logits * W), float64
and float32 (DESIGN tolerances, relative to the reference's norm), and greedy and beam-search tokens
against `generate` with the checkpoint's generation config. The reference is called the way its users
call it: input_ids, attention_mask, decoder_input_ids starting with decoder_start_token_id, and a
decoder_attention_mask (the twins then take the same masks).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from parity.config import TransformerConfig
from parity.suite import (GRAD_FLOORS, TOLERANCES, Check, Inputs, _grad_denominators, errors, make_inputs, np_dtype,
                          run_jax, run_torch)


def reference_inputs(cfg: TransformerConfig, decoder_start_id: int, batch: int, src_len: int, tgt_len: int,
                     rng: np.random.Generator) -> Inputs:
    """Random right-padded inputs (every source row non-empty: a fully masked row is undefined in
    transformers' attention) whose decoder rows start with `decoder_start_id`."""
    inputs = make_inputs(cfg, rng.integers(1, src_len + 1, size=batch), rng.integers(1, tgt_len + 1, size=batch),
                         src_len, tgt_len, rng)
    tgt = inputs.tgt.copy()
    tgt[:, 0] = decoder_start_id
    return Inputs(inputs.src, tgt, inputs.src_mask, inputs.tgt_mask, inputs.loss_weights)


def hf_param_names(model: Any) -> dict[str, str]:
    """Canonical name -> the name of the reference parameter it converts from (tied copies: the one it owns)."""
    from parity.formats.hf_dir import module_for

    owned = {id(p): n for n, p in model.named_parameters()}
    aliases = {n: owned[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    return {ours: aliases[theirs] for ours, theirs in module_for(model.config.model_type).canonical_sources(
        model.config.to_dict()).items() if theirs in aliases}


def run_reference(model: Any, inputs: Inputs, dtype: str, grads: bool = True) -> dict[str, Any]:
    """The reference model's memory, logits and {reference parameter name: grad}, numpy. use_cache=False, as
    with labels (FSMT's full pass with use_cache=True builds no causal mask: it expects one new token)."""
    import torch

    tdtype = getattr(torch, dtype)
    model = model.to(tdtype).eval()
    model.zero_grad(set_to_none=True)
    from parity.formats.hf_dir import module_for

    forward = getattr(module_for(model.config.model_type), "reference_forward", None)
    src, src_mask = torch.from_numpy(inputs.src), torch.from_numpy(inputs.src_mask)
    tgt, tgt_mask = torch.from_numpy(inputs.tgt), torch.from_numpy(inputs.tgt_mask)
    with torch.set_grad_enabled(grads):
        if forward is not None:
            memory, logits = forward(model, src, src_mask, tgt, tgt_mask)  # [B, S, D], [B, T, V]
        else:
            out = model(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt,
                        decoder_attention_mask=tgt_mask.long(), use_cache=False)
            memory, logits = out.encoder_last_hidden_state, out.logits  # [B, S, D], [B, T, V]
    result = {"memory": memory.detach().numpy(), "logits": logits.detach().numpy()}
    if grads:
        loss = (logits * torch.from_numpy(inputs.loss_weights["logits"]).to(tdtype)).sum()  # []
        loss.backward()
        result["grads"] = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    return result


def _real_positions_only(inputs: Inputs) -> Inputs:
    """The loss reads no padded target position (fairseq zeroes the position vector of pad tokens, the twins
    do not: outputs at pad positions are not part of the function)."""
    weights = {k: np.where(inputs.tgt_mask[..., None], w, 0.0) for k, w in inputs.loss_weights.items()}
    return Inputs(inputs.src, inputs.tgt, inputs.src_mask, inputs.tgt_mask, weights)


def compare_reference(model: Any, cfg: TransformerConfig, weights: Mapping[str, np.ndarray], inputs: Inputs,
                      dtype: str, label: str) -> list[Check]:
    """Rows "<label>->torch|jax memory / logits / grads": both twins on `weights` (converted from `model`)
    against the reference, in `dtype` (float64 or float32), at the real (unpadded) positions. The model is cast
    to `dtype` in place."""
    cfg = cfg.without_dropout()
    from parity.formats.hf_dir import module_for

    if getattr(module_for(model.config.model_type), "PAD_POSITIONS_DIFFER", False):
        inputs = _real_positions_only(inputs)
    ref = run_reference(model, inputs, dtype)
    names = hf_param_names(model)
    weights = {k: np.asarray(v).astype(np_dtype(dtype)) for k, v in weights.items()}
    ref_grads = {ours: ref["grads"][theirs] for ours, theirs in names.items()}
    denoms = _grad_denominators(ref_grads, dtype)
    tol = TOLERANCES[dtype]
    rows = []
    for twin, runner in (("torch", run_torch), ("jax", run_jax)):
        got = runner(cfg, weights, inputs, dtype)
        tag = f"{label}->{twin}"
        real = {"memory": inputs.src_mask, "logits": inputs.tgt_mask}  # [B, S], [B, T]
        rows += [Check(f"{tag} {name}", dtype, *errors(got[name][real[name]], ref[name][real[name]]), tol)
                 for name in ("memory", "logits")]
        per_param = {k: errors(got["grads"][k], ref_grads[k], denoms[k]) for k in ref_grads}
        worst = max(per_param, key=lambda k: per_param[k][1])
        rows.append(Check(f"{tag} grads ({len(per_param)} params, worst {worst})", dtype,
                          max(v[0] for v in per_param.values()), per_param[worst][1], tol))
    return rows


def _same_length(a: np.ndarray, length: int, pad_id: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=pad_id)[:, :length]


def generation_options(model: Any, eos_id: int) -> dict[str, Any]:
    """The twins' decoding options that do what the model's generation config makes transformers' `generate`
    do (`parity.decoding.hf_generation_options`), less num_beams, which the caller picks."""
    from parity.decoding import hf_generation_options

    options = hf_generation_options(model.generation_config.to_dict(), eos_id)
    options.pop("beam_size")
    return options


def compare_generate(model: Any, cfg: TransformerConfig, weights: Mapping[str, np.ndarray], src: np.ndarray,
                     src_mask: np.ndarray, ids: Mapping[str, int], max_new_tokens: int, label: str,
                     beams: tuple[int, ...] = (1, 4)) -> list[Check]:
    """Rows "<label> generate->torch|jax greedy|beam K tokens": transformers' `generate(num_beams=K)` with the
    model's generation config against both twins' `generate` (float32) with `generation_options` (forced EOS,
    beam_rule "hf"), token for token. The twins never emit pad or the decoder start (transformers'
    bad_words_ids [[pad]] says the same). rel is the fraction of differing tokens (tolerance 0)."""
    import jax.numpy as jnp
    import torch

    import jax_tx
    import torch_tx
    from parity.convert import canonical_to_flax, to_torch

    model = model.float().eval()
    options = generation_options(model, ids["eos_id"])
    cfg = cfg.without_dropout()
    w32 = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    tm = torch_tx.Transformer(cfg).eval()
    tm.load_state_dict({k: to_torch(v) for k, v in w32.items()}, strict=True)
    fm, fp = jax_tx.Transformer(cfg), canonical_to_flax(w32, cfg)
    rows = []
    for k in beams:
        with torch.no_grad():
            ref = model.generate(input_ids=torch.from_numpy(src), attention_mask=torch.from_numpy(src_mask).long(),
                                 max_new_tokens=max_new_tokens, num_beams=k, num_return_sequences=1,
                                 do_sample=False).numpy()[:, 1:]  # [B, n]
        kw = dict(max_new_tokens=max_new_tokens, bos_id=ids["decoder_start_id"], eos_id=ids["eos_id"], beam_size=k,
                  **options)
        outs = {"torch": torch_tx.decoding.generate(tm, torch.from_numpy(src), src_mask=torch.from_numpy(src_mask),
                                                    **kw).numpy(),
                "jax": np.asarray(jax_tx.decoding.generate(fm, fp, jnp.asarray(src), src_mask=jnp.asarray(src_mask),
                                                           **kw))}
        search = "greedy" if k == 1 else f"beam {k}"
        for twin, got in outs.items():
            length = max(got.shape[1], ref.shape[1])
            diff = float(np.mean(_same_length(got, length, cfg.pad_id) != _same_length(ref, length, cfg.pad_id)))
            rows.append(Check(f"{label} generate->{twin} {search} tokens ({ref.size} tokens)", "float32", diff, diff,
                              0.0))
    return rows


def load_reference(path: str) -> Any:
    """transformers' own model of a Hugging Face directory, offline, in eval mode."""
    from parity.extras import require

    require("twin parity", ["hf"], why=f"{path} is a Hugging Face model; transformers is the reference")
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True).eval()


def reference_rows(path: str, cfg: TransformerConfig, weights: Mapping[str, np.ndarray], dtypes: list[str],
                   batch: int, length: int, rng: np.random.Generator) -> list[Check]:
    """`twin parity HF_DIR`'s three-way rows: transformers' model of `path` against both twins on `weights`
    (float64 / float32 of `dtypes`), then greedy and beam-search tokens against `generate`."""
    from parity.formats.hf_dir import special_ids

    model = load_reference(path)
    ids = special_ids(path)
    inputs = reference_inputs(cfg, ids["decoder_start_id"], batch, length, length, rng)
    label = model.config.model_type
    rows = []
    for dtype in ("float64", "float32"):
        if dtype in dtypes:
            rows += compare_reference(model, cfg, weights, inputs, dtype, label)
    rows += compare_generate(model, cfg, weights, inputs.src, inputs.src_mask, ids,
                             min(cfg.max_len - 1, 2 * length + 4), label)
    return rows


__all__ = ["GRAD_FLOORS", "compare_generate", "compare_reference", "generation_options", "hf_param_names",
           "load_reference", "reference_inputs", "reference_rows", "run_reference"]
