"""Translate and evaluate with a run directory written by `twin train`, in either framework.

`Translator.load(run_dir, framework, device)` reads `config.json` + `model.safetensors` and
`tokenizer.json`, or a Hugging Face model directory with its tokenizer (opus-mt: MarianTokenizer, the
decoder starting from its config's decoder_start_token_id). `translate` checks every input first (empty,
characters the tokenizer has never seen, longer than the model takes), then encodes, appends <eos>, sorts
by length, batches (source length padded to a multiple of 8, so JAX compiles few shapes), calls
`torch_tx.generate` / `jax_tx.generate`, decodes and restores the input order. Both frameworks get
identical batches. Frameworks are imported only when a translator is loaded.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from parity.checkpoint import CONFIG_FILE, CheckpointError, atomic_write_bytes, load_model_dir
from parity.config import TransformerConfig
from parity.decoding import check_decoding_options
from parity.extras import default_framework
from parity.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError

FRAMEWORKS = ("torch", "jax")
CT2 = "ctranslate2"  # the framework of a CTranslate2 model directory (parity.ct2)
BUCKET = 8
FLAGS = {"beam_size": "--beam", "length_penalty": "--length-penalty", "temperature": "--temperature",
         "top_k": "--top-k", "top_p": "--top-p", "beam_rule": "--beam-rule", "forced_eos": "--forced-eos"}


class TranslateError(ValueError):
    """Input, options or a run directory that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class DecodeOptions:
    """How `generate` picks tokens: beam search (beam_size > 1), sampling (temperature > 0) or greedy.

    max_new_tokens None: min(max_len, 2 * padded source length + 10) per batch. beam_rule "hf" and forced_eos
    with length_penalty 1.0 decode as transformers' `generate(num_beams=K)` does under an opus-mt generation config
    (`parity.decoding.BEAM_RULES`). beam_rule None: the decoder's own rule ("twin" for the twins, CTranslate2's
    for a CTranslate2 model, `parity.ct2`).
    """

    beam_size: int = 1
    length_penalty: float = 0.6
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int | None = None
    beam_rule: str | None = None
    forced_eos: bool = False

    def __post_init__(self) -> None:
        try:
            check_decoding_options(beam_size=self.beam_size, length_penalty=self.length_penalty,
                                   temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                   beam_rule=self.beam_rule or "twin", forced_eos=self.forced_eos, names=FLAGS)
        except ValueError as e:
            raise TranslateError(str(e)) from None
        if self.temperature == 0 and (self.top_k or self.top_p < 1.0):
            raise TranslateError("--top-k and --top-p shape sampling; they need --temperature > 0")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise TranslateError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")

    def generate_kwargs(self, max_new_tokens: int) -> dict[str, Any]:
        kw = asdict(self)
        kw["max_new_tokens"] = max_new_tokens
        if kw["beam_rule"] is None:
            del kw["beam_rule"]
        return kw


def generation_config_options(run_dir: str | os.PathLike) -> dict[str, Any]:
    """DecodeOptions fields that decode as transformers' `generate` does under the directory's
    generation_config.json (`parity.decoding.hf_generation_options`); TranslateError naming the file or field."""
    from parity.checkpoint import read_json
    from parity.decoding import hf_generation_options
    from parity.formats.hf_dir import GENERATION_CONFIG

    file = Path(run_dir) / GENERATION_CONFIG
    if not file.is_file():
        raise TranslateError(f"{file}: no such file (--hf-generation reads the decoding settings of a Hugging Face "
                             f"directory, or of a run converted or fine-tuned from one)")
    config = read_json(file, "generation config", error=TranslateError)
    try:
        return hf_generation_options(config, config.get("eos_token_id"), str(file))
    except (ValueError, TypeError) as e:
        raise TranslateError(str(e)) from None


# ---------------------------------------------------------------------------------- backends

class _TorchBackend:
    def __init__(self, cfg: TransformerConfig, weights: dict[str, np.ndarray], device: str,
                 quantize: str | None = None) -> None:
        import torch

        import torch_tx
        from parity.convert import to_torch

        if device == "cuda" and not torch.cuda.is_available():
            raise TranslateError("--device cuda: torch sees no GPU (torch.cuda.is_available() is False)")
        self.torch, self.tx, self.device = torch, torch_tx, torch.device(device)
        self.model = torch_tx.Transformer(cfg)
        self.model.load_state_dict({k: to_torch(v) for k, v in weights.items()})
        self.model.to(self.device).eval()
        if quantize == "int8":  # --quantize int8: dynamic int8 Linears (torch_tx.quantize), CPU only
            from torch_tx.quantize import quantize_dynamic_int8

            self.model = quantize_dynamic_int8(self.model)

    def generate(self, src: np.ndarray, **kw) -> np.ndarray:
        src_t = self.torch.from_numpy(src).to(self.device, self.torch.long)  # [B, S]
        with self.torch.no_grad():
            return self.tx.generate(self.model, src_t, **kw).cpu().numpy()  # [B, n]

    def cross_attention(self, src: np.ndarray, tgt_in: np.ndarray) -> np.ndarray:
        from torch_tx.decoding import cross_attention_weights

        src_t = self.torch.from_numpy(src).to(self.device, self.torch.long)  # [B, S]
        tgt_t = self.torch.from_numpy(tgt_in).to(self.device, self.torch.long)  # [B, T]
        with self.torch.no_grad():
            return cross_attention_weights(self.model, src_t, tgt_t).float().cpu().numpy()  # [L, B, H, T, S]


class _CT2Backend:
    def __init__(self, path: Path, device: str) -> None:
        from parity import ct2

        try:
            self.model = ct2.CT2Model.load(path, device=device)
        except ct2.CT2Error as e:
            raise TranslateError(str(e)) from None
        self.ct2 = ct2

    def generate(self, src: np.ndarray, **kw) -> np.ndarray:
        return self.ct2.generate(self.model, src, **kw)  # [B, n]

    def cross_attention(self, src: np.ndarray, tgt_in: np.ndarray) -> np.ndarray:
        raise TranslateError(f"{self.model.path}: --plot-attention needs the twins' attention weights; plot it "
                             f"from the checkpoint this CTranslate2 model was converted from")


class _JaxBackend:
    def __init__(self, cfg: TransformerConfig, weights: dict[str, np.ndarray], device: str) -> None:
        if device == "cpu":
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax
        import jax.numpy as jnp

        import jax_tx
        from parity.convert import canonical_to_flax

        try:
            self.device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
        except RuntimeError as e:
            raise TranslateError(f"--device {device}: jax has no such device ({str(e).splitlines()[0]})") from None
        self.jax, self.jnp, self.tx = jax, jnp, jax_tx
        self.model = jax_tx.Transformer(cfg)
        self.params = jax.device_put(canonical_to_flax(weights, cfg), self.device)

    def _put(self, a: np.ndarray):
        return self.jax.device_put(self.jnp.asarray(a, self.jnp.int32), self.device)

    def generate(self, src: np.ndarray, **kw) -> np.ndarray:
        return np.asarray(self.tx.generate(self.model, self.params, self._put(src), **kw))  # [B, n]

    def cross_attention(self, src: np.ndarray, tgt_in: np.ndarray) -> np.ndarray:
        from jax_tx.decoding import cross_attention_weights

        weights = cross_attention_weights(self.model, self.params, self._put(src), self._put(tgt_in))
        return np.asarray(weights, dtype=np.float32)  # [L, B, H, T, S]


# -------------------------------------------------------------------------------- translator

def read_run_dir(run_dir: str | os.PathLike) -> tuple[TransformerConfig, dict[str, np.ndarray], Any]:
    """Config, float32 canonical weights and tokenizer of a run directory, or of a Hugging Face model directory with
    its tokenizer (opus-mt: MarianTokenizer); TranslateError when unusable."""
    path = Path(run_dir)
    if not path.is_dir():
        raise TranslateError(f"{path}: no such directory (expected a run directory written by twin train)")
    if not (path / CONFIG_FILE).is_file():
        raise TranslateError(f"{path}: not a run directory, no {CONFIG_FILE} (twin train writes config.json, "
                             f"model.safetensors and tokenizer.json)")
    try:
        cfg, weights, tokenizer = load_model_dir(path)
    except (CheckpointError, TokenizerError) as e:
        raise TranslateError(str(e)) from None
    if tokenizer is None:
        raise TranslateError(f"{path}: not a run directory, no {TOKENIZER_FILE} and no Hugging Face tokenizer "
                             f"files (twin train writes config.json, model.safetensors and tokenizer.json)")
    weights = {k: v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v
               for k, v in weights.items()}
    return cfg.without_dropout(), weights, tokenizer


def read_ct2_dir(path: str | os.PathLike) -> tuple[TransformerConfig, Any]:
    """Config and tokenizer of a CTranslate2 directory written by `twin convert --to ctranslate2`."""
    from parity.formats.ctranslate2 import CT2Error, read_twin_config
    from parity.tokenizer import HF_TOKENIZER_FILES, load_any

    path = Path(path)
    try:
        cfg = read_twin_config(path)
    except CT2Error as e:
        raise TranslateError(str(e)) from None
    if cfg.arch != "seq2seq":
        raise TranslateError(f"{path}: a {cfg.arch}-only model (arch {cfg.arch!r}); twin translate and twin eval "
                             f"need a seq2seq model (parity.ct2 runs the others from Python)")
    if not any((path / name).is_file() for name in (TOKENIZER_FILE, *HF_TOKENIZER_FILES)):
        raise TranslateError(f"{path}: no {TOKENIZER_FILE} and no Hugging Face tokenizer files (twin convert --to "
                             f"ctranslate2 copies the tokenizer of SRC)")
    try:
        tokenizer = load_any(path)
    except TokenizerError as e:
        raise TranslateError(str(e)) from None
    return cfg.without_dropout(), tokenizer


class Attention(NamedTuple):
    src_tokens: list[str]  # [S]: the source tokens and <eos>
    out_tokens: list[str]  # [T]: the output tokens, <eos> included when generated
    weights: np.ndarray  # [L, H, T, S] float32, softmax over S
    translation: str


QUANTIZE = ("int8",)  # --quantize: the torch twin's own int8 path (torch_tx.quantize)


def check_quantize(quantize: str | None, framework: str, device: str, run_dir: str | os.PathLike) -> None:
    """TranslateError (one line naming --quantize) unless `quantize` is None or int8 on the torch twin on the CPU."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise TranslateError(f"--quantize {quantize}: expected one of {', '.join(QUANTIZE)}")
    if framework == CT2:
        raise TranslateError(f"{run_dir}: --quantize int8 quantizes the torch twin; a CTranslate2 model is "
                             f"quantized when converted (twin convert --to ctranslate2 --quantization int8): leave out "
                             f"--quantize")
    if framework != "torch":
        raise TranslateError(f"--quantize int8 runs the torch twin only (torch_tx.quantize): pass --framework torch, "
                             f"not --framework {framework}")
    if device != "cpu":
        raise TranslateError(f"--quantize int8 runs on the CPU only (torch's dynamic int8 kernels): leave out "
                             f"--device {device}")


class Translator:
    """A trained model, its tokenizer and one framework's `generate`."""

    def __init__(self, cfg: TransformerConfig, tokenizer: Tokenizer, backend, framework: str,
                 quantize: str | None = None) -> None:
        self.cfg, self.tokenizer, self.backend, self.framework = cfg, tokenizer, backend, framework
        self.quantize = quantize  # "int8": the torch twin's dynamic int8 path (torch_tx.quantize)

    @classmethod
    def load(cls, run_dir: str | os.PathLike, framework: str | None = None, device: str = "cpu",
             quantize: str | None = None) -> "Translator":
        """The run's model in `framework` (None: the installed one, torch when both are); a CTranslate2 directory
        (`twin convert --to ctranslate2`) runs in CTranslate2 (framework None or "ctranslate2"). quantize "int8":
        the torch twin with dynamic int8 Linears (`torch_tx.quantize`, CPU only); refused elsewhere."""
        from parity.formats.ctranslate2 import is_ct2_dir

        if quantize is not None:
            check_quantize(quantize, CT2 if is_ct2_dir(run_dir) else framework or default_framework("Translator.load"),
                           device, run_dir)
        if is_ct2_dir(run_dir):
            if framework not in (None, CT2):
                raise TranslateError(f"{run_dir}: a CTranslate2 model runs in CTranslate2: leave out --framework "
                                     f"{framework}")
            cfg, tokenizer = read_ct2_dir(run_dir)
            return cls(cfg, tokenizer, _CT2Backend(Path(run_dir), device), CT2)
        if framework is None:
            framework = default_framework("Translator.load")
        if framework not in FRAMEWORKS:
            raise TranslateError(f"unknown framework {framework!r}; expected one of {', '.join(FRAMEWORKS)}")
        cfg, weights, tokenizer = read_run_dir(run_dir)
        if cfg.arch != "seq2seq":
            raise TranslateError(f"{run_dir}: a {cfg.arch}-only model (arch {cfg.arch!r}); twin translate and twin eval "
                                 "need a seq2seq run (the run's test scores are in its metrics.jsonl)")
        backend = (_TorchBackend(cfg, weights, device, quantize) if framework == "torch"
                   else _JaxBackend(cfg, weights, device))
        return cls(cfg, tokenizer, backend, framework, quantize)

    def encode(self, texts: Sequence[str], names: Sequence[str] | None = None, *,
               strict: bool = True) -> list[np.ndarray | None]:
        """Source ids + <eos> of each text ([L + 1] int32). Empty texts, texts too long for the model and
        (strict) unknown characters raise TranslateError naming the input; with strict=False too long
        ones give None."""
        names = names or [f"text {i}" for i in range(1, len(texts) + 1)]
        for name, text in zip(names, texts):
            if not text.strip():
                raise TranslateError(f"{name} is empty")
        if strict:
            for name, chars in zip(names, self.tokenizer.unknown_characters(texts)):
                if chars:
                    raise TranslateError(f"{name}: characters the tokenizer has never seen: "
                                         f"{' '.join(repr(c) for c in chars)}")
        out: list[np.ndarray | None] = []
        for name, ids in zip(names, self.tokenizer.encode(texts)):
            if len(ids) + 1 > self.cfg.max_len:
                if strict:
                    raise TranslateError(f"{name} is too long: {len(ids)} tokens + <eos> = {len(ids) + 1}, the "
                                         f"model takes at most {self.cfg.max_len} (max_len)")
                out.append(None)
            else:
                out.append(np.append(ids, self.tokenizer.eos_id).astype(np.int32))  # [L + 1]
        return out

    def _check_options(self, options: DecodeOptions) -> None:
        if options.max_new_tokens is not None and options.max_new_tokens > self.cfg.max_len:
            raise TranslateError(f"--max-new-tokens {options.max_new_tokens} is more than the model's max_len "
                                 f"{self.cfg.max_len}")

    def _pad(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        length = min(-(-max(len(r) for r in rows) // BUCKET) * BUCKET, self.cfg.max_len)
        src = np.full((len(rows), length), self.cfg.pad_id, dtype=np.int32)  # [B, S]
        for i, ids in enumerate(rows):
            src[i, :len(ids)] = ids
        return src

    def _generate(self, src: np.ndarray, options: DecodeOptions) -> np.ndarray:
        steps = options.max_new_tokens or min(self.cfg.max_len, 2 * src.shape[1] + 10)
        try:
            return self.backend.generate(src, bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
                                         **options.generate_kwargs(steps))  # [B, n]
        except ValueError as e:
            raise TranslateError(str(e).splitlines()[0]) from None

    def generate_ids(self, sources: Sequence[np.ndarray], options: DecodeOptions,
                     batch_size: int = 64) -> list[np.ndarray]:
        """Output ids of each source (ids + <eos>), in input order; batches of similar length."""
        if batch_size < 1:
            raise TranslateError(f"--batch-size must be at least 1, got {batch_size}")
        self._check_options(options)
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(sources)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            tokens = self._generate(self._pad([sources[i] for i in chunk]), options)  # [B, n]
            for i, row in zip(chunk, tokens):
                out[i] = row
        return out

    def translate(self, texts: Sequence[str], names: Sequence[str] | None = None, *, batch_size: int = 64,
                  **options: Any) -> list[str]:
        """One translation per text, in input order. `options`: DecodeOptions fields."""
        sources = self.encode(texts, names)
        ids = self.generate_ids(sources, DecodeOptions(**options), batch_size)
        return [self.tokenizer.decode(row) for row in ids]

    def attention(self, text: str, **options: Any) -> Attention:
        """The translation of `text` and its cross-attention: row t is the attention that produced output token t."""
        src_ids = self.encode([text])[0]
        out = self.generate_ids([src_ids], DecodeOptions(**options), 1)[0]
        ends = np.flatnonzero(out == self.tokenizer.eos_id)
        out = out[:ends[0] + 1] if len(ends) else out  # [T]
        src = self._pad([src_ids])  # [1, S]
        tgt_in = np.concatenate([[self.tokenizer.bos_id], out[:-1]]).astype(np.int32)[None]  # [1, T]
        weights = self.backend.cross_attention(src, tgt_in)[:, 0, :, :, :len(src_ids)]  # [L, H, T, S]
        return Attention(self.tokenizer.token_strings(src_ids), self.tokenizer.token_strings(out), weights,
                         self.tokenizer.decode(out))

    def evaluate(self, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64, **options: Any) -> dict[str, Any]:
        """Corpus BLEU and chrF (sacrebleu), exact match, and speed over (source, reference) pairs. Unknown
        characters become <unk>; sources too long for the model are skipped (counted in `skipped`)."""
        import sacrebleu

        from parity.train import exact_match

        decode = DecodeOptions(**options)
        sources = self.encode([p[0] for p in pairs], [f"test sentence {i}" for i in range(1, len(pairs) + 1)],
                              strict=False)
        kept = [i for i, s in enumerate(sources) if s is not None]
        if not kept:
            raise TranslateError(f"none of the {len(pairs)} test sentences fits the model's max_len {self.cfg.max_len}")
        start = time.perf_counter()
        ids = self.generate_ids([sources[i] for i in kept], decode, batch_size)
        hypotheses = [self.tokenizer.decode(row) for row in ids]
        seconds = time.perf_counter() - start
        references = [pairs[i][1] for i in kept]
        translations = [{"src": pairs[i][0], "ref": r, "hyp": h} for i, r, h in zip(kept, references, hypotheses)]
        return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
                "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
                "exact_match": exact_match(hypotheses, references), "sentences": len(kept),
                "skipped": len(pairs) - len(kept), "seconds": seconds,
                "sentences_per_s": len(kept) / max(seconds, 1e-9), "framework": self.framework,
                "quantize": self.quantize, **asdict(decode),
                "batch_size": batch_size, "translations": translations}


# ------------------------------------------------------------------------------------- files

def check_writable(path: str | os.PathLike, what: str) -> None:
    """TranslateError unless a file can be created next to `path` (checked before the slow work)."""
    path = Path(path)
    try:
        if path.is_dir():  # also raises for a name too long
            raise TranslateError(f"{what} {path}: is a directory")
        with tempfile.TemporaryFile(dir=path.parent if str(path.parent) else "."):
            pass
    except OSError as e:
        raise TranslateError(f"{what} {path}: cannot write there ({e.strerror or e})") from None


def write_file(path: str | os.PathLike, data: bytes, what: str) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise TranslateError(f"{what} {path}: cannot write ({e.strerror or e})") from None


def plot_attention(path: str | os.PathLike, src_tokens: Sequence[str], out_tokens: Sequence[str],
                   weights: np.ndarray, *, heads: bool = False, title: str = "") -> None:
    """PNG of cross-attention [L, H, T, S]: one panel per layer (heads averaged), or layers x heads;
    x = source tokens, y = output tokens (matplotlib Agg, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, num_heads, t, s = weights.shape  # [L, H, T, S]
    panels = weights if heads else weights.mean(axis=1, keepdims=True)  # [L, H or 1, T, S]
    rows, cols = panels.shape[:2]
    fig, axes = plt.subplots(rows, cols, squeeze=False, sharex=True, sharey=True, layout="constrained",
                             figsize=(1.5 + cols * max(2.0, 0.28 * s + 0.4), 1.5 + rows * max(1.5, 0.28 * t + 0.4)))
    for layer in range(rows):
        for head in range(cols):
            ax = axes[layer, head]
            image = ax.imshow(panels[layer, head], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)  # [T, S]
            ax.set_xticks(range(s), src_tokens, rotation=90, fontsize=8)
            ax.set_yticks(range(t), out_tokens, fontsize=8)
            ax.set_title(f"layer {layer + 1}" + (f", head {head + 1}" if heads else f" ({num_heads} heads averaged)"),
                         fontsize=9)
            ax.label_outer()
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_file(path, buffer.getvalue(), "--plot-attention")
