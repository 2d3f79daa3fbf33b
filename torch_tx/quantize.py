"""Dynamic int8 inference for the torch twin (CPU only): `quantize_dynamic_int8(model)`.

Every `nn.Linear` of the model becomes a dynamically quantized int8 Linear
(`torch.ao.quantization.quantize_dynamic`, qint8 weights): the attention projections (q/k/v/out, self- and
cross-attention), the feed-forward layers and the output layer `generator`, also where the generator is tied to
the target embedding (the quantized generator holds its own int8 copy; the embedding itself stays float32).
Token embeddings, the positional table, LayerNorms, softmax and attention scores stay float32. "Dynamic": the
weights are quantized once, here (symmetric qint8, per output channel by default); each Linear quantizes its
input activations to uint8 per tensor at every call, from that call's min/max, multiplies in int8 with int32
accumulation and returns float32. The kernels are those of `torch.backends.quantized.engine` at the time of the
call (on x86, "x86": fbgemm, and oneDNN where it is faster).

What it is for: decoding with `torch_tx.generate` (greedy, beam search, sampling) and the cross-attention capture
of `torch_tx.decoding.cross_attention_weights`, on CPU. It is not a training path (no gradients through int8
weights) and not a checkpoint format: the quantized model's `state_dict()` holds packed int8 weights under
other names than the canonical ones; save the float32 model and quantize at load time (`twin translate
--quantize int8`). The JAX twin has no int8 path.

Numerics: int8 weights carry a relative rounding error of about 1 / (2 * 127) of each output channel's largest
weight, and the activations one of 1 / (2 * 255) of each call's range, so logits move by about 1% of their
scale: greedy tokens change where the float32 model's top two logits are that close (measured on
`tests/data/tiny_run` and against CTranslate2 int8 in benchmarks/bench_int8.py and benchmarks/bench_decode.py).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

QCONFIGS = ("per_channel", "per_tensor")


def _qconfig(weights: str):
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    if weights not in QCONFIGS:
        raise ValueError(f"weights must be one of {', '.join(QCONFIGS)}, got {weights!r}")
    return per_channel_dynamic_qconfig if weights == "per_channel" else default_dynamic_qconfig


def quantize_dynamic_int8(model: nn.Module, *, weights: str = "per_channel") -> nn.Module:
    """A new eval-mode copy of `model` (a float32 torch_tx model on the CPU) whose nn.Linear layers are dynamic int8.

    weights: "per_channel" (one scale per output row; the default, closer to float32) or "per_tensor" (one scale
    per Linear). The model itself is left untouched (deep-copied first: its parameters, buffers and tied weights
    stay as they were). ValueError for a model with floating parameters other than float32 (int8 dynamic
    quantization computes in float32 only: float64 and bfloat16/float16 models are refused, convert with
    `.float()` first), for parameters on another device than the CPU, and for a model without any nn.Linear.
    """
    qconfig = _qconfig(weights)
    params = list(model.parameters())
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.is_floating_point()})
    if dtypes != ["float32"]:
        raise ValueError(f"quantize_dynamic_int8: int8 dynamic quantization runs float32 models only; this model's "
                         f"parameters are {', '.join(dtypes) or 'not floating point'} (call .float() first)")
    devices = sorted({str(p.device) for p in params} - {"cpu"})
    if devices:
        raise ValueError(f"quantize_dynamic_int8: int8 dynamic quantization runs on the CPU only; this model's "
                         f"parameters are on {', '.join(devices)} (call .cpu() first)")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError("quantize_dynamic_int8: the model has no nn.Linear to quantize")
    from torch.ao.quantization import quantize_dynamic

    quantized = copy.deepcopy(model).eval()
    with warnings.catch_warnings():  # torch >= 2.10 deprecates quantized tensor creation in favour of torchao
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor, torch.quantize_per_channel.*")
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        quantize_dynamic(quantized, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    for p in quantized.parameters():
        p.requires_grad_(False)
    return quantized


def quantized_linears(model: nn.Module) -> list[str]:
    """Names of the dynamic int8 Linear modules of `model` (those `quantize_dynamic_int8` made)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return [name for name, m in model.named_modules() if isinstance(m, DynamicLinear)]
