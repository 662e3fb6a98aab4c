"""Training transforms (bgeom.augment): L2 PGD, and transforms by name with their options."""

import jax
import jax.numpy as jnp
import optax
import pytest

from bgeom import augment


def test_pgd_stays_in_the_ball_and_the_box_and_raises_the_loss():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 36))
    logits_fn = lambda xb: xb.reshape(len(xb), -1) @ w.T
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 6, 6, 1))
    y = jnp.argmax(logits_fn(x), -1)
    adv = augment.pgd_l2(logits_fn, jax.random.PRNGKey(2), x, y, eps=0.5, steps=10)
    norms = jnp.linalg.norm((adv - x).reshape(8, -1), axis=1)
    assert float(norms.max()) <= 0.5 * (1 + 1e-5)
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    ce = lambda xb: optax.softmax_cross_entropy_with_integer_labels(logits_fn(xb), y)
    assert bool(jnp.all(ce(adv) > ce(x)))


def test_transform_names_and_bad_options():
    assert isinstance(augment.get("flip"), augment.Flip)
    assert augment.get({"name": "low_pass", "bandwidth": 4}).bandwidth == 4
    assert augment.get({"name": "pgd", "eps": 1.0, "bounds": [0, 1]}).bounds == (0.0, 1.0)
    with pytest.raises(ValueError, match="Unknown training transform"):
        augment.get("mixup")
    with pytest.raises(ValueError, match="unknown option"):
        augment.get({"name": "pgd", "radius": 1.0})
