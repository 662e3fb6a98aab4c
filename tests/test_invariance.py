"""The "Hold me tight!" experiments: flip training, synthetic invariance, the flip mirror.

The training transforms are tested in test_augment.py, the suite probe in test_probes.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

import bgeom
from bgeom import augment, data, suite, train
from bgeom import subspaces as S
from bgeom.probes.invariance import spearman


def test_flip_training_evaluates_on_flipped_inputs(digits):
    small = data.Dataset(
        digits.x_train[:256],
        digits.y_train[:256],
        digits.x_test[:64],
        digits.y_test[:64],
        10,
        "digits-small",
    )
    config = train.recipe("default", epochs=2, batch_size=32)
    result = train.fit("mlp", small, config=config, transform=augment.Flip(), progress=False)
    assert result.inputs is not None
    flipped = np.asarray(S.flip(small.x_test))
    acc = train.evaluate(result.apply_fn, result.params, flipped, small.y_test)
    np.testing.assert_allclose(result.test_accuracy[0], acc, atol=1e-6)


def test_synthetic_margin_along_u_is_eps_and_orthogonal_margins_are_much_larger():
    eps = 0.5
    shape = (16, 16, 1)
    ds = data.synthetic(shape, n_train=1000, n_test=100, eps=eps, atom=(1, 1))
    result = train.fit("mlp", ds, config=train.recipe("default", epochs=8), progress=False)
    assert float(result.test_accuracy[0]) == 1.0
    x = jnp.asarray(ds.x_test[:40])
    u = S.from_basis(ds.info["direction"][None])
    along_u = jax.vmap(lambda xi: bgeom.subspace_deepfool(result.apply_fn, result.params, xi, u))(x)
    blocks = S.dct_blocks(shape, 4, 2)  # u = atom (1, 1) lies in block 0 only
    grid = bgeom.subspace_margins(result.apply_fn, result.params, x, blocks[1:])
    med_u = float(np.median(along_u.margin))
    med_orth = float(np.median(grid.margin))
    print(f"synthetic: margin along u {med_u:.3f} (eps {eps}); orthogonal blocks {med_orth:.3f}")
    assert bool(jnp.all(along_u.converged))
    assert abs(med_u - eps) <= 0.2 * eps
    assert med_orth >= 5 * med_u


def test_flipped_model_profile_mirrors_the_standard_one():
    # 16x16 digits, 4x4 blocks (13): at 28x28 the high-frequency half of the profile is a flat
    # plateau (upsampled 8x8 images carry nothing there), whose ranks are noise; see the README.
    ds = data.load("digits", size=16)
    blocks = S.dct_blocks((16, 16, 1), 4, 1)
    profiles = []
    for transform in (None, augment.Flip()):
        result = train.fit(
            "mlp", ds, config=train.recipe("default", epochs=8), transform=transform, progress=False
        )
        x = jnp.asarray(ds.x_test[:100])
        x = result.inputs(x) if result.inputs is not None else x
        grid = bgeom.subspace_margins(result.apply_fn, result.params, x, blocks)
        profiles.append(np.median(np.asarray(grid.margin), axis=0))
    rho = spearman(profiles[0], profiles[1][::-1])
    print(f"digits 16x16 MLP: Spearman(standard, reversed flipped) = {rho:.3f}")
    print("standard", np.round(profiles[0], 2), "\nflipped ", np.round(profiles[1], 2))
    assert profiles[0][0] < profiles[0][-1] and profiles[1][0] > profiles[1][-1]
    assert rho >= 0.8


def test_bad_augment_in_a_config_is_a_clear_error():
    bad = tiny_config(models={"m": {"dataset": "d", "model": "mlp", "augment": "cutout"}})
    with pytest.raises(ValueError, match="Unknown training transform"):
        suite.validate_config(bad)
