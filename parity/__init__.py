"""What the twins share: config, weight names and conversion, checkpoint I/O, the parity suite, the CLI.

No framework is imported here at module level: a torch-only or a jax-only install can use it.
"""

from parity.config import TransformerConfig

__all__ = ["TransformerConfig"]
