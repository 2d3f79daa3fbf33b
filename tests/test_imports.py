"""A torch-only or jax-only install works: each twin imports and runs with the other framework blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, _Block())
"""


def _run(blocked: set[str], body: str) -> None:
    code = BLOCK.format(blocked=blocked) + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=300)
    assert result.returncode == 0, result.stderr


def test_torch_twin_without_jax():
    _run({"jax", "jaxlib", "flax", "optax"}, """
        import torch, torch_tx
        from parity.config import TransformerConfig
        from parity import convert, checkpoint, names, suite, cli
        cfg = TransformerConfig(5, 5, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=8)
        out = torch_tx.Transformer(cfg)(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
        assert out.shape == (1, 2, 5)
        assert torch_tx.generate(torch_tx.Transformer(cfg), torch.ones(1, 3, dtype=torch.long), max_new_tokens=4,
                                 bos_id=1, eos_id=2).shape[0] == 1
        import tempfile, pathlib
        from parity import formats
        tmp = pathlib.Path(tempfile.mkdtemp())
        sd = torch_tx.Transformer(cfg).state_dict()
        formats.write_checkpoint(tmp / "m.safetensors", "safetensors", cfg, {k: v.numpy() for k, v in sd.items()})
        assert cli.main(["convert", str(tmp / "m.safetensors"), str(tmp / "out"), "--to", "torch"]) == 0
        assert torch.equal(torch.load(tmp / "out" / "pytorch_model.bin")["generator.weight"], sd["generator.weight"])
        assert cli.main(["convert", str(tmp / "m.safetensors"), str(tmp / "x"), "--to", "flax"]) == 1  # names jax
        assert not any(m.split(".")[0] in ("jax", "flax") for m in sys.modules)
    """)


def test_jax_twin_without_torch():
    _run({"torch"}, """
        import jax, jax.numpy as jnp, jax_tx
        from parity.config import TransformerConfig
        from parity import convert, checkpoint, names, suite, cli
        cfg = TransformerConfig(5, 5, d_model=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=8)
        m = jax_tx.Transformer(cfg)
        ids = jnp.ones((1, 3), jnp.int32)
        v = m.init(jax.random.key(0), ids, ids)
        assert m.apply(v, ids, ids).shape == (1, 3, 5)
        sd = convert.flax_to_canonical(v["params"], cfg)
        assert "generator.weight" in sd
        assert jax_tx.generate(m, v, ids, max_new_tokens=4, bos_id=1, eos_id=2).shape[0] == 1
        import tempfile, pathlib, numpy as np
        from parity import formats
        tmp = pathlib.Path(tempfile.mkdtemp())
        formats.write_checkpoint(tmp / "m.safetensors", "safetensors", cfg, sd)
        assert cli.main(["convert", str(tmp / "m.safetensors"), str(tmp / "out"), "--to", "flax"]) == 0
        assert np.array_equal(formats.read_checkpoint(tmp / "out").weights["generator.weight"], sd["generator.weight"])
        assert cli.main(["convert", str(tmp / "m.safetensors"), str(tmp / "x.pt"), "--to", "torch"]) == 1
        assert "torch" not in sys.modules
    """)


def test_parity_imports_no_framework():
    _run(set(), """
        import parity, parity.config, parity.names, parity.convert, parity.checkpoint, parity.suite, parity.cli
        import parity.decoding, parity.translate, parity.train, parity.tokenizer, parity.data, parity.batching
        import parity.formats, parity.verify
        loaded = {m.split(".")[0] for m in sys.modules}
        assert not loaded & {"torch", "jax", "flax"}, loaded & {"torch", "jax", "flax"}
    """)
