"""One name per parameter: the torch twin's `named_parameters()`, its `state_dict()` and the canonical names
(`parity.names.canonical_shapes`) are one set, from a plain nn.Module tree without state-dict hooks; the Flax twin
holds each canonical weight as one param under the same module names (the rule table has no fused entry)."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import jax_tx
import torch_tx
from parity import convert
from parity.config import TransformerConfig
from parity.names import aliases, canonical_shapes

BASE = TransformerConfig(src_vocab_size=11, tgt_vocab_size=13, d_model=8, num_heads=2, num_encoder_layers=2,
                         num_decoder_layers=1, d_ff=16, dropout=0.0, max_len=16)
CONFIGS = {
    "seq2seq": BASE,
    "seq2seq-tied": BASE.replace(src_vocab_size=13, tie_output=True, share_embeddings=True, output_bias=False,
                                 final_norm=False),
    "encoder": BASE.replace(arch="encoder", num_classes=3),
    "decoder": BASE.replace(arch="decoder"),
}
HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def cfg(request) -> TransformerConfig:
    return CONFIGS[request.param]


def test_named_parameters_state_dict_and_canonical_names_are_one_list(cfg):
    torch.manual_seed(0)
    model = torch_tx.model_for(cfg)
    shapes = canonical_shapes(cfg)
    named = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    assert list(named) == list(model.state_dict()) == list(shapes)  # the same names, in the same order
    assert named == shapes
    assert not [name for name, module in model.named_modules() for hook in HOOKS if getattr(module, hook)]


def test_parameters_selected_by_name_are_all_found(cfg):
    """What outside code does by name: a weight-decay mask, LoRA/PEFT-style target modules, gradients by name."""
    torch.manual_seed(0)
    model = torch_tx.model_for(cfg)
    blocks = cfg.num_encoder_layers * (cfg.arch != "decoder") + cfg.num_decoder_layers * (cfg.arch != "encoder") \
        + cfg.num_decoder_layers * (cfg.arch == "seq2seq")  # attention blocks: self (+ cross in seq2seq)
    targets = {name: m for name, m in model.named_modules() if name.rpartition(".")[2] in ("q_proj", "v_proj")}
    assert len(targets) == 2 * blocks
    assert all(isinstance(m, nn.Linear) and m.weight.shape == (cfg.d_model, cfg.d_model) for m in targets.values())
    decay = {name for name, p in model.named_parameters() if p.ndim == 2 and "embed" not in name}
    assert {f"{name}.weight" for name in targets} <= decay
    assert sum(name.endswith("k_proj.weight") for name in decay) == blocks
    src = torch.randint(1, cfg.src_vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))  # [B, S]
    out = model(src) if cfg.arch != "seq2seq" else model(src, src.clamp(max=cfg.tgt_vocab_size - 1))
    (out[1] if isinstance(out, tuple) else out).sum().backward()
    grads = {name for name, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}
    assert grads <= set(model.state_dict()) and {f"{name}.weight" for name in targets} <= grads


def test_a_missing_projection_is_reported_by_its_canonical_name():
    torch.manual_seed(0)
    model = torch_tx.Transformer(BASE)
    state = model.state_dict()
    del state["decoder.layers.0.cross_attn.k_proj.bias"]
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["decoder.layers.0.cross_attn.k_proj.bias"] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "decoder.layers.0.cross_attn.k_proj.bias"'):
        model.load_state_dict(state)


def test_the_flax_tree_holds_each_canonical_weight_as_one_param(cfg):
    model = jax_tx.model_for(cfg)
    src = jnp.ones((1, 4), jnp.int32)
    args = (src,) if cfg.arch != "seq2seq" else (src, src)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))["params"]
    flat = {"/".join(str(k.key) for k in path): tuple(v.shape)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    key_map = convert.flax_key_map(cfg)
    owned = [key for key in canonical_shapes(cfg) if key not in aliases(cfg)]
    assert sorted(key for key, _ in key_map.values()) == sorted(owned)  # one canonical key per Flax param
    assert set(flat) == {"/".join(path) for path in key_map}
    layer = "encoder/layers_0/self_attn" if cfg.arch != "decoder" else "decoder/layers_0/self_attn"
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert flat[f"{layer}/{proj}/kernel"] == (cfg.d_model, cfg.d_model)  # the same module names as torch


def test_conversion_maps_q_k_v_one_to_one():
    torch.manual_seed(0)
    state = torch_tx.Transformer(BASE).double().state_dict()
    params = convert.torch_to_flax(state, BASE)
    attn = params["decoder"]["layers_0"]["cross_attn"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_array_equal(attn[proj]["kernel"], state[f"decoder.layers.0.cross_attn.{proj}.weight"].numpy().T)
        np.testing.assert_array_equal(attn[proj]["bias"], state[f"decoder.layers.0.cross_attn.{proj}.bias"].numpy())
    back = convert.flax_to_torch(params, BASE)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("package", ["torch_tx", "jax_tx"])
def test_the_twins_module_level_imports_have_no_cycle(package):
    """The import circle torch_tx/attention.py -> distributed.py -> layers.py -> attention.py is gone: the graph of
    each twin's module-level imports of its own modules is acyclic, and attention imports only initializers."""
    root = Path(__file__).resolve().parents[1] / package
    graph = {}
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
        names |= {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        graph[path.stem] = {n.split(".")[1] for n in names if n.startswith(f"{package}.")}
    assert graph["attention"] == {"initializers"}
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join(stack + (module,))}"
        if module not in done:
            for imported in graph.get(module, ()):
                visit(imported, stack + (module,))
            done.add(module)

    for module in graph:
        visit(module, ())
