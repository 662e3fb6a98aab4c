"""Every analysis composes with jit and vmap: jit == eager, vmap == a Python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tol

import bgeom
from bgeom import models


@pytest.fixture(scope="module")
def smooth_mlp():
    model = models.create("mlp", (6, 6, 1), 4, hidden=(32,), activation="softplus", beta=4.0)
    return models.functional(model)


def _samples(n=5):
    return jax.random.uniform(jax.random.PRNGKey(7), (n, 6, 6, 1))


def _asymmetry_score(apply_fn, params, x):
    # Fixed directions built with NumPy, so the eager run times the score alone.
    rng = np.random.default_rng(5)
    dirs = 0.3 * np.linalg.qr(rng.standard_normal((x.size, 8)))[0].T.reshape(8, *x.shape)
    return bgeom.detection.asymmetry_score(apply_fn, params, x, dirs.astype(np.float32))


def _path(apply_fn, params, x):
    # A pair of one class (the smooth MLP labels this nearby point like x); its
    # anchors and the pooled search are tested in test_paths.py.
    x2 = 0.9 * x + 0.05
    return bgeom.find_path(apply_fn, params, x, x2, max_anchors=7, samples=16, verify_samples=100)


ANALYSES = {
    "deepfool": lambda apply_fn, params, x: bgeom.deepfool(apply_fn, params, x),
    "targeted_deepfool": lambda apply_fn, params, x: bgeom.targeted_deepfool(
        apply_fn, params, x, (jnp.argmax(apply_fn(params, x)) + 1) % 4
    ),
    "find_path": _path,
    "deepfool_bounded": lambda apply_fn, params, x: bgeom.deepfool(
        apply_fn, params, x, bounds=(0.0, 1.0), candidates=3
    ),
    "subspace_deepfool_block": lambda apply_fn, params, x: bgeom.subspace_deepfool(
        apply_fn, params, x, bgeom.subspaces.dct_blocks(x.shape, 3, 3)[0]
    ),
    "subspace_deepfool_random": lambda apply_fn, params, x: bgeom.subspace_deepfool(
        apply_fn, params, x, bgeom.subspaces.random(jax.random.PRNGKey(3), x.shape, 12)
    ),
    "boundary_curvature": lambda apply_fn, params, x: bgeom.boundary_curvature(
        apply_fn, params, x, k=4, which="both", num_matvecs=8
    ),
    "asymmetry_score": lambda apply_fn, params, x: _asymmetry_score(apply_fn, params, x),
    "boundary_point": lambda apply_fn, params, x: bgeom.boundary_point(apply_fn, params, x),
    "boundary_point_targeted": lambda apply_fn, params, x: bgeom.boundary_point(
        apply_fn, params, x, target=(jnp.argmax(apply_fn(params, x)) + 2) % 4
    ),
    "curvature_density": lambda apply_fn, params, x: bgeom.curvature.curvature_density(
        apply_fn, params, x, jax.random.PRNGKey(2), num_probes=2, num_matvecs=6
    ),
    "sparsefool": lambda apply_fn, params, x: bgeom.sparsefool(apply_fn, params, x, max_iter=5),
    "principal_curvatures": lambda apply_fn, params, x: bgeom.curvature.principal_curvatures(
        apply_fn, params, x, jnp.argmax(apply_fn(params, x)), 0, k=3, num_matvecs=6
    ),
}


def _assert_trees_close(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u), np.asarray(v)
        if np.issubdtype(u.dtype, np.floating):
            np.testing.assert_allclose(u, v, **tol(u.dtype, 64))
        else:
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("name", sorted(ANALYSES))
def test_jit_equals_eager(name, smooth_mlp):
    apply_fn, params = smooth_mlp
    fn = ANALYSES[name]
    x = _samples(1)[0]
    with jax.disable_jit():
        eager = fn(apply_fn, params, x)
    # x closed over, as in jax.jit(lambda p: fn(apply_fn, p, x)): the input checks must read
    # a concrete x with NumPy (a jnp reduction of it is a tracer under jit). A traced x is
    # the vmap test's.
    jitted = jax.jit(lambda p: fn(apply_fn, p, x))(params)
    # Every result with a status converged here; analyses without one are scores.
    assert bool(getattr(eager, "converged", True))
    _assert_trees_close(eager, jitted)


@pytest.mark.parametrize("name", sorted(ANALYSES))
def test_vmap_equals_loop(name, smooth_mlp):
    apply_fn, params = smooth_mlp
    fn = ANALYSES[name]
    xs = _samples()
    batched = jax.vmap(lambda xi: fn(apply_fn, params, xi))(xs)
    looped = jax.tree.map(lambda *a: jnp.stack(a), *[fn(apply_fn, params, xi) for xi in xs])
    _assert_trees_close(batched, looped)


def test_subspace_margins_equal_nested_vmaps(smooth_mlp):
    apply_fn, params = smooth_mlp
    xs = _samples(3)
    blocks = bgeom.subspaces.dct_blocks(xs.shape[1:], 3, 3)
    grid = bgeom.subspace_margins(apply_fn, params, xs, blocks)
    nested = jax.vmap(
        lambda x: jax.vmap(lambda s: bgeom.subspace_deepfool(apply_fn, params, x, s))(blocks)
    )(xs)
    _assert_trees_close(grid, nested)


def test_vmap_over_ensemble_params(smooth_mlp):
    apply_fn, _ = smooth_mlp
    states = [
        models.functional(
            models.create("mlp", (6, 6, 1), 4, hidden=(32,), activation="softplus", seed=s)
        )[1]
        for s in range(3)
    ]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    xs = _samples(4)
    grid = jax.vmap(lambda p: jax.vmap(lambda xi: bgeom.deepfool(apply_fn, p, xi))(xs))(stacked)
    for i, p in enumerate(states):
        row = jax.vmap(lambda xi, p=p: bgeom.deepfool(apply_fn, p, xi))(xs)
        _assert_trees_close(jax.tree.map(lambda a, i=i: a[i], grid), row)
