"""Training transforms: frequency flip, low-pass, L2 PGD adversarial training, PRIME.

Each transform is a callable for the hook of ``bgeom.train.fit``,
``transform(key, x, y, logits_fn) -> (x, y)`` applied to every training batch
inside the jitted step, plus ``inputs(x)``: the deterministic map of inputs the
trained model expects at test time (the flip for a model trained on flipped
data; the identity for adversarial training and PRIME). ``fit`` evaluates test
accuracy on ``inputs(x_test)`` and the suite measures margins there, as "Hold
me tight!" does: a model trained on flipped data is probed on flipped images.
A transform may also define ``loss(logits, y) -> (loss, metrics)``, which then
replaces the cross-entropy of ``bgeom.train.classifier_loss`` (PRIME's JSD
consistency loss does; see docs/prime.md).

PRIME's random primitives (``spectral_filter``, ``diffeomorphism``,
``smooth_color``), their mixture (``prime``) and the image helpers they share
with ``bgeom.corruptions`` (``check_image``, ``remap``, ``correlate``) are pure
functions of ONE image (H, W, C) with values in [0, 1]; every random draw comes
from an explicit ``key``; they compose with ``jax.jit`` and ``jax.vmap``.

References:
  Ortiz-Jimenez, Modas, Moosavi-Dezfooli, Frossard. "Hold me tight! Influence of
  discriminative features on deep network boundaries", NeurIPS 2020, sections 3-4.
  https://arxiv.org/abs/2002.06349
  Madry, Makelov, Schmidt, Tsipras, Vladu. "Towards deep learning models
  resistant to adversarial attacks", ICLR 2018. https://arxiv.org/abs/1706.06083
  Modas, Rade, Ortiz-Jimenez, Moosavi-Dezfooli, Frossard. "PRIME: A few
  primitives can boost robustness to common corruptions", ECCV 2022.
  https://arxiv.org/abs/2112.13547
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bgeom import _checks, subspaces


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


# --------------------------------------------------------------------------
# Image helpers shared by the PRIME primitives and bgeom.corruptions.


def check_image(x: Any, fn_name: str) -> jax.Array:
    """Check that ``x`` is ONE floating-point image (H, W, C) with values in [0, 1].

    The shape and dtype are checked at trace time; the values only when ``x``
    holds them (an eager call), since a traced array has none yet.

    Raises:
      ValueError: a batch or another rank, an integer image, NaN/Inf or values
        outside [0, 1], with what to do about it.
    """
    x = jnp.asarray(x)
    if x.ndim != 3:
        hint = (
            f" It looks like a batch: map over it, jax.vmap(lambda k, x: {fn_name}(k, x))"
            "(jax.random.split(key, len(batch)), batch)."
            if x.ndim == 4
            else " Add a channel axis to a greyscale image: x[..., None]."
            if x.ndim == 2
            else ""
        )
        raise ValueError(
            f"{fn_name} expects ONE image of shape (H, W, C); got shape {tuple(x.shape)}.{hint}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{fn_name} expects a floating-point image in [0, 1]; got dtype {x.dtype}. "
            "Convert it with x.astype(jnp.float32) / 255."
        )
    if _checks.is_concrete(x):  # numpy: a jnp reduction of a closed-over x is traced under jit
        values = np.asarray(x)
        lo, hi = float(np.min(values)), float(np.max(values))
        if not (lo >= 0.0 and hi <= 1.0):  # also False for NaN
            raise ValueError(
                f"{fn_name} expects values in [0, 1]; got values in [{lo:g}, {hi:g}]. "
                "Scale the image to [0, 1] (e.g. x / 255) and clean NaN/Inf values first."
            )
    return x


REMAP_MODES = ("nearest", "reflect", "mirror")


def _fold(t: jax.Array, n: int, mode: str) -> jax.Array:
    """Positions ``t`` along an axis of ``n`` pixels folded into [0, n - 1] by ``mode``."""
    if mode == "reflect":  # half-sample symmetric: ... b a | a b ... (scipy "reflect")
        t = jnp.mod(t + 0.5, 2 * n)
        t = jnp.where(t < n, t, 2 * n - t) - 0.5
    elif mode == "mirror" and n > 1:  # whole-sample symmetric: ... c b | a b c ... (reflect-101)
        t = jnp.mod(t, 2 * (n - 1))
        t = jnp.where(t <= n - 1, t, 2 * (n - 1) - t)
    return jnp.clip(t, 0.0, n - 1.0)


def remap(x: jax.Array, rows: jax.Array, cols: jax.Array, *, mode: str = "nearest") -> jax.Array:
    """Bilinear resampling of one image at fractional pixel positions.

    ``out[i, j] = x(rows[i, j], cols[i, j])``, interpolated between the four
    nearest pixels, in every channel. Positions outside the image are folded in
    by ``mode`` (the names of ``scipy.ndimage``): ``nearest`` clamps them to the
    border (PRIME's diffeomorphism), ``reflect`` mirrors about the outer pixel
    edges (``map_coordinates(..., mode="reflect")``), ``mirror`` about the outer
    pixel centres (OpenCV's reflect-101). Integer positions copy pixels exactly.

    Args:
      x: one image (H, W, C).
      rows, cols: positions in pixel units, of one shape (H', W') (any values).
      mode: ``nearest``, ``reflect`` or ``mirror`` (static).

    Returns:
      The resampled image (H', W', C).
    """
    if mode not in REMAP_MODES:
        raise ValueError(f"remap: unknown mode {mode!r}; choose one of {', '.join(REMAP_MODES)}.")
    h, w = x.shape[0], x.shape[1]
    r = _fold(jnp.asarray(rows, x.dtype), h, mode)
    c = _fold(jnp.asarray(cols, x.dtype), w, mode)
    r0 = jnp.floor(r).astype(jnp.int32)
    c0 = jnp.floor(c).astype(jnp.int32)
    r1 = jnp.minimum(r0 + 1, h - 1)
    c1 = jnp.minimum(c0 + 1, w - 1)
    wr = (r - r0)[..., None]
    wc = (c - c0)[..., None]
    return (
        (1 - wr) * (1 - wc) * x[r0, c0]
        + (1 - wr) * wc * x[r0, c1]
        + wr * (1 - wc) * x[r1, c0]
        + wr * wc * x[r1, c1]
    )


def correlate(x: jax.Array, kernel: jax.Array, *, pad: str = "constant") -> jax.Array:
    """Cross-correlate every channel of one image with a 2-D kernel, 'same' size.

    ``out[i, j] = sum_ab kernel[a, b] x[i + a - p, j + b - q]`` with
    ``p = (kh - 1) // 2``, ``q = (kw - 1) // 2`` (PyTorch's ``padding="same"``
    and OpenCV's ``filter2D`` anchor), computed as a sum of shifted copies.

    Args:
      x: one image (H, W, C).
      kernel: (kh, kw), traced (e.g. one random kernel per image under vmap).
      pad: how the border is extended, a ``jnp.pad`` mode: ``constant`` (zeros),
        ``edge``, ``reflect`` (OpenCV's reflect-101) or ``symmetric``.

    Returns:
      The filtered image (H, W, C), not clipped.
    """
    kh, kw = kernel.shape
    h, w = x.shape[0], x.shape[1]
    p, q = (kh - 1) // 2, (kw - 1) // 2
    xp = jnp.pad(x, ((p, kh - 1 - p), (q, kw - 1 - q), (0, 0)), mode=pad)
    out = jnp.zeros_like(x)
    for a in range(kh):
        for b in range(kw):
            out = out + kernel[a, b] * xp[a : a + h, b : b + w]
    return out


# --------------------------------------------------------------------------
# PRIME: random max-entropy primitives and their mixture (docs/prime.md).
#
# Each primitive makes ONE draw of uniforms from its key and derives every
# random quantity from it (normals by Box-Muller, Beta(1/2, 1/2) as an arcsine
# law, integers by flooring): the same distributions as the general samplers,
# with a fraction of their compiled code.


def box_muller(u: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """N(0, 1) draws of ``shape`` from ``2 * prod(shape)`` uniforms in [0, 1) (Box-Muller:
    ``sqrt(-2 log(1 - a)) cos(2 pi b)``)."""
    a, b = jnp.split(u.reshape(2, -1), 2)
    return (jnp.sqrt(-2.0 * jnp.log1p(-a)) * jnp.cos(2.0 * jnp.pi * b)).reshape(shape)


def _split_uniforms(key: jax.Array, keys: int, uniforms: int) -> tuple[jax.Array, jax.Array]:
    """``keys`` new keys and ``uniforms`` uniforms in [0, 1) from ONE split of ``key``: the
    uniforms are the top 24 bits of the data of further split keys (threefry output,
    unused as keys), which saves a second generator in the compiled program."""
    extra = -(-uniforms // 2)
    new = jax.random.split(key, keys + extra)
    bits = jax.random.key_data(new[keys:]).reshape(-1)[:uniforms]
    return new[:keys], (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def _integer(u: jax.Array, low: Any, high: Any) -> jax.Array:
    """A uniform integer of [low, high) from a uniform in [0, 1) (as a float)."""
    return jnp.minimum(jnp.floor(low + u * (high - low)), high - 1)


def _arcsine(u: jax.Array) -> jax.Array:
    """Beta(1/2, 1/2) from a uniform in [0, 1): ``sin^2(pi u / 2)`` (the arcsine law)."""
    return jnp.sin(0.5 * jnp.pi * u) ** 2


def spectral_filter(
    key: jax.Array,
    x: jax.Array,
    *,
    sigma: float | jax.Array | None = None,
    kernel_size: int = 3,
    max_sigma: float = 4.0,
    centred: bool = True,
) -> jax.Array:
    """PRIME's spectral primitive: a random convolution filter.

    ``x' = clip(x * (delta + sigma N(0, 1)), 0, 1)``: every channel is
    cross-correlated ('same' size, zero padding) with one random
    ``kernel_size`` x ``kernel_size`` filter, the identity delta plus Gaussian
    noise of scale ``sigma ~ U(0, max_sigma)``, which multiplies the image's
    spectrum by a random smooth transfer function.

    Args:
      key: PRNG key (sigma and the filter).
      x: one image (H, W, C) in [0, 1].
      sigma: the noise scale (traced); ``None``: drawn from U(0, max_sigma).
      kernel_size: side of the filter (static).
      max_sigma: upper bound of the drawn sigma.
      centred: put the delta at the centre, ``(kernel_size - 1) // 2``, so that
        ``sigma = 0`` is the identity. ``False`` reproduces the reference code,
        whose delta sits at ``ceil(kernel_size / 2)``, one pixel off centre for
        an odd size: its identity part shifts the image by one pixel.

    Returns:
      The filtered image, same shape, in [0, 1].

    References:
      Modas et al., "PRIME", ECCV 2022, section 3 (spectral domain).
      https://arxiv.org/abs/2112.13547 ; docs/prime.md
    """
    x = check_image(x, "spectral_filter")
    k = _checks.check_positive_int(kernel_size, "kernel_size", "spectral_filter")
    centre = (k - 1) // 2 if centred else math.ceil(k / 2)
    if centre >= k:
        raise ValueError(
            f"spectral_filter: the reference's off-centre delta (centred=False) needs "
            f"kernel_size >= 2; got {k}."
        )
    u = jax.random.uniform(key, (1 + 2 * k * k,))
    if sigma is None:
        sigma = max_sigma * u[0]
    delta = jnp.zeros((k, k), x.dtype).at[centre, centre].set(1.0)
    kernel = delta + (sigma * box_muller(u[1:], (k, k))).astype(x.dtype)
    return jnp.clip(correlate(x, kernel), 0.0, 1.0)


def diffeomorphism_temperatures(n: int, cut: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The reference's range ``(T1, T2)`` of temperatures for image side ``n`` and ``cut``.

    ``T1 = 1 / (pi n^2 log cut)`` gives a typical displacement of half a pixel;
    ``T2 = 4 / (pi^3 cut^2 log cut)`` is the largest temperature without
    overhangs (the map stays invertible). ``cut`` is offset by 1e-6, as in the
    reference code.
    """
    cut = jnp.asarray(cut, jnp.float32) + 1e-6
    log = jnp.log(cut)
    return 1.0 / (jnp.pi * n**2 * log), 4.0 / (jnp.pi**3 * cut**2 * log)


def _draw_cut(u: jax.Array, min_cut: int, max_cut: int) -> jax.Array:
    """The reference's two-stage draw from two uniforms: top ~ U{min_cut + 1..max_cut},
    then a Beta(1/2, 1/2) point of [min_cut, top] rounded down."""
    top = _integer(u[0], min_cut + 1, max_cut + 1)
    return jnp.minimum(jnp.floor(_arcsine(u[1]) * (top + 1 - min_cut) + min_cut), top)


@functools.lru_cache(maxsize=64)
def _alias_classes(n: int, modes: int) -> np.ndarray:
    """The modes 1..``modes`` grouped by the mode they alias onto on n pixels.

    Sampled at the n points ``t_m = m / (n - 1)``, ``sin(pi i t)`` has period
    ``2 (n - 1)`` in i, ``i -> 2 (n - 1) - i`` only flips its sign, and the
    multiples of ``n - 1`` vanish: every mode equals ``+-sin(pi a t)`` for one
    ``a`` in 1..n - 2, or 0. Row ``a - 1`` lists the modes that alias onto
    ``a`` (zero-padded): shape (n - 2, most modes in one class).
    """
    period = 2 * (n - 1)
    groups: list[list[int]] = [[] for _ in range(max(n - 2, 0))]
    for i in range(1, modes + 1):
        a = i % period
        a = period - a if a > n - 1 else a
        if 0 < a < n - 1:
            groups[a - 1].append(i)
    out = np.zeros((len(groups), max((len(g) for g in groups), default=0)), np.int64)
    for a, g in enumerate(groups):
        out[a, : len(g)] = g
    return out


@functools.lru_cache(maxsize=64)
def _mode_radii(h: int, w: int, modes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(r2, inv)`` of shape (h - 2, w - 2, My, Mx): ``j^2 + i^2`` and ``1 / (j^2 + i^2)``
    for the y-modes j and x-modes i that alias onto each distinct mode (``inv`` 0 for padding)."""
    j = _alias_classes(h, modes)[:, None, :, None]
    i = _alias_classes(w, modes)[None, :, None, :]
    r2 = (j**2 + i**2).astype(np.float64)
    inv = np.where((j > 0) & (i > 0), 1.0 / np.maximum(r2, 1.0), 0.0)
    return r2.astype(np.float32), inv.astype(np.float32)


def _field_basis(
    h: int, w: int, cut: jax.Array, modes: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(std, s_y, s_x)``: the field ``s_y @ (std * N(0, 1)) @ s_x.T`` on the h x w grid has
    the distribution of ``sum_ij c_ij sin(pi i x) sin(pi j y)`` over i, j <= ``modes``,
    ``c_ij ~ N(0, 1) / sqrt(i^2 + j^2)`` where ``sqrt(i^2 + j^2) < cut + 0.5``, else 0.

    On the pixel grid the modes above ``n - 2`` alias onto lower ones
    (``_alias_classes``): each of the (h - 2) x (w - 2) distinct modes gets one
    coefficient whose variance sums those of the modes it collects. Exact in
    distribution, with far fewer random draws. For an integer cut c,
    ``r < c + 0.5`` is ``r^2 <= c (c + 1)``.
    """
    r2, inv = _mode_radii(h, w, modes)
    c = jnp.floor(cut)
    std = jnp.sqrt(jnp.sum(jnp.where(r2 <= c * (c + 1), inv, 0.0), axis=(-2, -1)))

    def sines(n: int) -> jax.Array:
        a = jnp.arange(1, max(n - 2, 0) + 1, dtype=jnp.float32)
        return jnp.sin(jnp.pi * jnp.linspace(0.0, 1.0, n)[:, None] * a[None, :])

    return std, sines(h), sines(w)


def diffeomorphism(
    key: jax.Array,
    x: jax.Array,
    *,
    temperature: float | jax.Array | None = None,
    cut: int | jax.Array | None = None,
    min_cut: int = 2,
    max_cut: int = 100,
    alpha: float = 1.0,
) -> jax.Array:
    """PRIME's spatial primitive: a smooth random diffeomorphism.

    Two displacement fields ``u, v = sum_ij c_ij sin(pi i x) sin(pi j y)``
    (``c_ij ~ N(0, 1) / sqrt(i^2 + j^2)``, modes with ``sqrt(i^2 + j^2) < cut +
    0.5``), scaled to pixels by ``sqrt(T) W`` and ``sqrt(T) H``; the image is
    resampled bilinearly at ``(row - dv, col - du)``, positions clamped to the
    border. One field per image; the modes the pixel grid cannot resolve alias
    onto lower ones, and their coefficients are drawn already summed (the same
    distribution, docs/prime.md). Unless given, ``cut`` and ``T`` are drawn as the
    reference does: ``top ~ U{min_cut + 1..max_cut}``, ``cut`` a Beta(1/2, 1/2)
    point of ``[min_cut, top]`` rounded down, ``T`` a Beta(1/2, 1/2) point of
    ``[T1, max(T1, alpha T2)]`` (``diffeomorphism_temperatures`` with
    ``n = max(H, W)``).

    Args:
      key: PRNG key (cut, temperature and the two fields).
      x: one image (H, W, C) in [0, 1].
      temperature: ``T`` (traced); 0 is the identity. ``None``: drawn.
      cut: the high-frequency cut-off, an integer (traced, at most ``max_cut``);
        ``None``: drawn.
      min_cut, max_cut: bounds of the drawn cut (static; ``max_cut`` also sets
        how many modes are summed).
      alpha: scales the upper temperature ``T2``.

    Returns:
      The deformed image, same shape, in [0, 1].

    References:
      Petrini, Favero, Geiger, Wyart, "Relative stability toward diffeomorphisms
      indicates performance in deep nets", NeurIPS 2021.
      https://arxiv.org/abs/2105.02468 ; Modas et al., "PRIME", ECCV 2022,
      section 3 (spatial domain). https://arxiv.org/abs/2112.13547 ; docs/prime.md
    """
    x = check_image(x, "diffeomorphism")
    lo = _checks.check_positive_int(min_cut, "min_cut", "diffeomorphism", minimum=2)
    hi = _checks.check_positive_int(max_cut, "max_cut", "diffeomorphism", minimum=lo + 1)
    if isinstance(cut, int | float) and not 1 <= cut <= hi:
        raise ValueError(f"diffeomorphism: cut must be in [1, max_cut={hi}]; got {cut}.")
    h, w = x.shape[0], x.shape[1]
    modes = max(h - 2, 0) * max(w - 2, 0)
    u = jax.random.uniform(key, (3 + 4 * modes,))
    cut = _draw_cut(u[:2], lo, hi) if cut is None else jnp.asarray(cut, jnp.float32)
    if temperature is None:
        t1, t2 = diffeomorphism_temperatures(max(h, w), cut)
        t2 = jnp.maximum(t1, alpha * t2)
        temperature = t1 + _arcsine(u[2]) * (t2 - t1)
    amplitude = jnp.sqrt(jnp.asarray(temperature, jnp.float32))
    std, s_y, s_x = _field_basis(h, w, cut, hi)
    c_u, c_v = std * box_muller(u[3:], (2, *std.shape))
    du = amplitude * w * (s_y @ c_u @ s_x.T)
    dv = amplitude * h * (s_y @ c_v @ s_x.T)
    rows = jnp.arange(h, dtype=jnp.float32)[:, None] - dv
    cols = jnp.arange(w, dtype=jnp.float32)[None, :] - du
    return remap(x, rows, cols, mode="nearest").astype(x.dtype)


def _sine_series(beta: jax.Array, x: jax.Array) -> jax.Array:
    """``sum_k beta[c, k-1] sin(k pi x[..., c])`` for k = 1..K, by Clenshaw's recurrence.

    ``sin((k + 1) t) = 2 cos(t) sin(k t) - sin((k - 1) t)``: K multiply-adds per
    pixel instead of K sines.
    """
    theta = jnp.pi * x
    two_cos = 2.0 * jnp.cos(theta)

    def step(carry, coeff):
        b1, b2 = carry
        return (coeff + two_cos * b1 - b2, b1), None

    zero = jnp.zeros_like(x)
    (b1, _), _ = jax.lax.scan(step, (zero, zero), beta.T[::-1], unroll=min(beta.shape[-1], 4))
    return b1 * jnp.sin(theta)


def smooth_color(
    key: jax.Array,
    x: jax.Array,
    *,
    temperature: float | jax.Array | None = None,
    cut: int | jax.Array | None = None,
    max_cut: int = 100,
    max_temperature: float = 0.01,
) -> jax.Array:
    """PRIME's colour primitive: a random smooth map of each channel's intensities.

    ``x'_c = clip(x_c + sqrt(T) sum_{k=1}^{cut} beta_ck sin(k pi x_c), 0, 1)``
    with ``beta_ck ~ N(0, 1)`` per image and channel. Unless given,
    ``cut ~ U{1..max_cut}`` and ``T ~ U(0, max_temperature)`` (the reference's
    stochastic mode; CIFAR: 100 and 0.01, ImageNet: 500 and 0.05).

    Args:
      key: PRNG key (cut, temperature and the coefficients).
      x: one image (H, W, C) in [0, 1].
      temperature: ``T`` (traced); 0 is the identity. ``None``: drawn.
      cut: number of sine terms (traced, at most ``max_cut``); ``None``: drawn.
      max_cut: the most terms (static).
      max_temperature: upper bound of the drawn temperature.

    Returns:
      The recoloured image, same shape, in [0, 1].

    References:
      Modas et al., "PRIME", ECCV 2022, section 3 (color domain).
      https://arxiv.org/abs/2112.13547 ; docs/prime.md
    """
    x = check_image(x, "smooth_color")
    k_max = _checks.check_positive_int(max_cut, "max_cut", "smooth_color")
    if isinstance(cut, int | float) and not 1 <= cut <= k_max:
        raise ValueError(f"smooth_color: cut must be in [1, max_cut={k_max}]; got {cut}.")
    channels = x.shape[-1]
    u = jax.random.uniform(key, (2 + 2 * channels * k_max,))
    if cut is None:
        cut = _integer(u[0], 1, k_max + 1)
    if temperature is None:
        temperature = max_temperature * u[1]
    keep = jnp.arange(1, k_max + 1) <= cut
    beta = (box_muller(u[2:], (channels, k_max)) * keep).astype(x.dtype)
    shift = jnp.sqrt(jnp.asarray(temperature, x.dtype)) * _sine_series(beta, x)
    return jnp.clip(x + shift, 0.0, 1.0)


PRIMITIVES: dict[str, Callable[..., jax.Array]] = {
    "spectral": spectral_filter,
    "spatial": diffeomorphism,
    "color": smooth_color,
}


@dataclasses.dataclass(frozen=True)
class PrimeOptions:
    """The options of ``prime``: the mixture and each primitive's (docs/prime.md).

    Attributes:
      width: number of chains mixed (3).
      max_depth: each chain applies ``U{1..max_depth}`` primitives (3).
      primitives: the primitives a step chooses from, uniformly: names of
        ``PRIMITIVES`` (all three).
      kernel_size, max_sigma, centred: the spectral filter (3, 4.0, True).
      min_cut, max_cut, alpha: the diffeomorphism's cut-off range and
        temperature factor (2, 100, 1.0, the reference's CIFAR values).
      color_cut, max_temperature: the colour map's most sine terms and
        temperature (100, 0.01: CIFAR; ImageNet uses 500, 0.05).
    """

    width: int = 3
    max_depth: int = 3
    primitives: tuple[str, ...] = ("spectral", "spatial", "color")
    kernel_size: int = 3
    max_sigma: float = 4.0
    centred: bool = True
    min_cut: int = 2
    max_cut: int = 100
    alpha: float = 1.0
    color_cut: int = 100
    max_temperature: float = 0.01

    def __post_init__(self):
        for name in ("width", "max_depth", "kernel_size", "color_cut"):
            _checks.check_positive_int(getattr(self, name), name, "prime")
        _checks.check_positive_int(self.min_cut, "min_cut", "prime", minimum=2)
        _checks.check_positive_int(self.max_cut, "max_cut", "prime", minimum=self.min_cut + 1)
        for name in ("max_sigma", "alpha", "max_temperature"):
            _checks.check_nonnegative_float(getattr(self, name), name, "prime")
        if isinstance(self.primitives, str):
            object.__setattr__(self, "primitives", (self.primitives,))
        object.__setattr__(self, "primitives", tuple(self.primitives))
        bad = [p for p in self.primitives if p not in PRIMITIVES]
        if bad or not self.primitives:
            raise ValueError(
                f"prime: primitives must be a non-empty list of {', '.join(PRIMITIVES)}; "
                f"got {list(self.primitives)}."
            )
        if not self.centred and self.kernel_size < 2:
            raise ValueError("prime: the off-centre delta (centred=False) needs kernel_size >= 2.")

    def branches(self) -> list[Callable[[jax.Array, jax.Array], jax.Array]]:
        """``fn(key, x)`` of each of ``primitives``, with these options."""
        options = {
            "spectral": dict(
                kernel_size=self.kernel_size, max_sigma=self.max_sigma, centred=self.centred
            ),
            "spatial": dict(min_cut=self.min_cut, max_cut=self.max_cut, alpha=self.alpha),
            "color": dict(max_cut=self.color_cut, max_temperature=self.max_temperature),
        }
        return [lambda k, x, f=PRIMITIVES[p], o=options[p]: f(k, x, **o) for p in self.primitives]


def _chain(key: jax.Array, x: jax.Array, branches: list[Callable], max_depth: int) -> jax.Array:
    """One chain: ``U{1..max_depth}`` steps, each a primitive chosen uniformly.

    A loop with one ``switch``: for one image only the chosen primitive runs and
    steps past the depth are skipped; under ``vmap`` both become selects.
    """
    k_steps, u = _split_uniforms(key, max_depth, 1 + max_depth)
    depth = _integer(u[0], 1, max_depth + 1)
    choices = _integer(u[1:], 0, len(branches)).astype(jnp.int32)

    def step(i, img):
        apply = lambda: jax.lax.switch(choices[i], branches, k_steps[i], img)
        return jax.lax.cond(i < depth, apply, lambda: img)

    return jax.lax.fori_loop(0, max_depth, step, x)


def prime(
    key: jax.Array, x: jax.Array, *, m: float | jax.Array | None = None, **options: Any
) -> jax.Array:
    """PRIME augmentation of one image: primitives chained, then mixed with the image.

    ``width`` chains each apply ``U{1..max_depth}`` primitives, every step one
    of ``primitives`` chosen uniformly with its own random draws; with weights
    ``w ~ Dirichlet(1, ..., 1)`` and ``m ~ Beta(1, 1)``,
    ``x' = (1 - m) x + m sum_i w_i chain_i(x)`` (clipped to [0, 1] against
    rounding). Every draw comes from ``key``, per image.

    Args:
      key: PRNG key.
      x: one image (H, W, C) in [0, 1], any size and number of channels.
      m: the mixing weight (traced); 0 returns ``x``. ``None``: drawn from Beta(1, 1).
      **options: the fields of ``PrimeOptions`` (static): ``width``,
        ``max_depth``, ``primitives``, ``kernel_size``, ``max_sigma``,
        ``centred``, ``min_cut``, ``max_cut``, ``alpha``, ``color_cut``,
        ``max_temperature``.

    Returns:
      The augmented image, same shape, in [0, 1].

    References:
      Modas, Rade, Ortiz-Jimenez, Moosavi-Dezfooli, Frossard, "PRIME: A few
      primitives can boost robustness to common corruptions", ECCV 2022,
      section 4. https://arxiv.org/abs/2112.13547 ; docs/prime.md
    """
    fields = {f.name for f in dataclasses.fields(PrimeOptions)}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(f"prime: unknown option(s) {sorted(unknown)}; valid: {sorted(fields)}.")
    opts = PrimeOptions(**options)
    return _mix(key, check_image(x, "prime"), opts, m)


def _mix(key: jax.Array, x: jax.Array, opts: PrimeOptions, m: Any) -> jax.Array:
    k_chains, u = _split_uniforms(key, opts.width, opts.width + 1)
    u = u.astype(x.dtype)
    branches = opts.branches()
    # Dirichlet(1, ..., 1): normalised Exp(1) draws; Beta(1, 1): a uniform.
    e = -jnp.log1p(-u[: opts.width])
    w = e / jnp.maximum(jnp.sum(e), 1e-30)
    m = jnp.asarray(u[opts.width] if m is None else m, x.dtype)

    def add_chain(i, total):
        chain = _chain(k_chains[i], x, branches, opts.max_depth)
        return total + w[i] * chain

    mix = jax.lax.fori_loop(0, opts.width, add_chain, jnp.zeros_like(x))
    return jnp.clip((1 - m) * x + m * mix, 0.0, 1.0)


def jsd_consistency(
    logits_clean: jax.Array, logits_aug1: jax.Array, logits_aug2: jax.Array
) -> jax.Array:
    """The Jensen-Shannon consistency of three predictions, averaged over a batch.

    ``(KL(p_c || M) + KL(p_1 || M) + KL(p_2 || M)) / 3`` with ``p`` the softmax
    of each batch of logits (B, L) and ``M = clip((p_c + p_1 + p_2) / 3, 1e-7,
    1)`` (clipped as in AugMix's and PRIME's code, against exploding KL terms).

    References:
      Hendrycks, Mu, Cubuk, Zoph, Gilmer, Lakshminarayanan, "AugMix", ICLR 2020.
      https://arxiv.org/abs/1912.02781 ; docs/prime.md
    """
    probs = [jax.nn.softmax(z, axis=-1) for z in (logits_clean, logits_aug1, logits_aug2)]
    log_mix = jnp.log(jnp.clip((probs[0] + probs[1] + probs[2]) / 3.0, 1e-7, 1.0))
    kl = [jnp.sum(jax.scipy.special.xlogy(p, p) - p * log_mix, axis=-1) for p in probs]
    return jnp.mean(kl[0] + kl[1] + kl[2]) / 3.0


@dataclasses.dataclass(frozen=True)
class PRIME(PrimeOptions):
    """Train on PRIME-augmented images (Modas et al. 2022), optionally with JSD consistency.

    Every training image gets its own ``prime`` draw (the fields of
    ``PrimeOptions`` configure it). With ``jsd``, the batch becomes
    ``[x, prime(x), prime(x)]`` (two independent draws), and ``loss`` is the
    cross-entropy of the clean images plus ``jsd_weight`` times
    ``jsd_consistency`` of the three predictions; without it, the model is
    trained on one augmented copy. The model is probed on plain images.
    """

    jsd: bool = False
    jsd_weight: float = 12.0
    name = "prime"

    def __post_init__(self):
        super().__post_init__()
        _checks.check_nonnegative_float(self.jsd_weight, "jsd_weight", "prime")

    def inputs(self, x: jax.Array) -> jax.Array:
        return x

    def augment(self, key: jax.Array, x: jax.Array) -> jax.Array:
        """One PRIME draw per image of a batch (N, H, W, C): ``prime`` with the keys
        ``split(key, N)``.

        ``jax.lax.map`` rather than ``vmap``: image by image, only the primitive
        each step chose runs (under ``vmap`` every primitive would run for every
        image and step, and be selected afterwards). Under an outer ``vmap`` (the
        members of an ensemble) the batches are flattened into one ``lax.map``.
        """
        return _prime_batch(self)(jax.random.split(key, x.shape[0]), x)

    def __call__(self, key, x, y, logits_fn):
        if not self.jsd:
            return self.augment(key, x), y
        k1, k2 = jax.random.split(key)
        return jnp.concatenate([x, self.augment(k1, x), self.augment(k2, x)]), y

    def loss(self, logits: jax.Array, y: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Cross-entropy of the first ``len(y)`` rows (+ JSD consistency with ``jsd``)."""
        n = y.shape[0]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:n], y).mean()
        metrics = {"train_accuracy": jnp.mean(jnp.argmax(logits[:n], -1) == y)}
        if not self.jsd:
            return ce, metrics
        consistency = jsd_consistency(logits[:n], logits[n : 2 * n], logits[2 * n :])
        return ce + self.jsd_weight * consistency, {**metrics, "consistency": consistency}

    def describe(self) -> dict[str, Any]:
        spec = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {"name": self.name, **spec, "primitives": list(self.primitives)}


@functools.lru_cache(maxsize=16)
def _prime_batch(opts: PrimeOptions) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``fn(keys, x)``: ``prime`` of every image of ``x`` (N, H, W, C) with its key, by
    ``lax.map``; vmapped, it maps over all images of all batches at once instead of
    batching the map (which would turn every ``switch`` into a select of all branches)."""

    @jax.custom_batching.custom_vmap
    def run(keys: jax.Array, x: jax.Array) -> jax.Array:
        return jax.lax.map(lambda a: _mix(a[0], a[1], opts, None), (keys, x))

    @run.def_vmap
    def _flattened(axis_size, in_batched, keys, x):
        keys, x = (
            a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, batched in zip((keys, x), in_batched, strict=True)
        )
        flat = run(keys.reshape(-1, *keys.shape[2:]), x.reshape(-1, *x.shape[2:]))
        return flat.reshape(x.shape), True

    return run


TRANSFORMS: dict[str, type] = {"flip": Flip, "low_pass": LowPass, "pgd": PGD, "prime": PRIME}


def get(spec: str | dict[str, Any] | None) -> Any:
    """A transform from a name or a ``{"name": ..., **options}`` table (``None``: none).

    Names: ``flip``, ``low_pass`` (``bandwidth``), ``pgd`` (``eps``, ``steps``,
    ``step_size``, ``bounds``, ``random_start``), ``prime`` (``jsd``,
    ``jsd_weight`` and the fields of ``PrimeOptions``).
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
