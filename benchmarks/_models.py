"""The 28x28 models the DeepFool and subspace benchmarks share, trained on digits.

Imported by ``bench_deepfool.py`` and ``bench_subspace.py`` after they parse
their options (it imports JAX, Flax and bgeom). Every model is built for the
digits images resized to 28x28x1 (``bgeom.data.load("digits", size=28)``) and
trained here for ``EPOCHS`` epochs of Adam (learning rate 1e-3, batch 64), seed 0:

- ``mlp``: bgeom's MLP with tanh, 784-256-256-256-10;
- ``lenet``: bgeom's LeNet-5 (ReLU, 'SAME' 5x5 convolutions, 2x2 max-pooling);
- ``cnn``: bgeom's small VGG-style CNN (four 3x3 convolutions of width 32/64);
- ``jaxcnn``: a conv net written the way a user writes one in plain JAX, with no
  bgeom or Flax inside: ``lax.conv_general_dilated`` (NHWC / HWIO, 'SAME'),
  ReLU, ``lax.reduce_window`` max-pooling; 3x3 conv 32, pool, 3x3 conv 64,
  pool, dense 128, dense 10 (the layout of the Keras MNIST example), trained
  by its own short optax loop with the same recipe.

Each comes as a :class:`BenchModel`: the per-example ``apply_fn(params, x)``
every bgeom analysis takes, the batched logits, and ``layers``, the weights as
NumPy arrays in the order and layout of the JAX computation (kernels HWIO,
dense matrices (in, out)), from which ``_torch_models.py`` builds the PyTorch
copies.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import import_bgeom, test_accuracy
from jax import lax

#: Models the benchmarks know, and what each is.
MODELS = {
    "mlp": "bgeom MLP, tanh, 784-256-256-256-10",
    "lenet": "bgeom LeNet-5, ReLU",
    "cnn": "bgeom CNN (4 x 3x3 conv, width 32/64, dense 128), ReLU",
    "jaxcnn": "plain-JAX CNN (lax.conv_general_dilated + reduce_window max-pool, ReLU; "
    "conv 32, conv 64, dense 128)",
}
EPOCHS = 5
SIZE = 28


@dataclasses.dataclass
class BenchModel:
    """A trained benchmark model.

    Attributes:
      name: a key of ``MODELS``.
      description: ``MODELS[name]``.
      apply_fn: ``apply_fn(params, x)``: logits of ONE image (H, W, C).
      batched: ``batched(params, xb)``: logits of a batch (N, H, W, C).
      params: the parameters (a pytree).
      layers: the forward pass as a list of ``(op, *arrays)``; ops ``dense``
        (kernel (in, out), bias), ``conv`` (kernel HWIO, bias; 'SAME', stride 1),
        ``relu``, ``tanh``, ``pool`` (2x2, stride 2) and ``flatten`` (NHWC order).
      test_accuracy: on the digits test split.
      train_seconds: training time (compilation included).
    """

    name: str
    description: str
    apply_fn: Callable
    batched: Callable
    params: Any
    layers: list[tuple]
    test_accuracy: float
    train_seconds: float


def load_data() -> Any:
    """The digits data resized to 28x28x1."""
    return import_bgeom().data.load("digits", size=SIZE)


def _np(v: Any) -> np.ndarray:
    return np.asarray(getattr(v, "value", v), np.float32)


def _bgeom_layers(name: str, module: Any) -> list[tuple]:
    """The forward pass of a bgeom module as ``layers`` (see ``BenchModel``)."""
    act = module.act.name
    if act not in ("relu", "tanh"):
        raise ValueError(f"no PyTorch copy for activation {act!r}")
    dense = lambda layer: ("dense", _np(layer.kernel), _np(layer.bias))
    conv = lambda layer: ("conv", _np(layer.kernel), _np(layer.bias))
    if name == "mlp":
        out: list[tuple] = [("flatten",)]
        for layer in module.layers:
            out += [dense(layer), (act,)]
        return out + [dense(module.head)]
    if name == "lenet":
        return [
            conv(module.conv1), (act,), ("pool",),
            conv(module.conv2), (act,), ("pool",),
            ("flatten",), dense(module.fc1), (act,), dense(module.fc2), (act,),
            dense(module.head),
        ]  # fmt: skip
    if name == "cnn":
        out = []
        for i, layer in enumerate(module.convs):
            out += [conv(layer), (act,)] + ([("pool",)] if i % 2 else [])
        return out + [("flatten",), dense(module.fc), (act,), dense(module.head)]
    raise ValueError(name)


def _train_bgeom(name: str, data: Any) -> BenchModel:
    bgeom = import_bgeom()
    kwargs = {"hidden": (256, 256, 256), "activation": "tanh"} if name == "mlp" else {}
    config = bgeom.train.recipe("default", epochs=EPOCHS)
    start = time.perf_counter()
    trained = bgeom.train.fit(name, data, config=config, seeds=0, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    apply_fn = trained.apply_fn
    return BenchModel(
        name=name,
        description=MODELS[name],
        apply_fn=apply_fn,
        batched=apply_fn.batched,
        params=trained.params,
        layers=_bgeom_layers(name, trained.model),
        test_accuracy=test_accuracy(trained),
        train_seconds=seconds,
    )


# --------------------------------------------------------------------------- plain JAX CNN

_DN = ("NHWC", "HWIO", "NHWC")


def jaxcnn_logits(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """The plain-JAX CNN on a batch (N, 28, 28, 1): written without bgeom or Flax."""

    def conv(h, w, b):
        return lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=_DN) + b

    def pool(h):
        return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    h = pool(jax.nn.relu(conv(x, params["w1"], params["b1"])))
    h = pool(jax.nn.relu(conv(h, params["w2"], params["b2"])))
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["w3"] + params["b3"])
    return h @ params["w4"] + params["b4"]


def jaxcnn_apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Logits of ONE image (28, 28, 1): the form bgeom's analyses take."""
    return jaxcnn_logits(params, x[None])[0]


def _jaxcnn_init(key: jax.Array, num_classes: int) -> dict[str, jax.Array]:
    """He-normal kernels, zero biases."""
    shapes = {
        "w1": (3, 3, 1, 32),
        "w2": (3, 3, 32, 64),
        "w3": ((SIZE // 4) ** 2 * 64, 128),
        "w4": (128, num_classes),
    }
    params = {}
    for (name, shape), k in zip(shapes.items(), jax.random.split(key, len(shapes)), strict=True):
        fan_in = int(np.prod(shape[:-1]))
        params[name] = jax.random.normal(k, shape) * np.sqrt(2.0 / fan_in)
        params["b" + name[1:]] = jnp.zeros(shape[-1])
    return params


def _train_jaxcnn(data: Any, batch_size: int = 64) -> BenchModel:
    """Train the plain-JAX CNN with Adam (1e-3), ``EPOCHS`` epochs, seed 0."""
    start = time.perf_counter()
    params = _jaxcnn_init(jax.random.PRNGKey(0), data.num_classes)
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss(p):
            logits = jaxcnn_logits(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(0)
    n = len(data.x_train)
    for _ in range(EPOCHS):
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            params, opt_state = step(params, opt_state, data.x_train[idx], data.y_train[idx])
    predict = jax.jit(jaxcnn_logits)
    accuracy = float(np.mean(np.argmax(predict(params, data.x_test), -1) == data.y_test))
    seconds = time.perf_counter() - start
    p = {k: np.asarray(v) for k, v in params.items()}
    layers = [
        ("conv", p["w1"], p["b1"]), ("relu",), ("pool",),
        ("conv", p["w2"], p["b2"]), ("relu",), ("pool",),
        ("flatten",), ("dense", p["w3"], p["b3"]), ("relu",),
        ("dense", p["w4"], p["b4"]),
    ]  # fmt: skip
    return BenchModel(
        name="jaxcnn",
        description=MODELS["jaxcnn"],
        apply_fn=jaxcnn_apply,
        batched=jaxcnn_logits,
        params=params,
        layers=layers,
        test_accuracy=accuracy,
        train_seconds=seconds,
    )


def train(name: str, data: Any) -> BenchModel:
    """Train model ``name`` (a key of ``MODELS``) on ``data`` (digits at 28x28)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return _train_jaxcnn(data) if name == "jaxcnn" else _train_bgeom(name, data)


def place(tree: Any, device: Any) -> Any:
    """``tree`` committed to ``device`` (the bgeom rows run on the device they are given)."""
    return jax.device_put(tree, device)
