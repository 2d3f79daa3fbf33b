"""The training run both frameworks share: data, tokenizer, batches, logging, checkpoints, resume.

Three model families (`--arch`): the seq2seq Transformer (translation: test exact match), the encoder
with a classification head (test accuracy against chance) and the decoder-only language model (test
perplexity, greedy continuations of held-out prompts). The framework-specific part is a `Trainer` from
`torch_tx.train` or `jax_tx.train` (the same methods in both); everything here is numpy and files. A
run directory holds:

    config.json, model.safetensors    the latest weights (canonical names of cfg.arch; num_classes in
                                      the config), for translate/eval/parity
    tokenizer.json                    the joint BPE tokenizer
    train_config.json                 TrainConfig, framework, arch, data, tokenizer kind, class names, padding shares
    metrics.jsonl                     one JSON record per log/eval interval
    loss.png                          train and validation loss curves
    checkpoints/step_0000500/         model.safetensors, optimizer.safetensors (Adam moments in
                                      canonical names, RNG state), trainer_state.json (step, data
                                      position, fingerprints); the last `keep` are kept

Checkpoint directories appear whole (written under a temporary name, fsynced, renamed); every other
file is replaced atomically, and metrics.jsonl is appended a whole record or none. A write that fails
(a full disk, a read-only file system) stops the run with one line naming the file and the last good
checkpoint, which `--resume` continues from; nothing half-written is left behind. Adam moments are
stored in canonical layout, so a run saved by one framework resumes in the other.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from parity.batching import Batcher, Position
from parity.checkpoint import (CONFIG_FILE, CheckpointError, WriteError, _umask, append_bytes, atomic_write_bytes,
                               json_type, load_checkpoint, load_config, load_model_dir, parse_json, read_bytes,
                               read_json, renamed, save_checkpoint, temp_prefix, writing)
from parity.config import ARCHS, DictFields, TransformerConfig, is_number
from parity.convert import ConversionError, check_canonical
from parity.data import Corpus, DataError, Example, load_corpus
from parity.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError, load_any, train_tokenizer

FRAMEWORKS = ("torch", "jax")
CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
MOMENTS = ("exp_avg", "exp_avg_sq")
BUCKET_SIDES = ("shared", "separate")

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=64, max_len=64),
    "small": dict(d_model=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, d_ff=512, max_len=128),
    "base": dict(d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, d_ff=2048, max_len=256),
    # Hugging Face Marian's layout at small's sizes: `twin convert RUN OUT --to hf-marian` exports it.
    "marian": dict(d_model=128, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, d_ff=512, max_len=128,
                   activation="silu", final_norm=False, positions="marian", share_embeddings=True, tie_output=True,
                   output_bias=True, scale_embedding=True, attention_dropout=0.0, activation_dropout=0.0),
}


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message is one line meant for the user."""


@dataclass(frozen=True)
class TrainConfig(DictFields):
    """Optimization and bookkeeping settings of a run (the model's are in TransformerConfig).

    lr = lr_factor * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), step counted from 1
    (Vaswani et al. 2017, eq. 3, with lr_factor 1; the paper warms up for 4000 of 100k steps, the
    defaults here suit the embedded corpus: 1200 steps, 400 of warmup). `pack`: several examples per row
    of max_len positions (`parity.batching`) instead of length buckets. `bucket_sides`: "shared" pads a
    seq2seq pair's two sides to one bucketed length (fewer batch shapes: fewer JAX compilations),
    "separate" buckets each side's length on its own (runs saved before this option existed resume so).
    """

    steps: int = 1200
    max_tokens: int = 4096
    lr_factor: float = 1.0
    warmup_steps: int = 400
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-9
    seed: int = 0
    vocab_size: int = 1000
    bucket_step: int = 8
    bucket_sides: str = "shared"
    log_every: int = 20
    eval_every: int = 200
    save_every: int = 400
    keep: int = 3
    pack: bool = False

    def __post_init__(self) -> None:
        ints = ("steps", "max_tokens", "warmup_steps", "seed", "vocab_size", "bucket_step", "log_every", "eval_every",
                "save_every", "keep")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        for name in ("lr_factor", "label_smoothing", "clip_norm", "adam_eps"):
            if not is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(is_number(b) and 0.0 <= b < 1.0 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        rules = {**dict.fromkeys(("steps", "max_tokens", "warmup_steps", "vocab_size", "bucket_step", "log_every",
                                  "eval_every", "save_every", "keep"), (lambda v: v >= 1, "at least 1")),
                 **dict.fromkeys(("lr_factor", "clip_norm", "adam_eps"), (lambda v: v > 0, "positive")),
                 "label_smoothing": (lambda v: 0.0 <= v < 1.0, "in [0, 1)")}
        for name, (ok, what) in rules.items():
            if not ok(getattr(self, name)):
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)}")
        if not isinstance(self.pack, bool):
            raise ValueError(f"pack must be a bool, got {self.pack!r}")
        if self.bucket_sides not in BUCKET_SIDES:
            raise ValueError(f"bucket_sides must be one of {', '.join(BUCKET_SIDES)}, got {self.bucket_sides!r}")
        object.__setattr__(self, "betas", tuple(self.betas))


def learning_rate(step, *, d_model: int, tcfg: TrainConfig, minimum: Callable = min):
    """The rate of update number `step` (0-based). `minimum`: `jnp.minimum` for traced steps."""
    s = step + 1
    return tcfg.lr_factor * d_model ** -0.5 * minimum(s ** -0.5, s * tcfg.warmup_steps ** -1.5)


@dataclass
class TrainState:
    """What exact resume needs, framework-neutral: step, weights and Adam moments (canonical names), RNGs."""

    step: int
    weights: dict[str, np.ndarray]
    exp_avg: dict[str, np.ndarray]
    exp_avg_sq: dict[str, np.ndarray]
    rng: dict[str, np.ndarray] = field(default_factory=dict)


def model_config(spec: str | TransformerConfig, vocab_size: int, arch: str = "seq2seq",
                 num_classes: int | None = None) -> TransformerConfig:
    """A preset name or a JSON file of TransformerConfig fields, for `arch` (the encoder's head has
    `num_classes`, the number of labels in the data); vocab sizes come from the tokenizer."""
    if isinstance(spec, TransformerConfig):
        fields = spec.to_dict()
    elif spec in PRESETS:
        fields = dict(PRESETS[spec])
    else:
        try:
            data = Path(spec).read_bytes()
        except OSError as e:
            raise TrainError(f"--config {spec}: not a preset ({', '.join(PRESETS)}) and not readable "
                             f"({e.strerror or e})") from None
        fields = parse_json(data, f"--config {spec}", error=TrainError)
    for key in ("src_vocab_size", "tgt_vocab_size"):
        if fields.get(key, vocab_size) != vocab_size:
            raise TrainError(f"vocabulary mismatch: the config's {key} is {fields[key]}, the tokenizer has "
                             f"{vocab_size} tokens")
    fields.update(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size)
    own_arch, own_classes = fields.pop("arch", arch), fields.pop("num_classes", None)
    if own_arch != arch:
        raise TrainError(f"--config {spec}: its arch is {own_arch!r}, not {arch!r} (--arch)")
    if None not in (own_classes, num_classes) and own_classes != num_classes:
        raise TrainError(f"label mismatch: the config's num_classes is {own_classes}, the data has {num_classes} "
                         f"labels")
    try:
        cfg = TransformerConfig.from_dict({**TransformerConfig(1, 1).to_dict(), **fields})
        return cfg.for_arch(arch, num_classes if num_classes is not None else own_classes)
    except (ValueError, TypeError) as e:
        raise TrainError(f"--config {spec}: {e}") from None


# ----------------------------------------------------------------------------------------- files

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def saved_train_config(path: Path, steps: int) -> TrainConfig:
    """The TrainConfig of a run's train_config.json (its "train" object), with `steps` (a resumed run may
    train longer); CheckpointError naming the file and field."""
    train = read_json(path, "training config").get("train")
    if not isinstance(train, dict):
        raise CheckpointError(f"{path}: \"train\" must be a JSON object of training settings, got {json_type(train)}")
    try:
        return TrainConfig.from_dict({"bucket_sides": "separate", **train, "steps": steps})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: \"train\": {e}") from None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit())


def save_training_checkpoint(run_dir: Path, cfg: TransformerConfig, state: TrainState, meta: Mapping[str, Any],
                             keep: int) -> Path:
    """Write checkpoints/step_N whole (temp dir, fsync, rename), refresh the top-level weights, prune to `keep`.

    A failed write is a WriteError naming the file by its final name (checkpoints/step_N/...); the
    temporary directory is removed and the earlier checkpoints are untouched."""
    from safetensors.numpy import save

    root = run_dir / CHECKPOINTS
    final = root / f"step_{state.step:07d}"
    with writing(final):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".tmp", dir=root))
    try:
        with writing(final):
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the run's other directories honour the umask
        save_checkpoint(tmp, cfg, state.weights)
        arrays = {f"{moment}.{k}": np.ascontiguousarray(v) for moment in MOMENTS
                  for k, v in getattr(state, moment).items()}
        arrays.update({f"rng.{k}": np.ascontiguousarray(v) for k, v in state.rng.items()})
        atomic_write_bytes(tmp / OPTIMIZER_FILE, save(arrays))
        _write_json(tmp / STATE_FILE, {**meta, "step": state.step})
        with writing(final):
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
    except WriteError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise renamed(e, tmp, final) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    save_checkpoint(run_dir, cfg, state.weights)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_training_checkpoint(step_dir: Path, cfg: TransformerConfig) -> tuple[TrainState, dict[str, Any]]:
    """TrainState and trainer_state.json of a checkpoint directory; every file, key, shape and field checked
    (CheckpointError naming the file)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    ckpt_cfg, weights = load_checkpoint(step_dir)
    if ckpt_cfg != cfg:
        raise CheckpointError(f"{step_dir}: its config differs from the run's {CONFIG_FILE}")
    meta = read_json(step_dir / STATE_FILE, "training state")
    _check_state(meta, step_dir / STATE_FILE)
    path = step_dir / OPTIMIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: {'is a directory, not' if path.is_dir() else 'no such file, need'} the "
                              "optimizer state (Adam moments)")
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable optimizer state ({e})") from None
    moments = {m: {k[len(m) + 1:]: v for k, v in arrays.items() if k.startswith(m + ".")} for m in MOMENTS}
    try:
        for m in MOMENTS:
            check_canonical(moments[m], cfg)
    except ConversionError as e:
        raise CheckpointError(f"{path}: {e}") from None
    for m in MOMENTS:
        for k, v in moments[m].items():
            if v.dtype.kind != "f":
                raise CheckpointError(f"{path}: '{m}.{k}' has dtype {v.dtype}, expected a float dtype")
    rng = {k[4:]: v for k, v in arrays.items() if k.startswith("rng.")}
    return TrainState(meta["step"], weights, moments["exp_avg"], moments["exp_avg_sq"], rng), meta


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_state(meta: dict[str, Any], path: Path) -> None:
    """The fields of trainer_state.json that resume uses: step and position (counts), the fingerprints (strings)."""
    if not _is_count(meta.get("step")):
        raise CheckpointError(f"{path}: \"step\" must be a non-negative int, got {meta.get('step')!r}")
    position = meta.get("position")
    if not (isinstance(position, list) and len(position) == 2 and all(map(_is_count, position))):
        raise CheckpointError(f"{path}: \"position\" must be [epoch, index], two non-negative ints, got {position!r}")
    for key in ("tokenizer", "data"):
        if not isinstance(meta.get(key), str):
            raise CheckpointError(f"{path}: \"{key}\" must be a string (a SHA-256 fingerprint), got "
                                  f"{meta.get(key)!r}")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (none when it is missing); CheckpointError naming the file and line of a
    malformed one. A last line without its newline that does not parse (a write cut off by a crash) is left
    out: `--resume` rewrites the file."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists() and not path.is_symlink():
        return []
    lines = read_bytes(path, "metrics").split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = parse_json(line, where)
        except CheckpointError:
            if number == len(lines):
                break
            raise
        if not (_is_count(record.get("step")) and isinstance(record.get("split"), str)):
            raise CheckpointError(f"{where}: expected a record with \"step\" (an int) and \"split\" (a string)")
        values = [record.get(k) for k in ("loss", "nll")]  # a diverged validation loss may be Infinity
        if record["split"] in ("train", "valid") and not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise CheckpointError(f"{where}: a {record['split']} record needs numbers \"loss\" and \"nll\"")
        records.append(record)
    return records


def plot_losses(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """loss.png: training and validation loss (smoothed, and plain nll) against step (matplotlib, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("loss", "nll"), ("label-smoothed cross-entropy", "cross-entropy (nll)")):
        for split, style in (("train", "-"), ("valid", "o-")):
            points = [(r["step"], r[key]) for r in records if r["split"] == split]
            if points:
                ax.plot(*zip(*points), style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(run_dir / PLOT_FILE, buffer.getvalue())


# ------------------------------------------------------------------------------------- the run

class _Window:
    """The step metrics since the last log record. They stay framework scalars until `settle` (so JAX
    steps run ahead asynchronously), which converts them, checks the loss and sums them token-weighted."""

    def __init__(self, step: int) -> None:
        self.pending: list[Mapping[str, Any]] = []
        self.sums: dict[str, float] = {}
        self.first, self.steps, self.start, self.excluded = step, 0, time.perf_counter(), 0.0

    def add(self, metrics: Mapping[str, Any]) -> None:
        self.pending.append(metrics)

    def exclude(self, seconds: float) -> None:
        """Time spent on evaluation or checkpoints, not counted in tokens/s."""
        self.excluded += seconds

    def settle(self) -> None:
        """Raise _NonFinite(step, loss) at the first non-finite loss; else fold the pending steps in."""
        for metrics in self.pending:
            values = {k: float(v) for k, v in metrics.items()}
            self.first, self.steps = self.first + 1, self.steps + 1
            if not math.isfinite(values["loss"]):
                raise _NonFinite(self.first, values["loss"])
            for k, v in values.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
        self.pending = []

    def record(self, step: int) -> dict[str, Any]:
        self.settle()
        seconds = time.perf_counter() - self.start - self.excluded
        record = {**summarize(self.sums, step, "train"), "lr": self.sums["lr"] / self.steps,
                  "grad_norm": self.sums["grad_norm"] / self.steps,
                  "tokens_per_s": self.sums["tokens"] / max(seconds, 1e-9)}
        self.__init__(step)
        return record


class _NonFinite(Exception):
    def __init__(self, step: int, loss: float) -> None:
        super().__init__(step, loss)
        self.step, self.loss = step, loss


def summarize(sums: Mapping[str, float], step: int, split: str) -> dict[str, Any]:
    tokens = max(sums["tokens"], 1.0)
    return {"step": step, "split": split, "loss": sums["loss"] / tokens, "nll": sums["nll"] / tokens,
            "ppl": math.exp(min(sums["nll"] / tokens, 700.0)), "accuracy": sums["correct"] / tokens,
            "tokens": int(sums["tokens"])}


def evaluate(trainer, batcher: Batcher, step: int, split: str = "valid") -> dict[str, Any]:
    """Loss, perplexity and accuracy over every example of `batcher`: teacher-forced next tokens, or
    classes (then "tokens" counts examples)."""
    sums: dict[str, float] = {}
    for batch in batcher.once():
        for k, v in trainer.eval_step(batch).items():
            sums[k] = sums.get(k, 0.0) + v
    return summarize(sums, step, split)


def _rows(sequences: list[np.ndarray], pad_id: int, max_len: int) -> np.ndarray:
    """Sequences right-padded into one array (B, L), L the longest rounded up to a multiple of 8 (few shapes
    to compile) and capped at max_len."""
    length = min(-(-max(len(ids) for ids in sequences) // 8) * 8, max_len)
    rows = np.full((len(sequences), length), pad_id, dtype=np.int32)  # [B, L]
    for row, ids in enumerate(sequences):
        rows[row, :len(ids)] = ids
    return rows


def translate(trainer, tokenizer: Tokenizer, texts: list[str], max_len: int, batch_size: int = 256) -> list[str]:
    """Greedy translations of `texts`, at most 2 * source length + 10 tokens each (sources longer than
    max_len - 1 tokens are truncated)."""
    out = []
    encoded = tokenizer.encode(texts)
    for start in range(0, len(texts), batch_size):
        src = _rows([np.append(ids[:max_len - 1], tokenizer.eos_id) for ids in encoded[start:start + batch_size]],
                    tokenizer.pad_id, max_len)  # [B, S]
        tokens = trainer.greedy(src, max_new_tokens=min(max_len - 1, 2 * src.shape[1] + 10), bos_id=tokenizer.bos_id,
                                eos_id=tokenizer.eos_id)
        out += [tokenizer.decode(row) for row in tokens]
    return out


def classify(trainer, tokenizer: Tokenizer, texts: list[str], labels: tuple[str, ...], max_len: int,
             batch_size: int = 256) -> list[str]:
    """The predicted label of each text (texts longer than max_len - 1 tokens are truncated)."""
    out = []
    encoded = tokenizer.encode(texts)
    for start in range(0, len(texts), batch_size):
        src = _rows([np.append(ids[:max_len - 1], tokenizer.eos_id) for ids in encoded[start:start + batch_size]],
                    tokenizer.pad_id, max_len)  # [B, S]
        out += [labels[int(i)] for i in trainer.classify(src)]
    return out


def prompt_of(text: str) -> str:
    """The part of a held-out text the language model continues: up to and including the "=" of the builtin
    "English = French" lines, else the first half of the words."""
    head, sep, _ = text.partition(" = ")
    if sep:
        return f"{head} ="
    words = text.split(" ")
    return " ".join(words[:max(1, len(words) // 2)])


def continue_texts(trainer, tokenizer: Tokenizer, prompts: list[str], max_len: int, batch_size: int = 256) -> list[str]:
    """Greedy continuations of `prompts` (with them) up to <eos>, at most 2 * prompt length + 10 new tokens and
    max_len in all (prompts longer than max_len / 2 tokens are truncated)."""
    out = []
    encoded = [ids[:max_len // 2] for ids in tokenizer.encode(prompts)]
    for start in range(0, len(prompts), batch_size):
        chunk = encoded[start:start + batch_size]
        src = _rows(chunk, tokenizer.pad_id, max_len)  # [B, P]
        tokens = trainer.greedy(src, max_new_tokens=min(max_len - src.shape[1], 2 * src.shape[1] + 10),
                                bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)  # [B, N]
        out += [tokenizer.decode(np.concatenate([ids, row])) for ids, row in zip(chunk, tokens)]
    return out


def exact_match(hypotheses: list[str], references: list[str]) -> float:
    return sum(h == r for h, r in zip(hypotheses, references)) / max(len(references), 1)


class _StopOnSigint:
    """First Ctrl-C asks the loop to stop after the current step (it then saves); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopOnSigint":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise TrainError(f"cannot write to output directory {out}: {e.strerror or e}") from None


def _prepare_run_dir(out: Path, resume: bool, writer: bool = True) -> Path | None:
    """The checkpoint to resume from (None for a new run); refuses to overwrite an existing run. Only the
    `writer` (process 0) checks and creates `out`; the others only read it when they resume."""
    try:
        if out.exists() and not out.is_dir():
            raise TrainError(f"--out {out}: is a file, not a run directory")
    except OSError as e:
        raise TrainError(f"cannot write to output directory {out}: {e.strerror or e}") from None
    if resume:
        found = checkpoint_dirs(out)
        if not found:
            raise TrainError(f"--resume: {out} holds no checkpoint to resume from")
        if writer:
            _check_writable(out)
        return found[-1]
    if not writer:
        return None
    if out.exists() and any(out.iterdir()):
        raise TrainError(f"{out} is not empty; pass --resume to continue the run there, or choose another --out")
    _check_writable(out)
    return None


def _trainer_class(framework: str):
    if framework not in FRAMEWORKS:
        raise TrainError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")
    return importlib.import_module(f"{framework}_tx.train").Trainer


def parse_mesh(spec: str) -> dict[str, int]:
    """`data=N,fsdp=M` (either part may be left out: size 1) -> {"data": N, "fsdp": M}."""
    sizes = {"data": 1, "fsdp": 1}
    seen = set()
    for part in spec.split(","):
        name, sep, size = part.strip().partition("=")
        if not sep or name not in sizes or name in seen or not size.isdigit() or int(size) < 1:
            raise TrainError(f"--mesh {spec!r}: expected data=N,fsdp=M with axis names data and fsdp (each at most "
                             f"once) and sizes >= 1, e.g. --mesh data=2,fsdp=4")
        seen.add(name)
        sizes[name] = int(size)
    return sizes


def _context(framework: str, device: str, mesh: str | None, fsdp: bool, hosts: Mapping[str, Any] | None = None):
    """The twin's `distributed.Context` of this process (None: one device, one process): a JAX mesh from
    --mesh (over the devices of several processes with `hosts`: coordinator, num_processes, process_id), or
    the torchrun process group (DDP, or FSDP2 with --fsdp)."""
    if framework == "torch" and hosts:
        raise TrainError("--coordinator/--num-processes/--process-id are for --framework jax; torch runs on several "
                         "machines under torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT ...")
    if framework == "torch" and mesh is not None:
        raise TrainError("--mesh is for --framework jax; PyTorch spreads a run over processes: torchrun "
                         "--nproc-per-node N -m parity.cli train --framework torch [--fsdp] ...")
    if framework == "jax" and fsdp:
        raise TrainError("--fsdp is for --framework torch (under torchrun); JAX shards parameters over a mesh "
                         "axis: --mesh data=N,fsdp=M")
    distributed = importlib.import_module(f"{framework}_tx.distributed")
    try:
        if framework == "jax":
            return distributed.setup(device, mesh=None if mesh is None else parse_mesh(mesh), **(hosts or {}))
        return distributed.setup(device, fsdp=fsdp)
    except ValueError as e:
        raise TrainError(str(e)) from None


def _agree(context, **values: int) -> None:
    """TrainError unless every process passes the same values (names with _ for spaces)."""
    try:
        for name, value in values.items():
            context.check_same(name.replace("_", " "), value)
    except ValueError as e:
        raise TrainError(str(e)) from None


def _digest(text: str) -> int:
    """A hex digest as an int64 that processes can compare."""
    return int(text[:15], 16)


def _batches(tokenizer: Tokenizer, examples: list[Example], corpus: Corpus, cfg: TransformerConfig,
             tcfg: TrainConfig, shuffle: bool) -> Batcher:
    """The Batcher of `examples` for cfg.arch: pairs (seq2seq), texts and their class ids (encoder), texts (decoder)."""
    first = tokenizer.encode([e[0] for e in examples])
    src = None if cfg.arch == "decoder" else first
    tgt = tokenizer.encode([e[1] for e in examples], target=True) if cfg.arch == "seq2seq" else first \
        if cfg.arch == "decoder" else None
    classes = None
    if cfg.arch == "encoder":
        index = {label: i for i, label in enumerate(corpus.labels)}
        classes = [index[e[1]] for e in examples]
    try:
        return Batcher(src, tgt, classes=classes, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                       eos_id=tokenizer.eos_id, max_tokens=tcfg.max_tokens, max_len=cfg.max_len,
                       bucket_step=tcfg.bucket_step, seed=tcfg.seed, shuffle=shuffle, pack=tcfg.pack,
                       shared_length=tcfg.bucket_sides == "shared")
    except ValueError as e:
        raise TrainError(str(e)) from None


def padding_report(batcher: Batcher) -> dict[str, float]:
    """The share of padding positions in an epoch's batches, bucketed ("unpacked") and, for a packed batcher,
    packed."""
    if not batcher.pack:
        return {"unpacked": batcher.padding()}
    return {"unpacked": batcher.repacked(False).padding(), "packed": batcher.padding()}


def _resolve_arch(arch: str | None, source: Path | None, what: str) -> str:
    """--arch, checked against the run or checkpoint `source` continues from (whose arch it defaults to)."""
    if arch is not None and arch not in ARCHS:
        raise TrainError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if source is None:
        return arch or "seq2seq"
    from parity.formats import FormatError
    from parity.formats.hf_dir import hf_config

    try:
        found = "seq2seq" if hf_config(source) is not None else load_config(source).arch  # Marian, FSMT: seq2seq
    except (CheckpointError, FormatError) as e:
        raise TrainError(str(e)) from None
    if arch not in (None, found):
        raise TrainError(f"--arch {arch}: {what} {source} holds a {found} model; pass --arch {found} or leave it out")
    return found


def run(framework: str, data: str, out: str | os.PathLike, *, model: str | TransformerConfig = "small",
        tcfg: TrainConfig = TrainConfig(), resume: bool = False, init_from: str | os.PathLike | None = None,
        dtype: str = "float32", device: str = "cpu", limit: int | None = None, show: int = 5,
        test_limit: int | None = None, progress: bool = True, dropout: float | None = None,
        arch: str | None = None, echo: Callable[[str], None] = print, mesh: str | None = None,
        fsdp: bool = False, hosts: Mapping[str, Any] | None = None, compile: bool = False) -> dict[str, Any]:
    """Train (or resume) a run of `arch` (default seq2seq; a resumed run or --init-from checkpoint's own) in
    `out`; returns the last train/valid/test records (and `interrupted`).

    Spread over devices (JAX: `mesh` "data=N,fsdp=M") or torchrun processes (torch: DDP, or FSDP2 with `fsdp`),
    every process reads the same data and batches; process 0 alone writes and prints, and the processes check
    that they agree on the tokenizer, the data and each checkpoint's step. A JAX mesh spans several processes
    (hosts) with `hosts` = {"coordinator": "host:port", "num_processes": P, "process_id": i}, passed to
    `jax.distributed.initialize`.

    `dtype`: "float32", "float64", or "bfloat16" (mixed precision: float32 weights and Adam moments, bfloat16
    compute; checkpoints hold the float32 weights). `compile` (torch): `torch.compile` the training steps."""
    out = Path(out)
    Trainer = _trainer_class(framework)
    if compile and framework != "torch":
        raise TrainError("--compile is for --framework torch (torch.compile); the JAX trainer's step is always "
                         "jitted")
    if compile:
        Trainer = functools.partial(Trainer, compile=True)
    context = _context(framework, device, mesh, fsdp, hosts)
    try:
        return _run(Trainer, context, framework, data, out, model=model, tcfg=tcfg, resume=resume,
                    init_from=init_from, dtype=dtype, device=device, limit=limit, show=show, test_limit=test_limit,
                    progress=progress, dropout=dropout, arch=arch, echo=echo)
    except WriteError as e:
        raise TrainError(str(e)) from None
    finally:
        if context is not None:
            context.close()


def _run(Trainer, context, framework: str, data: str, out: Path, *, model: str | TransformerConfig,
         tcfg: TrainConfig, resume: bool, init_from: str | os.PathLike | None, dtype: str, device: str,
         limit: int | None, show: int, test_limit: int | None, progress: bool, dropout: float | None,
         arch: str | None, echo: Callable[[str], None]) -> dict[str, Any]:
    writer = context is None or context.rank == 0
    if not writer:
        echo = _silent
    resume_from = _prepare_run_dir(out, resume, writer)
    arch = (_resolve_arch(arch, out, "the run in") if resume_from is not None else
            _resolve_arch(arch, None if init_from is None else Path(init_from), "the checkpoint"))
    try:
        corpus = load_corpus(data, limit=limit, arch=arch)
    except DataError as e:
        raise TrainError(str(e)) from None

    init_weights, meta = None, {}
    try:
        if resume_from is not None:
            tokenizer, spec = load_any(out), load_config(out)
            tcfg = saved_train_config(out / TRAIN_CONFIG_FILE, tcfg.steps)
        else:
            spec, tokenizer = model, None
            if init_from is not None:  # a run directory or a Hugging Face model directory, with its tokenizer
                spec, init_weights, tokenizer = load_model_dir(init_from)
            if tokenizer is None:
                tokenizer = train_tokenizer(corpus.texts(), vocab_size=tcfg.vocab_size)
        cfg = model_config(spec, tokenizer.vocab_size, arch, None if corpus.labels is None else len(corpus.labels))
        if dropout is not None and resume_from is None:
            cfg = cfg.replace(dropout=dropout)
    except (CheckpointError, TokenizerError, OSError, KeyError, ValueError) as e:
        raise TrainError(str(e)) from None
    if resume_from is not None:
        try:
            state, meta = load_training_checkpoint(resume_from, cfg)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        if meta.get("tokenizer") != tokenizer.fingerprint():
            raise TrainError(f"vocabulary mismatch: {out / TOKENIZER_FILE} is not the tokenizer "
                             f"{resume_from.name} was trained with")
        if meta.get("data") != corpus.fingerprint():
            raise TrainError(f"--data {data}: not the training data of the run in {out} (it was trained on "
                             f"{meta.get('data_name')!r}); resume with the same --data")

    if context is not None:
        _agree(context, tokenizer=_digest(tokenizer.fingerprint()), training_data=_digest(corpus.fingerprint()))
        echo(f"distributed: {context.describe()}")
    train_batches = _batches(tokenizer, corpus.train, corpus, cfg, tcfg, shuffle=True)
    valid_batches = _batches(tokenizer, corpus.valid, corpus, cfg, tcfg, shuffle=False)
    if train_batches.dropped:
        echo(f"note: {train_batches.dropped} training {'pairs' if arch == 'seq2seq' else 'examples'} longer than "
             f"max_len={cfg.max_len} tokens were left out")
    padding = padding_report(train_batches)
    echo(f"padding: {padding['unpacked']:.1%}" + (f" -> {padding['packed']:.1%}" if tcfg.pack else "") +
         f" of positions{f' (packed rows of {cfg.max_len})' if tcfg.pack else ''}")
    if resume_from is None and writer:
        tokenizer.save(out / TOKENIZER_FILE)
        _write_json(out / TRAIN_CONFIG_FILE, {"framework": framework, "arch": arch, "data": str(data),
                                              "model": str(model) if not isinstance(model, TransformerConfig)
                                              else "custom",
                                              "init_from": None if init_from is None else str(init_from),
                                              "tokenizer": tokenizer.kind,
                                              "labels": None if corpus.labels is None else list(corpus.labels),
                                              "padding": padding, "train": tcfg.to_dict()})
        atomic_write_bytes(out / CONFIG_FILE, cfg.to_json().encode())
    trainer = Trainer(cfg, tcfg, init_weights, dtype=dtype, device=device, context=context)
    step, position = 0, Position()
    try:
        records = read_metrics(out)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    if resume_from is not None:
        try:
            trainer.load_state(state)
        except (ValueError, RuntimeError, TypeError) as e:  # e.g. a torch RNG state of the wrong size
            raise TrainError(f"{resume_from / OPTIMIZER_FILE}: cannot resume from it "
                             f"({str(e).strip().splitlines()[0][:200]})") from None
        step, position = state.step, Position(*meta["position"])
        if context is not None:
            _agree(context, step_to_resume_from=step)
        records = [r for r in records if r["step"] <= step]
        if writer:
            atomic_write_bytes(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records).encode())
        echo(f"resuming {out} at step {step} ({framework})")

    def checkpoint() -> Path:
        meta = {"framework": framework, "position": [position.epoch, position.index], "seed": tcfg.seed,
                "tokenizer": tokenizer.fingerprint(), "data": corpus.fingerprint(), "data_name": corpus.name,
                "dtype": dtype}
        state = trainer.export_state(step)  # every process takes part: the shards are gathered
        if context is not None:
            _agree(context, step=step)
        if not writer:
            return out / CHECKPOINTS / f"step_{step:07d}"
        return save_training_checkpoint(out, cfg, state, meta, tcfg.keep)

    def log(record: dict[str, Any]) -> None:
        records.append(record)
        if writer:
            append_bytes(out / METRICS_FILE, (json.dumps(record) + "\n").encode())

    def stop_now() -> bool:
        """Ctrl-C seen by any process (they all stop after the same step)."""
        return stop.requested if context is None else context.any(stop.requested)

    window, last_saved, last, stopping, plotted = _Window(step), resume_from, {}, False, -1
    bar = _progress(progress and writer, tcfg.steps, step)
    with _StopOnSigint() as stop:
        stream = train_batches.stream(position)
        try:
            while step < tcfg.steps and not stopping:
                following, batch = next(stream)
                window.add(trainer.train_step(batch))
                step, position = step + 1, following
                bar.update(1)
                if step % tcfg.log_every == 0 or step == tcfg.steps:
                    last["train"] = window.record(step)
                    log(last["train"])
                    bar.set_postfix(loss=f"{last['train']['loss']:.3f}", lr=f"{last['train']['lr']:.2e}",
                                    tok_s=f"{last['train']['tokens_per_s']:,.0f}")
                start = time.perf_counter()
                if step % tcfg.eval_every == 0 or step == tcfg.steps:
                    window.settle()
                    last["valid"] = evaluate(trainer, valid_batches, step)
                    log(last["valid"])
                    if writer:
                        plot_losses(out, records)
                        plotted = len(records)
                stopping = stop_now()
                if step % tcfg.save_every == 0 or step == tcfg.steps or stopping:
                    window.settle()
                    last_saved = checkpoint()
                window.exclude(time.perf_counter() - start)
        except _NonFinite as e:
            kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved"
            raise TrainError(f"loss became {e.loss} at step {e.step}; stopped, {kept}") from None
        except WriteError as e:
            found = checkpoint_dirs(out)
            kept = (f"the last good checkpoint is {found[-1]} (continue with --resume)" if found else
                    "no checkpoint was saved")
            raise TrainError(f"{e}; stopped at step {step}, {kept}") from None
        finally:
            bar.close()
        if stopping:
            echo(f"interrupted at step {step}: saved {last_saved}; continue with --resume")
            return {**last, "interrupted": True}
    if records and writer and len(records) != plotted:  # the last evaluation drew the same records
        plot_losses(out, records)
    if "valid" in last:
        valid = last["valid"]
        echo(f"step {step}: validation loss {valid['loss']:.4f}, " + (
            f"accuracy {valid['accuracy']:.2%}" if arch == "encoder" else
            f"perplexity {valid['ppl']:.3f}, token accuracy {valid['accuracy']:.2%}"))
    if test_limit != 0:
        test = {"seq2seq": _test_translation, "encoder": _test_classifier, "decoder": _test_language_model}[arch]
        last["test"] = {"step": step, "split": "test", **test(trainer, tokenizer, corpus, corpus.test[:test_limit],
                                                               cfg, tcfg, show, echo)}
        log(last["test"])
    return last


def _test_translation(trainer, tokenizer: Tokenizer, corpus: Corpus, pairs: list[Example], cfg: TransformerConfig,
                      tcfg: TrainConfig, show: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """Greedy translations of the test sources: exact match."""
    hypotheses = translate(trainer, tokenizer, [p[0] for p in pairs], cfg.max_len)
    result = {"exact_match": exact_match(hypotheses, [p[1] for p in pairs]), "sentences": len(pairs)}
    for (src, ref), hyp in list(zip(pairs, hypotheses))[:show]:
        echo(f"  {src}\n    -> {hyp}{'' if hyp == ref else f'   (reference: {ref})'}")
    echo(f"test exact match: {result['exact_match']:.2%} of {len(pairs)} sentences")
    return result


def _test_classifier(trainer, tokenizer: Tokenizer, corpus: Corpus, examples: list[Example], cfg: TransformerConfig,
                     tcfg: TrainConfig, show: int, echo: Callable[[str], None]) -> dict[str, Any]:
    """Loss and accuracy on the test split, against chance (always answering its most frequent label)."""
    scores = evaluate(trainer, _batches(tokenizer, examples, corpus, cfg, tcfg, shuffle=False), 0, "test")
    labels = [e[1] for e in examples]
    chance = max(labels.count(label) for label in set(labels)) / len(labels)
    shown = examples[:show]
    for (text, label), guess in zip(shown, classify(trainer, tokenizer, [e[0] for e in shown], corpus.labels,
                                                    cfg.max_len)):
        echo(f"  {text}\n    -> {guess}{'' if guess == label else f'   (label: {label})'}")
    echo(f"test accuracy: {scores['accuracy']:.2%} of {scores['tokens']} examples (chance: {chance:.2%}, always "
         f"the most frequent label)")
    return {"loss": scores["loss"], "nll": scores["nll"], "accuracy": scores["accuracy"], "chance": chance,
            "examples": scores["tokens"]}


def _test_language_model(trainer, tokenizer: Tokenizer, corpus: Corpus, examples: list[Example],
                         cfg: TransformerConfig, tcfg: TrainConfig, show: int,
                         echo: Callable[[str], None]) -> dict[str, Any]:
    """Perplexity on the test split; greedy continuations of its prompts (`prompt_of`): exact match with the
    held-out texts, and samples."""
    scores = evaluate(trainer, _batches(tokenizer, examples, corpus, cfg, tcfg, shuffle=False), 0, "test")
    texts = [e[0] for e in examples]
    prompts = [prompt_of(text) for text in texts]
    outputs = continue_texts(trainer, tokenizer, ["", *prompts], cfg.max_len)
    echo(f"  (no prompt)\n    -> {outputs[0]}")
    for prompt, text, output in list(zip(prompts, texts, outputs[1:]))[:show]:
        echo(f"  {prompt}\n    -> {output}{'' if output == text else f'   (held out: {text})'}")
    match = exact_match(outputs[1:], texts)
    echo(f"test perplexity: {scores['ppl']:.3f} over {scores['tokens']} tokens; greedy continuations: {match:.2%} "
         f"of {len(texts)} reproduce the held-out text")
    return {"loss": scores["loss"], "nll": scores["nll"], "ppl": scores["ppl"], "accuracy": scores["accuracy"],
            "tokens": scores["tokens"], "exact_match": match, "continued": len(texts), "sample": outputs[0]}


def _silent(text: str) -> None:
    """The echo of processes other than 0."""


def _progress(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
