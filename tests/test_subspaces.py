"""Subspaces and margins along them, checked against independent dense DCT bases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
from helpers import affine_classifier, tol

import bgeom
from bgeom import models
from bgeom import subspaces as S


def dense_dct_basis(h, w, c):
    """Every 2-D orthonormal DCT-II atom as a row (float64, built by scipy, not bgeom)."""
    rows, index = [], []
    for i in range(h):
        for j in range(w):
            coeff = np.zeros((h, w))
            coeff[i, j] = 1.0
            atom = scipy.fft.idctn(coeff, type=2, norm="ortho")
            for ch in range(c):
                v = np.zeros((h, w, c))
                v[..., ch] = atom
                rows.append(v.ravel())
                index.append((i, j))
    return np.array(rows), index


def dense_block_projector(shape, rows, cols):
    basis, index = dense_dct_basis(*shape)
    keep = [k for k, (i, j) in enumerate(index) if i in rows and j in cols]
    B = basis[keep]
    return B.T @ B


def test_reference_grids_have_the_paper_block_counts():
    assert len(S.dct_blocks((28, 28, 1), 8, 1)) == 21
    assert len(S.dct_blocks((32, 32, 3), 8, 2)) == 13
    assert len(S.dct_blocks((224, 224, 3), 16, 16)) == 14
    blocks = S.dct_blocks((32, 32, 3), 8, 2)
    assert float(blocks.dim[0]) == 8 * 8 * 3
    np.testing.assert_array_equal(S.block_starts((32, 32, 3), 8, 2), np.arange(0, 25, 2))


@pytest.mark.parametrize("which", [0, 3, 6])  # low, middle, high block
def test_block_projection_matches_dense_dct_basis(which):
    shape = (10, 10, 2)
    blocks = S.dct_blocks(shape, block=4, stride=1)
    s = which
    P = dense_block_projector(shape, range(s, s + 4), range(s, s + 4))
    g = np.random.default_rng(which).standard_normal(shape)
    got = np.asarray(blocks[which].project(jnp.asarray(g, jnp.float32)), np.float64)
    np.testing.assert_allclose(got.ravel(), P @ g.ravel(), **tol(jnp.float32, 4))
    np.testing.assert_allclose(
        float(blocks[which].norm_of_projection(jnp.asarray(g, jnp.float32))),
        np.linalg.norm(P @ g.ravel()),
        **tol(jnp.float32, 4),
    )
    _check_coordinates(blocks[which], g, P)


def _check_coordinates(sub, g, P):
    """The coordinates' norm is the projection's; synthesise is linear and lands in S."""
    c = sub.coordinates(sub.analyse(jnp.asarray(g, jnp.float32)))
    np.testing.assert_allclose(
        float(jnp.linalg.norm(c)), np.linalg.norm(P @ g.ravel()), **tol(jnp.float32, 4)
    )
    img = np.asarray(sub.synthesise(2.5 * c), np.float64).ravel()
    np.testing.assert_allclose(img, 2.5 * (P @ g.ravel()), **tol(jnp.float32, 4))
    np.testing.assert_allclose(P @ img, img, **tol(jnp.float32, 4))


def test_complementary_masks_sum_to_identity_and_project():
    shape = (12, 12, 3)
    g = jax.random.normal(jax.random.PRNGKey(0), shape)
    for sub in (S.dct_blocks(shape, 5, 2)[2], S.band(shape, 4), S.band(shape, 7, high=True)):
        total = sub.project(g) + sub.complement().project(g)
        np.testing.assert_allclose(total, g, **tol(jnp.float32, 8))
        once = sub.project(g)
        np.testing.assert_allclose(sub.project(once), once, **tol(jnp.float32, 8))
        assert abs(float(jnp.vdot(once, sub.complement().project(g)))) < 1e-4


def test_flip_is_an_orthogonal_involution_that_mirrors_frequencies():
    shape = (9, 7, 2)
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    y = jax.random.normal(jax.random.PRNGKey(2), shape)
    np.testing.assert_allclose(S.flip(S.flip(x)), x, **tol(jnp.float32, 8))
    np.testing.assert_allclose(
        float(jnp.vdot(S.flip(x), S.flip(y))), float(jnp.vdot(x, y)), rtol=1e-5
    )
    coeff = np.zeros((9, 7))
    coeff[1, 2] = 1.0
    atom = scipy.fft.idctn(coeff, type=2, norm="ortho")
    mirrored = np.zeros((9, 7))
    mirrored[9 - 1 - 1, 7 - 1 - 2] = 1.0
    expected = scipy.fft.idctn(mirrored, type=2, norm="ortho")
    got = S.flip(jnp.asarray(np.stack([atom, atom], -1), jnp.float32))
    np.testing.assert_allclose(got[..., 0], expected, **tol(jnp.float32, 4))
    # batched images flip one by one
    batch = jnp.stack([x, y])
    np.testing.assert_allclose(S.flip(batch)[1], S.flip(y), **tol(jnp.float32, 4))


def test_low_and_high_pass_keep_their_corner_blocks():
    shape = (8, 8, 1)
    x = jax.random.normal(jax.random.PRNGKey(3), shape)
    low = S.dct2(S.low_pass(x, 3))[..., 0]
    high = S.dct2(S.high_pass(x, 3))[..., 0]
    full = S.dct2(x)[..., 0]
    np.testing.assert_allclose(low[:3, :3], full[:3, :3], **tol(jnp.float32, 8))
    assert float(jnp.abs(low).sum() - jnp.abs(low[:3, :3]).sum()) < 1e-4
    np.testing.assert_allclose(high[5:, 5:], full[5:, 5:], **tol(jnp.float32, 8))
    assert float(jnp.abs(high).sum() - jnp.abs(high[5:, 5:]).sum()) < 1e-4


def test_random_and_custom_bases_are_orthonormal_projections():
    shape = (6, 6, 2)
    rs = S.random(jax.random.PRNGKey(4), shape, 5, num=3)
    assert rs.basis.shape == (3, 5, *shape) and len(rs) == 3
    B = np.asarray(rs[1].basis, np.float64).reshape(5, -1)
    np.testing.assert_allclose(B @ B.T, np.eye(5), atol=1e-5)
    g = jax.random.normal(jax.random.PRNGKey(5), shape)
    np.testing.assert_allclose(
        np.asarray(rs[1].project(g)).ravel(), B.T @ (B @ np.asarray(g).ravel()), atol=1e-5
    )
    _check_coordinates(rs[1], np.asarray(g, np.float64), B.T @ B)
    custom = S.from_basis(rs[1].basis)
    np.testing.assert_allclose(custom.project(g), rs[1].project(g), **tol(jnp.float32, 4))


def _subspace_affine_margin(params, x, P, candidates, overshoot):
    """Closed form along a subspace: (1+os)(min_k |g_k| / ||P w_k|| + 1e-4), float64."""
    W, b = (np.asarray(a, np.float64) for a in params)
    f = W @ np.asarray(x, np.float64).ravel() + b
    order = np.argsort(-f, kind="stable")[:candidates]
    k0 = order[0]
    dists = {int(k): abs(f[k] - f[k0]) / np.linalg.norm(P @ (W[k] - W[k0])) for k in order[1:]}
    return (1.0 + overshoot) * (min(dists.values()) + 1e-4)


@pytest.mark.parametrize("which", [0, 3, 6])  # low, middle, high block
def test_affine_subspace_margin_is_closed_form_and_stays_in_the_subspace(which):
    shape = (10, 10, 1)
    apply_fn, params = affine_classifier(which, 5, shape)
    blocks = S.dct_blocks(shape, block=4, stride=1)
    P = dense_block_projector(shape, range(which, which + 4), range(which, which + 4))
    x = jax.random.uniform(jax.random.PRNGKey(which), shape)
    res = bgeom.subspace_deepfool(apply_fn, params, x, blocks[which], candidates=5)
    assert bool(res.converged) and int(res.iterations) == 1
    expected = _subspace_affine_margin(params, x, P, 5, 0.02)
    np.testing.assert_allclose(float(res.margin), expected, **tol(jnp.float32, 16))
    r = np.asarray(res.perturbation, np.float64).ravel()
    assert np.linalg.norm(r - P @ r) <= 1e-5 * np.linalg.norm(r)


def test_whole_space_equals_deepfool():
    model = models.create("mlp", (8, 8, 1), 5, hidden=(16,), activation="softplus")
    f, p = models.functional(model)
    x = jax.random.uniform(jax.random.PRNGKey(11), (8, 8, 1))
    a = bgeom.subspace_deepfool(f, p, x, S.whole(x.shape), max_iter=50)
    b = bgeom.deepfool(f, p, x)
    assert bool(a.converged) and bool(b.converged)
    np.testing.assert_allclose(a.perturbation, b.perturbation, **tol(jnp.float32, 64))
    assert int(a.adv_label) == int(b.adv_label)


def test_subspace_margins_grid_equals_per_pair_calls():
    shape = (8, 8, 1)
    apply_fn, params = affine_classifier(3, 4, shape)
    xs = jax.random.uniform(jax.random.PRNGKey(9), (3, *shape))
    blocks = S.dct_blocks(shape, 4, 2)
    grid = bgeom.subspace_margins(apply_fn, params, xs, blocks, candidates=4)
    assert grid.margin.shape == (3, len(blocks))
    for i in range(3):
        for j in range(len(blocks)):
            one = bgeom.subspace_deepfool(apply_fn, params, xs[i], blocks[j], candidates=4)
            np.testing.assert_allclose(grid.margin[i, j], one.margin, **tol(jnp.float32, 4))


@pytest.mark.parametrize("kind", ["dct", "basis"])
def test_subspace_margins_on_a_nonlinear_model_equals_per_pair_calls(kind):
    # Searches of several steps: the shared first step, then engine steps.
    shape = (8, 8, 1)
    model = models.create("mlp", shape, 4, hidden=(24,), activation="tanh")
    apply_fn, params = models.functional(model)
    xs = jax.random.uniform(jax.random.PRNGKey(10), (4, *shape))
    subs = (
        S.dct_blocks(shape, 4, 2)
        if kind == "dct"
        else S.random(jax.random.PRNGKey(11), shape, 12, num=3)
    )
    grid = bgeom.subspace_margins(apply_fn, params, xs, subs, batch_size=4)
    one = jax.vmap(
        lambda x: jax.vmap(lambda s: bgeom.subspace_deepfool(apply_fn, params, x, s))(subs)
    )(xs)
    assert int(np.max(grid.iterations)) > 1
    np.testing.assert_array_equal(grid.converged, one.converged)
    ok = np.asarray(one.converged)
    assert ok.mean() > 0.5
    np.testing.assert_allclose(grid.margin[ok], np.asarray(one.margin)[ok], **tol(jnp.float32, 64))


def test_bad_input_says_what_is_wrong():
    apply_fn, params = affine_classifier(0, 3, (8, 8, 1))
    x = jnp.zeros((8, 8, 1))
    with pytest.raises(ValueError, match="shape"):
        bgeom.subspace_deepfool(apply_fn, params, x, S.dct_blocks((10, 10, 1), 4)[0])
    with pytest.raises(ValueError, match="does not fit"):
        S.dct_blocks((8, 8, 1), block=9)
    with pytest.raises(ValueError, match="not orthonormal"):
        S.from_basis(jnp.ones((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="stack"):
        bgeom.subspace_deepfool(apply_fn, params, x, S.dct_blocks((8, 8, 1), 4))
    with pytest.raises(ValueError, match="bandwidth"):
        S.low_pass(x, 0)
    with pytest.raises(ValueError, match="subspace must be built"):
        bgeom.subspace_deepfool(apply_fn, params, x, np.eye(64))
