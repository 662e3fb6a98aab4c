"""Lanczos spectra of symmetric operators on image-shaped vectors (matfree).

The extreme eigenpairs of a matrix-free symmetric operator by Lanczos with
full reorthogonalisation (matfree ``decomp.tridiag_sym`` and
``eig.eigh_partial``), with residuals ``||A u - lambda u||`` computed with the
operator itself; the selection of the wanted end of the spectrum; and the
Gaussian smoothing of a stochastic-Lanczos-quadrature density. Used by
``bgeom.curvature``; see docs/curvature.md.

References:
  Lanczos, "An iteration method for the solution of the eigenvalue problem of
  linear differential and integral operators", 1950.
  Ubaru, Chen, Saad. "Fast estimation of tr(f(A)) via stochastic Lanczos
  quadrature", SIAM J. Matrix Anal. Appl. 2017. https://doi.org/10.1137/16M1104974
  Kraemer et al., matfree. https://github.com/pnkraemer/matfree
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from matfree import decomp

from bgeom import _checks

WHICH = ("largest", "smallest", "both", "magnitude")
"""Which end of a spectrum ``select`` keeps (see ``bgeom.boundary_curvature``)."""


def default_num_matvecs(k: int, dim: int) -> int:
    """The default Krylov depth for ``k`` eigenpairs: ``min(dim, max(2k + 20, 3k))``."""
    return min(dim, max(2 * k + 20, 3 * k))


def check_spectrum_args(fn: str, k: int, which: str, num_matvecs: int | None, dim: int):
    """Validate ``k``, ``which`` and the Krylov depth; return ``(k, num_matvecs)``."""
    k = _checks.check_positive_int(k, "k", fn)
    if which not in WHICH:
        raise ValueError(f"{fn}: which must be one of {', '.join(WHICH)}; got {which!r}.")
    if k > dim:
        raise ValueError(
            f"{fn}: k={k} exceeds the {dim} dimensions of the tangent space; choose k <= {dim}."
        )
    if num_matvecs is None:
        num_matvecs = default_num_matvecs(k, dim)
    num_matvecs = _checks.check_positive_int(num_matvecs, "num_matvecs", fn)
    if not k <= num_matvecs <= dim:
        raise ValueError(
            f"{fn}: num_matvecs (the Krylov depth) must be between k={k} and the tangent "
            f"dimension {dim}; got {num_matvecs}."
        )
    return k, num_matvecs


def select(vals: jax.Array, k: int, which: str) -> jax.Array:
    """Indices of the wanted Ritz values (``vals`` ascending), in descending value order."""
    m = vals.shape[0]
    if which == "largest":
        idx = jnp.arange(m - 1, m - 1 - k, -1)
    elif which == "smallest":
        idx = jnp.arange(k - 1, -1, -1)
    elif which == "both":
        top = k - k // 2
        idx = jnp.concatenate([jnp.arange(m - 1, m - 1 - top, -1), jnp.arange(k // 2 - 1, -1, -1)])
    else:  # magnitude
        idx = jnp.argsort(-jnp.abs(vals))[:k]
        idx = idx[jnp.argsort(-vals[idx])]
    return idx


def canonical_sign(vecs: jax.Array) -> jax.Array:
    """Flip each row so its largest-magnitude entry is positive (reproducible signs)."""
    flat = vecs.reshape(vecs.shape[0], -1)
    pivot = jnp.take_along_axis(flat, jnp.argmax(jnp.abs(flat), axis=1)[:, None], axis=1)
    return vecs * jnp.where(pivot < 0, -1.0, 1.0).reshape((-1,) + (1,) * (vecs.ndim - 1))


# The small dense eigenproblem of the Lanczos tridiagonal, one matrix per call
# even under vmap. Batched, jaxlib's CPU LAPACK kernel splits the batch over
# XLA's intra-op thread pool and waits for it; with as many forced host devices
# as threads (``--xla_force_host_platform_device_count``), every pool thread
# then runs a device's program waiting in that kernel, and nothing runs the
# split work: a deadlock (seen with 2 devices on 2 cores, the curvature probe).
@jax.custom_batching.sequential_vmap
def _tridiagonal_eigh(tridiagonal: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.linalg.eigh(tridiagonal)


def lanczos_eigs(matvec: Callable, v0: jax.Array, k: int, which: str, num_matvecs: int):
    """Top/bottom eigenpairs of a symmetric operator by matfree's Lanczos; explicit residuals.

    matfree's ``decomp.tridiag_sym`` (full reorthogonalisation) gives the
    Krylov basis ``Q`` and the tridiagonal ``T = Q A Q^T``; the Ritz pairs are
    the eigenpairs of ``T`` mapped back through ``Q`` (what matfree's
    ``eig.eigh_partial`` computes, with the small eigenproblem solved one
    matrix at a time under vmap: see ``_tridiagonal_eigh``).
    """
    tridiag = decomp.tridiag_sym(num_matvecs, reortho="full", materialize=True, custom_vjp=False)
    shape = v0.shape
    flat = lambda v: matvec(v.reshape(shape)).reshape(-1)
    basis, tridiagonal, *_ = tridiag(flat, v0.reshape(-1))
    vals, ritz = _tridiagonal_eigh(tridiagonal)
    vecs = (ritz.T @ basis).reshape((-1, *shape))
    idx = select(vals, k, which)
    vals, vecs = vals[idx], canonical_sign(vecs[idx])
    # Residuals with the operator itself (k products, batched): an honest
    # accuracy measure even when the Lanczos estimate would be misleading
    # (loss of orthogonality, or the slightly nonlinear finite-difference map).
    applied = jax.vmap(matvec)(vecs)
    diff = applied - vals.reshape((-1,) + (1,) * (vecs.ndim - 1)) * vecs
    residuals = jnp.sqrt(jnp.sum(jnp.square(diff.reshape(k, -1)), axis=1))
    return vals, vecs, residuals


def spectral_density(
    nodes: jax.Array, weights: jax.Array, grid: jax.Array, width: float | jax.Array
) -> jax.Array:
    """Gaussian-smoothed density on ``grid`` of the quadrature ``(nodes, weights)``.

    ``rho(t) = mean_l sum_j w_lj N(t; nodes_lj, width^2)``; integrates to 1 when
    each probe's weights sum to 1. Leading axes beyond the last are averaged
    (pass a batch of ``CurvatureDensity`` fields to pool several points).

    Args:
      nodes, weights: same shape ``(..., m)``.
      grid: ``(G,)`` curvature values.
      width: the Gaussian's standard deviation (curvature units).

    Returns:
      ``(G,)`` density values.
    """
    nodes = jnp.asarray(nodes).reshape(-1)
    weights = jnp.asarray(weights).reshape(-1)
    probes = jnp.sum(weights)
    z = (jnp.asarray(grid)[:, None] - nodes[None, :]) / width
    kernel = jnp.exp(-0.5 * z * z) / (width * math.sqrt(2 * math.pi))
    return kernel @ weights / probes
