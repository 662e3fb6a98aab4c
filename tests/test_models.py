import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tol

from bgeom import models


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("activation", ["relu", "softplus", "tanh"])
def test_functional_equals_module(name, activation):
    kwargs = {"width": 4} if name == "resnet18" else {}
    model = models.create(name, (8, 8, 3), 7, activation=activation, beta=3.0, **kwargs)
    apply_fn, params = models.functional(model)
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 3))
    batched = model(x)
    assert batched.shape == (3, 7)
    single = jnp.stack([apply_fn(params, xi) for xi in x])
    np.testing.assert_allclose(single, batched, **tol(jnp.float32, 16))
    feats_fn, feats_params = models.functional(model, features=True)
    f = feats_fn(feats_params, x[0])
    assert f.ndim == 1
    np.testing.assert_allclose(f, model.features(x[:1])[0], **tol(jnp.float32, 16))


def test_equal_architectures_share_apply_fn():
    a = models.functional(models.create("cnn", (8, 8, 1), 10, seed=0))[0]
    b = models.functional(models.create("cnn", (8, 8, 1), 10, seed=1))[0]
    c = models.functional(models.create("cnn", (8, 8, 1), 10, activation="gelu"))[0]
    assert a == b and hash(a) == hash(b)
    assert a != c


def test_softplus_is_the_scaled_smooth_relu():
    act = models.get_activation("softplus", beta=10.0)
    z = jnp.linspace(-2, 2, 9)
    np.testing.assert_allclose(act(z), jnp.log1p(jnp.exp(10 * z)) / 10, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(models.get_activation("relu")(z), jnp.maximum(z, 0))


def test_seeds_change_the_initialisation():
    p0 = models.functional(models.create("mlp", (4, 4, 1), 3, seed=0))[1]
    p1 = models.functional(models.create("mlp", (4, 4, 1), 3, seed=1))[1]
    diffs = [
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True)
    ]
    assert max(diffs) > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "vgg99"}, "Unknown model"),
        ({"activation": "sigmoidish"}, "Unknown activation"),
        ({"activation": "softplus", "beta": 0.0}, "beta"),
        ({"input_shape": (8, 8)}, r"\(H, W, C\)"),
        ({"depth": 3}, "Bad options"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    args = {"name": "cnn", "input_shape": (8, 8, 1), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        models.create(**args)


@pytest.mark.parametrize("name", models.MODELS)
def test_every_convolution_is_canonical_and_no_reduce_window_pooling(name):
    """New layers must use the loop-friendly kernels (see tests/test_kernels.py)."""
    kwargs = {"width": 2} if name == "resnet18" else {}
    model = nnx.eval_shape(lambda: models.create(name, (8, 8, 3), 4, **kwargs))
    convs = [m for _, m in model.iter_modules() if isinstance(m, nnx.Conv)]
    assert (len(convs) > 0) == (name != "mlp")
    assert all(c.conv_general_dilated is models.canonical_conv for c in convs)
    apply_fn, params = models.functional(model)
    grad = jax.grad(lambda p, x: apply_fn(p, x)[0], argnums=1)
    jaxpr = str(jax.make_jaxpr(grad)(params, jax.ShapeDtypeStruct((8, 8, 3), jnp.float32)))
    assert "reduce_window" not in jaxpr and "select_and" not in jaxpr
