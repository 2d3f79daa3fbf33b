"""Whether JAX is tracing: the one test the Flax twin's value checks use before they look at values on the host.

Inside `jit`, `grad`, `vmap`, `lax.scan`, `eval_shape` and the like, even a concrete array captured by the
traced function is not safe to read: operations on it (`np.min(x)` calls `x.min()`) are staged out and give
tracers. So a check asks JAX whether a trace is running, not whether its argument is a `Tracer`, and under a
trace it leaves the values alone (out-of-range ids then give NaN rows: see `TokenEmbedding`). The torch twin's
counterpart is `torch.compiler.is_compiling()`.

JAX has no public API for this yet (jax-ml/jax#18544); `trace_state_clean` is what `jax.core` exported before
0.4.36 and what `jax._src.core` still has.
"""

from __future__ import annotations

import jax

try:
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # older JAX
    _trace_state_clean = jax.core.trace_state_clean


def tracing() -> bool:
    """True while JAX is tracing a function (any transformation); False in plain eager code."""
    return not _trace_state_clean()
