import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bgeom import augment, train


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


# --------------------------------------------------------------------------
# The reusable step and loop, on losses that are not classifiers.


def _regression_problem(n=96, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w_true = np.array([1.5, -2.0, 0.5], np.float32)[:d]
    y = (x @ w_true + 0.3 + 0.01 * rng.normal(size=n)).astype(np.float32)
    return {"x": x, "y": y}, w_true


def _mse_loss(params, state, batch, key):
    """Least squares; ``state`` counts the steps the loss saw (carried, not differentiated)."""
    err = batch["x"] @ params["w"] + params["b"] - batch["y"]
    new_state = {"steps": state["steps"] + 1}
    return jnp.mean(err**2), train.LossAux(new_state, {"max_error": jnp.max(jnp.abs(err))})


def _regression_init(tx, members=2):
    params = train.stack([{"w": jnp.zeros(3), "b": jnp.zeros(())}] * members)
    state = train.stack([{"steps": jnp.zeros((), jnp.int32)}] * members)
    return train.init_train_state(params, state, tx)


def test_train_loop_fits_a_custom_regression_loss():
    data_, w_true = _regression_problem()
    tx = optax.adam(0.05)
    init = _regression_init(tx)

    def w_error(epoch, ts):
        return {"w_error": np.linalg.norm(np.asarray(ts.params["w"]) - w_true, axis=-1)}

    done = train.train_loop(
        _mse_loss,
        tx,
        init,
        data_,
        seeds=[0, 1],
        epochs=25,
        batch_size=16,
        on_epoch=w_error,
        progress=False,
    )
    assert done.step == 25 * (96 // 16)
    assert set(done.history) == {"loss", "max_error", "w_error"}
    for values in done.history.values():
        assert values.shape == (25, 2) and np.isfinite(values).all()
    loss = done.history["loss"]
    assert (loss[-1] < 1e-3 * loss[0]).all()
    assert (done.history["w_error"][-1] < 0.02).all()
    np.testing.assert_allclose(done.train.params["b"], [0.3, 0.3], atol=0.01)
    # the undifferentiated state is carried from step to step
    np.testing.assert_array_equal(done.train.state["steps"], [done.step, done.step])
    # each member reads its own shuffle of the same data
    assert not np.array_equal(done.train.params["w"][0], done.train.params["w"][1])
    # the caller's init is not consumed (the step donates its own copy)
    np.testing.assert_array_equal(np.asarray(init.params["w"]), 0.0)


def test_train_step_matches_a_hand_written_update():
    """One step of make_train_step == grad + optax update of each member, by hand."""
    data_, _ = _regression_problem(n=8)
    tx = optax.sgd(0.1)
    init = _regression_init(tx)
    init = init._replace(params={"w": jnp.array([[1.0, 0, 0], [0, 1.0, 0]]), "b": jnp.zeros(2)})
    batch = jax.tree.map(lambda a: jnp.stack([a[:4], a[4:]]), data_)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    step = train.make_train_step(_mse_loss, tx)
    ts, metrics = step(jax.tree.map(jnp.copy, init), batch, keys)  # the step donates its input
    for i in range(2):
        p = jax.tree.map(lambda a, i=i: a[i], init.params)
        b = jax.tree.map(lambda a, i=i: a[i], batch)
        x, y = np.asarray(b["x"], np.float64), np.asarray(b["y"], np.float64)
        err = x @ np.asarray(p["w"]) + float(p["b"]) - y
        np.testing.assert_allclose(metrics["loss"][i], np.mean(err**2), rtol=1e-5)
        np.testing.assert_allclose(metrics["max_error"][i], np.max(np.abs(err)), rtol=1e-5)
        grad_w, grad_b = 2 * x.T @ err / len(err), 2 * np.mean(err)
        np.testing.assert_allclose(ts.params["w"][i], p["w"] - 0.1 * grad_w, rtol=1e-5)
        np.testing.assert_allclose(ts.params["b"][i], p["b"] - 0.1 * grad_b, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ts.state["steps"], [1, 1])


def test_autoencoder_against_a_frozen_classifier():
    """A DeepDIG-style generator: BCE(G(x), x) + 0.8 CE(f(G(x)), t), f frozen in ``state``."""
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(128, 16)).astype(np.float32)
    target = 2

    def init_member(seed):
        k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
        params = {
            "enc": 0.1 * jax.random.normal(k1, (16, 6)),
            "dec": 0.1 * jax.random.normal(k2, (6, 16)),
        }
        classifier = {"w": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)}
        return params, classifier

    def loss_fn(params, frozen, batch, key):
        recon_logits = jnp.tanh(batch["x"] @ params["enc"]) @ params["dec"]
        recon = optax.sigmoid_binary_cross_entropy(recon_logits, batch["x"]).mean()
        logits = jax.nn.sigmoid(recon_logits) @ frozen["w"]
        labels = jnp.full(len(logits), target)
        attack = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        hit = jnp.mean(jnp.argmax(logits, -1) == target)
        return recon + 0.8 * attack, train.LossAux(frozen, {"target_rate": hit})

    # Adam with step decay, as DeepDIG trains its generators
    tx = optax.adam(optax.exponential_decay(0.05, 8, 0.95, staircase=True))
    members = [init_member(s) for s in (0, 1)]
    params, frozen = train.stack([p for p, _ in members]), train.stack([f for _, f in members])
    done = train.train_loop(
        loss_fn,
        tx,
        train.init_train_state(params, frozen, tx),
        {"x": x},
        seeds=[0, 1],
        epochs=10,
        batch_size=32,
        progress=False,
    )
    loss = done.history["loss"]
    assert (loss[-1] < 0.9 * loss[0]).all()
    assert (done.history["target_rate"][-1] > done.history["target_rate"][0]).all()
    np.testing.assert_array_equal(done.train.state["w"], frozen["w"])  # f stays frozen


def test_train_loop_resumes_exactly_after_sigterm(tmp_path, monkeypatch):
    """SIGTERM in the middle of an epoch checkpoints the last step; a rerun ends identical."""
    data_, _ = _regression_problem()
    tx = optax.adam(0.05)
    init = _regression_init(tx)
    run = dict(seeds=[0, 1], epochs=3, batch_size=16, progress=False)
    reference = train.train_loop(_mse_loss, tx, init, data_, **run)

    real, calls = train._take, {"n": 0}

    def sigterm_at_step_9(data, idx):
        calls["n"] += 1
        if calls["n"] == 10:  # 6 steps per epoch: step 9 is in the middle of epoch 1
            os.kill(os.getpid(), signal.SIGTERM)
        return real(data, idx)

    monkeypatch.setattr(train, "_take", sigterm_at_step_9)
    record = {"what": "least squares"}
    with pytest.raises(KeyboardInterrupt):
        train.train_loop(_mse_loss, tx, init, data_, checkpoint_dir=tmp_path, record=record, **run)
    assert sorted(int(p.name) for p in (tmp_path / "steps").iterdir()) == [6, 9]
    monkeypatch.setattr(train, "_take", real)
    resumed = train.train_loop(
        _mse_loss, tx, init, data_, checkpoint_dir=tmp_path, record=record, **run
    )
    assert resumed.step == reference.step == 18
    for u, v in zip(jax.tree.leaves(reference.train), jax.tree.leaves(resumed.train), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # The interrupted epoch keeps the metrics of its steps before the interruption:
    # the whole history equals the uninterrupted run's.
    for k in reference.history:
        np.testing.assert_array_equal(reference.history[k], resumed.history[k])
    with pytest.raises(ValueError, match="different run"):
        train.train_loop(
            _mse_loss, tx, init, data_, checkpoint_dir=tmp_path, record={"what": "else"}, **run
        )


def test_an_interruption_at_an_epoch_end_loses_no_history(tmp_path):
    """Stopped while the epoch's end is evaluated: the rerun records that epoch."""
    data_, _ = _regression_problem()
    tx = optax.adam(0.05)
    init = _regression_init(tx)
    run = dict(seeds=[0, 1], epochs=3, batch_size=16, progress=False)
    score = lambda epoch, ts: {"w_norm": np.linalg.norm(np.asarray(ts.params["w"]), axis=1)}
    reference = train.train_loop(_mse_loss, tx, init, data_, on_epoch=score, **run)

    def interrupted(epoch, ts):
        if epoch == 1:
            raise KeyboardInterrupt
        return score(epoch, ts)

    with pytest.raises(KeyboardInterrupt):
        train.train_loop(
            _mse_loss, tx, init, data_, on_epoch=interrupted, checkpoint_dir=tmp_path, **run
        )
    resumed = train.train_loop(
        _mse_loss, tx, init, data_, on_epoch=score, checkpoint_dir=tmp_path, **run
    )
    assert set(resumed.history) == set(reference.history)
    for k in reference.history:
        assert not np.isnan(resumed.history[k]).any(), k
        np.testing.assert_array_equal(reference.history[k], resumed.history[k])


def test_train_loop_checks_its_arguments():
    data_, _ = _regression_problem()
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match="one seed per member"):
        train.train_loop(
            _mse_loss,
            tx,
            _regression_init(tx),
            data_,
            seeds=[0],
            epochs=1,
            batch_size=8,
            progress=False,
        )
    with pytest.raises(ValueError, match="leading"):
        bad = {"x": data_["x"], "y": data_["y"][:10]}
        train.train_loop(
            _mse_loss,
            tx,
            _regression_init(tx),
            bad,
            seeds=[0, 1],
            epochs=1,
            batch_size=8,
            progress=False,
        )


# --------------------------------------------------------------------------
# Evaluation and batch norm.


def test_evaluate_single_ensemble_and_inputs():
    """Linear classifiers whose accuracy is known by hand."""
    x = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0]], np.float32)
    y = np.array([0, 1, 0, 0])
    apply_fn = lambda w, xi: w @ xi
    identity, swap = jnp.eye(2), jnp.array([[0.0, 1.0], [1.0, 0.0]])
    assert train.evaluate(apply_fn, identity, x, y, batch_size=3) == 0.75
    assert train.evaluate(apply_fn, swap, x, y) == 0.25
    accs = train.evaluate(apply_fn, jnp.stack([identity, swap]), x, y, ensemble=True, batch_size=3)
    np.testing.assert_array_equal(accs, [0.75, 0.25])
    flipped = train.evaluate(apply_fn, identity, x, y, inputs=lambda xb: xb[:, ::-1])
    assert flipped == 0.25


class _TinyBN(nnx.Module):
    """Conv -> batch norm -> ReLU -> global mean -> linear: the smallest batch-norm classifier."""

    def __init__(self, seed):
        rngs = nnx.Rngs(seed)
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(4, 10, rngs=rngs)

    def features(self, x):
        return jnp.mean(jax.nn.relu(self.bn(self.conv(x))), axis=(1, 2))

    def __call__(self, x):
        return self.head(self.features(x))


def test_batch_norm_models_train_and_evaluate_on_running_statistics(small):
    config = train.TrainConfig(epochs=2, batch_size=64)
    pgd = augment.PGD(eps=1.0, steps=2)
    res = train.fit(_TinyBN, small, config=config, seeds=[0, 1], transform=pgd, progress=False)
    untrained = nnx.split(_TinyBN(0))[1]
    assert not np.allclose(res.params["bn"]["mean"][0], untrained["bn"]["mean"])
    # test accuracy was measured in eval mode, as evaluate() does on the result
    for i in range(2):
        acc = train.evaluate(*res.member(i), small.x_test, small.y_test)
        assert acc == pytest.approx(res.test_accuracy[i])
    np.testing.assert_array_equal(
        train.evaluate(res.apply_fn, res.params, small.x_test, small.y_test, ensemble=True),
        res.test_accuracy,
    )
