"""Multi-head attention (torch twin): one fused q/k/v projection (`in_proj`), out projection, SDPA.

The fused weight is a layout, not a name: `state_dict()` splits `in_proj` into the canonical
`q_proj`, `k_proj`, `v_proj` keys and `load_state_dict` joins them (`split_in_proj` / `join_in_proj`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from torch_tx.distributed import laid_out_like, whole
from torch_tx.initializers import linear, xavier_blocks_

QKV = ("q_proj", "k_proj", "v_proj")  # the canonical names of in_proj's blocks, in order


class InProjection(nn.Module):
    """The q, k and v projections as one (3D, D) weight: rows [0, D) q, [D, 2D) k, [2D, 3D) v (torch.nn's
    `in_proj_weight` layout). `forward(x, first, last)` applies blocks first..last-1: x (..., D) -> (..., n D)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.weight = nn.Parameter(xavier_blocks_(torch.empty(3 * d_model, d_model), 3))  # [3D, D]
        self.bias = nn.Parameter(torch.zeros(3 * d_model))  # [3D]

    def forward(self, x: torch.Tensor, first: int = 0, last: int = 3) -> torch.Tensor:
        rows = slice(first * self.d_model, last * self.d_model)
        return F.linear(x, self.weight[rows], self.bias[rows])  # [..., (last - first) * D]


def _key(*names: str) -> str:
    """Dotted state-dict key of the non-empty names: _key("", "q_proj", "bias") == "q_proj.bias"."""
    return ".".join(n for n in names if n)


def split_in_proj(tensors: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{name: tensor} -> the same with every `{prefix}…in_proj.{weight,bias}` split into its canonical row blocks
    `q_proj.weight, q_proj.bias, k_proj.…, v_proj.…` in its place (views; a DTensor is gathered first)."""
    out: dict[str, Any] = {}
    for name, tensor in tensors.items():
        module, _, _ = name.rpartition(".")
        base, _, last = module.rpartition(".")
        if last != "in_proj" or not name.startswith(prefix):
            out[name] = tensor
            continue
        leaves = [leaf for leaf in ("weight", "bias") if f"{module}.{leaf}" in tensors]
        if name != f"{module}.{leaves[0]}":
            continue
        blocks = {leaf: whole(tensors[f"{module}.{leaf}"]).chunk(3) for leaf in leaves}  # 3 x [D, ...]
        for i, proj in enumerate(QKV):
            for leaf in leaves:
                out[_key(base, proj, leaf)] = blocks[leaf][i]
    return out


def join_in_proj(tensors: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of `split_in_proj`: every complete `{prefix}…{q,k,v}_proj.{leaf}` triple becomes one
    `…in_proj.{leaf}` (concatenated rows), in q_proj's place; incomplete triples are left as they are."""
    out = {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        base, _, proj = module.rpartition(".")
        parts = [_key(base, p, leaf) for p in QKV]
        if proj not in QKV or not name.startswith(prefix) or not all(p in tensors for p in parts):
            out[name] = tensor
        elif proj == QKV[0]:
            out[_key(base, "in_proj", leaf)] = torch.cat(
                [whole(tensors[p]) for p in parts])  # [3D, ...]
    return out


class MultiHeadAttention(nn.Module):
    """query (B, T, D), key_value (B, S, D), mask (B|1, 1, T|1, S) bool True = attend -> (B, T, D).

    Self-attention (`key_value is query`) projects q, k, v with one matmul; cross-attention projects q
    and k, v (two). A query row whose keys are all masked gives zeros (SDPA's behaviour since torch 2.5).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.in_proj = InProjection(d_model)
        self.out_proj = linear(d_model, d_model)
        self.register_state_dict_post_hook(_split_state_dict)
        self.register_load_state_dict_pre_hook(_join_state_dict)
        self.register_load_state_dict_post_hook(_canonical_errors)

    def _split_heads(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """x (B, L, n D) -> n blocks (B, H, L, K) (views)."""
        b, length, _ = x.shape
        return tuple(part.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
                     for part in x.chunk(n, -1))  # n x [B, H, L, K]

    def project_q(self, query: torch.Tensor) -> torch.Tensor:
        """query (B, T, D) -> queries (B, H, T, K)."""
        return self._split_heads(self.in_proj(query, 0, 1), 1)[0]  # [B, H, T, K]

    def project_kv(self, key_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key_value (B, S, D) -> keys and values (B, H, S, K): what a KV cache stores."""
        return self._split_heads(self.in_proj(key_value, 1, 3), 2)  # 2 x [B, H, S, K]

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> queries, keys and values (B, H, T, K) of self-attention, one matmul."""
        return self._split_heads(self.in_proj(x), 3)  # 3 x [B, H, T, K]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected q (B, H, T, K) against k, v (B, H, S, K) -> (B, T, D)."""
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # [B, H, T, K]
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, D]
        return self.out_proj(out)  # [B, T, D]

    def forward(self, query: torch.Tensor, key_value: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_value is query:
            return self.attend(*self.project_qkv(query), mask)  # [B, T, D]
        return self.attend(self.project_q(query), *self.project_kv(key_value), mask)  # [B, T, D]


def _split_state_dict(module: MultiHeadAttention, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: in_proj -> the canonical q_proj, k_proj, v_proj keys, in the canonical order."""
    items = split_in_proj(state_dict, prefix + "in_proj.")
    state_dict.clear()
    state_dict.update(items)


def _join_state_dict(module: MultiHeadAttention, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: canonical q_proj, k_proj, v_proj keys -> in_proj, laid out like the parameter
    (FSDP2: sharded the same way)."""
    before = set(state_dict)
    items = join_in_proj(state_dict, prefix)
    state_dict.clear()
    state_dict.update(items)
    for leaf in ("weight", "bias"):
        key = f"{prefix}in_proj.{leaf}"
        if key in state_dict and key not in before:
            state_dict[key] = laid_out_like(state_dict[key], getattr(module.in_proj, leaf))


def _canonical_errors(module: MultiHeadAttention, incompatible: Any) -> None:
    """load_state_dict post-hook: a missing `…in_proj.{leaf}` is reported as the canonical keys that are
    missing (those of its q, k, v triple not given), and the given ones are no longer unexpected."""
    for key in list(incompatible.missing_keys):
        module_name, _, leaf = key.rpartition(".")
        base, _, last = module_name.rpartition(".")
        if last != "in_proj":
            continue
        parts = [_key(base, p, leaf) for p in QKV]
        incompatible.missing_keys.remove(key)
        incompatible.missing_keys.extend(p for p in parts if p not in incompatible.unexpected_keys)
        incompatible.unexpected_keys[:] = [k for k in incompatible.unexpected_keys if k not in parts]
