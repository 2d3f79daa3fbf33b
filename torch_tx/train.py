"""Training the torch twin: label-smoothed loss, Adam with the paper's schedule, one step, for each arch.

Mirrors `jax_tx/train.py` name for name. The model is `model_for(cfg)`: the seq2seq Transformer and the
decoder-only LM score next tokens, the encoder-only classifier scores classes. The loop around it (data,
logging, checkpoints) is `parity.train`, shared by both frameworks. State goes in and out in canonical
names (numpy), so a run can resume in the other framework.

Under torchrun (`torch_tx.distributed.Context`: DDP, or FSDP2 with --fsdp) every process takes its share of
the rows of each global batch, scales its loss sum so that the averaged gradient is the one of the whole
batch, and gets the global sums back: the step is the single-process step of the same global batch.

Precision (`PRECISIONS`, by the trainer's dtype name): float32 or float64 throughout, or "bfloat16", mixed
precision: float32 master weights and Adam moments, the forward pass under `torch.autocast(bfloat16)`
(matmuls in bfloat16, and so their backward; embedding lookups, layer norms, the residual stream and the loss
sums in float32). `compile=True` runs the training steps through `torch.compile` of the model (the stored
module and its state dict keep their canonical names).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from parity.batching import PACKING, Batch, label_pad
from parity.config import TransformerConfig
from parity.convert import to_numpy, to_torch
from parity.train import TrainConfig, TrainState, learning_rate
from torch_tx.decoding import generate
from torch_tx.distributed import Context, laid_out_like, whole
from torch_tx.embeddings import ids_checked
from torch_tx.model import model_for

SUMS = ("loss", "nll", "correct", "tokens")
PROCESS_RNG = "torch_processes"


@dataclass(frozen=True)
class Precision:
    """Weights, gradients and Adam moments in `param_dtype`; the passes computed in `compute_dtype` (None: in
    param_dtype; else the matmuls, under `autocast`). Loss sums come out in at least float32 (`loss_terms`)."""

    param_dtype: torch.dtype
    compute_dtype: torch.dtype | None = None


PRECISIONS = {"float32": Precision(torch.float32), "float64": Precision(torch.float64),
              "bfloat16": Precision(torch.float32, torch.bfloat16)}


def loss_terms(logits: torch.Tensor, labels: torch.Tensor, pad_id: int, smoothing: float) -> dict[str, torch.Tensor]:
    """Sums over the labels that are not `pad_id`: smoothed loss, nll, correct argmax, label count (scalars).

    logits (..., V) next-token or class scores, labels (...) their ids (pad_id: skipped; it may be out of
    range, like NO_CLASS). Smoothed loss per label = (1 - smoothing) * nll + smoothing * mean over the
    vocabulary of -log p, as `F.cross_entropy(label_smoothing=...)` and `optax.smooth_labels` define it; computed from
    logsumexp without materializing log p: -log p_i = lse - logit_i. The loss sum's gradient is `SmoothedLoss`'s
    one pass over the logits.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # [B, T, V]
    mask = labels != pad_id  # [B, T]
    labels = torch.where(mask, labels, 0)  # [B, T]
    loss, nll = SmoothedLoss.apply(logits, labels, mask, smoothing)  # scalars
    return {"loss": loss, "nll": nll, "correct": ((logits.detach().argmax(-1) == labels) & mask).sum(),
            "tokens": mask.sum()}


class SmoothedLoss(torch.autograd.Function):
    """(logits (..., V), labels (...) in range, mask (...) bool, smoothing) -> the sums over the masked-in labels
    of the smoothed loss and of the nll (scalars; only the first has a gradient).

    Autograd through logsumexp, gather and mean would make three (..., V) gradients and add them; the backward
    here writes the one gradient in place: g * mask * (softmax(logits) - (1 - smoothing) onehot - smoothing / V).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        lse = torch.logsumexp(logits, -1)  # [...]
        nll = lse - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [...]
        loss = (1.0 - smoothing) * nll + smoothing * (lse - logits.mean(-1))  # [...]
        ctx.save_for_backward(logits, labels, mask, lse)
        ctx.smoothing = smoothing
        ctx.mark_non_differentiable(nll)
        return (loss * mask).sum(), (nll * mask).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_nll: torch.Tensor):
        logits, labels, mask, lse = ctx.saved_tensors
        grad = (logits - lse.unsqueeze(-1)).exp_()  # [..., V]: softmax
        if ctx.smoothing:
            grad.sub_(ctx.smoothing / logits.shape[-1])
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad.new_full((*labels.shape, 1), ctx.smoothing - 1.0))
        grad.mul_((grad_loss * mask).unsqueeze(-1))  # [..., V]
        return grad, None, None, None


def global_sums(terms: Mapping[str, torch.Tensor], context: Context | None) -> dict[str, torch.Tensor]:
    """The loss sums of `terms` (this process's rows) summed over the processes in one all_reduce; `terms`
    itself without a context."""
    if context is None:
        return dict(terms)
    total = context.all_sum(torch.stack([terms[k].detach().to(torch.float64) for k in SUMS]))  # [4]
    return {k: total[i].to(terms[k].dtype) for i, k in enumerate(SUMS)}


def logits_of(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], arch: str) -> torch.Tensor:
    """What the loss scores: next-token logits (B, T, V) of the seq2seq model (src, tgt_in) or the decoder
    (tgt_in), or the encoder's class logits (B, C), packed (B, S, C). Packed batches pass their segments
    and positions on. `model` may be a DDP wrapper (hence `arch` is passed, as in the JAX twin)."""
    packed = {name: batch[name] for name in PACKING if name in batch}
    if arch == "encoder":
        return model(batch["src"], **packed)[1]  # [B, C] or [B, S, C]
    if arch == "decoder":
        return model(batch["tgt_in"], **packed)  # [B, T, V]
    return model(batch["src"], batch["tgt_in"], **packed)  # [B, T, V]


def autocast(compute_dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.autocast` to `compute_dtype` on `device`'s type: matmuls in it, embedding lookups, layer norms and
    the residual stream in the weights' dtype (which stay as they are); nothing when None."""
    if compute_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype)


def make_optimizer(model: torch.nn.Module,
                   tcfg: TrainConfig) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam(betas, eps) driven by `LambdaLR` with the warmup + inverse-square-root schedule (base lr 1)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=tcfg.betas, eps=tcfg.adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, d_model=model.cfg.d_model, tcfg=tcfg))
    return optimizer, schedule


def restart_schedule(schedule: torch.optim.lr_scheduler.LambdaLR, step: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The same schedule positioned so that the next update is number `step` (0-based)."""
    return torch.optim.lr_scheduler.LambdaLR(schedule.optimizer, schedule.lr_lambdas[0], last_epoch=step - 1)


def clip_by_global_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Scale all gradients by max_norm / norm when their global norm exceeds max_norm; return the norm.

    `optax.clip_by_global_norm`'s rule. (`clip_grad_norm_` divides by norm + 1e-6, a 1e-6 relative
    difference that Adam carries into every later step.) FSDP2's gradients are DTensor shards: their norm
    comes back as a replicated DTensor, made a plain tensor here (the same on every process).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = whole(torch.nn.utils.get_total_norm(grads))
    if norm >= max_norm:
        for g in grads:
            g.div_(norm).mul_(max_norm)
    return norm


def train_step(model: torch.nn.Module, optimizer: torch.optim.Adam, schedule, batch: Mapping[str, torch.Tensor], *,
               cfg: TransformerConfig, tcfg: TrainConfig, context: Context | None = None,
               compute_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One update on `batch` (the arrays of a `Batch`); returns the loss sums, grad norm and the lr used.

    `compute_dtype` (mixed precision): the forward pass and the loss run under autocast to it and the backward
    pass follows; the gradients land in the weights' dtype, where clipping and Adam run.

    With `context`, `batch` is this process's share of the global batch and `model` its DDP wrapper or
    FSDP2-sharded model, which average the gradients over the processes: each process's loss sum is divided
    by the global label count and multiplied by the number of processes, so that the average is the gradient
    of the global mean. The returned sums are the global ones, the same on every process.
    """
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    with autocast(compute_dtype, batch["labels"].device):
        logits = logits_of(model, batch, cfg.arch)  # [B, T, V] or [B, C]
        terms = loss_terms(logits, batch["labels"], label_pad(cfg.arch, cfg.pad_id), tcfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if context is None:
        (terms["loss"] / terms["tokens"].clamp(min=1)).backward()
    else:
        total = global_sums(terms, context)
        (terms["loss"] * context.devices / total["tokens"].clamp(min=1)).backward()
        terms = total
    terms["grad_norm"] = clip_by_global_norm_(model.parameters(), tcfg.clip_norm)
    optimizer.step()
    schedule.step()
    terms["lr"] = torch.tensor(lr)
    return terms


@torch.no_grad()
def eval_step(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *, cfg: TransformerConfig,
              tcfg: TrainConfig, context: Context | None = None,
              compute_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Loss sums of `batch` without dropout or update (computed in `compute_dtype`, as in `train_step`); with
    `context`, of the global batch whose share this process holds."""
    model.eval()
    with autocast(compute_dtype, batch["labels"].device):
        logits = logits_of(model, batch, cfg.arch)  # [B, T, V] or [B, C]
        terms = loss_terms(logits, batch["labels"], label_pad(cfg.arch, cfg.pad_id), tcfg.label_smoothing)
    return global_sums(terms, context)


def check_ids(arrays: Mapping[str, np.ndarray], cfg: TransformerConfig) -> None:
    """The embeddings' range checks of a batch's ids and positions (`check_index_range`'s messages), on the host."""
    bounds = {"src": (cfg.src_vocab_size, "token ids", str(cfg.src_vocab_size)),
              "tgt_in": (cfg.tgt_vocab_size, "token ids", str(cfg.tgt_vocab_size)),
              "src_positions": (cfg.max_len, "positions", f"max_len={cfg.max_len}"),
              "tgt_positions": (cfg.max_len, "positions", f"max_len={cfg.max_len}")}
    for name, (size, what, bound) in bounds.items():
        values = arrays.get(name)
        if values is not None and values.size and (values.min() < 0 or values.max() >= size):
            raise ValueError(f"{what} must be in [0, {bound}), got values in [{values.min()}, {values.max()}]")


def process_seed(seed: int, rank: int, step: int) -> int:
    """The dropout seed of process `rank` of a distributed run from update `step` on: its own stream, so that
    the processes draw different masks."""
    return int(np.random.SeedSequence([seed % 2 ** 64, rank, step]).generate_state(1, np.uint64)[0] % 2 ** 63)


class Trainer:
    """The torch side of `parity.train`: model (`model_for(cfg)`), optimizer, schedule and dropout RNG.

    One process on `device`, or with `context` (`torch_tx.distributed.setup`) one torchrun process of many,
    on `context.device`. Every process builds the same model from tcfg.seed; DDP wraps it, FSDP2 shards it
    in place. `model` is the module either way (its cfg, its canonical state dict; FSDP2: DTensor shards),
    `step_model` what the training step calls (the DDP wrapper, else `model`; with `compile`, `torch.compile` of
    that, which compiles the forward and backward passes on the first step and on new batch shapes; evaluation
    and decoding stay eager). Process 0 goes on drawing dropout masks from the stream of tcfg.seed (a one-process
    run is the single-process run); process r > 0 reseeds with `process_seed(seed, r, 0)`.

    `dtype` names a `PRECISIONS` entry: "float32", "float64", or "bfloat16" (mixed: float32 weights and Adam
    moments, which `weights` and `export_state` return, bfloat16 compute).
    """

    framework = "torch"

    def __init__(self, cfg: TransformerConfig, tcfg: TrainConfig, weights: Mapping[str, np.ndarray] | None = None,
                 *, dtype: str = "float32", device: str = "cpu", context: Context | None = None,
                 compile: bool = False) -> None:
        self.cfg, self.tcfg, self.context, self.precision = cfg, tcfg, context, PRECISIONS[dtype]
        self.dtype = self.precision.param_dtype
        self.device = torch.device(device) if context is None else context.device
        torch.manual_seed(tcfg.seed)
        self.model = model_for(cfg).to(self.device, self.dtype)
        if weights is not None:
            self.model.load_state_dict({k: to_torch(np.asarray(v)) for k, v in weights.items()})
        self.step_model = self.model if context is None else context.wrap(self.model)
        if compile:
            self.step_model = torch.compile(self.step_model)
        if context is not None and context.rank:
            torch.manual_seed(process_seed(tcfg.seed, context.rank, 0))
        self.optimizer, self.schedule = make_optimizer(self.model, tcfg)
        self.params = dict(self.model.named_parameters(remove_duplicate=False))  # canonical name -> parameter
        self._replica: torch.nn.Module | None = None

    def _tensors(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The arrays of `batch` as tensors on the device; with a context, this process's share of its rows. Their
        ids and positions are range-checked here, on the host, so that the step runs in `ids_checked`."""
        check_ids(batch.arrays(), self.cfg)
        if self.context is not None:
            batch = batch.pad_rows(self.context.devices).part(self.context.rank, self.context.devices)
        return {name: torch.from_numpy(array).to(self.device, torch.long) for name, array in batch.arrays().items()}

    def _whole_model(self) -> torch.nn.Module:
        """The model with all its weights on this process, for decoding: `model`, but under FSDP2 an unsharded
        replica of the gathered weights (collective: every process decodes the same input; rebuilt after an
        update). Building it leaves the dropout stream alone."""
        if self.context is None or self.context.strategy != "fsdp":
            return self.model
        if self._replica is None:
            with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
                replica = model_for(self.cfg).to(self.device, self.dtype)
            replica.load_state_dict({k: whole(v) for k, v in self.model.state_dict().items()})
            self._replica = replica.eval()
        return self._replica

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One update of the global `batch`; the metrics are scalar tensors (`float()` them when needed), global
        sums on every process."""
        self._replica = None
        tensors = self._tensors(batch)
        with ids_checked():
            terms = train_step(self.step_model, self.optimizer, self.schedule, tensors, cfg=self.cfg,
                               tcfg=self.tcfg, context=self.context, compute_dtype=self.precision.compute_dtype)
        return {k: v.detach() for k, v in terms.items()}

    def eval_step(self, batch: Batch) -> dict[str, float]:
        """Loss sums of the global `batch` (every process gets them)."""
        tensors = self._tensors(batch)
        with ids_checked():
            terms = eval_step(self.model, tensors, cfg=self.cfg, tcfg=self.tcfg, context=self.context,
                              compute_dtype=self.precision.compute_dtype)
        return {k: float(v) for k, v in terms.items()}

    def greedy(self, src: np.ndarray, *, max_new_tokens: int, bos_id: int, eos_id: int) -> np.ndarray:
        """Greedy translations of src (seq2seq), or continuations of the prompts src (decoder): `generate`."""
        src_t = torch.from_numpy(src).to(self.device, torch.long)
        return generate(self._whole_model(), src_t, max_new_tokens=max_new_tokens, bos_id=bos_id,
                        eos_id=eos_id).cpu().numpy()

    @torch.no_grad()
    def classify(self, src: np.ndarray) -> np.ndarray:
        """The most likely class of each row of src (B, S) (encoder) -> (B,)."""
        model = self._whole_model().eval()
        return model(torch.from_numpy(src).to(self.device, torch.long))[1].argmax(-1).cpu().numpy()  # [B]

    def weights(self) -> dict[str, np.ndarray]:
        """A copy of the weights in canonical names, whole (FSDP2: gathered; every process must call this). A copy:
        on CPU `.cpu()` returns the parameter itself, whose numpy view the next step would rewrite."""
        return {k: to_numpy(whole(v)).copy() for k, v in self.model.state_dict().items()}

    def export_state(self, step: int) -> TrainState:
        """Weights, Adam moments (canonical names, tied names repeated) and the dropout RNG after `step` updates.

        Collective under a context: the shards are gathered on every process. rng["torch"] is this process's
        stream; a distributed run adds rng["torch_processes"], every process's stream (P, N) by rank.
        """
        weights = self.weights()
        moments = {"exp_avg": {}, "exp_avg_sq": {}}
        for key in weights:
            slot = self.optimizer.state.get(self.params[key], {})
            for moment, arrays in moments.items():
                arrays[key] = to_numpy(whole(slot[moment])).copy() if moment in slot else np.zeros_like(weights[key])
        rng = {"torch": torch.get_rng_state().numpy()}
        if self.context is not None:
            rng[PROCESS_RNG] = self.context.all_gather(torch.get_rng_state()).numpy()  # [P, N]
        return TrainState(step=step, weights=weights, exp_avg=moments["exp_avg"],
                          exp_avg_sq=moments["exp_avg_sq"], rng=rng)

    def load_state(self, state: TrainState) -> None:
        """Continue exactly where `state` stopped (it may come from either framework, one process or many).

        Weights, Adam moments and the schedule are restored whole (FSDP2: process 0's copy split over the
        processes). The dropout RNG: process r takes up the stream saved for rank r (rng["torch_processes"]),
        else process 0 that of a single-process run (rng["torch"]), else a fresh `process_seed(seed, r, step)`
        (a JAX checkpoint, or more processes than the run had): with dropout on, such a resumed run is exact
        in everything but which masks it draws.
        """
        self._replica = None
        template = self.model.state_dict()
        self.model.load_state_dict({k: laid_out_like(to_torch(np.asarray(v)), template[k]) if k in template
                                    else to_torch(np.asarray(v)) for k, v in sorted(state.weights.items())})
        self.optimizer.state.clear()
        if state.step:
            for key in sorted(self.params):
                param = self.params[key]
                self.optimizer.state[param] = {
                    "step": torch.tensor(float(state.step)),
                    "exp_avg": laid_out_like(to_torch(state.exp_avg[key]), param),
                    "exp_avg_sq": laid_out_like(to_torch(state.exp_avg_sq[key]), param)}
        self.schedule = restart_schedule(self.schedule, state.step)
        self._restore_rng(state)

    def _restore_rng(self, state: TrainState) -> None:
        rank = 0 if self.context is None else self.context.rank
        streams = state.rng.get(PROCESS_RNG)
        if self.context is not None and streams is not None and rank < len(streams):
            torch.set_rng_state(torch.from_numpy(np.ascontiguousarray(streams[rank])))
        elif rank == 0 and "torch" in state.rng:
            torch.set_rng_state(torch.from_numpy(state.rng["torch"]))
        elif rank:
            torch.manual_seed(process_seed(self.tcfg.seed, rank, state.step))
