"""Hand-solvable classifiers and small trained models shared by the curvature tests."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np


def quadratic_classifier(seed: int, num_classes: int, shape=(4, 4, 1), scale: float = 0.1):
    """``f_k(x) = 0.5 s x^T A_k x + b_k . x + c_k`` with random symmetric A_k.

    Every input Hessian is constant, so the principal curvatures at any point
    are the eigenvalues of ``P s (A_i - A_j) P / ||grad F||`` in closed form.
    """
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    A = rng.standard_normal((num_classes, d, d))
    A = scale * (A + A.transpose(0, 2, 1)) / 2
    b = rng.standard_normal((num_classes, d))
    c = rng.standard_normal(num_classes)
    params = tuple(jnp.asarray(a, jnp.float32) for a in (A, b, c))

    def apply_fn(p, x):
        v = x.ravel()
        return 0.5 * jnp.einsum("i,kij,j->k", v, p[0], v) + p[1] @ v + p[2]

    return apply_fn, params


def tangent_curvatures(hessian: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """The d - 1 eigenvalues of ``H / ||g||`` on the complement of ``g``, descending (float64)."""
    from scipy.linalg import null_space

    g = np.asarray(grad, np.float64).ravel()
    B = null_space(g[None, :])  # (d, d - 1) orthonormal tangent basis
    H = np.asarray(hessian, np.float64)
    vals = np.linalg.eigvalsh(B.T @ (0.5 * (H + H.T)) @ B / np.linalg.norm(g))
    return vals[::-1]


@functools.cache
def digits_mlp(activation: str, steps: int = 300):
    """A small MLP (one hidden layer of 64) fitted to digits by full-batch Adam, cached.

    A lean jitted ``lax.scan`` instead of ``bgeom.train.fit`` keeps the tests fast
    (about 95 % test accuracy with softplus)."""
    import jax
    import optax

    from bgeom import data, models

    ds = data.load("digits")
    beta = 5.0 if activation == "softplus" else 1.0
    model = models.create("mlp", (8, 8, 1), 10, hidden=(64,), activation=activation, beta=beta)
    apply_fn, params = models.functional(model)
    opt = optax.adam(1e-2)
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)

    def loss(p):
        logits = apply_fn.batched(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, state = carry
            g = jax.grad(loss)(p)
            updates, state = opt.update(g, state, p)
            return (optax.apply_updates(p, updates), state), None

        return jax.lax.scan(step, (p, opt.init(p)), None, length=steps)[0][0]

    params = fit(params)
    logits = apply_fn.batched(params, jnp.asarray(ds.x_test))
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(ds.y_test)))
    return ds, apply_fn, params, accuracy


@functools.cache
def digits_curvature(n: int = 32):
    """The whole curvature spectrum (63 = d - 1 curvatures) of the smooth digits MLP at the
    boundary points of ``n`` test and ``n`` training images, and the shared curved subspace
    (m = 8) of the training points. Shared by the curvature and detection tests."""
    import jax

    from bgeom import curvature

    ds, apply_fn, params, accuracy = digits_mlp("softplus")
    assert accuracy > 0.9, accuracy
    run = jax.jit(
        jax.vmap(lambda x: curvature.boundary_curvature(apply_fn, params, x, k=63, num_matvecs=63))
    )
    x_test, x_train = jnp.asarray(ds.x_test[:n]), jnp.asarray(ds.x_train[:n])
    test, train_points = run(x_test), run(x_train)
    shared = curvature.shared_curved_subspace_at(apply_fn, params, train_points, m=8)
    return SimpleNamespace(
        apply_fn=apply_fn,
        params=params,
        x_test=x_test,
        x_train=x_train,
        y_test=ds.y_test[:n],
        test=test,
        train=train_points,
        shared=shared,
    )
