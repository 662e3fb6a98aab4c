import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgeom import train


def test_small_cnn_reaches_95_percent_on_digits(digits_cnn, digits):
    acc = float(digits_cnn.test_accuracy[0])
    print(f"digits CNN: test accuracy {acc:.4f} in {digits_cnn.seconds:.1f}s")
    assert acc >= 0.95
    # evaluate() agrees with the accuracy recorded during training
    again = train.evaluate(digits_cnn.apply_fn, digits_cnn.params, digits.x_test, digits.y_test)
    assert again == pytest.approx(acc)
    assert digits_cnn.history["loss"][-1, 0] < digits_cnn.history["loss"][0, 0]


@pytest.fixture(scope="module")
def small(digits):
    from bgeom import data

    return data.load("digits", max_train=256, max_test=128)


QUICK = train.TrainConfig(epochs=2, batch_size=32)


def test_training_is_reproducible(small):
    a = train.fit("mlp", small, config=QUICK, seeds=3, progress=False)
    b = train.fit("mlp", small, config=QUICK, seeds=3, progress=False)
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_ensemble_members_match_single_runs(small):
    ens = train.fit("mlp", small, config=QUICK, seeds=[0, 5], progress=False)
    assert ens.ensemble and len(ens.test_accuracy) == 2
    for i, seed in enumerate([0, 5]):
        single = train.fit("mlp", small, config=QUICK, seeds=seed, progress=False)
        _, member = ens.member(i)
        for u, v in zip(jax.tree.leaves(member), jax.tree.leaves(single.params), strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5)
    # the stacked parameters evaluate every member at once
    logits = jax.vmap(ens.apply_fn, in_axes=(0, None))(ens.params, jnp.asarray(small.x_test[0]))
    assert logits.shape == (2, 10)


def test_interrupted_run_resumes_exactly(small, tmp_path, monkeypatch):
    reference = train.fit("mlp", small, config=QUICK, progress=False)
    real = train._batch_indices
    calls = {"n": 0}

    def interrupt_in_second_epoch(seed, epoch, n, batch_size):
        if epoch == 1 and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt
        return real(seed, epoch, n, batch_size)

    monkeypatch.setattr(train, "_batch_indices", interrupt_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.fit("mlp", small, config=QUICK, progress=False, checkpoint_dir=tmp_path)
    monkeypatch.setattr(train, "_batch_indices", real)
    resumed = train.fit("mlp", small, config=QUICK, progress=False, checkpoint_dir=tmp_path)
    for u, v in zip(
        jax.tree.leaves(reference.params), jax.tree.leaves(resumed.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # a finished run is loaded, not retrained
    monkeypatch.setattr(train, "_batch_indices", lambda *a: pytest.fail("retrained"))
    loaded = train.fit("mlp", small, config=QUICK, progress=False, checkpoint_dir=tmp_path)
    np.testing.assert_array_equal(loaded.test_accuracy, resumed.test_accuracy)
    # a different run in the same folder is refused
    with pytest.raises(ValueError, match="different run"):
        train.fit("cnn", small, config=QUICK, progress=False, checkpoint_dir=tmp_path)


def test_transform_hook_is_applied(small):
    """A transform that relabels every batch as class 3 yields a constant classifier."""

    def relabel(key, x, y, logits_fn):
        assert logits_fn(x).shape == (x.shape[0], small.num_classes)
        return x, jnp.full_like(y, 3)

    res = train.fit("mlp", small, config=QUICK, transform=relabel, progress=False)
    preds = jax.vmap(res.apply_fn, in_axes=(None, 0))(res.params, jnp.asarray(small.x_test))
    assert bool(jnp.all(preds.argmax(-1) == 3))


def test_holdmetight_recipe_and_triangular_schedule():
    cfg = train.recipe("holdmetight")
    assert (cfg.optimizer, cfg.learning_rate, cfg.momentum, cfg.weight_decay) == (
        "sgd",
        0.21,
        0.9,
        5e-4,
    )
    assert (cfg.batch_size, cfg.clip_norm, cfg.schedule) == (128, 0.5, "triangular")
    # The schedule rises linearly from 0 to 0.21 at 2/5 of training and falls back to 0.
    config = dataclasses.replace(cfg, clip_norm=None, weight_decay=0.0, momentum=0.0)
    tx = train.make_optimizer(config, total_steps=100)
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    lrs = []
    for _ in range(100):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(updates["w"]))
    assert lrs[0] == pytest.approx(0.0, abs=1e-7)
    assert int(np.argmax(lrs)) == 40 and max(lrs) == pytest.approx(0.21, rel=1e-5)
    assert lrs[-1] < 0.21 / 50


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"config": "nope"}, "Unknown training recipe"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"seeds": []}, "empty"),
        ({"config": train.TrainConfig(batch_size=10_000)}, "larger than the training set"),
    ],
)
def test_bad_training_arguments(small, kwargs, match):
    with pytest.raises(ValueError, match=match):
        train.fit("mlp", small, progress=False, **kwargs)


def test_bad_config_values():
    with pytest.raises(ValueError, match="optimizer"):
        train.TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="Unknown training option"):
        train.recipe("default", learning_rat=0.1)
