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
Thread counts are the frameworks' defaults. The default batch, 128 rows of 32 tokens a side, is the
4096-token budget `twin train` batches by default.

Model FLOP/s: `train_flops` counts the matmul FLOPs of a step analytically (3 x the forward's:
projections, attention scores and values over every position, pads included, feed-forward, output
layer; embeddings, norms, softmax and the optimizer are not counted) and divides by the step time.
It is compared with this machine's matmul ceiling, measured in the same run (before and after the
training measurements): the best float32 square matmul rate of torch and of jax.jit over a few
sizes (`matmul_ceiling`). With `--compile`, torch_tx.Transformer and torch.nn.Transformer also run under
`torch.compile` (default settings), the compiled twin's ratio against the compiled peer. With
`--memory`, each eager model also trains alone in a fresh process: its peak
memory is that process's peak resident set size during 2 training steps after the warm-up, minus its
size right before the model was built (the imported frameworks excluded; the JSON also has the peak
during the warm-up, which holds XLA's compilation).

Run from the repository root:
    .venv/bin/python benchmarks/bench_train.py            # d_model 256 and 512, a few minutes
    .venv/bin/python benchmarks/bench_train.py --quick    # smoke run, well under a minute
    .venv/bin/python benchmarks/bench_train.py --d-model 512 --steps 20 --json bench_results/train.json
    .venv/bin/python benchmarks/bench_train.py --memory --compile --json bench_results/train.json  # as `twin bench`
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

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
PEERS = {"torch": "torch.nn.Transformer", "jax": "flax.linen layers"}


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
        causal = torch.ones(length, length, dtype=torch.bool, device=tgt.device).triu(1)  # [T, T] True = masked
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
        self.data = [tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (b.src, b.tgt_in, b.labels))
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


COMPILED = " + torch.compile"


def peer_of(name: str, framework: str) -> str:
    """The peer a model is compared with: the compiled peer for a compiled twin, else its framework's peer."""
    return PEERS[framework] + (COMPILED if name.endswith(COMPILED) else "")


def build_entries(cfg: TransformerConfig, batches: list[Batch], seed: int, trainers: bool = True,
                  only: str | None = None, compiled: bool = False) -> list[Entry]:
    """The models to time, built in this order (`only`: just the one of that name). `compiled` adds the torch
    twin and peer under `torch.compile` (default settings; compiled during the warm-up)."""
    torch.manual_seed(seed)
    makers = {"torch_tx trainer": ("torch", lambda: TrainerRunner(torch_train.Trainer, cfg, batches, seed)),
              "jax_tx trainer": ("jax", lambda: TrainerRunner(jax_train.Trainer, cfg, batches, seed)),
              "torch_tx.Transformer": ("torch", lambda: TorchRunner(torch_tx.Transformer(cfg), batches)),
              PEERS["torch"]: ("torch", lambda: TorchRunner(TorchPeer(cfg), batches)),
              "jax_tx.Transformer": ("jax", lambda: JaxRunner(jax_tx.Transformer(cfg), batches, seed)),
              PEERS["jax"]: ("jax", lambda: JaxRunner(FlaxPeer(cfg), batches, seed)),
              "torch_tx.Transformer" + COMPILED: ("torch", lambda: TorchRunner(
                  torch.compile(torch_tx.Transformer(cfg)), batches)),
              PEERS["torch"] + COMPILED: ("torch", lambda: TorchRunner(torch.compile(TorchPeer(cfg)), batches))}
    if only is not None and only not in makers:
        raise ValueError(f"unknown model {only!r}; one of {', '.join(makers)}")
    names = [only] if only is not None else [n for n in makers if (trainers or "trainer" not in n)
                                             and (compiled or not n.endswith(COMPILED))]
    return [Entry(n, makers[n][0], "twin" if n.startswith(("torch_tx", "jax_tx")) else "peer", makers[n][1]())
            for n in names]


def measure(entries: list[Entry], steps: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm every model up, then time `steps` steps `repeats` times, taking turns; seconds per repetition."""
    losses = {e.name: e.runner.run(warmup + 2 * e.name.endswith(COMPILED)) for e in entries}  # compile settles
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


def train_flops(cfg: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
    """Matmul FLOPs of one seq2seq training step on a (batch, src_len) / (batch, tgt_len) batch: 3 x forward.

    Forward, per encoder layer: q/k/v/out projections 8 B S D^2, scores and values 4 B S^2 D,
    feed-forward 4 B S D F; per decoder layer: self-attention 8 B T D^2 + 4 B T^2 D, cross-attention
    4 B T D^2 (q, out) + 4 B S D^2 (k, v) + 4 B T S D, feed-forward 4 B T D F; output layer 2 B T D V.
    Every position counts (pads and the causal mask's upper triangle included: the kernels compute them).
    """
    b, s, t, d, f = batch, src_len, tgt_len, cfg.d_model, cfg.d_ff
    encoder = 8 * b * s * d * d + 4 * b * s * s * d + 4 * b * s * d * f
    decoder = 8 * b * t * d * d + 4 * b * t * t * d + 4 * b * t * d * d + 4 * b * s * d * d + 4 * b * t * s * d \
        + 4 * b * t * d * f
    forward = cfg.num_encoder_layers * encoder + cfg.num_decoder_layers * decoder + 2 * b * t * d * cfg.tgt_vocab_size
    return 3.0 * forward


def matmul_ceiling(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> dict[str, float]:
    """Best float32 n x n matmul rate, GFLOP/s, of torch and of jax.jit over `sizes`: the machine's ceiling."""
    rng = np.random.default_rng(0)
    jit_matmul = jax.jit(jnp.matmul)
    best = {"torch": 0.0, "jax": 0.0}
    for n in sizes:
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))  # [n, n]
        calls = {"torch": (lambda x=torch.from_numpy(a), y=torch.from_numpy(b): x @ y),
                 "jax": (lambda x=jnp.asarray(a), y=jnp.asarray(b): jit_matmul(x, y).block_until_ready())}
        for name, call in calls.items():
            call()
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                best[name] = max(best[name], 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def with_torch_threads(threads: int | None, fn: Callable[[], Any]) -> Any:
    """fn() with torch at `threads` intra-op threads (None: torch's default), the count restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set size now (VmRSS) or its peak (VmHWM), from Linux's /proc/self/status.

    (getrusage's ru_maxrss would not do: Linux carries it over from the parent across fork and exec.)
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory(args: argparse.Namespace, d_model: int, name: str) -> dict[str, int]:
    """Peak memory of `name` training alone in a fresh process (`--peak-of`, Linux): see `report_peak_of`."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--peak-of", name, "--d-model", str(d_model),
            "--layers", str(args.layers), "--batch", str(args.batch), "--src-len", str(args.src_len),
            "--tgt-len", str(args.tgt_len), "--vocab", str(args.vocab), "--seed", str(args.seed)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"peak memory of {name} at d_model {d_model} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report_peak_of(args: argparse.Namespace) -> None:
    """The `--peak-of NAME` child: build that model alone, warm it up (JAX compiles), reset the peak (Linux
    clear_refs), train 2 steps; print as JSON the peak RSS increase over the RSS before the model was built,
    during the warm-up (`warmup_bytes`, compilation included) and during the steps (`model_bytes`)."""
    batches = make_batches(NUM_BATCHES, args.batch, args.src_len, args.tgt_len, args.vocab, args.seed)
    before = rss_bytes()
    entries = {e.name: e for e in build_entries(config_for(args, args.d_model[0]), batches, args.seed,
                                                only=args.peak_of)}
    runner = entries[args.peak_of].runner
    runner.run(args.warmup)
    warmup = rss_bytes("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    runner.run(2)
    peak = rss_bytes("VmHWM")
    print(json.dumps({"before_model_rss_bytes": before, "warmup_peak_rss_bytes": warmup, "peak_rss_bytes": peak,
                      "warmup_bytes": warmup - before, "model_bytes": peak - before}))


def config_for(args: argparse.Namespace, d_model: int) -> TransformerConfig:
    return TransformerConfig(src_vocab_size=args.vocab, tgt_vocab_size=args.vocab, d_model=d_model,
                             num_heads=max(1, d_model // 64), num_encoder_layers=args.layers,
                             num_decoder_layers=args.layers, d_ff=4 * d_model, dropout=0.1,
                             max_len=max(512, args.src_len, args.tgt_len), pad_id=PAD)


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu": cpu_model(), "jax_devices": [str(d) for d in jax.devices()],
            "ld_preload": os.environ.get("LD_PRELOAD", ""), "platform": platform.platform(),
            "load_average": os.getloadavg()}


def print_noisy(rows: list[dict[str, Any]],
                describe: Callable[[dict[str, Any]], str] = lambda r: f"{r['model']} at d_model {r['d_model']}") -> None:
    """Name the rows whose slowest repetition (`seconds`) took over NOISY x their fastest."""
    noisy = [describe(r) for r in rows if max(r["seconds"]) > NOISY * min(r["seconds"])]
    if noisy:
        print(f"noisy (slowest repetition over {NOISY:.2f}x the fastest): {', '.join(noisy)}")


def print_wall(wall: float, env: dict[str, Any]) -> None:
    print(f"wall time {wall:.1f} s, load average {env['load_average'][0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")


def settings_of(args: argparse.Namespace, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The command line's settings for a JSON report (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in leave_out}


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    headers = ["d_model", "model", "tokens/s", "ms/step", "spread", "twin/peer", "GFLOP/s", "of ceiling", "peak MB"]
    cells = [[str(r["d_model"]), r["model"], f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_step']:.1f}",
              f"{max(r['seconds']) / min(r['seconds']) - 1:.0%}",
              f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-", f"{r['gflops_per_s']:.0f}",
              f"{r['ceiling_fraction']:.0%}",
              f"{r['peak_memory']['model_bytes'] / 2**20:,.0f}" if r.get("peak_memory") else "-"] for r in rows]
    render_table(title, headers, cells, [r["d_model"] for r in rows], left=(1,), min_width=130)


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
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128: with lengths 32, the "
                        "4096-token batches of `twin train`)")
    parser.add_argument("--src-len", type=int, default=32, help="source length (default 32)")
    parser.add_argument("--tgt-len", type=int, default=32, help="target length (default 32)")
    parser.add_argument("--vocab", type=int, default=1000, help="source and target vocabulary size (default 1000)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repetition (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps, at least 1 (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions, the fastest counts (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: d_model 128, 1 layer, batch 4, lengths 16, 3 steps, 1 warm-up, 1 repetition")
    parser.add_argument("--no-trainers", action="store_true", help="leave out the `twin train` trainers")
    parser.add_argument("--compile", action="store_true", help="also torch_tx.Transformer and torch.nn.Transformer "
                        "under torch.compile (the twin's ratio then against the compiled peer)")
    parser.add_argument("--memory", action="store_true",
                        help="also the peak memory of each model, training alone in a fresh process")
    parser.add_argument("--peak-of", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write settings, environment and results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.batch, args.src_len, args.tgt_len = [128], 1, 4, 16, 16
        args.steps, args.warmup, args.repeats = 3, 1, 1
    if args.peak_of is not None and len(args.d_model) != 1:
        parser.error("--peak-of takes one --d-model")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.peak_of is not None:
        report_peak_of(args)
        return
    wall_start = time.perf_counter()
    env = environment()
    print(f"torch {env['torch']} ({env['torch_threads']} threads), jax {env['jax']}, flax {env['flax']}, "
          f"optax {env['optax']}, python {env['python']}, {env['cpu_count']} CPUs ({env['cpu']}), "
          f"jax devices {env['jax_devices']}, load average {env['load_average'][0]:.2f}"
          + (f", LD_PRELOAD={env['ld_preload']}" if env["ld_preload"] else ""))
    print(f"float32 CPU, dropout 0.1, batch {args.batch}, src {args.src_len}, tgt {args.tgt_len}, "
          f"vocab {args.vocab}, {args.layers}+{args.layers} layers; {args.warmup} warm-up steps, "
          f"best of {args.repeats} x {args.steps} steps")
    ceilings = [matmul_ceiling()]
    batches = make_batches(NUM_BATCHES, args.batch, args.src_len, args.tgt_len, args.vocab, args.seed)
    tokens = sum(batches[i % len(batches)].tokens for i in range(args.steps))
    rows: list[dict[str, Any]] = []
    for d_model in args.d_model:
        cfg = config_for(args, d_model)
        flops = train_flops(cfg, args.batch, args.src_len, args.tgt_len)
        entries = build_entries(cfg, batches, args.seed, trainers=not args.no_trainers, compiled=args.compile)
        times = measure(entries, args.steps, args.warmup, args.repeats)
        speed = {e.name: tokens / min(times[e.name]) for e in entries}
        for e in entries:
            ratio = speed[e.name] / speed[peer_of(e.name, e.framework)] if e.role == "twin" else None
            seconds = min(times[e.name]) / args.steps
            rows.append({"d_model": d_model, "num_heads": cfg.num_heads, "d_ff": cfg.d_ff, "model": e.name,
                         "framework": e.framework, "role": e.role, "tokens_per_s": speed[e.name],
                         "ms_per_step": 1000 * seconds, "ratio": ratio, "flops_per_step": flops,
                         "gflops_per_s": flops / seconds / 1e9, "seconds": times[e.name]})
        del entries
    ceilings.append(matmul_ceiling())
    ceiling = {name: max(c[name] for c in ceilings) for name in ceilings[0]}
    machine = max(ceiling.values())
    for r in rows:
        r["ceiling_fraction"] = r["gflops_per_s"] / machine
        r["own_framework_ceiling_fraction"] = r["gflops_per_s"] / ceiling[r["framework"]]
    if args.memory:
        for r in rows:
            if not r["model"].endswith(COMPILED):
                r["peak_memory"] = peak_memory(args, r["d_model"], r["model"])
    print(f"matmul ceiling (best float32 n x n, n in 1024 2048, before and after): torch {ceiling['torch']:.0f}, "
          f"jax {ceiling['jax']:.0f} GFLOP/s; the machine's: {machine:.0f} GFLOP/s")
    print_table(rows, "Training throughput (target tokens/s, higher is better; model FLOP/s of the machine's "
                      "matmul ceiling)")
    wall = time.perf_counter() - wall_start
    print_noisy(rows)
    print_wall(wall, env)
    if args.json:
        write_json(args.json, {"settings": settings_of(args), "environment": env, "tokens_per_repetition": tokens,
                               "matmul_ceiling_gflops": {**ceiling, "machine": machine, "measurements": ceilings},
                               "wall_seconds": wall, "results": rows})


if __name__ == "__main__":
    main()
