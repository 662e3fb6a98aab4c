"""Training transforms: frequency-flipped data, low-pass data, L2 PGD adversarial training.

Each transform is a callable for the hook of ``bgeom.train.fit``,
``transform(key, x, y, logits_fn) -> (x, y)`` applied to every training batch
inside the jitted step, plus ``inputs(x)``: the deterministic map of inputs the
trained model expects at test time (the flip for a model trained on flipped
data; the identity for adversarial training). ``fit`` evaluates test accuracy
on ``inputs(x_test)`` and the suite measures margins there, as "Hold me tight!"
does: a model trained on flipped data is probed on flipped images.

References:
  Ortiz-Jimenez, Modas, Moosavi-Dezfooli, Frossard. "Hold me tight! Influence of
  discriminative features on deep network boundaries", NeurIPS 2020, sections 3-4.
  https://arxiv.org/abs/2002.06349
  Madry, Makelov, Schmidt, Tsipras, Vladu. "Towards deep learning models
  resistant to adversarial attacks", ICLR 2018. https://arxiv.org/abs/1706.06083
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bgeom import subspaces


@dataclasses.dataclass(frozen=True)
class Flip:
    """Train on frequency-flipped images (``bgeom.subspaces.flip``)."""

    name = "flip"

    def inputs(self, x: jax.Array) -> jax.Array:
        return subspaces.flip(x)

    def __call__(self, key, x, y, logits_fn):
        return self.inputs(x), y

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


@dataclasses.dataclass(frozen=True)
class LowPass:
    """Train on low-pass images: only the top-left ``bandwidth`` x ``bandwidth`` DCT block."""

    bandwidth: int = 8
    name = "low_pass"

    def __post_init__(self):
        if int(self.bandwidth) < 1:
            raise ValueError(f"low_pass: bandwidth must be >= 1; got {self.bandwidth}.")

    def inputs(self, x: jax.Array) -> jax.Array:
        return subspaces.low_pass(x, self.bandwidth)

    def __call__(self, key, x, y, logits_fn):
        return self.inputs(x), y

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "bandwidth": int(self.bandwidth)}


@dataclasses.dataclass(frozen=True)
class PGD:
    """L2 PGD adversarial training (Madry et al.): train on the batch's worst case.

    Each batch is replaced by ``x + delta``, delta maximising the cross-entropy
    under ``||delta||_2 <= eps`` and ``x + delta`` in ``bounds``, found by
    ``steps`` normalised-gradient ascent steps of size ``step_size`` (default
    ``2.5 eps / steps``) from a random start in the ball. "Hold me tight!" uses
    eps 2 on MNIST and 1 on CIFAR-10.
    """

    eps: float = 2.0
    steps: int = 7
    step_size: float | None = None
    bounds: tuple[float, float] | None = (0.0, 1.0)
    random_start: bool = True
    name = "pgd"

    def __post_init__(self):
        if not float(self.eps) > 0 or int(self.steps) < 1:
            raise ValueError(f"pgd: eps must be > 0 and steps >= 1; got {self.eps}, {self.steps}.")

    def inputs(self, x: jax.Array) -> jax.Array:
        return x

    def __call__(self, key, x, y, logits_fn):
        return pgd_l2(
            logits_fn,
            key,
            x,
            y,
            eps=self.eps,
            steps=self.steps,
            step_size=self.step_size,
            bounds=self.bounds,
            random_start=self.random_start,
        ), y

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **{k: getattr(self, k) for k in self.__dataclass_fields__}}


def _batch_norms(v: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def pgd_l2(
    logits_fn: Callable[[jax.Array], jax.Array],
    key: jax.Array,
    x: jax.Array,
    y: jax.Array,
    *,
    eps: float,
    steps: int,
    step_size: float | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    random_start: bool = True,
) -> jax.Array:
    """L2 projected gradient ascent on the cross-entropy of a batch.

    Args:
      logits_fn: batched logits ``(B, H, W, C) -> (B, L)``.
      key: PRNG key for the random start.
      x: the batch; y: its integer labels.
      eps: radius of the L2 ball (per example).
      steps: number of ascent steps.
      step_size: length of each step (default ``2.5 eps / steps``).
      bounds: box the adversarial images are clipped to (``None``: no box).
      random_start: start uniformly inside the ball instead of at ``x``.

    Returns:
      The adversarial batch ``x + delta`` (gradients stopped).
    """
    alpha = 2.5 * eps / steps if step_size is None else step_size

    def project(delta):
        norms = _batch_norms(delta)
        delta = delta * jnp.minimum(1.0, eps / jnp.maximum(norms, 1e-12))
        if bounds is not None:
            delta = jnp.clip(x + delta, bounds[0], bounds[1]) - x
        return delta

    if random_start:
        kd, kr = jax.random.split(key)
        direction = jax.random.normal(kd, x.shape, x.dtype)
        direction = direction / jnp.maximum(_batch_norms(direction), 1e-12)
        radius = eps * jax.random.uniform(kr, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
        delta = project(direction * radius)
    else:
        delta = jnp.zeros_like(x)

    def loss(d):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(x + d), y).sum()

    def body(_, d):
        g = jax.grad(loss)(d)
        return project(d + alpha * g / jnp.maximum(_batch_norms(g), 1e-12))

    delta = jax.lax.fori_loop(0, int(steps), body, delta)
    return jax.lax.stop_gradient(x + delta)


TRANSFORMS: dict[str, type] = {"flip": Flip, "low_pass": LowPass, "pgd": PGD}


def get(spec: str | dict[str, Any] | None) -> Any:
    """A transform from a name or a ``{"name": ..., **options}`` table (``None``: none).

    Names: ``flip``, ``low_pass`` (``bandwidth``), ``pgd`` (``eps``, ``steps``,
    ``step_size``, ``bounds``, ``random_start``).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"A transform is a name or a table with a name; got {spec!r}.")
    options = {k: v for k, v in spec.items() if k != "name"}
    cls = TRANSFORMS.get(spec["name"])
    if cls is None:
        raise ValueError(
            f"Unknown training transform {spec['name']!r}; choose one of {', '.join(TRANSFORMS)}."
        )
    fields = set(cls.__dataclass_fields__)
    bad = set(options) - fields
    if bad:
        raise ValueError(
            f"Transform {spec['name']}: unknown option(s) {sorted(bad)}; valid: {sorted(fields)}."
        )
    if "bounds" in options and options["bounds"] is not None:
        options["bounds"] = tuple(float(b) for b in options["bounds"])
    return cls(**options)
