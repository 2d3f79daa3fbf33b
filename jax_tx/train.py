"""Training the Flax twin: label-smoothed loss, Adam with the paper's schedule, one step, for each arch.

Mirrors `torch_tx/train.py` name for name. The model is `model_for(cfg)`: the seq2seq Transformer and
the decoder-only LM score next tokens, the encoder-only classifier scores classes.
`train_step(state, batch, rng) -> (state, metrics)` is pure and jitted with the state donated; dropout
keys are `fold_in(rng, state.step)`. The loop around it is `parity.train`. State goes in and out in
canonical names (numpy), so a run can resume in the other framework.

Precision (`PRECISIONS`, by the trainer's dtype name): float32 or float64 throughout, or "bfloat16", mixed
precision (a jmp-style policy: params float32, compute bfloat16, loss float32) with torch.autocast's rule of
what computes in bfloat16: inside the loss the weights of the matmul layers are cast to bfloat16 and so are
their inputs (`compute_params`, `autocast`), while embedding lookups, layer norms and the residual stream stay
float32, like the attention softmax and the loss sums; the gradients come back to the float32 params through
the casts, and Adam runs in float32. The torch trainer's `compile` option has no counterpart here: the step
is always jitted (XLA).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state

from jax_tx import distributed
from jax_tx.decoding import generate
from jax_tx.model import EncoderOnly, Generator, init_inputs, model_for
from parity.batching import PACKING, Batch, label_pad
from parity.config import TransformerConfig
from parity.convert import canonical_to_flax, flax_to_canonical
from parity.train import TrainConfig, TrainState, learning_rate


@dataclass(frozen=True)
class Precision:
    """Weights, gradients and Adam moments in `param_dtype`; the passes computed in `compute_dtype` (None: in
    param_dtype; else the matmuls, through `compute_params` and `autocast`). Loss sums come out in at least
    float32 (`loss_terms`)."""

    param_dtype: Any
    compute_dtype: Any = None


PRECISIONS = {"float32": Precision(jnp.float32), "float64": Precision(jnp.float64),
              "bfloat16": Precision(jnp.float32, jnp.bfloat16)}
# The module calls whose first argument goes into a matmul, cast by `autocast`: every nn.Dense, the output layer
# (tied or not) and the classifier's pooling (a masked mean, computed as a matmul in both twins).
MATMUL_CALLS = ((nn.Dense, "__call__"), (Generator, "__call__"), (EncoderOnly, "classify"))


def loss_terms(logits: jnp.ndarray, labels: jnp.ndarray, pad_id: int, smoothing: float) -> dict[str, jnp.ndarray]:
    """Sums over the labels that are not `pad_id`: smoothed loss, nll, correct argmax, label count (scalars).

    logits (..., V) next-token or class scores, labels (...) their ids (pad_id: skipped; it may be out of
    range, like NO_CLASS). Smoothed loss per label = (1 - smoothing) * nll + smoothing * mean over the
    vocabulary of -log p, as `optax.smooth_labels` and `F.cross_entropy(label_smoothing=...)` define it; computed from
    logsumexp without materializing log p: -log p_i = lse - logit_i.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # [B, T, V]
    lse = jax.nn.logsumexp(logits, -1)  # [B, T]
    mask = labels != pad_id  # [B, T]
    nll = lse - jnp.take_along_axis(logits, jnp.where(mask, labels, 0)[..., None], -1)[..., 0]  # [B, T]
    loss = (1.0 - smoothing) * nll + smoothing * (lse - logits.mean(-1))  # [B, T]
    return {"loss": (loss * mask).sum(), "nll": (nll * mask).sum(),
            "correct": ((logits.argmax(-1) == labels) & mask).sum(), "tokens": mask.sum()}


def logits_of(apply_fn, variables: Mapping[str, Any], batch: Mapping[str, jnp.ndarray], arch: str,
              **kwargs) -> jnp.ndarray:
    """What the loss scores: next-token logits (B, T, V) of the seq2seq model (src, tgt_in) or the decoder
    (tgt_in), or the encoder's class logits (B, C), packed (B, S, C). Packed batches pass their segments
    and positions on; `kwargs` (deterministic, rngs) go to `apply_fn`."""
    packed = {name: batch[name] for name in PACKING if name in batch}
    if arch == "encoder":
        return apply_fn(variables, batch["src"], **kwargs, **packed)[1]  # [B, C] or [B, S, C]
    if arch == "decoder":
        return apply_fn(variables, batch["tgt_in"], **kwargs, **packed)  # [B, T, V]
    return apply_fn(variables, batch["src"], batch["tgt_in"], **kwargs, **packed)  # [B, T, V]


def compute_params(params: Any, compute_dtype: Any) -> Any:
    """The params the passes read under mixed precision: the weights of every module that holds a "kernel"
    (nn.Dense, the untied Generator) cast to `compute_dtype`; embedding tables and LayerNorm params as they are
    (torch.autocast runs lookups and layer norms in float32). `params` itself when compute_dtype is None. Under
    `jax.grad` the cast's transpose brings the gradients back to the params' dtype."""
    if compute_dtype is None:
        return params

    def cast(tree):
        if not isinstance(tree, Mapping):
            return tree
        if "kernel" in tree:
            return {name: leaf.astype(compute_dtype) for name, leaf in tree.items()}
        return {name: cast(sub) for name, sub in tree.items()}

    return cast(params)


@contextlib.contextmanager
def autocast(compute_dtype: Any):
    """Within it (while tracing), the first argument of the `MATMUL_CALLS` is cast to `compute_dtype`: with
    `compute_params`, every matmul runs in compute_dtype and returns it (attention too: its q, k, v come from
    nn.Dense), and float32 + compute_dtype sums keep the residual stream in float32, as under torch.autocast.
    Nothing when compute_dtype is None."""
    def cast_input(next_fun, args, kwargs, context):
        if any(isinstance(context.module, kind) and context.method_name == method for kind, method in MATMUL_CALLS):
            args = (args[0].astype(compute_dtype), *args[1:])
        return next_fun(*args, **kwargs)

    if compute_dtype is None:
        yield
        return
    with nn.intercept_methods(cast_input):
        yield


def lr_schedule(cfg: TransformerConfig, tcfg: TrainConfig) -> optax.Schedule:
    """The warmup + inverse-square-root schedule as an optax schedule (float64 under x64, like torch's float)."""
    def schedule(count: jnp.ndarray) -> jnp.ndarray:
        return learning_rate(jnp.asarray(count, jnp.result_type(float)), d_model=cfg.d_model, tcfg=tcfg,
                             minimum=jnp.minimum)

    return schedule


def make_optimizer(cfg: TransformerConfig, tcfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam(betas, eps) with the warmup + inverse-square-root schedule."""
    schedule = lr_schedule(cfg, tcfg)
    return optax.chain(optax.clip_by_global_norm(tcfg.clip_norm),
                       optax.adam(schedule, b1=tcfg.betas[0], b2=tcfg.betas[1], eps=tcfg.adam_eps))


def train_step(state: train_state.TrainState, batch: Mapping[str, jnp.ndarray], rng: jax.Array, *,
               cfg: TransformerConfig, tcfg: TrainConfig, unshard: Callable[[Any], Any] | None = None,
               compute_dtype: Any = None) -> tuple[train_state.TrainState, dict[str, jnp.ndarray]]:
    """One update on `batch` (the arrays of a `Batch`); returns the new state, loss sums, grad norm and lr.

    Pure: bind cfg/tcfg with functools.partial and jit with the state donated (see `Trainer`). `unshard`
    (fully sharded runs) lays the parameters out whole for the forward and backward passes; its transpose
    reduce-scatters the gradients back onto the shards, where clipping and Adam run. `compute_dtype` (mixed
    precision): the matmuls run in it (`compute_params` after unsharding, so the gradients are reduced in the
    params' dtype, and `autocast`); the gradients land in the params' dtype.
    """
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        params = compute_params(params if unshard is None else unshard(params), compute_dtype)
        with autocast(compute_dtype):
            logits = logits_of(state.apply_fn, {"params": params}, batch, cfg.arch, deterministic=False,
                               rngs={"dropout": dropout_rng})  # [B, T, V] or [B, C]
        terms = loss_terms(logits, batch["labels"], label_pad(cfg.arch, cfg.pad_id), tcfg.label_smoothing)
        return terms["loss"] / jnp.maximum(terms["tokens"], 1), terms

    grads, terms = jax.grad(loss_fn, has_aux=True)(state.params)
    terms["grad_norm"] = optax.tree.norm(grads)
    terms["lr"] = lr_schedule(cfg, tcfg)(state.step)
    return state.apply_gradients(grads=grads), terms


def _keyed_train_step(state: train_state.TrainState, batch: Mapping[str, jnp.ndarray], key_data: jax.Array, *,
                      cfg: TransformerConfig, tcfg: TrainConfig, unshard: Callable[[Any], Any] | None = None,
                      compute_dtype: Any = None):
    """`train_step` with the dropout key passed as its raw key data (a uint32 array, laid out like any other)."""
    return train_step(state, batch, jax.random.wrap_key_data(key_data), cfg=cfg, tcfg=tcfg, unshard=unshard,
                      compute_dtype=compute_dtype)


def eval_step(state: train_state.TrainState, batch: Mapping[str, jnp.ndarray], *, cfg: TransformerConfig,
              tcfg: TrainConfig, unshard: Callable[[Any], Any] | None = None,
              compute_dtype: Any = None) -> dict[str, jnp.ndarray]:
    """Loss sums of `batch` without dropout or update (`unshard`, `compute_dtype`: as in `train_step`)."""
    params = compute_params(state.params if unshard is None else unshard(state.params), compute_dtype)
    with autocast(compute_dtype):
        logits = logits_of(state.apply_fn, {"params": params}, batch, cfg.arch)  # [B, T, V] or [B, C]
    return loss_terms(logits, batch["labels"], label_pad(cfg.arch, cfg.pad_id), tcfg.label_smoothing)


class Trainer:
    """The JAX side of `parity.train`: a flax TrainState of `model_for(cfg)`, the dropout key and the jitted step.

    `context` (`jax_tx.distributed.setup`): the state lives sharded on its mesh (parameters and Adam moments
    over the fsdp axis) and each global batch is split by rows over all its devices; without one, a 1 x 1 mesh
    of `device`. The step is the same jitted function either way.

    `dtype` names a `PRECISIONS` entry: "float32", "float64", or "bfloat16" (mixed: float32 params and Adam
    moments, which `weights` and `export_state` return, bfloat16 compute). Decoding uses the params as stored.
    """

    framework = "jax"

    def __init__(self, cfg: TransformerConfig, tcfg: TrainConfig, weights: Mapping[str, np.ndarray] | None = None,
                 *, dtype: str = "float32", device: str = "cpu", context=None) -> None:
        if dtype == "float64" and not jax.config.jax_enable_x64:
            jax.config.update("jax_enable_x64", True)
        self.cfg, self.tcfg, self.precision = cfg, tcfg, PRECISIONS[dtype]
        self.dtype = self.precision.param_dtype
        self.context = context or distributed.single_device(device)
        self.device = self.context.mesh.devices.flat[0] if context is None else jax.local_devices()[0]
        self.model = model_for(cfg)
        init_rng, rng = jax.random.split(jax.random.key(tcfg.seed))
        if weights is None:
            params = jax.device_get(self.model.init(init_rng, *init_inputs(cfg))["params"])
        else:
            params = canonical_to_flax(weights, cfg)
        create = functools.partial(train_state.TrainState.create, apply_fn=self.model.apply,
                                   tx=make_optimizer(cfg, tcfg))
        self.shardings = self.context.shardings(jax.eval_shape(lambda p: create(params=p), self._host(params)))
        self.train_state = jax.jit(lambda p: create(params=p), out_shardings=self.shardings)(
            self.context.put(self._host(params), self.shardings.params))
        self.rng = self.context.put(jax.random.key_data(rng), self.context.replicated)
        batch, replicated = self.context.batch_sharding, self.context.replicated
        unshard = None if self.context.strategy != "fsdp" else functools.partial(
            jax.lax.with_sharding_constraint, shardings=replicated)
        compute_dtype = self.precision.compute_dtype
        self._train_step = jax.jit(functools.partial(_keyed_train_step, cfg=cfg, tcfg=tcfg, unshard=unshard,
                                                     compute_dtype=compute_dtype),
                                   in_shardings=(self.shardings, batch, replicated),
                                   out_shardings=(self.shardings, replicated), donate_argnums=0)
        self._eval_step = jax.jit(functools.partial(eval_step, cfg=cfg, tcfg=tcfg, unshard=unshard,
                                                    compute_dtype=compute_dtype),
                                  in_shardings=(self.shardings, batch), out_shardings=replicated)
        self._classify = jax.jit(lambda params, src: self.model.apply({"params": params}, src)[1].argmax(-1))

    def _host(self, tree):
        """A params-shaped tree as numpy arrays of the trainer's dtype."""
        return jax.tree_util.tree_map(lambda a: np.asarray(a, self.dtype), tree)

    def _arrays(self, batch: Batch) -> dict[str, jax.Array]:
        """The global batch, padded with empty rows to a multiple of the mesh size and split over it."""
        return self.context.put_batch(batch.pad_rows(self.context.devices).arrays())

    def _local_params(self):
        """The parameters whole on this process's first device (for decoding)."""
        if self.context.devices == 1:
            return self.train_state.params
        return jax.device_put(self.context.gather(self.train_state.params), self.device)

    def train_step(self, batch: Batch) -> dict[str, jax.Array]:
        """One update; the metrics are device scalars, not waited for (`float()` them when needed)."""
        self.train_state, terms = self._train_step(self.train_state, self._arrays(batch), self.rng)
        return terms

    def eval_step(self, batch: Batch) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(self._eval_step(self.train_state, self._arrays(batch))).items()}

    def greedy(self, src: np.ndarray, *, max_new_tokens: int, bos_id: int, eos_id: int) -> np.ndarray:
        """Greedy translations of src (seq2seq), or continuations of the prompts src (decoder): `generate`."""
        return np.asarray(generate(self.model, self._local_params(), jax.device_put(src, self.device),
                                   max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id))

    def classify(self, src: np.ndarray) -> np.ndarray:
        """The most likely class of each row of src (B, S) (encoder) -> (B,)."""
        return np.asarray(self._classify(self._local_params(), jax.device_put(src, self.device)))


    def weights(self) -> dict[str, np.ndarray]:
        return flax_to_canonical(self.context.gather(self.train_state.params), self.cfg)

    def export_state(self, step: int) -> TrainState:
        """Weights, Adam moments (canonical names, tied names repeated) after `step` updates."""
        mu, nu = (self.context.gather(optax.tree_utils.tree_get(self.train_state.opt_state, name))
                  for name in ("mu", "nu"))
        return TrainState(step=step, weights=self.weights(), exp_avg=flax_to_canonical(mu, self.cfg),
                          exp_avg_sq=flax_to_canonical(nu, self.cfg))

    def load_state(self, state: TrainState) -> None:
        """Continue exactly where `state` stopped (it may come from either framework)."""
        params = self._host(canonical_to_flax(state.weights, self.cfg))
        opt_state = optax.tree_utils.tree_set(
            self.train_state.tx.init(params), mu=self._host(canonical_to_flax(state.exp_avg, self.cfg)),
            nu=self._host(canonical_to_flax(state.exp_avg_sq, self.cfg)), count=np.asarray(state.step, np.int32))
        host = self.train_state.replace(step=np.asarray(state.step, np.int32), params=params,
                                        opt_state=jax.device_get(opt_state))
        self.train_state = self.context.put(host, self.shardings)

