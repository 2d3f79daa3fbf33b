"""Training the torch twin: label-smoothed loss, Adam with the paper's schedule, one step, for each arch.

Mirrors `jax_tx/train.py` name for name. The model is `model_for(cfg)`: the seq2seq Transformer and the
decoder-only LM score next tokens, the encoder-only classifier scores classes. The loop around it (data,
logging, checkpoints) is `parity.train`, shared by both frameworks. State goes in and out in canonical
names (numpy), so a run can resume in the other framework.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from parity.batching import PACKING, Batch, label_pad
from parity.config import TransformerConfig
from parity.convert import to_numpy, to_torch
from parity.train import TrainConfig, TrainState, learning_rate
from torch_tx.decoding import generate
from torch_tx.model import model_for

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def loss_terms(logits: torch.Tensor, labels: torch.Tensor, pad_id: int, smoothing: float) -> dict[str, torch.Tensor]:
    """Sums over the labels that are not `pad_id`: smoothed loss, nll, correct argmax, label count (scalars).

    logits (..., V) next-token or class scores, labels (...) their ids (pad_id: skipped; it may be out of
    range, like NO_CLASS). Smoothed loss per label = (1 - smoothing) * nll + smoothing * mean over the
    vocabulary of -log p, as `F.cross_entropy(label_smoothing=...)` and `optax.smooth_labels` define it; computed from
    logsumexp without materializing log p: -log p_i = lse - logit_i.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # [B, T, V]
    lse = torch.logsumexp(logits, -1)  # [B, T]
    mask = labels != pad_id  # [B, T]
    nll = lse - logits.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)  # [B, T]
    loss = (1.0 - smoothing) * nll + smoothing * (lse - logits.mean(-1))  # [B, T]
    return {"loss": (loss * mask).sum(), "nll": (nll * mask).sum(),
            "correct": ((logits.argmax(-1) == labels) & mask).sum(), "tokens": mask.sum()}


def logits_of(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """What the loss scores: next-token logits (B, T, V) of the seq2seq model (src, tgt_in) or the decoder
    (tgt_in), or the encoder's class logits (B, C), packed (B, S, C). Packed batches pass their segments
    and positions on."""
    packed = {name: batch[name] for name in PACKING if name in batch}
    if model.cfg.arch == "encoder":
        return model(batch["src"], **packed)[1]  # [B, C] or [B, S, C]
    if model.cfg.arch == "decoder":
        return model(batch["tgt_in"], **packed)  # [B, T, V]
    return model(batch["src"], batch["tgt_in"], **packed)  # [B, T, V]


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
    difference that Adam carries into every later step.)
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if norm >= max_norm:
        for g in grads:
            g.div_(norm).mul_(max_norm)
    return norm


def train_step(model: torch.nn.Module, optimizer: torch.optim.Adam, schedule, batch: Mapping[str, torch.Tensor],
               tcfg: TrainConfig) -> dict[str, torch.Tensor]:
    """One update on `batch` (the arrays of a `Batch`); returns the loss sums, grad norm and the lr used."""
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    logits = logits_of(model, batch)  # [B, T, V] or [B, C]
    terms = loss_terms(logits, batch["labels"], label_pad(model.cfg.arch, model.cfg.pad_id), tcfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    (terms["loss"] / terms["tokens"].clamp(min=1)).backward()
    terms["grad_norm"] = clip_by_global_norm_(model.parameters(), tcfg.clip_norm)
    optimizer.step()
    schedule.step()
    terms["lr"] = torch.tensor(lr)
    return terms


@torch.no_grad()
def eval_step(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], tcfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Loss sums of `batch` without dropout or update."""
    model.eval()
    logits = logits_of(model, batch)  # [B, T, V] or [B, C]
    return loss_terms(logits, batch["labels"], label_pad(model.cfg.arch, model.cfg.pad_id), tcfg.label_smoothing)


class Trainer:
    """The torch side of `parity.train`: model (`model_for(cfg)`), optimizer, schedule and dropout RNG on one device."""

    framework = "torch"

    def __init__(self, cfg: TransformerConfig, tcfg: TrainConfig, weights: Mapping[str, np.ndarray] | None = None,
                 *, dtype: str = "float32", device: str = "cpu", context=None) -> None:
        self.cfg, self.tcfg, self.device = cfg, tcfg, torch.device(device)
        torch.manual_seed(tcfg.seed)
        self.model = model_for(cfg).to(self.device, DTYPES[dtype])
        if weights is not None:
            self.model.load_state_dict({k: to_torch(np.asarray(v)) for k, v in weights.items()})
        self.optimizer, self.schedule = make_optimizer(self.model, tcfg)

    def _tensors(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(array).to(self.device, torch.long) for name, array in batch.arrays().items()}

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One update; the metrics are scalar tensors (`float()` them when needed)."""
        terms = train_step(self.model, self.optimizer, self.schedule, self._tensors(batch), self.tcfg)
        return {k: v.detach() for k, v in terms.items()}

    def eval_step(self, batch: Batch) -> dict[str, float]:
        return {k: float(v) for k, v in eval_step(self.model, self._tensors(batch), self.tcfg).items()}

    def greedy(self, src: np.ndarray, *, max_new_tokens: int, bos_id: int, eos_id: int) -> np.ndarray:
        """Greedy translations of src (seq2seq), or continuations of the prompts src (decoder): `generate`."""
        src_t = torch.from_numpy(src).to(self.device, torch.long)
        return generate(self.model, src_t, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id).cpu().numpy()

    @torch.no_grad()
    def classify(self, src: np.ndarray) -> np.ndarray:
        """The most likely class of each row of src (B, S) (encoder) -> (B,)."""
        self.model.eval()
        return self.model(torch.from_numpy(src).to(self.device, torch.long))[1].argmax(-1).cpu().numpy()  # [B]


    def weights(self) -> dict[str, np.ndarray]:
        return {k: to_numpy(v) for k, v in self.model.state_dict().items()}

    def export_state(self, step: int) -> TrainState:
        """Weights, Adam moments (canonical names, tied names repeated) and the dropout RNG after `step` updates."""
        names = dict(self.model.named_parameters(remove_duplicate=False))
        weights = self.weights()
        moments = {"exp_avg": {}, "exp_avg_sq": {}}
        for key in weights:
            slot = self.optimizer.state.get(names[key], {})
            for moment, arrays in moments.items():
                arrays[key] = to_numpy(slot[moment]) if moment in slot else np.zeros_like(weights[key])
        return TrainState(step=step, weights=weights, exp_avg=moments["exp_avg"],
                          exp_avg_sq=moments["exp_avg_sq"], rng={"torch": torch.get_rng_state().numpy()})

    def load_state(self, state: TrainState) -> None:
        """Continue exactly where `state` stopped (it may come from either framework)."""
        dtype = next(self.model.parameters()).dtype
        self.model.load_state_dict({k: to_torch(v) for k, v in state.weights.items()})
        names = dict(self.model.named_parameters(remove_duplicate=False))
        self.optimizer.state.clear()
        if state.step:
            for key, param in names.items():
                self.optimizer.state[param] = {
                    "step": torch.tensor(float(state.step)),
                    "exp_avg": to_torch(state.exp_avg[key]).to(self.device, dtype),
                    "exp_avg_sq": to_torch(state.exp_avg_sq[key]).to(self.device, dtype)}
        self.schedule = restart_schedule(self.schedule, state.step)
        if "torch" in state.rng:
            torch.set_rng_state(torch.from_numpy(state.rng["torch"]))
