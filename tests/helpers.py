"""Shared test helpers: the one dtype-aware tolerance and small hand-solvable classifiers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def tol(dtype, scale: float = 1.0) -> dict[str, float]:
    """rtol/atol for comparing results computed in ``dtype`` (``scale`` loosens both)."""
    eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
    return {"rtol": scale * 64 * eps, "atol": scale * 64 * eps}


def affine_classifier(seed: int, num_classes: int, shape=(4, 4, 1)):
    """``f(x) = W vec(x) + b`` with random W, b: its DeepFool answer is known in closed form."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    W = jnp.asarray(rng.standard_normal((num_classes, d)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(num_classes), jnp.float32)
    return (lambda p, x: p[0] @ x.ravel() + p[1]), (W, b)


def affine_margin(params, x, candidates: int, overshoot: float) -> tuple[float, int]:
    """Closed form: (1 + overshoot)(d + 1e-4) with d the distance to the nearest pairwise
    hyperplane among the top ``candidates`` classes, and that class. Float64 NumPy."""
    W, b = (np.asarray(a, np.float64) for a in params)
    f = W @ np.asarray(x, np.float64).ravel() + b
    order = np.argsort(-f, kind="stable")[:candidates]
    k0 = order[0]
    dists = {int(k): abs(f[k] - f[k0]) / np.linalg.norm(W[k] - W[k0]) for k in order[1:]}
    k = min(dists, key=dists.get)
    return (1.0 + overshoot) * (dists[k] + 1e-4), k
