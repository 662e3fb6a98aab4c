"""Argument checks shared by every analysis: misuse is a ValueError saying what to do.

Each check raises ``ValueError`` with a sentence saying what to do. They run at
trace time: shapes are always known then; values only when the input is
concrete (not a tracer), so a NaN caught here under eager execution comes back
under ``jit`` as ``converged=False`` instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values now (not an abstract tracer under jit/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def check_example(x: Any, fn_name: str) -> jax.Array:
    """Check that ``x`` is ONE image of shape (H, W, C) with finite values."""
    x = jnp.asarray(x)
    if x.ndim != 3:
        hint = (
            " It looks like a batch: map over it with jax.vmap(lambda x: "
            f"bgeom.{fn_name}(apply_fn, params, x))(batch)."
            if x.ndim == 4
            else ""
        )
        raise ValueError(
            f"{fn_name} expects ONE example of shape (H, W, C); got shape {tuple(x.shape)}.{hint}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{fn_name} expects a floating-point image; got dtype {x.dtype}. "
            "Convert it with x.astype(jnp.float32) (and scale to [0, 1])."
        )
    if is_concrete(x) and not bool(np.all(np.isfinite(np.asarray(x)))):
        raise ValueError(
            f"{fn_name} got an input with NaN or Inf values; clean the input first "
            "(e.g. jnp.nan_to_num) or check the data pipeline."
        )
    return x


def check_logits(apply_fn: Any, params: Any, x: jax.Array, fn_name: str) -> int:
    """Check that ``apply_fn(params, x)`` gives a vector of logits; return its length."""
    out = jax.eval_shape(apply_fn, params, x)
    if len(out.shape) != 1:
        raise ValueError(
            f"{fn_name}: apply_fn(params, x) must return a 1-D vector of logits for one "
            f"example, but returned shape {tuple(out.shape)}. Wrap a batched model as "
            "lambda p, x: model(p, x[None])[0], or use bgeom.models.functional(model)."
        )
    if out.shape[0] < 2:
        raise ValueError(f"{fn_name}: the classifier must have at least 2 classes.")
    return int(out.shape[0])


def check_positive_int(value: Any, name: str, fn_name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{fn_name}: {name} must be an integer; got {value!r}.")
    if value < minimum:
        raise ValueError(f"{fn_name}: {name} must be >= {minimum}; got {value}.")
    return int(value)


def check_nonnegative_float(value: Any, name: str, fn_name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{fn_name}: {name} must be a number; got {value!r}.") from None
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{fn_name}: {name} must be a finite number >= 0; got {value}.")
    return value
