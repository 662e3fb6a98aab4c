"""Detecting small adversarial perturbations by the asymmetry of boundary curvature.

Seen from a clean image, the decision boundary near it bends one way; a
minimally perturbed image sits just across the boundary, where the same
boundary, seen from the other side, bends the other way. For each class ``k``
the score

    rho_k(x) = mean_t [F_k(x + v_t) + F_k(x - v_t) - 2 F_k(x)],
    F_k = f_k - f_khat(x),

with ``v_t`` random vectors of a fixed norm in the shared curved subspace S
(``bgeom.curvature.shared_curved_subspace``), is a second difference: about
``v^T (H_k - H_khat) v``, how the boundary between ``khat`` and ``k`` bends
along S, seen from ``x``. ``F_k`` changes sign when the two classes swap roles,
so for a perturbed input ``x' = x + r`` (now predicted ``j``, the original
class ``k0`` a competitor) ``rho_{k0}(x') ~ -rho_j(x)`` when the boundary bends
alike on both sides (exactly so for quadratic classifiers): the flip.

Sign convention used throughout (fixed once, from the definition above):
**the detection score is ``s(x) = -min_{k != khat} rho_k(x)`` and an input is
flagged as perturbed when ``s(x)`` is ABOVE a threshold** chosen on held-out
clean data (a false-positive rate). For a flagged input the recovered label is
the class with the most negative score, ``argmin_{k != khat} rho_k(x)``. On the
digits models we measured, every ``rho_k`` of a clean input is positive (the
predicted class's logit falls off faster than the others along S) while the
original class of a DeepFool-perturbed input has ``rho_{k0}`` near zero or
negative; other networks may differ, which the ROC AUC shows (below 0.5: the
opposite side).

Every per-example function composes with jit and vmap; the ROC metrics are
NumPy (scikit-learn) functions of finished scores.

References:
  Fawzi, Moosavi-Dezfooli, Frossard, Soatto. "Empirical study of the topology
  and geometry of deep networks" (first version: "Classification regions of
  deep neural networks"), CVPR 2018, section 6. https://arxiv.org/abs/1705.09552

See docs/detection.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bgeom import _checks


class AsymmetryScore(NamedTuple):
    """Curvature-asymmetry scores of one input.

    Attributes:
      scores: ``(L,)`` ``rho_k(x)`` for every class; ``+inf`` at the predicted class.
      score: ``-min_k scores``, the detection statistic (high means perturbed).
      label: the prediction ``khat(x)``.
      recovered_label: ``argmin_k scores``, the label proposed for a flagged input.
      converged: every logit was finite (a NaN score is never a statistic).
    """

    scores: jax.Array
    score: jax.Array
    label: jax.Array
    recovered_label: jax.Array
    converged: jax.Array


def curved_directions(
    key: jax.Array, basis: jax.Array, num: int, radius: float | jax.Array
) -> jax.Array:
    """``num`` random vectors of norm ``radius``, uniform on the sphere of a subspace.

    Args:
      key: PRNG key.
      basis: ``(m, H, W, C)`` orthonormal (flattened rows) basis of S.
      num: number of vectors.
      radius: their norm.

    Returns:
      ``(num, H, W, C)``.
    """
    num = _checks.check_positive_int(num, "num", "curved_directions")
    if _checks.is_concrete(radius) and not float(radius) > 0:
        raise ValueError(
            f"curved_directions: radius must be > 0 (zero-length directions measure nothing); "
            f"got {radius}."
        )
    basis = jnp.asarray(basis)
    if basis.ndim != 4:
        raise ValueError(
            f"curved_directions: basis must have shape (m, H, W, C); got {tuple(basis.shape)}."
        )
    return _directions_core(key, basis, jnp.asarray(radius, basis.dtype), num=num)


@functools.partial(jax.jit, static_argnames=("num",))
def _directions_core(key, basis, radius, *, num):
    c = jax.random.normal(key, (num, basis.shape[0]), basis.dtype)
    c = radius * c / jnp.linalg.norm(c, axis=1, keepdims=True)
    return jnp.tensordot(c, basis, axes=1)


def asymmetry_score(
    apply_fn: Callable, params: Any, x: jax.Array, directions: jax.Array
) -> AsymmetryScore:
    """Curvature-asymmetry scores ``rho_k(x)`` of ONE input along given directions.

    ``rho_k(x) = mean_t [F_k(x + v_t) + F_k(x - v_t) - 2 F_k(x)]`` with
    ``F_k = f_k - f_khat(x)``; ``2T + 1`` forward passes (one batch).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` for one unbatched example.
      params: the model parameters; traced.
      x: one example (H, W, C).
      directions: ``(T, H, W, C)`` the vectors ``v_t`` (``curved_directions``).

    Returns:
      ``AsymmetryScore``.

    References:
      Method page: docs/detection.md.
      Fawzi et al., CVPR 2018, section 6. https://arxiv.org/abs/1705.09552
    """
    fn = "asymmetry_score"
    x = _checks.check_example(x, fn)
    num_classes = _checks.check_logits(apply_fn, params, x, fn)
    directions = jnp.asarray(directions, x.dtype)
    if directions.ndim != 4 or directions.shape[1:] != x.shape:
        raise ValueError(
            f"{fn}: directions must have shape (T, *x.shape) = (T, {', '.join(map(str, x.shape))})"
            f"; got {tuple(directions.shape)}. Build them with "
            "curved_directions(key, basis, T, radius)."
        )
    return _asymmetry_core(apply_fn, params, x, directions, num_classes=num_classes)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_classes"))
def _asymmetry_core(apply_fn, params, x, directions, *, num_classes):
    points = jnp.concatenate([x[None], x[None] + directions, x[None] - directions])
    logits = jax.vmap(lambda z: apply_fn(params, z))(points)
    label = jnp.argmax(logits[0])
    F = logits - logits[:, label][:, None]  # F_k at every point
    t = directions.shape[0]
    rho = jnp.mean(F[1 : t + 1] + F[t + 1 :], axis=0) - 2.0 * F[0]
    rho = jnp.where(jnp.arange(num_classes) == label, jnp.inf, rho)
    recovered = jnp.argmin(rho)
    return AsymmetryScore(
        scores=rho,
        score=-rho[recovered],
        label=label.astype(jnp.int32),
        recovered_label=recovered.astype(jnp.int32),
        converged=jnp.all(jnp.isfinite(logits)),
    )


def fit_threshold(clean_scores: Any, false_positive_rate: float = 0.05) -> float:
    """The detection threshold: the ``1 - false_positive_rate`` quantile of clean scores.

    Args:
      clean_scores: scores of held-out clean inputs (not the ones evaluated).
      false_positive_rate: the fraction of clean inputs allowed above it.

    Returns:
      The threshold; flag an input when ``score > threshold``.
    """
    s = np.asarray(clean_scores, np.float64).ravel()
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("fit_threshold: needs at least one finite clean score.")
    if not 0.0 <= float(false_positive_rate) < 1.0:
        raise ValueError("fit_threshold: false_positive_rate must be in [0, 1).")
    return float(np.quantile(s, 1.0 - float(false_positive_rate), method="higher"))


def roc(clean_scores: Any, perturbed_scores: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve and area for "perturbed" (positive) against "clean" (negative).

    Args:
      clean_scores, perturbed_scores: detection scores (higher = more likely perturbed).

    Returns:
      ``(false_positive_rate, true_positive_rate, auc)``; the AUC is the
      probability that a perturbed input scores above a clean one (ties count 1/2).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    clean = np.asarray(clean_scores, np.float64).ravel()
    pert = np.asarray(perturbed_scores, np.float64).ravel()
    if clean.size == 0 or pert.size == 0:
        raise ValueError("roc: needs at least one clean and one perturbed score.")
    y = np.concatenate([np.zeros(clean.size), np.ones(pert.size)])
    s = np.concatenate([clean, pert])
    # -inf (e.g. a two-class net with no competitor) sorts lowest; sklearn needs finite.
    s = np.nan_to_num(s, nan=-np.inf)
    finite_min = np.min(s[np.isfinite(s)]) if np.any(np.isfinite(s)) else 0.0
    s = np.where(np.isfinite(s), s, finite_min - 1.0)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr, float(roc_auc_score(y, s))


def recovery_accuracy(recovered_labels: Any, true_labels: Any, flagged: Any | None = None) -> float:
    """Fraction of (flagged) perturbed inputs whose recovered label is the original one.

    Args:
      recovered_labels: ``AsymmetryScore.recovered_label`` of perturbed inputs.
      true_labels: the labels to recover (the clean prediction, or the ground truth).
      flagged: optional mask; only these inputs count (``nan`` if none is flagged).
    """
    rec = np.asarray(recovered_labels).ravel()
    true = np.asarray(true_labels).ravel()
    ok = rec == true
    if flagged is not None:
        flagged = np.asarray(flagged, bool).ravel()
        if not flagged.any():
            return float("nan")
        ok = ok[flagged]
    return float(np.mean(ok))
