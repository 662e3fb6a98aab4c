"""The models' convolution and max-pooling kernels: the same numbers as plain lax / nnx
(values, gradients, exact HVPs), and compiled loops (DeepFool, exact HVPs) whose
convolutions are all canonical, with no max-pool gradient scatter."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import bgeom
from bgeom import models

CANONICAL = "b01f_01io->b01f"


def _nnx_pool(x):
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


def _reference(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` whose convolutions are plain ``lax.conv_general_dilated``."""
    ref = nnx.clone(model)
    for _, module in ref.iter_modules():
        if isinstance(module, nnx.Conv):
            module.conv_general_dilated = lax.conv_general_dilated
    return ref


def _close(actual, desired, scale=64.0):
    """Equal to float32 rounding: within ``scale`` ulps of the largest entry, leaf by leaf."""
    eps = float(jnp.finfo(jnp.float32).eps)
    for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        a, d = np.asarray(a), np.asarray(d)
        np.testing.assert_allclose(a, d, rtol=0, atol=scale * eps * max(np.abs(d).max(), 1e-30))


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _inputs(shape, n=3, seed=0):
    """Random images, the first all zeros and the second half zeros: constant regions give
    ties in the pooling windows, where the derivative picks one element."""
    x = np.random.default_rng(seed).uniform(size=(n, *shape)).astype(np.float32)
    x[0] = 0.0
    x[1, : shape[0] // 2] = 0.0
    return jnp.asarray(x)


def _derivatives(apply_fn, params, x, c, v, param_grads=True):
    """The batch's logits (batched and per example), per-example input gradients and HVPs
    (forward over reverse) of ``<c, f(z)>``, and (``param_grads``) the parameter gradient
    of its sum over the batch."""

    def F(p, z):
        return jnp.vdot(c, apply_fn(p, z))

    def per_example(z):
        g = lambda y: jax.grad(F, argnums=1)(params, y)
        grad, hvp = jax.jvp(g, (z,), (v,))
        return apply_fn(params, z), grad, hvp

    out = (apply_fn.batched(params, x), *jax.vmap(per_example)(x))
    if param_grads:
        out += (jax.grad(lambda p: jnp.sum(jax.vmap(lambda z: F(p, z))(x)))(params),)
    return out


# Compiling these programs is most of the time of the tests: the numbers checked here do
# not depend on LLVM's optimisation level, so it is turned down.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _run(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


@functools.cache
def _model(name, shape, activation="relu", num_classes=5, **kwargs):
    """``models.create(...)`` with seeded random parameters (biases and batch statistics
    too), built abstractly: an eager initialisation compiles every operation of every new
    shape separately, most of the time of a test."""
    model = nnx.eval_shape(
        lambda: models.create(name, shape, num_classes, activation=activation, beta=2.0, **kwargs)
    )
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(3)

    def leaf(path, a):
        kind = path[-2].key
        if kind == "kernel":
            x = rng.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))
        elif kind == "var":
            x = rng.uniform(0.5, 1.5, a.shape)
        else:
            x = (kind == "scale") + 0.1 * rng.standard_normal(a.shape)
        return jnp.asarray(x, a.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(leaf, state))


MODEL_CASES = [
    # odd sizes (ceil-mode pooling) and ties in the pooling windows of a ReLU net
    ("cnn", (7, 5, 2), "relu", {"width": 3, "hidden": 8}, True),
    ("cnn", (8, 8, 1), "softplus", {"width": 4, "hidden": 16}, True),
    ("lenet", (12, 12, 1), "softplus", {}, True),
    # strided 3x3 and 1x1 convolutions without bias, batch-norm; the kernel gradients are
    # JAX's own, checked on the nets above
    ("resnet18", (4, 4, 3), "softplus", {"width": 2}, False),
]


@pytest.mark.parametrize("name,shape,activation,kwargs,param_grads", MODEL_CASES)
def test_models_equal_plain_lax_and_nnx_pooling(
    monkeypatch, name, shape, activation, kwargs, param_grads
):
    model = _model(name, shape, activation, **kwargs)
    apply_fn, params = models.functional(model)
    x = _inputs(shape)
    c, v = _normal((5,), 1), _normal(shape, 2)

    def run(f):
        return _run(lambda p, x: _derivatives(f, p, x, c, v, param_grads), params, x)

    new = run(apply_fn)
    ref_fn, ref_params = models.functional(_reference(model))
    assert jax.tree.structure(ref_params) == jax.tree.structure(params)
    monkeypatch.setattr(models, "max_pool_2x2", _nnx_pool)  # traced below, while patched
    ref = run(ref_fn)

    np.testing.assert_array_equal(new[0], ref[0])  # forward: bitwise
    np.testing.assert_array_equal(new[1], ref[1])
    assert float(jnp.abs(ref[2]).max()) > 0
    assert (float(jnp.abs(ref[3]).max()) > 0) == (activation != "relu")  # ReLU: zero HVP
    for a, d in zip(new[2:], ref[2:], strict=True):  # derivatives: float32 rounding
        _close(a, d)


def test_hessian_of_a_small_softplus_cnn(monkeypatch):
    name, shape, activation, kwargs, _ = MODEL_CASES[1]
    model = _model(name, shape, activation, **kwargs)
    apply_fn, params = models.functional(model)
    ref_fn, _ = models.functional(_reference(model))
    z = _inputs(shape)[2]

    def hessian(f):
        return _run(jax.hessian(lambda y: f(params, y)[0] - f(params, y)[2]), z)

    H = hessian(apply_fn)
    monkeypatch.setattr(models, "max_pool_2x2", _nnx_pool)
    H_ref = hessian(ref_fn)
    assert float(jnp.abs(H_ref).max()) > 0
    _close(H, H_ref)


def test_piecewise_linear_proof_still_holds():
    """``has_zero_input_hessian`` reads the traced HVP program: ReLU and the new kernels
    must still give an HVP that provably ignores its vector, softplus one that does not."""
    for name, shape, activation, kwargs, _ in MODEL_CASES:
        model = _model(name, shape, activation, **kwargs)
        flat = bgeom.operators.has_zero_input_hessian(*models.functional(model), jnp.zeros(shape))
        assert flat is (activation == "relu")


@pytest.mark.parametrize(
    "strides,padding,groups,rhs_dilation,kernel",
    [
        ((1, 1), "SAME", 1, (1, 1), (3, 3)),
        ((2, 2), "SAME", 1, (1, 1), (3, 3)),
        ((2, 2), "SAME", 1, (1, 1), (1, 1)),
        ((2, 1), "VALID", 1, (1, 1), (5, 2)),
        ((1, 2), ((2, 0), (1, 1)), 2, (2, 1), (3, 2)),
    ],
)
def test_canonical_conv_equals_lax(strides, padding, groups, rhs_dilation, kernel):
    x, w = _normal((2, 7, 6, 4), 0), _normal((*kernel, 4 // groups, 6), 1)
    dn = ("NHWC", "HWIO", "NHWC")
    opts = dict(rhs_dilation=rhs_dilation, dimension_numbers=dn, feature_group_count=groups)

    def run(conv):
        def f(x, w):
            return jnp.sum(jnp.tanh(conv(x, w, strides, padding, **opts)) ** 2)

        def all_of_it(x, w):
            y = conv(x, w, strides, padding, **opts)
            grads = jax.grad(f, argnums=(0, 1))(x, w)
            hvp = jax.jvp(lambda x: jax.grad(f)(x, w), (x,), (jnp.cos(x),))[1]
            jvp = jax.jvp(lambda x, w: conv(x, w, strides, padding, **opts), (x, w), (x**2, w / 3))
            return y, grads, hvp, jvp[1]

        return _run(all_of_it, x, w)

    new, ref = run(models.canonical_conv), run(lax.conv_general_dilated)
    np.testing.assert_array_equal(new[0], ref[0])
    _close(new[1:], ref[1:])


@pytest.mark.parametrize("shape", [(2, 6, 4, 3), (2, 5, 7, 3)])
def test_max_pool_2x2_equals_nnx_max_pool(shape):
    x = np.array(_normal(shape, 0))
    # ties: a constant block, and values rounded to integers
    x[0, :4, :4] = 0.5
    x[-1] = np.round(x[-1])
    x, t = jnp.asarray(x), _normal(shape, 1)
    ct = _normal((shape[0], -(-shape[1] // 2), -(-shape[2] // 2), shape[3]), 2)

    def run(pool):
        y, vjp = jax.vjp(pool, x)
        return y, vjp(ct)[0], jax.jvp(pool, (x,), (t,))[1]

    for a, d in zip(
        _run(lambda: run(models.max_pool_2x2)), _run(lambda: run(_nnx_pool)), strict=True
    ):
        np.testing.assert_array_equal(a, d)


# ------------------------------------------------------------------ compiled-HLO guard


def _computations(text: str) -> dict[str, list[str]]:
    """The instruction lines of every computation of an HLO module's text, by name."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            head = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{$", line.rstrip())
            if head and not line.startswith((" ", "HloModule")):
                current = head.group(1)
                comps[current] = []
        elif line.rstrip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps


def _in_loop_bodies(text: str) -> list[str]:
    """Every instruction of every while-loop body, and of what those bodies call (fusions,
    reductions, nested loops), with its metadata kept apart after a tab."""
    comps = _computations(text)
    bodies = [
        b for lines in comps.values() for ln in lines for b in re.findall(r"body=%?([\w.\-]+)", ln)
    ]
    seen: set[str] = set()
    todo = list(bodies)
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            todo += [
                n for n in re.findall(r"%([\w.\-]+)", line.split(", metadata=")[0]) if n in comps
            ]
    out = []
    for name in seen:
        for line in comps[name]:
            code, _, meta = line.partition(", metadata=")
            out.append(code + "\t" + meta)
    return out


def loop_kernel_problems(text: str) -> list[str]:
    """Non-canonical convolutions and max-pool-gradient scatters inside loop bodies."""
    problems = []
    lines = _in_loop_bodies(text)
    convs = [ln for ln in lines if " convolution(" in ln.split("\t")[0]]
    if not convs:
        problems.append("no convolution inside any while-loop body (is this the right program?)")
    for ln in convs:
        labels = re.search(r"dim_labels=([^,\s]+)", ln)
        if labels is None or labels.group(1) != CANONICAL:
            problems.append("non-canonical convolution in a loop: " + ln.split("\t")[0].strip())
    for ln in lines:
        code, meta = ln.split("\t")
        if " select-and-scatter(" in code or (
            " scatter(" in code and re.search("select_and_scatter|reduce_window", meta)
        ):
            problems.append("max-pool gradient scatter in a loop: " + code.strip()[:200])
    return problems


def _assert_canonical_loops(text: str):
    assert " while(" in text and "op_name=" in text  # the loop, with metadata to read
    problems = loop_kernel_problems(text)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name,shape", [("cnn", (8, 8, 1)), ("lenet", (28, 28, 1))])
def test_deepfool_loop_has_only_canonical_convolutions(name, shape):
    apply_fn, params = models.functional(_model(name, shape, num_classes=10))
    x = jnp.zeros((4, *shape))
    fn = jax.jit(jax.vmap(lambda x: bgeom.deepfool(apply_fn, params, x)))
    _assert_canonical_loops(fn.lower(x).compile().as_text())


def test_exact_hvp_loop_has_only_canonical_convolutions():
    """Forward over reverse, linearised once as the curvature code does, then applied in a
    loop (as Lanczos does): every convolution of both passes stays canonical."""
    apply_fn, params = models.functional(
        _model("cnn", (8, 8, 1), "softplus", num_classes=10, width=8, hidden=16)
    )

    def products(z):
        hvp = bgeom.operators.hessian_vector_product(apply_fn, params, z, 0, 1)
        return jax.lax.fori_loop(0, 3, lambda i, v: hvp(v) / bgeom.operators.norm(hvp(v)), z)

    fn = jax.jit(jax.vmap(products))
    _assert_canonical_loops(fn.lower(jnp.ones((2, 8, 8, 1))).compile().as_text())
