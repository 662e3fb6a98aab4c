"""Users' own models: Flax Linen and Equinox adapters give the numbers of the equivalent plain
function (DeepFool, curvature, ``bgeom.batched``), and their penultimate features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tol

import bgeom
from bgeom import models

nn = pytest.importorskip("flax.linen")
eqx = pytest.importorskip("equinox")

SHAPE = (6, 6, 1)
KEY = jax.random.PRNGKey(0)


def _xs(n=4):
    return jax.random.uniform(jax.random.PRNGKey(7), (n, *SHAPE))


class LinenNet(nn.Module):
    """Conv, batch-norm, softplus, a hidden dense layer and a head: batched, as Linen code is."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.softplus(x).reshape(x.shape[0], -1)
        h = nn.softplus(nn.Dense(16, name="hidden")(x))
        return nn.Dense(3, name="head")(h)


@pytest.fixture(scope="module")
def linen():
    module = LinenNet()
    variables = module.init(KEY, jnp.zeros((1, *SHAPE)), train=False)
    # Non-trivial running statistics, so that evaluation mode is visible in the numbers.
    stats = variables["batch_stats"]["bn"]
    rng = np.random.default_rng(0)
    variables = {
        "params": variables["params"],
        "batch_stats": {
            "bn": {
                "mean": jnp.asarray(rng.normal(0, 0.3, stats["mean"].shape), jnp.float32),
                "var": jnp.asarray(rng.uniform(0.5, 2.0, stats["var"].shape), jnp.float32),
            }
        },
    }
    return module, variables


def linen_plain(v, x, *, features=False):
    """The same network written by hand for ONE example, from the same variables."""
    p, s = v["params"], v["batch_stats"]["bn"]
    y = (
        jax.lax.conv_general_dilated(
            x[None], p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )[0]
        + p["conv"]["bias"]
    )
    y = (y - s["mean"]) / jnp.sqrt(s["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    y = jax.nn.softplus(y).reshape(-1)
    h = jax.nn.softplus(y @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    return h if features else h @ p["head"]["kernel"] + p["head"]["bias"]


class EqxNet(eqx.Module):
    """An Equinox MLP of ONE example, with the head as its last layer."""

    layers: list

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        d = int(np.prod(SHAPE))
        self.layers = [eqx.nn.Linear(d, 16, key=k1), eqx.nn.Linear(16, 8, key=k2),
                       eqx.nn.Linear(8, 3, key=k3)]  # fmt: skip

    def __call__(self, x):
        h = x.reshape(-1)
        for layer in self.layers[:-1]:
            h = jnp.tanh(layer(h))
        return self.layers[-1](h)


def eqx_plain(w, x, *, features=False):
    h = x.reshape(-1)
    for W, b in w[:-1]:
        h = jnp.tanh(W @ h + b)
    return h if features else w[-1][0] @ h + w[-1][1]


@pytest.fixture(scope="module")
def equinox_model():
    model = EqxNet(KEY)
    weights = [(layer.weight, layer.bias) for layer in model.layers]
    return model, weights


def _close(a, b, digits=64):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u), np.asarray(v)
        if np.issubdtype(u.dtype, np.floating):
            np.testing.assert_allclose(u, v, **tol(u.dtype, digits))
        else:
            np.testing.assert_array_equal(u, v)


def _same_numbers(adapted, plain):
    """DeepFool, curvature and bgeom.batched: the adapted model equals the plain function."""
    (fa, pa), (fp, pp) = adapted, plain
    xs = _xs()
    df = jax.jit(jax.vmap(lambda x: bgeom.deepfool(fa, pa, x)))(xs)
    assert bool(np.all(df.converged))
    _close(df, jax.jit(jax.vmap(lambda x: bgeom.deepfool(fp, pp, x)))(xs))
    _close(bgeom.batched(bgeom.deepfool)(fa, pa, xs), bgeom.batched(bgeom.deepfool)(fp, pp, xs))
    curv = jax.jit(lambda x: bgeom.boundary_curvature(fa, pa, x, k=3, num_matvecs=8))(xs[0])
    want = jax.jit(lambda x: bgeom.boundary_curvature(fp, pp, x, k=3, num_matvecs=8))(xs[0])
    assert bool(curv.converged)
    np.testing.assert_allclose(curv.curvatures, want.curvatures, rtol=1e-3, atol=1e-4)


def test_linen_model_gives_the_plain_functions_numbers(linen):
    module, variables = linen
    apply_fn, params = models.from_linen(module, variables, train=False)
    x = _xs(1)[0]
    want = module.apply(variables, x[None], train=False)[0]
    np.testing.assert_allclose(apply_fn(params, x), want, rtol=1e-6)
    np.testing.assert_allclose(linen_plain(variables, x), want, rtol=1e-4, atol=1e-5)
    _same_numbers((apply_fn, params), (linen_plain, variables))
    # The batch statistics are part of params (traced), not captured.
    assert "batch_stats" in params


def test_linen_features_are_the_input_of_the_named_last_layer(linen):
    module, variables = linen
    features_fn, params = models.from_linen(module, variables, features="head", train=False)
    xs = _xs()
    got = jax.jit(jax.vmap(features_fn, in_axes=(None, 0)))(params, xs)
    want = jax.vmap(lambda x: linen_plain(variables, x, features=True))(xs)
    assert got.shape == (len(xs), 16)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_linen_bad_use_says_what_to_do(linen):
    module, variables = linen
    apply_fn, params = models.from_linen(module, variables)  # train=True: updates batch stats
    with pytest.raises(ValueError, match=r"evaluation mode, e.g.*train=False"):
        apply_fn(params, _xs(1)[0])
    features_fn, _ = models.from_linen(module, variables, features="nope", train=False)
    with pytest.raises(ValueError, match=r"no layer named 'nope'"):
        features_fn(params, _xs(1)[0])
    with pytest.raises(ValueError, match=r"'params' entry"):
        models.from_linen(module, variables["params"]["head"])
    with pytest.raises(ValueError, match=r"flax.linen.Module"):
        models.from_linen(object(), variables)


def test_equinox_model_gives_the_plain_functions_numbers(equinox_model):
    model, weights = equinox_model
    apply_fn, params = models.from_equinox(model)
    x = _xs(1)[0]
    np.testing.assert_allclose(apply_fn(params, x), model(x), rtol=1e-6)
    np.testing.assert_allclose(eqx_plain(weights, x), model(x), rtol=1e-5, atol=1e-6)
    _same_numbers((apply_fn, params), (eqx_plain, weights))
    # Only arrays are params; the activation and structure are static.
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))


def test_equinox_features_and_a_stateful_model(equinox_model):
    model, weights = equinox_model
    features_fn, params = models.from_equinox(model, features=lambda m: m.layers[-1])
    xs = _xs()
    got = jax.jit(jax.vmap(features_fn, in_axes=(None, 0)))(params, xs)
    want = jax.vmap(lambda x: eqx_plain(weights, x, features=True))(xs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # A batch-norm model: called as model(x, state), in inference mode (running statistics).
    class WithNorm(eqx.Module):
        linear: eqx.nn.Linear
        norm: eqx.nn.BatchNorm

        def __init__(self, key):
            self.linear = eqx.nn.Linear(int(np.prod(SHAPE)), 3, key=key)
            self.norm = eqx.nn.BatchNorm(3, axis_name="batch", mode="ema")

        def __call__(self, x, state):
            return self.norm(self.linear(x.reshape(-1)), state)

    net, state = eqx.nn.make_with_state(WithNorm)(KEY)
    mean, var = jnp.asarray([0.1, -0.2, 0.3]), jnp.asarray([0.5, 2.0, 1.5])
    state = state.set(net.norm.ema_state_index, (mean, var))
    apply_fn, params = models.from_equinox(net, state=state)
    x = _xs(1)[0]
    lin = net.linear(x.reshape(-1))
    # Inference mode: the running statistics of the state, not the example's own.
    want = (lin - mean) / jnp.sqrt(var + 1e-5)
    np.testing.assert_allclose(apply_fn(params, x), want, rtol=1e-5, atol=1e-6)
    assert bool(bgeom.deepfool(apply_fn, params, x).converged)
    with pytest.raises(ValueError, match=r"equinox.Module"):
        models.from_equinox(lambda x: x)
    with pytest.raises(ValueError, match=r"last layer"):
        models.from_equinox(model, features=lambda m: m.missing)
