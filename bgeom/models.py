"""Flax NNX image classifiers and the one functional model interface.

Every model maps a batch (N, H, W, C) to logits (N, L), exposes its
penultimate-layer features through ``features(x)``, and takes its activation
by name (``relu``, ``softplus`` with ``beta``, ``gelu``, ``tanh``, ``swish``):
smooth activations give meaningful input Hessians for the curvature analyses,
ReLU nets are piecewise linear.

``functional(model)`` turns a module into ``(apply_fn, params)`` with
``apply_fn(params, x)`` the logits of ONE unbatched example, the interface
every analysis in bgeom takes. No analysis imports Flax.

Every convolution is an ``nnx.Conv`` (same parameters, initialisation and
checkpoint layout) computed by ``canonical_conv``, and max-pooling is a
reshape and a max (``max_pool_2x2``): the same values and derivatives as
``lax.conv_general_dilated`` and ``nnx.max_pool``, written so that the input
gradient inside bgeom's ``while_loop`` searches is again an ordinary
convolution, with no scatter (BENCHMARKS.md: top level vs inside a loop).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.custom_derivatives import SymbolicZero

ACTIVATIONS = ("relu", "softplus", "gelu", "tanh", "swish")
MODELS = ("mlp", "lenet", "cnn", "resnet18")


@dataclasses.dataclass(frozen=True)
class Activation:
    """A named activation, hashable by value so equal models have equal graphs.

    ``softplus`` is ``softplus(beta * x) / beta``: a smooth ReLU whose sharpness
    grows with ``beta`` (ReLU as beta -> inf).
    """

    name: str
    beta: float = 1.0

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation {self.name!r}; choose one of {', '.join(ACTIVATIONS)}."
            )
        if self.name == "softplus" and not self.beta > 0:
            raise ValueError(f"softplus needs beta > 0; got {self.beta}.")

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.name == "relu":
            return jax.nn.relu(x)
        if self.name == "softplus":
            return jax.nn.softplus(self.beta * x) / self.beta
        if self.name == "gelu":
            return jax.nn.gelu(x)
        if self.name == "tanh":
            return jnp.tanh(x)
        return jax.nn.swish(x)


def get_activation(name: str, beta: float = 1.0) -> Activation:
    """The activation function called ``name`` (one of ``ACTIVATIONS``)."""
    return Activation(name, float(beta))


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def _pooled(n: int, times: int = 2) -> int:
    """Spatial size after ``times`` ceil-mode 2x2 poolings."""
    for _ in range(times):
        n = -(-n // 2)
    return n


# ------------------------------------------------------------------ convolution


def _lax_conv(config: tuple, x: jax.Array, w: jax.Array, dn: Any = None) -> jax.Array:
    """``lax.conv_general_dilated`` with the options in ``config`` (``dn`` overrides)."""
    strides, padding, lhs_dil, rhs_dil, config_dn, groups, precision, pet, sharding = config
    return lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        lhs_dilation=lhs_dil,
        rhs_dilation=rhs_dil,
        dimension_numbers=config_dn if dn is None else dn,
        feature_group_count=groups,
        precision=precision,
        preferred_element_type=pet,
        out_sharding=sharding,
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _conv(config: tuple, x: jax.Array, w: jax.Array) -> jax.Array:
    return _lax_conv(config, x, w)


@functools.partial(_conv.defjvp, symbolic_zeros=True)
def _conv_jvp(config, primals, tangents):
    x, w = primals
    dx, dw = tangents
    # Plain lax here, not _conv: the forward-mode derivative of this rule
    # (forward over reverse, the exact Hessian-vector products) is then
    # lax's own, a canonical convolution of the tangent.
    y = _lax_conv(config, x, w)
    parts = []
    if not isinstance(dx, SymbolicZero):
        # The same linear map of dx, with the kernel's in/out feature axes
        # swapped both in memory and in the dimension numbers. JAX transposes
        # a convolution by swapping the kernel's in/out labels and reversing
        # its spatial axes, so the input gradient is a convolution of the
        # cotangent with the array rev(swap(w)) read in the kernel's own
        # layout: the canonical form, which XLA:CPU also compiles well inside
        # loop bodies.
        dn = config[4]
        o, i, *spatial = dn.rhs_spec
        swapped = dn._replace(rhs_spec=(i, o, *spatial))
        parts.append(_lax_conv(config, dx, jnp.swapaxes(w, o, i), swapped))
    if not isinstance(dw, SymbolicZero):
        parts.append(_lax_conv(config, x, dw))  # transposed: the usual kernel gradient
    if not parts:
        return y, jnp.zeros_like(y)
    return y, parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _static(v: Any) -> Any:
    """A hashable copy of a convolution option (lists of pairs become tuples)."""
    if isinstance(v, (list, tuple)):
        return tuple(_static(a) for a in v)
    return v


def canonical_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` whose input gradient is a canonical convolution.

    A drop-in replacement (same signature, bitwise the same values;
    ``nnx.Conv(..., conv_general_dilated=canonical_conv)``) with the same
    derivatives in every mode, to float32 rounding. What changes is the form
    of one convolution: the gradient with respect to the input is computed as
    a convolution of the cotangent with the spatially reversed kernel whose
    in/out feature axes are swapped in memory, read in the kernel's own layout
    (``b01f_01io->b01f`` for NHWC/HWIO), instead of one that reads the kernel
    with in and out swapped (``01oi``). XLA:CPU runs the latter as a naive
    loop nest inside ``while_loop`` bodies, where bgeom's searches spend their
    time (BENCHMARKS.md). Reverse mode and forward over reverse (exact
    Hessian-vector products, ``jax.hessian``) are canonical throughout; the
    kernel gradient is JAX's usual one. The price is paid where bgeom does not
    go: in forward mode alone (``jax.jvp`` of the model) and reverse over
    reverse, the tangent of the input is convolved with the swapped layout.
    ``batch_group_count > 1`` (only found in kernel gradients) is passed to
    ``lax.conv_general_dilated`` unchanged.
    """
    if batch_group_count != 1:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            precision,
            preferred_element_type,
            out_sharding,
        )
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    config = (
        _static(window_strides),
        _static(padding),
        _static(lhs_dilation),
        _static(rhs_dilation),
        dn,
        int(feature_group_count),
        _static(precision),
        preferred_element_type,
        out_sharding,
    )
    return _conv(config, lhs, rhs)


def _conv_layer(cin: int, cout: int, kernel: Sequence[int], *, rngs: nnx.Rngs, **kwargs):
    """``nnx.Conv`` (same parameters and initialisation) computed by ``canonical_conv``."""
    return nnx.Conv(cin, cout, kernel, conv_general_dilated=canonical_conv, rngs=rngs, **kwargs)


# ------------------------------------------------------------------ max-pooling

# The position of each element of a 2x2 window in row-major order, on the
# (N, H/2, 2, W/2, 2, C) view of an (N, H, W, C) array.
_WINDOW_ORDER = np.arange(4, dtype=np.int32).reshape(1, 1, 2, 1, 2, 1)


def _windows(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_jvp
def _max_pool_even(x: jax.Array) -> jax.Array:
    return jnp.max(_windows(x), axis=(2, 4))


@_max_pool_even.defjvp
def _max_pool_even_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _max_pool_even(x)
    # Each output takes the tangent of the FIRST maximum of its window in
    # row-major order, as the derivative of reduce_window max does (ties are
    # common: constant image regions give equal activations); masks and sums
    # only, so the transpose is a select and a broadcast, no scatter.
    win = _windows(x)
    rank = jnp.where(win == y[:, :, None, :, None, :], _WINDOW_ORDER, 4)
    first = rank == jnp.min(rank, axis=(2, 4), keepdims=True)
    return y, jnp.sum(jnp.where(first, _windows(dx), 0), axis=(2, 4))


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 stride-2 max-pooling of (N, H, W, C), ceil mode, so tiny inputs like 8x8 work.

    Equal to ``nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")`` (an
    odd height or width is padded with -inf at the end) in value and in every
    derivative, written as a reshape and a max instead of ``reduce_window``,
    whose gradient becomes a scatter under ``vmap`` (BENCHMARKS.md).
    """
    if x.ndim != 4:
        raise ValueError(f"max_pool_2x2 expects (N, H, W, C); got shape {x.shape}.")
    _, h, w, _ = x.shape
    if h % 2 or w % 2:
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    return _max_pool_even(x)


class MLP(nnx.Module):
    """Fully connected classifier on flattened images."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        beta: float = 1.0,
        rngs: nnx.Rngs,
    ):
        self.act = get_activation(activation, beta)
        sizes = [math.prod(input_shape), *hidden]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        h = _flat(x)
        for layer in self.layers:
            h = self.act(layer(h))
        return h

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


class LeNet(nnx.Module):
    """LeNet-5 (LeCun et al. 1998) with 'SAME' convolutions so any input size works."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        activation: str = "relu",
        beta: float = 1.0,
        rngs: nnx.Rngs,
    ):
        h, w, c = input_shape
        self.act = get_activation(activation, beta)
        self.conv1 = _conv_layer(c, 6, (5, 5), rngs=rngs)
        self.conv2 = _conv_layer(6, 16, (5, 5), rngs=rngs)
        flat = _pooled(h) * _pooled(w) * 16
        self.fc1 = nnx.Linear(flat, 120, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.head = nnx.Linear(84, num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        h = max_pool_2x2(self.act(self.conv1(x)))
        h = max_pool_2x2(self.act(self.conv2(h)))
        h = self.act(self.fc1(_flat(h)))
        return self.act(self.fc2(h))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


class CNN(nnx.Module):
    """Small VGG-style CNN: two blocks of two 3x3 convolutions, then a dense layer."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        width: int = 32,
        hidden: int = 128,
        activation: str = "relu",
        beta: float = 1.0,
        rngs: nnx.Rngs,
    ):
        h, w, c = input_shape
        self.act = get_activation(activation, beta)
        self.convs = nnx.List(
            [
                _conv_layer(c, width, (3, 3), rngs=rngs),
                _conv_layer(width, width, (3, 3), rngs=rngs),
                _conv_layer(width, 2 * width, (3, 3), rngs=rngs),
                _conv_layer(2 * width, 2 * width, (3, 3), rngs=rngs),
            ]
        )
        flat = _pooled(h) * _pooled(w) * 2 * width
        self.fc = nnx.Linear(flat, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        h = x
        for i, conv in enumerate(self.convs):
            h = self.act(conv(h))
            if i % 2 == 1:
                h = max_pool_2x2(h)
        return self.act(self.fc(_flat(h)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


class BasicBlock(nnx.Module):
    """ResNet basic block: two 3x3 conv + batch-norm layers and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, act: Callable, *, rngs: nnx.Rngs):
        self.act = act
        self.conv1 = _conv_layer(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.conv2 = _conv_layer(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        if stride != 1 or cin != cout:
            self.short_conv = _conv_layer(
                cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs
            )
            self.short_bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        else:
            self.short_conv = None
            self.short_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.act(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        s = x if self.short_conv is None else self.short_bn(self.short_conv(x))
        return self.act(h + s)


class ResNet18(nnx.Module):
    """CIFAR-style ResNet-18 (He et al. 2016): 3x3 stem, no initial max-pool.

    ``width`` scales every stage (64 is the standard network; small widths give
    toy-sized versions for tests).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        width: int = 64,
        activation: str = "relu",
        beta: float = 1.0,
        rngs: nnx.Rngs,
    ):
        _, _, c = input_shape
        act = get_activation(activation, beta)
        self.act = act
        self.stem = _conv_layer(c, width, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        blocks = []
        cin = width
        for stage, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            for j in range(2):
                stride = 2 if (stage > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, cout, stride, act, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        h = self.act(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            h = block(h)
        return jnp.mean(h, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


_CONSTRUCTORS = {"mlp": MLP, "lenet": LeNet, "cnn": CNN, "resnet18": ResNet18}


def create(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    seed: int = 0,
    activation: str = "relu",
    beta: float = 1.0,
    **kwargs: Any,
) -> nnx.Module:
    """Build the classifier called ``name`` (one of ``MODELS``) with a seeded init.

    Args:
      name: ``mlp``, ``lenet``, ``cnn`` or ``resnet18``.
      input_shape: (H, W, C) of one image.
      num_classes: number of logits.
      seed: initialisation seed.
      activation: one of ``ACTIVATIONS``; ``beta`` is softplus' sharpness.
      **kwargs: architecture options (``hidden`` for mlp; ``width``/``hidden``
        for cnn; ``width`` for resnet18).
    """
    if name not in _CONSTRUCTORS:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    get_activation(activation, beta)  # validates the name early, with a clear error
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape must be (H, W, C); got {tuple(input_shape)}.")
    try:
        return _CONSTRUCTORS[name](
            tuple(input_shape),
            int(num_classes),
            activation=activation,
            beta=beta,
            rngs=nnx.Rngs(seed),
            **kwargs,
        )
    except TypeError as e:
        raise ValueError(f"Bad options for model {name!r}: {e}.") from None


class ApplyFn:
    """``apply_fn(params, x)`` of a split NNX module, for one unbatched example.

    Equal (and equally hashed) for equal graph definitions, so jitted analyses
    that take ``apply_fn`` as a static argument reuse their compiled code across
    ``functional`` calls on the same architecture.
    """

    def __init__(self, graphdef: Any, method: str):
        self.graphdef = graphdef
        self.method = method

    def __call__(self, params: Any, x: jax.Array) -> jax.Array:
        model = nnx.merge(self.graphdef, params)
        return getattr(model, self.method)(x[None])[0]

    def batched(self, params: Any, x: jax.Array) -> jax.Array:
        """The same function on a batch (N, H, W, C), without a vmap."""
        return getattr(nnx.merge(self.graphdef, params), self.method)(x)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ApplyFn)
            and self.method == other.method
            and self.graphdef == other.graphdef
        )

    def __hash__(self) -> int:
        return hash((self.graphdef, self.method))

    def __repr__(self) -> str:
        return f"ApplyFn({self.method})"


def functional(model: nnx.Module, *, features: bool = False) -> tuple[Callable, Any]:
    """Split an NNX module into ``(apply_fn, params)`` for ONE unbatched example.

    The module is put in evaluation mode first (batch-norm uses its running
    statistics), so ``apply_fn(params, x) == model(x[None])[0]`` after
    ``model.eval()``. ``params`` is the whole ``nnx.State`` (parameters and
    batch statistics): everything the forward pass reads is traced, nothing is
    captured in a closure. Stack several states along a new leading axis and
    ``jax.vmap(apply_fn, in_axes=(0, None))`` evaluates an ensemble.

    Args:
      model: any bgeom (or other NNX) classifier.
      features: return the penultimate-layer features instead of the logits
        (the model must have a ``features`` method).

    Returns:
      ``(apply_fn, params)``.
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"functional expects a Flax NNX Module; got {type(model).__name__}.")
    method = "features" if features else "__call__"
    if features and not hasattr(model, "features"):
        raise ValueError(f"{type(model).__name__} has no features() method.")
    model.eval()
    graphdef, params = nnx.split(model)
    return ApplyFn(graphdef, method), params


def unstack(params: Any, i: int) -> Any:
    """Member ``i`` of an ensemble's stacked parameters."""
    return jax.tree.map(lambda a: a[i], params)


# --------------------------------------------------------------------------
# Users' own models: Flax Linen and Equinox adapters (docs/models.md).


class _Captured(Exception):
    """Carries the input of the named layer out of a forward pass (then abandoned)."""

    def __init__(self, value: Any):
        super().__init__("features captured")
        self.value = value


def _one_example(out: Any, fn_name: str) -> jax.Array:
    if not isinstance(out, jax.Array | np.ndarray) or out.ndim < 1 or out.shape[0] != 1:
        raise ValueError(
            f"{fn_name}: the model must map a batch of one, (1, H, W, C), to an array with a "
            f"leading batch axis of 1; got {getattr(out, 'shape', type(out).__name__)}."
        )
    return out[0]


def from_linen(
    module: Any,
    variables: Any,
    *,
    method: str | Callable | None = None,
    features: str | None = None,
    **apply_kwargs: Any,
) -> tuple[Callable, Any]:
    """``(apply_fn, params)`` of a Flax Linen classifier, for ONE unbatched example.

    ``apply_fn(params, x) == module.apply(params, x[None], method=method,
    **apply_kwargs)[0]``: the Linen module is written for batches, the adapter
    adds and removes the batch axis. ``params`` is the whole ``variables``
    dict (``params`` and, e.g., ``batch_stats``), all of it traced, and
    nothing is mutable: batch-norm statistics stay constant. Pass what puts the
    module in evaluation mode as ``apply_kwargs`` (e.g. ``train=False`` for a
    module whose ``BatchNorm`` takes ``use_running_average=not train``); a module
    that still tries to update its statistics raises, saying so.

    Args:
      module: a ``flax.linen.Module`` mapping (N, H, W, C) to logits (N, L).
      variables: its variables, as from ``module.init``.
      method: the method to apply (name or function), as in ``Module.apply``.
      features: the name of the LAST layer (the submodule attribute name, e.g.
        ``"head"`` or ``"Dense_2"``): ``apply_fn`` then returns that layer's
        input, the penultimate-layer features, flattened (the ``features_fn`` of
        the feature-space and borderline analyses).
      **apply_kwargs: static keyword arguments of every call (``train=False``).

    Returns:
      ``(apply_fn, params)``; ``apply_fn`` takes ``(params, x)`` with ``x`` of
      shape (H, W, C).

    References:
      docs/models.md ("Your own model").
    """
    import flax.linen as nn

    if not isinstance(module, nn.Module):
        raise ValueError(f"from_linen expects a flax.linen.Module; got {type(module).__name__}.")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            "from_linen expects the module's variables, a dict with a 'params' entry (from "
            "module.init(key, x)); got " + type(variables).__name__ + "."
        )

    def run(params: Any, x: jax.Array) -> jax.Array:
        try:
            return module.apply(params, x[None], method=method, mutable=False, **apply_kwargs)
        except Exception as e:  # Flax's error for a write to an immutable collection
            if "immutable" in str(e).lower() or "mutable" in type(e).__name__.lower():
                raise ValueError(
                    "from_linen: the module updates a variable collection (batch statistics?) "
                    "during the forward pass; pass what puts it in evaluation mode, e.g. "
                    "from_linen(module, variables, train=False)."
                ) from e
            raise

    if features is None:

        def apply_fn(params: Any, x: jax.Array) -> jax.Array:
            return _one_example(run(params, x), "from_linen")

        return apply_fn, variables

    def capture(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name == features:
            raise _Captured(args[0])
        return next_fun(*args, **kwargs)

    def features_fn(params: Any, x: jax.Array) -> jax.Array:
        try:
            with nn.intercept_methods(capture):
                run(params, x)
        except _Captured as c:
            return _one_example(c.value, "from_linen").reshape(-1)
        raise ValueError(
            f"from_linen: no layer named {features!r} was called in the forward pass; name "
            "the last layer by its attribute name (e.g. 'head') or its automatic name "
            "('Dense_2'); module.tabulate(...) lists them."
        )

    return features_fn, variables


def from_equinox(
    model: Any,
    *,
    state: Any = None,
    features: Callable[[Any], Any] | None = None,
) -> tuple[Callable, Any]:
    """``(apply_fn, params)`` of an Equinox classifier of ONE unbatched example.

    The model's arrays become ``params`` (traced); everything else (functions,
    shapes, activations) is static: ``eqx.partition(model, eqx.is_array)``, and
    ``apply_fn(params, x) == eqx.combine(params, static)(x)``. The model is put
    in inference mode first (``eqx.nn.inference_mode``: dropout off, batch-norm
    on its running statistics). A stateful model (``eqx.nn.State``, e.g.
    batch-norm) is called as ``model(x, state)`` and its new state is
    discarded; the state is part of ``params``.

    Args:
      model: an ``equinox.Module`` mapping one image (H, W, C) to logits (L,).
      state: its ``eqx.nn.State``, for a stateful model.
      features: a function selecting the model's LAST layer, e.g.
        ``lambda m: m.layers[-1]``: ``apply_fn`` then returns that layer's
        input, the penultimate-layer features, flattened (``features_fn``).

    Returns:
      ``(apply_fn, params)``.

    References:
      docs/models.md ("Your own model").
    """
    import equinox as eqx

    if not isinstance(model, eqx.Module):
        raise ValueError(f"from_equinox expects an equinox.Module; got {type(model).__name__}.")
    model = eqx.nn.inference_mode(model)
    if features is not None:
        try:
            last = features(model)
        except Exception as e:
            raise ValueError(
                f"from_equinox: features must select the model's last layer, e.g. "
                f"lambda m: m.layers[-1]; calling it failed: {e}"
            ) from e
        if not callable(last):
            raise ValueError(
                f"from_equinox: features selected a {type(last).__name__}, not a layer "
                "(a callable module)."
            )

        class _Capture(eqx.Module):
            def __call__(self, x, *args, **kwargs):
                raise _Captured(x)

        model = eqx.tree_at(features, model, _Capture())
    params, static = eqx.partition((model, state), eqx.is_array)

    def call(p: Any, x: jax.Array) -> Any:
        m, s = eqx.combine(p, static)
        return m(x) if s is None else m(x, s)[0]

    if features is None:
        return call, params

    def features_fn(p: Any, x: jax.Array) -> jax.Array:
        try:
            call(p, x)
        except _Captured as c:
            return jnp.asarray(c.value).reshape(-1)
        raise ValueError("from_equinox: the selected last layer was not called by the model.")

    return features_fn, params
