"""The batched driver: compaction, work accounting, and batched(fn) == jit(vmap(fn))."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tol

import bgeom
from bgeom import engine, models


class _Count(NamedTuple):
    n: jax.Array
    done: jax.Array
    total: jax.Array


# A toy search: example n takes exactly n steps and returns n * scale.
COUNTDOWN = engine.Iterative(
    init=lambda c, n: _Count(n, jnp.asarray(0, jnp.int32), jnp.asarray(0.0)),
    step=lambda c, s: s._replace(done=s.done + 1, total=s.total + c),
    running=lambda c, s: s.done < s.n,
    finish=lambda c, s: (s.done, s.total),
)


def test_every_example_runs_exactly_its_own_steps():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 4, 200).astype(np.int32)
    n[[5, 150]] = 0, 0  # nothing to do: finished at once
    n[77] = 20  # one slow example
    (done, total), stats = engine.run(COUNTDOWN, jnp.float32(0.5), n, batch_size=64)
    np.testing.assert_array_equal(done, n)
    np.testing.assert_allclose(total, 0.5 * n)
    assert stats.examples == len(n) and stats.steps == n.sum()
    # Lockstep chunks of 64 would compute 64 x 20 slot-steps for the chunk holding
    # the slow example; compaction refills slots, and the tail shrinks to 8 slots.
    lockstep = sum(64 * n[i : i + 64].max() for i in range(0, len(n), 64))
    assert stats.computed_steps <= n.sum() + 64 * 3 + 8 * 20
    assert stats.computed_steps < 0.6 * lockstep
    assert stats.work_efficiency >= 0.5
    # The same through the per-example loop, under jit(vmap).
    ref = jax.jit(jax.vmap(lambda k: engine.loop(COUNTDOWN, jnp.float32(0.5), k)))(n)
    np.testing.assert_array_equal(np.asarray(ref[0]), done)


def test_examples_finished_at_init_leave_running_ones_pending_not_lost():
    # Like subspace_margins' pairs: most searches end at init, a few run on.
    # Whole buckets start at once; running ones wait, started, for free slots.
    rng = np.random.default_rng(1)
    n = np.where(rng.random(500) < 0.9, 0, rng.integers(1, 6, 500)).astype(np.int32)
    (done, total), stats = engine.run(COUNTDOWN, jnp.float32(2.0), n, batch_size=16)
    np.testing.assert_array_equal(done, n)
    np.testing.assert_allclose(total, 2.0 * n)
    assert stats.steps == n.sum() and stats.examples == 500
    assert stats.work_efficiency >= 0.6


@pytest.fixture(scope="module")
def smooth_mlp():
    model = models.create("mlp", (6, 6, 1), 4, hidden=(32,), activation="softplus", beta=4.0)
    apply_fn, params = models.functional(model)
    xs = jax.random.uniform(jax.random.PRNGKey(3), (13, 6, 6, 1))
    return apply_fn, params, xs


def _close(batched, ref):
    for field in ref._fields:
        a, b = np.asarray(getattr(ref, field)), np.asarray(getattr(batched, field))
        assert a.shape == b.shape, field
        if np.issubdtype(a.dtype, np.floating):
            finite = np.isfinite(a)
            np.testing.assert_array_equal(finite, np.isfinite(b), err_msg=field)
            np.testing.assert_allclose(b[finite], a[finite], **tol(a.dtype, 64), err_msg=field)
        else:
            np.testing.assert_array_equal(b, a, err_msg=field)


def test_batched_equals_jit_vmap_for_every_registered_analysis(smooth_mlp):
    apply_fn, params, xs = smooth_mlp
    labels = jax.vmap(lambda x: jnp.argmax(apply_fn(params, x)))(xs)
    targets = (labels + 1) % 4
    block = bgeom.subspaces.dct_blocks(xs.shape[1:], 3, 3)[0]
    blocks = bgeom.subspaces.dct_blocks(xs.shape[1:], 3, 3)
    per_image = bgeom.subspaces.stack([blocks[i % len(blocks)] for i in range(len(xs))])
    cases = [
        (bgeom.deepfool, (), {"max_iter": 30}, lambda x: bgeom.deepfool(apply_fn, params, x)),
        (
            bgeom.targeted_deepfool,
            (targets,),
            {},
            lambda x, t: bgeom.targeted_deepfool(apply_fn, params, x, t),
        ),
        (
            bgeom.subspace_deepfool,
            (block,),
            {},
            lambda x: bgeom.subspace_deepfool(apply_fn, params, x, block),
        ),
        (
            bgeom.subspace_deepfool,
            (per_image,),
            {},
            lambda x, s: bgeom.subspace_deepfool(apply_fn, params, x, s),
        ),
        (bgeom.boundary_point, (), {}, lambda x: bgeom.boundary_point(apply_fn, params, x)),
    ]
    for fn, args, options, one in cases:
        got, stats = bgeom.batched(fn)(
            apply_fn, params, xs, *args, batch_size=4, return_stats=True, **options
        )
        mapped = [a for a in args if not hasattr(a, "batch_shape") or len(a.batch_shape)]
        ref = jax.jit(jax.vmap(one))(xs, *mapped)
        _close(got, ref)
        assert stats.examples == len(xs) and stats.steps <= stats.computed_steps
    got = bgeom.batched(bgeom.boundary_point)(apply_fn, params, xs, target=targets)
    ref = jax.vmap(lambda x, t: bgeom.boundary_point(apply_fn, params, x, target=t))(xs, targets)
    _close(got, ref)


def test_misuse_says_what_to_pass(smooth_mlp):
    apply_fn, params, xs = smooth_mlp
    with pytest.raises(ValueError, match="iterative bgeom analysis"):
        bgeom.batched(jnp.sum)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        bgeom.batched(bgeom.deepfool)(apply_fn, params, xs[0])
    with pytest.raises(ValueError, match="unknown option"):
        bgeom.batched(bgeom.deepfool)(apply_fn, params, xs, lambda_=3.0)
    with pytest.raises(ValueError, match="one integer class per image"):
        bgeom.batched(bgeom.targeted_deepfool)(apply_fn, params, xs, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="NaN"):
        bgeom.batched(bgeom.deepfool)(apply_fn, params, xs.at[0, 0, 0, 0].set(jnp.nan))


def _conv_logits(p, x):
    """A plain-JAX conv net (NHWC/HWIO), one image: conv, ReLU, mean pool, dense."""
    h = jax.lax.conv_general_dilated(
        x[None], p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.mean(jax.nn.relu(h), axis=(0, 1, 2)) @ p["w"]


def test_default_slots_follow_whether_the_step_convolves(smooth_mlp):
    apply_fn, params, xs = smooth_mlp
    options = bgeom.boundary.options_of(bgeom.deepfool, "deepfool", {"candidates": 4})
    one = jax.ShapeDtypeStruct(xs.shape[1:], xs.dtype)

    def convolves(f, p):
        it = bgeom.boundary.deepfool_iterative(f)
        return engine.step_has_convolution(it, bgeom.boundary.Shared(p, options), one)

    conv = {"k": jnp.ones((3, 3, 1, 4)) / 9, "w": jnp.eye(4)}
    lenet_fn, lenet_params = models.functional(models.create("lenet", (6, 6, 1), 4))
    assert not convolves(apply_fn, params)
    assert convolves(_conv_logits, conv)
    assert convolves(lenet_fn, lenet_params)  # inside bgeom's custom-VJP convolution
    if jax.default_backend() == "cpu":
        assert (engine.default_batch_size(True), engine.default_batch_size(False)) == (64, 256)
        # The MLP gets 256 slots per device (capped by the batch: 13 -> 16).
        _, stats = bgeom.batched(bgeom.deepfool)(apply_fn, params, xs, return_stats=True)
        assert stats.slots == 16 and stats.devices == 1
        many = jnp.tile(xs, (10, 1, 1, 1))  # 130 images: 256 slots would hold them all
        _, stats = bgeom.batched(bgeom.deepfool)(_conv_logits, conv, many, return_stats=True)
        assert stats.slots == 64
        _, stats = bgeom.batched(bgeom.deepfool)(apply_fn, params, many, return_stats=True)
        assert stats.slots == 256
