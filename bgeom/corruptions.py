"""Common corruptions (Hendrycks & Dietterich) as pure JAX functions of one image.

``apply(key, x, name, severity)`` corrupts ONE image (H, W, C) with values in
[0, 1] by the corruption ``name`` (one of ``NAMES``) at ``severity`` 1-5; every
random draw comes from ``key``. It composes with ``jax.jit`` and ``jax.vmap``
(``name`` is static; ``severity`` may be traced, so one compiled function
serves all five). The definitions follow the benchmark code of Hendrycks &
Dietterich (``make_cifar_c.py``, the generator of CIFAR-10-C), minus the
weather corruptions (fog, frost, snow, spatter) and glass blur:

- noise: ``gaussian_noise``, ``shot_noise``, ``impulse_noise``, ``speckle_noise``;
- blur: ``defocus_blur``, ``gaussian_blur``, ``motion_blur``, ``zoom_blur``;
- digital: ``contrast``, ``brightness``, ``saturate`` (colour images only),
  ``pixelate``, ``elastic_transform``, ``jpeg_compression``.

``parameters(name, shape)`` gives the five severity parameters used for an
image shape: the CIFAR-10-C values for images of side 16 or more, and values
chosen for small images (the 8x8 digits) below that, where the CIFAR pixel
sizes would make several severities identical or erase the digit. Every
parameter, every deviation from the benchmark code (and why) is listed in
docs/prime.md.

References:
  Hendrycks, Dietterich. "Benchmarking neural network robustness to common
  corruptions and perturbations", ICLR 2019. https://arxiv.org/abs/1903.12261
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bgeom.augment import box_muller, check_image, correlate, remap

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
BLUR = ("defocus_blur", "gaussian_blur", "motion_blur", "zoom_blur")
DIGITAL = (
    "contrast",
    "brightness",
    "saturate",
    "pixelate",
    "elastic_transform",
    "jpeg_compression",
)
NAMES = NOISE + BLUR + DIGITAL
FAMILIES = {"noise": NOISE, "blur": BLUR, "digital": DIGITAL}
COLOUR_ONLY = ("saturate",)
SEVERITIES = (1, 2, 3, 4, 5)
#: Images with a side below this use the small-image parameters.
SMALL_SIDE = 16

# The severity parameters of the benchmark code for CIFAR-10 (32 x 32).
CIFAR: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std
    "shot_noise": (500, 250, 100, 75, 50),  # photons at intensity 1
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of salt-and-pepper values
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),  # multiplicative noise std
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk, alias
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma (pixels)
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma (pixels)
    "zoom_blur": (1.05, 1.10, 1.15, 1.20, 1.25),  # largest zoom (steps of 0.01 from 1)
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor on the deviation from the mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV saturation a S + b
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # relative size of the coarse image
    # (alpha, sigma, affine jitter) as fractions of the image side
    "elastic_transform": (
        (0.0, 0.0, 0.08),
        (0.05, 0.2, 0.07),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.05),
        (0.1, 0.03, 0.03),
    ),
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}

# Small images (side below SMALL_SIDE, e.g. the 8 x 8 digits): the entries that
# differ from CIFAR. Pixel-sized blurs are scaled down (a 9-pixel motion blur
# spans an 8-pixel image), pixelation sizes are spread so that every severity
# gives another coarse size, and the elastic field is smoothed over more of the
# image (at sigma below one pixel the CIFAR fractions give white noise).
SMALL: dict[str, tuple[Any, ...]] = {
    "motion_blur": ((2, 0.5), (2, 0.75), (3, 1.0), (3, 1.25), (4, 1.5)),
    "pixelate": (0.9, 0.8, 0.55, 0.45, 0.3),
    "elastic_transform": (
        (0.0, 0.0, 0.06),
        (0.05, 0.2, 0.07),
        (0.08, 0.2, 0.08),
        (0.1, 0.2, 0.09),
        (0.12, 0.2, 0.1),
    ),
}


def parameters(name: str, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """The five severity parameters of corruption ``name`` for images of ``shape`` (H, W, C)."""
    _check_name(name)
    small = min(shape[0], shape[1]) < SMALL_SIDE
    return SMALL.get(name, CIFAR[name]) if small else CIFAR[name]


def names_for(channels: int) -> tuple[str, ...]:
    """The corruptions defined for images with ``channels`` channels (saturate needs 3)."""
    return tuple(n for n in NAMES if channels == 3 or n not in COLOUR_ONLY)


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"Unknown corruption {name!r}; choose one of {', '.join(NAMES)}.")


def _row(name: str, shape: tuple[int, ...], index: jax.Array) -> jax.Array:
    """The parameters of severity ``index + 1`` (a traced row of the table)."""
    table = np.asarray(parameters(name, shape), np.float32)
    return jnp.asarray(table)[index]


# ------------------------------------------------------------------ noise


# Every corruption is ``fn(u, key, x, index)``: ``u`` its share of one draw of uniforms
# in [0, 1) (``_uniforms`` of them), ``key`` for the Poisson draw of shot noise, ``index``
# the severity - 1.


def _gaussian_noise(u, key, x, index):
    c = _row("gaussian_noise", x.shape, index)
    return jnp.clip(x + c * box_muller(u, x.shape).astype(x.dtype), 0.0, 1.0)


def _shot_noise(u, key, x, index):
    c = _row("shot_noise", x.shape, index)
    counts = jax.random.poisson(key, x * c, x.shape)
    return jnp.clip(counts.astype(x.dtype) / c, 0.0, 1.0)


def _impulse_noise(u, key, x, index):
    amount = _row("impulse_noise", x.shape, index)
    u = u.reshape(2, *x.shape)
    hit, salt = u[0] <= amount, u[1] <= 0.5
    return jnp.where(hit, salt.astype(x.dtype), x)


def _speckle_noise(u, key, x, index):
    c = _row("speckle_noise", x.shape, index)
    return jnp.clip(x + x * c * box_muller(u, x.shape).astype(x.dtype), 0.0, 1.0)


# ------------------------------------------------------------------ blur


def _fold_index(j: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Integer positions folded into [0, n) by ``nearest`` or ``reflect`` (half-sample)."""
    if mode == "nearest":
        return np.clip(j, 0, n - 1)
    j = np.mod(j, 2 * n)
    return np.where(j < n, j, 2 * n - 1 - j)


@functools.lru_cache(maxsize=128)
def _gaussian_matrix(n: int, sigma: float, truncate: float, mode: str) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter1d`` on n samples as an (n, n) matrix (float64)."""
    out = np.zeros((n, n))
    if sigma <= 1e-15:  # scipy skips the axis
        return np.eye(n)
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    for i in range(n):
        np.add.at(out[i], _fold_index(i + offsets, n, mode), weights)
    return out


def _stacked_gaussians(n: int, sigmas: tuple[float, ...], truncate: float, mode: str) -> jax.Array:
    return jnp.asarray(
        np.stack([_gaussian_matrix(n, float(s), truncate, mode) for s in sigmas]), jnp.float32
    )


def _separable(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """``rows @ x @ cols.T`` in every channel."""
    return jnp.einsum("ih,hwc,jw->ijc", rows, x, cols)


def _gaussian_blur(u, key, x, index):
    sigmas = tuple(parameters("gaussian_blur", x.shape))
    h, w = x.shape[0], x.shape[1]
    rows = _stacked_gaussians(h, sigmas, 4.0, "nearest")[index]
    cols = _stacked_gaussians(w, sigmas, 4.0, "nearest")[index]
    return jnp.clip(_separable(x, rows, cols), 0.0, 1.0)


@functools.lru_cache(maxsize=16)
def _defocus_kernels(params: tuple[tuple[float, float], ...]) -> np.ndarray:
    """The benchmark's disk kernels (aliased disk, then a 3x3 Gaussian of sigma
    ``alias_blur``), cropped to their support and zero-padded to one size."""
    from scipy.signal import convolve2d

    kernels = []
    for radius, alias_blur in params:
        span = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
        xx, yy = np.meshgrid(span, span)
        disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
        disk /= disk.sum()
        g = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias_blur**2))
        g /= g.sum()  # OpenCV's 3-tap Gaussian kernel; the disk's border is zero
        kernels.append(convolve2d(disk, np.outer(g, g), mode="same"))
    support = max(int(np.max(np.abs(np.argwhere(k > 0) - 8))) for k in kernels)
    return np.stack([k[8 - support : 9 + support, 8 - support : 9 + support] for k in kernels])


def _defocus_blur(u, key, x, index):
    kernel = jnp.asarray(_defocus_kernels(tuple(parameters("defocus_blur", x.shape))))[index]
    return jnp.clip(correlate(x, kernel.astype(x.dtype), pad="reflect"), 0.0, 1.0)


def _motion_blur(u, key, x, index):
    """ImageMagick's motion blur: a one-sided line of ``2 ceil(radius) + 1`` taps with
    Gaussian weights ``exp(-i^2 / 2 sigma^2)``, at whole-pixel offsets along a random
    angle in [-45, 45] degrees, the border repeated."""
    params = np.asarray(parameters("motion_blur", x.shape), np.float32)
    widths = 2 * np.ceil(params[:, 0]) + 1
    taps = int(widths.max())
    width = jnp.asarray(widths)[index]
    sigma = jnp.asarray(params[:, 1])[index]
    i = jnp.arange(taps, dtype=jnp.float32)
    weights = jnp.where(i < width, jnp.exp(-(i**2) / (2 * sigma**2)), 0.0)
    weights = weights / jnp.sum(weights)
    angle = jnp.deg2rad(90.0 * u[0] - 45.0)
    d_col = jnp.ceil(i * jnp.cos(angle) - 0.5)
    d_row = jnp.ceil(i * jnp.sin(angle) - 0.5)
    h, w = x.shape[0], x.shape[1]
    rows = jnp.arange(h, dtype=jnp.float32)[:, None]
    cols = jnp.arange(w, dtype=jnp.float32)[None, :]
    shifted = jax.vmap(lambda dr, dc: remap(x, rows + dr, cols + dc, mode="nearest"))(d_row, d_col)
    return jnp.clip(jnp.tensordot(weights.astype(x.dtype), shifted, axes=1), 0.0, 1.0)


def _zoom_blur(u, key, x, index):
    """The mean of the image and its zooms by 1, 1.01, ..., the severity's largest
    factor, each a bilinear resampling about the image centre."""
    tops = parameters("zoom_blur", x.shape)
    # np.arange(1, top + 0.01, 0.01): the benchmark's lists of factors
    lists = [np.arange(1, top + 0.01, 0.01) for top in tops]
    longest = max(len(f) for f in lists)
    factors = np.ones((len(lists), longest), np.float32)
    used = np.zeros((len(lists), longest), np.float32)
    for s, f in enumerate(lists):
        factors[s, : len(f)] = f
        used[s, : len(f)] = 1.0
    z = jnp.asarray(factors)[index]
    mask = jnp.asarray(used)[index]
    h, w = x.shape[0], x.shape[1]
    r = jnp.arange(h, dtype=jnp.float32)[:, None] - (h - 1) / 2
    c = jnp.arange(w, dtype=jnp.float32)[None, :] - (w - 1) / 2

    def zoom(f):
        return remap(x, r / f + (h - 1) / 2, c / f + (w - 1) / 2, mode="nearest")

    total = x + jnp.tensordot(mask.astype(x.dtype), jax.vmap(zoom)(z), axes=1)
    return jnp.clip(total / (1.0 + jnp.sum(mask)), 0.0, 1.0)


# ------------------------------------------------------------------ digital


def _contrast(u, key, x, index):
    c = _row("contrast", x.shape, index)
    mean = jnp.mean(x, axis=(0, 1), keepdims=True)
    return jnp.clip((x - mean) * c + mean, 0.0, 1.0)


def _brightness(u, key, x, index):
    """HSV value + c: at fixed hue and saturation every channel scales with the value
    ``V = max_c x_c``, so ``x' = x V' / V`` (grey ``V'`` where ``V = 0``)."""
    c = _row("brightness", x.shape, index)
    value = jnp.max(x, axis=-1, keepdims=True)
    new = jnp.clip(value + c, 0.0, 1.0)
    safe = jnp.where(value > 0, value, 1.0)
    return jnp.clip(jnp.where(value > 0, x * (new / safe), new), 0.0, 1.0)


def _saturate(u, key, x, index):
    """HSV saturation ``S' = clip(a S + b, 0, 1)``: at fixed hue and value
    ``V - x_c`` scales with S, so ``x' = V - (V - x) S' / S``. A grey pixel (S = 0)
    has hue 0 (red) in skimage's conversion, as in the benchmark."""
    a, b = _row("saturate", x.shape, index)
    value = jnp.max(x, axis=-1, keepdims=True)
    low = jnp.min(x, axis=-1, keepdims=True)
    sat = jnp.where(value > 0, (value - low) / jnp.where(value > 0, value, 1.0), 0.0)
    new = jnp.clip(sat * a + b, 0.0, 1.0)
    coloured = value - (value - x) * new / jnp.where(sat > 0, sat, 1.0)
    red = jnp.concatenate([value, value * (1 - new), value * (1 - new)], axis=-1)
    return jnp.clip(jnp.where(sat > 0, coloured, red), 0.0, 1.0)


@functools.lru_cache(maxsize=128)
def _pil_box(n_in: int, n_out: int) -> np.ndarray:
    """Pillow's BOX resampling of n_in samples to n_out as an (n_out, n_in) matrix."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        for j in range(lo, hi):
            t = (j - center + 0.5) / filterscale
            out[i, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
        total = out[i].sum()
        if total:
            out[i] /= total
    return out


@functools.lru_cache(maxsize=64)
def _pixelate_matrices(n: int, factors: tuple[float, ...]) -> np.ndarray:
    """(5, n, n): box-resize to ``int(n * factor)`` samples and back, per severity."""
    return np.stack(
        [_pil_box(max(int(n * f), 1), n) @ _pil_box(n, max(int(n * f), 1)) for f in factors]
    )


def _pixelate(u, key, x, index):
    factors = tuple(float(f) for f in parameters("pixelate", x.shape))
    rows = jnp.asarray(_pixelate_matrices(x.shape[0], factors), x.dtype)[index]
    cols = jnp.asarray(_pixelate_matrices(x.shape[1], factors), x.dtype)[index]
    return jnp.clip(_separable(x, rows, cols), 0.0, 1.0)


def _elastic_transform(u, key, x, index):
    """A random affine map (three points jittered by up to ``affine`` x side), then a
    displacement field of uniform noise smoothed by a Gaussian (``sigma`` x side,
    truncated at 3 sigma) and scaled by ``alpha`` x side; bilinear resampling with
    mirrored borders (OpenCV's reflect-101 for the affine map, scipy's reflect for
    the field), as in the benchmark code."""
    params = parameters("elastic_transform", x.shape)
    h, w = x.shape[0], x.shape[1]
    side = float(min(h, w))
    table = jnp.asarray(np.asarray(params, np.float32) * side)
    alpha, _, jitter = table[index]
    u = 2.0 * u - 1.0
    # The affine part: cv2.getAffineTransform(pts1, pts2) and warpAffine, points as
    # (x, y). warpAffine samples the source at the inverse map, the affine map taking
    # pts2 to pts1: through barycentric coordinates in the triangle pts2.
    c0, c1 = float(h // 2), float(w // 2)  # (float32(shape) // 2), used as (x, y)
    s = float(min(h, w) // 3)
    pts1 = jnp.asarray([[c0 + s, c1 + s], [c0 + s, c1 - s], [c0 - s, c1 - s]], jnp.float32)
    pts2 = pts1 + u[:6].reshape(3, 2) * jitter
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    (x1, y1), (x2, y2), (x3, y3) = pts2
    det = (y2 - y3) * (x1 - x3) + (x3 - x2) * (y1 - y3)
    l1 = ((y2 - y3) * (cols - x3) + (x3 - x2) * (rows - y3)) / det
    l2 = ((y3 - y1) * (cols - x3) + (x1 - x3) * (rows - y3)) / det
    src = jnp.einsum("hwk,kj->hwj", jnp.stack([l1, l2, 1.0 - l1 - l2], -1), pts1)
    warped = remap(x, src[..., 1], src[..., 0], mode="mirror")
    # The smooth displacement field.
    sigmas = tuple(float(p[1]) * side for p in params)
    g_rows = _stacked_gaussians(h, sigmas, 3.0, "reflect")[index]
    g_cols = _stacked_gaussians(w, sigmas, 3.0, "reflect")[index]

    def field(noise):
        return alpha * _separable(noise.reshape(h, w, 1), g_rows, g_cols)[..., 0]

    dx, dy = field(u[6 : 6 + h * w]), field(u[6 + h * w :])
    out = remap(warped, rows + dy, cols + dx, mode="reflect")
    return jnp.clip(out, 0.0, 1.0).astype(x.dtype)


# Annex K of the JPEG standard: the luminance and chrominance quantisation tables.
_LUMA = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    np.float32,
)
_CHROMA = np.full((8, 8), 99.0, np.float32)
_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def _quant_table(base: np.ndarray, quality: jax.Array) -> jax.Array:
    """libjpeg's quality scaling: 5000 / q below 50, 200 - 2 q above; entries in [1, 255]."""
    scale = jnp.where(quality < 50, 5000.0 / quality, 200.0 - 2.0 * quality)
    return jnp.clip(jnp.floor((base * scale + 50.0) / 100.0), 1.0, 255.0)


def _jpeg_compression(u, key, x, index):
    """Baseline JPEG of an 8-bit image: YCbCr (colour), 8x8 blocks (edges repeated to
    whole blocks), orthonormal DCT, quantisation by the quality-scaled Annex K tables,
    and back, rounded to 8 bits. Chroma is not subsampled."""
    from jax.scipy.fft import dctn, idctn

    quality = _row("jpeg_compression", x.shape, index)
    h, w, channels = x.shape
    img = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0)
    if channels == 3:
        to_ycc = jnp.asarray(
            [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
        )
        img = img @ to_ycc.T + jnp.asarray([0.0, 128.0, 128.0])
        tables = jnp.stack([_quant_table(_LUMA, quality)] + [_quant_table(_CHROMA, quality)] * 2)
    else:
        tables = jnp.stack([_quant_table(_LUMA, quality)] * channels)
    ph, pw = -h % 8, -w % 8
    img = jnp.pad(img - 128.0, ((0, ph), (0, pw), (0, 0)), mode="edge")
    bh, bw = img.shape[0] // 8, img.shape[1] // 8
    blocks = img.reshape(bh, 8, bw, 8, channels).transpose(0, 2, 4, 1, 3)  # (bh, bw, C, 8, 8)
    coeffs = dctn(blocks, type=2, axes=(-2, -1), norm="ortho")
    coeffs = jnp.round(coeffs / tables) * tables
    blocks = idctn(coeffs, type=2, axes=(-2, -1), norm="ortho")
    img = blocks.transpose(0, 3, 1, 4, 2).reshape(bh * 8, bw * 8, channels)[:h, :w] + 128.0
    if channels == 3:
        to_rgb = jnp.asarray([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])
        img = (img - jnp.asarray([0.0, 128.0, 128.0])) @ to_rgb.T
    return (jnp.clip(jnp.round(img), 0.0, 255.0) / 255.0).astype(x.dtype)


_CORRUPTIONS: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "defocus_blur": _defocus_blur,
    "gaussian_blur": _gaussian_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "saturate": _saturate,
    "pixelate": _pixelate,
    "elastic_transform": _elastic_transform,
    "jpeg_compression": _jpeg_compression,
}


def _uniforms(name: str, shape: tuple[int, ...]) -> int:
    """How many uniforms corruption ``name`` draws for an image of ``shape``."""
    size = int(np.prod(shape))
    return {
        "gaussian_noise": 2 * size,
        "impulse_noise": 2 * size,
        "speckle_noise": 2 * size,
        "motion_blur": 1,
        "elastic_transform": 6 + 2 * shape[0] * shape[1],
    }.get(name, 0)


def _check(x: Any, name: str, severity: Any) -> jax.Array:
    _check_name(name)
    x = check_image(x, f"corruptions.apply({name!r})")
    if name in COLOUR_ONLY and x.shape[-1] != 3:
        raise ValueError(
            f"{name} needs a colour image (C = 3); got {x.shape[-1]} channel(s). "
            f"For this image use one of {', '.join(names_for(x.shape[-1]))}."
        )
    if isinstance(severity, bool) or (
        isinstance(severity, int | np.integer | float) and severity not in SEVERITIES
    ):
        raise ValueError(f"severity must be an integer from 1 to 5; got {severity!r}.")
    return x


def apply(key: jax.Array, x: jax.Array, name: str, severity: int | jax.Array) -> jax.Array:
    """Corrupt one image by the common corruption ``name`` at ``severity`` (1-5).

    Args:
      key: PRNG key of the corruption's random draws (noise, angle, field, ...).
      x: one image (H, W, C) with values in [0, 1]; ``saturate`` needs C = 3.
      name: one of ``NAMES`` (static).
      severity: 1 (mild) to 5 (severe); an int, or a traced integer (then not
        checked, and clipped to 1-5).

    Returns:
      The corrupted image, same shape and dtype, in [0, 1].

    Raises:
      ValueError: an unknown name, a severity outside 1-5, an image of the wrong
        rank or outside [0, 1], or ``saturate`` on a greyscale image.

    References:
      Hendrycks, Dietterich, "Benchmarking neural network robustness to common
      corruptions and perturbations", ICLR 2019. https://arxiv.org/abs/1903.12261 ;
      docs/prime.md
    """
    return apply_all(key, x, severity, (name,))[0]


def apply_all(
    key: jax.Array, x: jax.Array, severity: int | jax.Array, names: tuple[str, ...] = NAMES
) -> jax.Array:
    """Every corruption of ``names`` at ``severity``: shape (len(names), H, W, C).

    One draw of uniforms from ``key`` is shared out among the corruptions (and
    one Poisson draw for shot noise): the same distributions as separate
    ``apply`` calls, with one random-number generator in the compiled program
    instead of one per corruption. ``apply(key, x, name, s)`` is
    ``apply_all(key, x, s, (name,))[0]``. Arguments as in ``apply``.
    """
    if isinstance(names, str) or not names:
        raise ValueError(f"names must be a non-empty tuple of names from {', '.join(NAMES)}.")
    for name in names:
        x = _check(x, name, severity)
    index = jnp.clip(jnp.asarray(severity, jnp.int32), 1, 5) - 1
    counts = [_uniforms(n, x.shape) for n in names]
    k_uniform, k_poisson = jax.random.split(key)
    u = jax.random.uniform(k_uniform, (sum(counts),))
    starts = np.cumsum([0, *counts])
    return jnp.stack(
        [
            _CORRUPTIONS[n](u[a:b], k_poisson, x, index).astype(x.dtype)
            for n, a, b in zip(names, starts[:-1], starts[1:], strict=True)
        ]
    )
