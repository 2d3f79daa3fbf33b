"""Training-step throughput of each twin against the model a user would pick instead.

Measured: target tokens per second (the non-pad labels, the tokens the loss counts) of whole
training steps, float32 on CPU, dropout 0.1 on, in one process:

- torch: `torch_tx.Transformer` vs `TorchPeer`, which is `torch.nn.Transformer(batch_first=True)`
  plus what it lacks (nn.Embedding scaled by sqrt(d_model), the sinusoidal table, dropout, an
  nn.Linear output layer), masks as nn.Transformer expects them. A step is forward, cross-entropy
  (pad ignored), backward, `torch.optim.Adam.step`, `zero_grad`.
- jax: `jax_tx.Transformer` vs `FlaxPeer`, made only of flax.linen layers (Embed,
  MultiHeadDotProductAttention with its defaults, Dense, LayerNorm, Dropout), post-LN like the
  twin, masks from `nn.make_attention_mask` / `nn.make_causal_mask`. A step is one call of the
  same jitted pure `train_step(state, batch, rng)` for both models (state donated, optax.adam,
  dropout key `fold_in(rng, step)`).

- trainers: `torch_tx.train.Trainer` and `jax_tx.train.Trainer`, the steps `twin train` runs (label
  smoothing 0.1, global-norm clipping, the warmup schedule, metrics fetched to the host every step),
  on the twins, compared with the same peers.

All six train on the same numpy batches (fixed seed, random right-padding). Warm-up steps
(JAX compilation, torch's first allocations) are not timed. Then each model runs `--steps` steps,
`--repeats` times, the models taking turns (order reversed every repetition), and the fastest
repetition counts. ratio = twin tokens/s / peer tokens/s: below 1, the twin is slower.
spread = slowest / fastest repetition - 1; a large spread, or a load average above 0 before the
run, means other processes shared the CPU (2 busy threads on 2 cores suffer badly from that).
Heads are d_model // 64 and d_ff is 4 * d_model (256: 4 heads, d_ff 1024; 512: 8 heads, 2048).
Thread counts are the frameworks' defaults.

Run from the repository root:
    .venv/bin/python benchmarks/bench_train.py            # d_model 256 and 512, a few minutes
    .venv/bin/python benchmarks/bench_train.py --quick    # smoke run, well under a minute
    .venv/bin/python benchmarks/bench_train.py --d-model 512 --steps 20 --json bench_results/train.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import linen as fnn  # noqa: E402
from flax.training import train_state  # noqa: E402
from torch import nn as tnn  # noqa: E402

import jax_tx  # noqa: E402
import jax_tx.train as jax_train  # noqa: E402
import torch_tx  # noqa: E402
import torch_tx.train as torch_train  # noqa: E402
from parity.batching import Batch as TrainBatch  # noqa: E402
from parity.config import TransformerConfig  # noqa: E402
from parity.train import TrainConfig  # noqa: E402
from parity.numerics import sinusoidal_table  # noqa: E402

PAD = 0
LEARNING_RATE = 1e-4
NUM_BATCHES = 4
NOISY = 1.25


@dataclass(frozen=True)
class Batch:
    """One teacher-forced batch: decoder input `tgt_in` and `labels` are one sequence shifted by one."""

    src: np.ndarray  # [B, S] int64
    tgt_in: np.ndarray  # [B, T] int64
    labels: np.ndarray  # [B, T] int64
    tokens: int  # non-pad labels


def make_batches(count: int, batch: int, src_len: int, tgt_len: int, vocab: int, seed: int) -> list[Batch]:
    """Random ids in [1, vocab), each row right-padded from a random length in [L // 2, L]."""
    rng = np.random.default_rng(seed)

    def padded(length: int) -> np.ndarray:
        ids = rng.integers(1, vocab, size=(batch, length))  # [B, L]
        keep = rng.integers(max(1, length // 2), length + 1, size=(batch, 1))  # [B, 1]
        return np.where(np.arange(length) < keep, ids, PAD)  # [B, L]

    batches = []
    for _ in range(count):
        src = padded(src_len)  # [B, S]
        tgt = padded(tgt_len + 1)  # [B, T + 1]
        labels = tgt[:, 1:]  # [B, T]
        batches.append(Batch(src, tgt[:, :-1], labels, int((labels != PAD).sum())))
    return batches


class TorchPeer(tnn.Module):
    """torch.nn.Transformer plus scaled embeddings, the sinusoidal table, dropout and an output layer.

    src (B, S), tgt (B, T) int ids -> logits (B, T, V).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.d_model = cfg.d_model
        self.pad_id = cfg.pad_id
        self.src_embed = tnn.Embedding(cfg.src_vocab_size, cfg.d_model)
        self.tgt_embed = tnn.Embedding(cfg.tgt_vocab_size, cfg.d_model)
        table = torch.from_numpy(sinusoidal_table(cfg.max_len, cfg.d_model)).float()  # [max_len, D]
        self.register_buffer("pe", table, persistent=False)
        self.drop = tnn.Dropout(cfg.dropout)
        self.transformer = tnn.Transformer(
            d_model=cfg.d_model, nhead=cfg.num_heads, num_encoder_layers=cfg.num_encoder_layers,
            num_decoder_layers=cfg.num_decoder_layers, dim_feedforward=cfg.d_ff, dropout=cfg.dropout,
            activation=cfg.activation, layer_norm_eps=cfg.layer_norm_eps, batch_first=True,
            norm_first=cfg.norm_first)
        self.generator = tnn.Linear(cfg.d_model, cfg.tgt_vocab_size)

    def embed(self, table: tnn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return self.drop(table(ids) * math.sqrt(self.d_model) + self.pe[: ids.shape[1]])  # [B, L, D]

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        src_pad = src == self.pad_id  # [B, S] True = pad
        tgt_pad = tgt == self.pad_id  # [B, T]
        length = tgt.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)  # [T, T] True = masked
        y = self.transformer(self.embed(self.src_embed, src), self.embed(self.tgt_embed, tgt), tgt_mask=causal,
                             src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                             memory_key_padding_mask=src_pad, tgt_is_causal=True)  # [B, T, D]
        return self.generator(y)  # [B, T, V]


def flax_attention(cfg: TransformerConfig, deterministic: bool) -> fnn.MultiHeadDotProductAttention:
    return fnn.MultiHeadDotProductAttention(num_heads=cfg.num_heads, qkv_features=cfg.d_model,
                                            dropout_rate=cfg.dropout, deterministic=deterministic)


def flax_residual(cfg: TransformerConfig, x: jnp.ndarray, h: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    """Post-LN: norm(x + dropout(h))."""
    return fnn.LayerNorm(epsilon=cfg.layer_norm_eps)(x + fnn.Dropout(cfg.dropout)(h, deterministic=deterministic))


def flax_feed_forward(cfg: TransformerConfig, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    h = fnn.Dense(cfg.d_ff)(x)  # [B, L, F]
    h = fnn.relu(h) if cfg.activation == "relu" else fnn.gelu(h, approximate=False)
    return fnn.Dense(cfg.d_model)(fnn.Dropout(cfg.dropout)(h, deterministic=deterministic))  # [B, L, D]


class FlaxPeerEncoderLayer(fnn.Module):
    """x (B, S, D), mask (B, 1, S, S) -> (B, S, D), from flax.linen layers only."""

    cfg: TransformerConfig

    @fnn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        cfg = self.cfg
        x = flax_residual(cfg, x, flax_attention(cfg, deterministic)(x, x, mask=mask), deterministic)  # [B, S, D]
        return flax_residual(cfg, x, flax_feed_forward(cfg, x, deterministic), deterministic)  # [B, S, D]


class FlaxPeerDecoderLayer(fnn.Module):
    """x (B, T, D), memory (B, S, D), self_mask (B, 1, T, T), cross_mask (B, 1, T, S) -> (B, T, D)."""

    cfg: TransformerConfig

    @fnn.compact
    def __call__(self, x: jnp.ndarray, memory: jnp.ndarray, self_mask: jnp.ndarray, cross_mask: jnp.ndarray,
                 deterministic: bool) -> jnp.ndarray:
        cfg = self.cfg
        x = flax_residual(cfg, x, flax_attention(cfg, deterministic)(x, x, mask=self_mask),
                          deterministic)  # [B, T, D]
        x = flax_residual(cfg, x, flax_attention(cfg, deterministic)(x, memory, mask=cross_mask),
                          deterministic)  # [B, T, D]
        return flax_residual(cfg, x, flax_feed_forward(cfg, x, deterministic), deterministic)  # [B, T, D]


class FlaxPeer(fnn.Module):
    """The post-LN encoder-decoder from flax.linen layers. src (B, S), tgt (B, T) -> logits (B, T, V)."""

    cfg: TransformerConfig

    @fnn.compact
    def __call__(self, src: jnp.ndarray, tgt: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        cfg = self.cfg
        src_ok = src != cfg.pad_id  # [B, S]
        tgt_ok = tgt != cfg.pad_id  # [B, T]
        enc_mask = fnn.make_attention_mask(src_ok, src_ok)  # [B, 1, S, S]
        self_mask = fnn.combine_masks(fnn.make_attention_mask(tgt_ok, tgt_ok),
                                      fnn.make_causal_mask(tgt))  # [B, 1, T, T]
        cross_mask = fnn.make_attention_mask(tgt_ok, src_ok)  # [B, 1, T, S]
        table = jnp.asarray(sinusoidal_table(cfg.max_len, cfg.d_model), jnp.float32)  # [max_len, D]

        def embed(vocab_size: int, ids: jnp.ndarray) -> jnp.ndarray:
            x = fnn.Embed(vocab_size, cfg.d_model)(ids) * math.sqrt(cfg.d_model)  # [B, L, D]
            return fnn.Dropout(cfg.dropout)(x + table[: ids.shape[1]], deterministic=deterministic)

        x = embed(cfg.src_vocab_size, src)  # [B, S, D]
        for _ in range(cfg.num_encoder_layers):
            x = FlaxPeerEncoderLayer(cfg)(x, enc_mask, deterministic)  # [B, S, D]
        memory = fnn.LayerNorm(epsilon=cfg.layer_norm_eps)(x)  # [B, S, D]
        y = embed(cfg.tgt_vocab_size, tgt)  # [B, T, D]
        for _ in range(cfg.num_decoder_layers):
            y = FlaxPeerDecoderLayer(cfg)(y, memory, self_mask, cross_mask, deterministic)  # [B, T, D]
        y = fnn.LayerNorm(epsilon=cfg.layer_norm_eps)(y)  # [B, T, D]
        return fnn.Dense(cfg.tgt_vocab_size)(y)  # [B, T, V]


class Runner(Protocol):
    def run(self, steps: int) -> float:
        """Train `steps` steps on batches 0, 1, ... (cycled), wait for the result; return the last loss."""


class TorchRunner:
    """Adam training of a torch model that maps (src, tgt_in) to logits."""

    def __init__(self, model: tnn.Module, batches: list[Batch]):
        self.model = model.train()
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        self.data = [(torch.from_numpy(b.src), torch.from_numpy(b.tgt_in), torch.from_numpy(b.labels))
                     for b in batches]

    def step(self, src: torch.Tensor, tgt_in: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(src, tgt_in)  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=PAD)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss

    def run(self, steps: int) -> float:
        loss = None
        for i in range(steps):
            loss = self.step(*self.data[i % len(self.data)])
        return loss.item()


def train_step(state: train_state.TrainState, batch: dict[str, jnp.ndarray],
               rng: jax.Array) -> tuple[train_state.TrainState, dict[str, jnp.ndarray]]:
    """One Adam step of `state.apply_fn` on `batch`, dropout keyed by fold_in(rng, step); both Flax models use it."""
    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params: Any) -> jnp.ndarray:
        logits = state.apply_fn({"params": params}, batch["src"], batch["tgt_in"], deterministic=False,
                                rngs={"dropout": dropout_rng})  # [B, T, V]
        real = batch["labels"] != PAD  # [B, T]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])  # [B, T]
        return (ce * real).sum() / jnp.maximum(real.sum(), 1)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), {"loss": loss}


jit_train_step = jax.jit(train_step, donate_argnums=0)


class JaxRunner:
    """optax.adam training of a Flax model called as model(src, tgt_in, deterministic=...), via `jit_train_step`."""

    def __init__(self, model: fnn.Module, batches: list[Batch], seed: int):
        self.data = [jax.device_put({"src": b.src.astype(np.int32), "tgt_in": b.tgt_in.astype(np.int32),
                                     "labels": b.labels.astype(np.int32)}) for b in batches]
        first = self.data[0]
        params = model.init(jax.random.key(seed), first["src"], first["tgt_in"])["params"]
        self.state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                                   tx=optax.adam(LEARNING_RATE))
        self.rng = jax.random.key(seed + 1)

    def run(self, steps: int) -> float:
        metrics = None
        for i in range(steps):
            self.state, metrics = jit_train_step(self.state, self.data[i % len(self.data)], self.rng)
        jax.block_until_ready(self.state)
        return float(metrics["loss"])


class TrainerRunner:
    """A `twin train` trainer (torch_tx.train.Trainer or jax_tx.train.Trainer) stepping through the batches."""

    def __init__(self, trainer_class: type, cfg: TransformerConfig, batches: list[Batch], seed: int):
        self.trainer = trainer_class(cfg, TrainConfig(seed=seed))
        self.data = [TrainBatch(b.src.astype(np.int32), b.tgt_in.astype(np.int32), b.labels.astype(np.int32),
                                pad_id=PAD) for b in batches]

    def run(self, steps: int) -> float:
        metrics = None
        for i in range(steps):
            metrics = self.trainer.train_step(self.data[i % len(self.data)])
        return float(metrics["loss"]) / float(metrics["tokens"])


@dataclass(frozen=True)
class Entry:
    name: str
    framework: str
    role: str
    runner: Runner


def build_entries(cfg: TransformerConfig, batches: list[Batch], seed: int, trainers: bool = True) -> list[Entry]:
    torch.manual_seed(seed)
    extra = [Entry("torch_tx trainer", "torch", "twin", TrainerRunner(torch_train.Trainer, cfg, batches, seed)),
             Entry("jax_tx trainer", "jax", "twin", TrainerRunner(jax_train.Trainer, cfg, batches, seed))]
    return (extra if trainers else []) + [
        Entry("torch_tx.Transformer", "torch", "twin", TorchRunner(torch_tx.Transformer(cfg), batches)),
        Entry("torch.nn.Transformer", "torch", "peer", TorchRunner(TorchPeer(cfg), batches)),
        Entry("jax_tx.Transformer", "jax", "twin", JaxRunner(jax_tx.Transformer(cfg), batches, seed)),
        Entry("flax.linen layers", "jax", "peer", JaxRunner(FlaxPeer(cfg), batches, seed)),
    ]


def measure(entries: list[Entry], steps: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm every model up, then time `steps` steps `repeats` times, taking turns; seconds per repetition."""
    losses = {e.name: e.runner.run(warmup) for e in entries}
    bad = [name for name, loss in losses.items() if not math.isfinite(loss)]
    if bad:
        raise RuntimeError(f"non-finite loss after warm-up: {', '.join(bad)}")
    times: dict[str, list[float]] = {e.name: [] for e in entries}
    for rep in range(repeats):
        for entry in entries if rep % 2 == 0 else entries[::-1]:
            start = time.perf_counter()
            entry.runner.run(steps)
            times[entry.name].append(time.perf_counter() - start)
    return times


def config_for(args: argparse.Namespace, d_model: int) -> TransformerConfig:
    return TransformerConfig(src_vocab_size=args.vocab, tgt_vocab_size=args.vocab, d_model=d_model,
                             num_heads=max(1, d_model // 64), num_encoder_layers=args.layers,
                             num_decoder_layers=args.layers, d_ff=4 * d_model, dropout=0.1,
                             max_len=max(512, args.src_len, args.tgt_len), pad_id=PAD)


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "jax_devices": [str(d) for d in jax.devices()],
            "platform": platform.platform(), "load_average": os.getloadavg()}


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    headers = ["d_model", "model", "tokens/s", "ms/step", "spread", "twin/peer"]
    cells = [[str(r["d_model"]), r["model"], f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_step']:.1f}",
              f"{max(r['seconds']) / min(r['seconds']) - 1:.0%}",
              f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"] for r in rows]
    render_table(title, headers, cells, [r["d_model"] for r in rows], left=(1,))


def render_table(title: str, headers: list[str], cells: list[list[str]], sections: list[Any],
                 left: tuple[int, ...], min_width: int = 0) -> None:
    """A rich table (plain text without rich): columns in `left` left-aligned, a rule where `sections` changes."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        print(title)
        for line in [headers, ["-" * w for w in widths], *cells]:
            print("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        return
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i in left else "right", no_wrap=True)
    for i, line in enumerate(cells):
        table.add_row(*line, end_section=i + 1 < len(cells) and sections[i + 1] != sections[i])
    Console(width=max(min_width, Console().width)).print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, nargs="+", default=[256, 512], help="d_model values (default 256 512)")
    parser.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each (default 2)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--src-len", type=int, default=32, help="source length (default 32)")
    parser.add_argument("--tgt-len", type=int, default=32, help="target length (default 32)")
    parser.add_argument("--vocab", type=int, default=1000, help="source and target vocabulary size (default 1000)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per repetition (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps, at least 1 (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions, the fastest counts (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: d_model 128, 1 layer, batch 4, lengths 16, 3 steps, 1 warm-up, 1 repetition")
    parser.add_argument("--no-trainers", action="store_true", help="leave out the `twin train` trainers")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write settings, environment and results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.batch, args.src_len, args.tgt_len = [128], 1, 4, 16, 16
        args.steps, args.warmup, args.repeats = 3, 1, 1
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    env = environment()
    print(f"torch {env['torch']} ({env['torch_threads']} threads), jax {env['jax']}, flax {env['flax']}, "
          f"optax {env['optax']}, python {env['python']}, {env['cpu_count']} CPUs, jax devices {env['jax_devices']}, "
          f"load average {env['load_average'][0]:.2f}")
    print(f"float32 CPU, dropout 0.1, batch {args.batch}, src {args.src_len}, tgt {args.tgt_len}, "
          f"vocab {args.vocab}, {args.layers}+{args.layers} layers; {args.warmup} warm-up steps, "
          f"best of {args.repeats} x {args.steps} steps")
    batches = make_batches(NUM_BATCHES, args.batch, args.src_len, args.tgt_len, args.vocab, args.seed)
    tokens = sum(batches[i % len(batches)].tokens for i in range(args.steps))
    rows: list[dict[str, Any]] = []
    for d_model in args.d_model:
        cfg = config_for(args, d_model)
        entries = build_entries(cfg, batches, args.seed, trainers=not args.no_trainers)
        times = measure(entries, args.steps, args.warmup, args.repeats)
        speed = {e.name: tokens / min(times[e.name]) for e in entries}
        peers = {e.framework: e.name for e in entries if e.role == "peer"}
        for e in entries:
            ratio = speed[e.name] / speed[peers[e.framework]] if e.role == "twin" else None
            rows.append({"d_model": d_model, "num_heads": cfg.num_heads, "d_ff": cfg.d_ff, "model": e.name,
                         "framework": e.framework, "role": e.role, "tokens_per_s": speed[e.name],
                         "ms_per_step": 1000 * min(times[e.name]) / args.steps, "ratio": ratio,
                         "seconds": times[e.name]})
    print_table(rows, "Training throughput (target tokens/s, higher is better)")
    wall = time.perf_counter() - wall_start
    noisy = [f"{r['model']} at d_model {r['d_model']}" for r in rows
             if max(r["seconds"]) > NOISY * min(r["seconds"])]
    if noisy:
        print(f"noisy (slowest repetition over {NOISY:.2f}x the fastest): {', '.join(noisy)}")
    print(f"wall time {wall:.1f} s, load average {env['load_average'][0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        report = {"settings": settings, "environment": env, "tokens_per_repetition": tokens,
                  "wall_seconds": wall, "results": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
