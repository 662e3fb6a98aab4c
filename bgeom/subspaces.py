"""Subspaces of image space, never materialised as D x d bases when image-sized.

A subspace is a pytree with a ``project(g)`` method (orthogonal projection of
one image-shaped array onto it), in three parts: ``analyse(g)`` (what every
subspace of the kind shares: the DCT, or nothing), ``coordinates(t)`` (the
subspace's coordinates, whose norm is ``||P_S g||``) and ``synthesise(c)``
(back to an image). Searches work in coordinates and synthesise only the step
they take; ``subspace_margins`` analyses each gradient once for all its
subspaces. Two kinds:

- ``MaskSubspace``: a 0/1 mask on the grid of 2-D orthonormal DCT-II
  coefficients, the same in every channel. ``P_S g = IDCT2(M * DCT2(g))`` per
  channel and ``||P_S g|| = ||M * DCT2(g)||``: matrix-free for any image size.
  ``dct_blocks`` (the diagonal K x K blocks of "Hold me tight!"), ``low_pass``
  and ``high_pass`` bands and the ``whole`` space are of this kind.
- ``BasisSubspace``: an explicit orthonormal basis of d image-shaped vectors,
  for small d: ``random`` subspaces and any user basis (``from_basis``), such as
  the shared curved directions of a boundary.

Both can be stacked: ``dct_blocks`` returns one object holding every block,
``blocks[i]`` is one block, ``len(blocks)`` counts them, and ``jax.vmap`` over
the stack maps over the blocks (every leaf has the block axis first)::

    blocks = dct_blocks((28, 28, 1), block=8, stride=1)        # 21 blocks
    jax.vmap(lambda s: subspace_deepfool(apply_fn, params, x, s))(blocks)

The frequency ``flip`` and the ``low_pass`` / ``high_pass`` filters act on
images (any leading batch axes).

References:
  Ortiz-Jimenez, Modas, Moosavi-Dezfooli, Frossard. "Hold me tight! Influence of
  discriminative features on deep network boundaries", NeurIPS 2020.
  https://arxiv.org/abs/2002.06349

See docs/subspaces.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bgeom import _checks

Shape = tuple[int, ...]


@functools.lru_cache(maxsize=32)
def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix ``D`` (n x n): ``D @ v`` is the DCT of ``v``."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


def _apply(x: jax.Array, transpose: bool) -> jax.Array:
    """``D_H x D_W^T`` (or its inverse) over the (H, W) axes, as two dense matmuls.

    At image sizes a dense matrix product is several times faster on CPU than
    an FFT-based DCT, and equal to float rounding.
    """
    x = jnp.asarray(x)
    dh, dw = (jnp.asarray(dct_matrix(n), x.dtype) for n in x.shape[-3:-1])
    if transpose:
        dh, dw = dh.T, dw.T
    # HIGHEST: no reduced-precision (TF32) products on GPUs.
    high = jax.lax.Precision.HIGHEST
    y = jnp.einsum("ih,...hwc->...iwc", dh, x, precision=high)
    return jnp.einsum("jw,...iwc->...ijc", dw, y, precision=high)


def dct2(x: jax.Array) -> jax.Array:
    """Orthonormal 2-D DCT-II over the (H, W) axes of ``(..., H, W, C)`` arrays."""
    return _apply(x, transpose=False)


def idct2(c: jax.Array) -> jax.Array:
    """Inverse of ``dct2`` (orthonormal, so also its transpose)."""
    return _apply(c, transpose=True)


def _check_shape(shape: Any, fn: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: shape must be (H, W, C) integers; got {shape!r}.") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{fn}: shape must be (H, W, C) with positive sizes; got {shape}.")
    return shape


class _Stackable:
    """Indexing, length and stacking shared by every subspace kind."""

    _unit_ndim: int  # rank of the defining leaf for ONE subspace

    def _leaf(self) -> jax.Array:
        raise NotImplementedError

    @property
    def batch_shape(self) -> Shape:
        """Leading stack axes (``()`` for one subspace)."""
        leaf = self._leaf()
        return tuple(leaf.shape[: leaf.ndim - self._unit_ndim])

    def __len__(self) -> int:
        if not self.batch_shape:
            raise TypeError("A single subspace has no length; only a stack of subspaces has.")
        return self.batch_shape[0]

    def __getitem__(self, index: Any):
        if not self.batch_shape:
            raise TypeError("A single subspace cannot be indexed; only a stack of subspaces can.")
        return jax.tree.map(lambda a: a[index], self)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["mask"], meta_fields=["shape", "name"]
)
@dataclasses.dataclass(frozen=True)
class MaskSubspace(_Stackable):
    """The span of the 2-D DCT atoms selected by ``mask``, in every channel.

    Attributes:
      mask: 0/1 array ``(..., H, W)`` on the DCT coefficient grid (leading
        axes index a stack of subspaces).
      shape: the image shape ``(H, W, C)`` this subspace lives in.
      name: a label for plots and reports (e.g. ``"dct 8x8 @ 3"``).
    """

    mask: jax.Array
    shape: Shape
    name: str = ""
    _unit_ndim = 2

    def _leaf(self) -> jax.Array:
        return self.mask

    @property
    def dim(self) -> jax.Array:
        """Dimension: selected coefficients times channels (per stacked subspace)."""
        return jnp.sum(self.mask, axis=(-2, -1)) * self.shape[2]

    def project(self, g: jax.Array) -> jax.Array:
        """Orthogonal projection of one image-shaped ``g`` onto the subspace."""
        return self.synthesise(self.coordinates(self.analyse(g)))

    @staticmethod
    def analyse(g: jax.Array) -> jax.Array:
        """The part of the projection every mask shares: ``dct2(g)``.

        ``project(g) == synthesise(coordinates(analyse(g)))``; a search that
        projects one gradient onto many subspaces analyses it once.
        """
        return dct2(g)

    def coordinates(self, t: jax.Array) -> jax.Array:
        """The subspace's coordinates of an analysed ``t``: its masked DCT coefficients.

        Their norm is ``||P_S g||`` (the DCT is orthonormal).
        """
        return self.mask[..., None].astype(t.dtype) * t

    @staticmethod
    def synthesise(c: jax.Array) -> jax.Array:
        """The image with coordinates ``c`` (``idct2``); linear."""
        return idct2(c)

    def norm_of_projection(self, g: jax.Array) -> jax.Array:
        """``||P_S g||`` without the inverse transform (the DCT is orthonormal)."""
        return jnp.linalg.norm(self.coordinates(self.analyse(g)).ravel())

    def complement(self) -> MaskSubspace:
        """The orthogonal complement: the atoms this subspace leaves out."""
        return MaskSubspace(1 - self.mask, self.shape, f"not {self.name}".strip())


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["basis"], meta_fields=["shape", "name"]
)
@dataclasses.dataclass(frozen=True)
class BasisSubspace(_Stackable):
    """The span of ``d`` orthonormal image-shaped vectors.

    Attributes:
      basis: ``(..., d, H, W, C)``; the flattened rows are orthonormal.
      shape: the image shape ``(H, W, C)``.
      name: a label for plots and reports.
    """

    basis: jax.Array
    shape: Shape
    name: str = ""
    _unit_ndim = 4

    def _leaf(self) -> jax.Array:
        return self.basis

    @property
    def dim(self) -> int:
        return self.basis.shape[-4]

    def project(self, g: jax.Array) -> jax.Array:
        """Orthogonal projection ``B^T B g`` of one image-shaped ``g``."""
        return self.synthesise(self.coordinates(self.analyse(g)))

    @staticmethod
    def analyse(g: jax.Array) -> jax.Array:
        """The part of the projection every basis shares: none (``g`` itself)."""
        return g

    def coordinates(self, t: jax.Array) -> jax.Array:
        """``B t``: the coefficients of ``t`` in the orthonormal basis (norm ``||P_S t||``)."""
        return jnp.tensordot(self.basis, t, axes=3)

    def synthesise(self, c: jax.Array) -> jax.Array:
        """``B^T c``: the image with coefficients ``c``; linear."""
        return jnp.tensordot(c, self.basis, axes=1)

    def norm_of_projection(self, g: jax.Array) -> jax.Array:
        """``||P_S g|| = ||B g||`` (orthonormal rows)."""
        return jnp.linalg.norm(self.coordinates(self.analyse(g)))


Subspace = MaskSubspace | BasisSubspace


# ------------------------------------------------------------------ builders


def _block_mask(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((h, w), np.float32)
    mask[rows, cols] = 1.0
    return mask


def dct_blocks(shape: Sequence[int], block: int = 8, stride: int = 1) -> MaskSubspace:
    """The K x K diagonal DCT blocks of "Hold me tight!", low to high frequency.

    Block ``i`` spans the 2-D orthonormal DCT-II atoms with row and column
    indices in ``[s_i, s_i + K)``, ``s_i = i * stride``, in every channel
    (dimension ``K * K * C``); ``s`` walks the diagonal while the block fits.
    Reference grids: 28x28 with K=8, stride 1 gives 21 blocks; 32x32 with K=8,
    stride 2 gives 13; 224x224 with K=16, stride 16 gives 14.

    Args:
      shape: the image shape ``(H, W, C)``.
      block: K, the side of each block.
      stride: step of ``s`` along the diagonal.

    Returns:
      A stacked ``MaskSubspace`` (``len`` = number of blocks; index or vmap it).

    References:
      Method page: docs/subspaces.md.
      Ortiz-Jimenez et al., "Hold me tight!", NeurIPS 2020, section 3.
    """
    h, w, _ = _check_shape(shape, "dct_blocks")
    block, stride = int(block), int(stride)
    if block < 1 or stride < 1:
        raise ValueError(f"dct_blocks: block and stride must be >= 1; got {block}, {stride}.")
    if block > min(h, w):
        raise ValueError(
            f"dct_blocks: a {block}x{block} block does not fit in a {h}x{w} image; "
            f"choose block <= {min(h, w)}."
        )
    starts = range(0, min(h, w) - block + 1, stride)
    masks = np.stack([_block_mask(h, w, slice(s, s + block), slice(s, s + block)) for s in starts])
    return MaskSubspace(jnp.asarray(masks), (h, w, shape[2]), f"dct {block}x{block}/{stride}")


def block_starts(shape: Sequence[int], block: int = 8, stride: int = 1) -> np.ndarray:
    """The diagonal offsets ``s_i`` of ``dct_blocks(shape, block, stride)`` (for plot axes)."""
    h, w, _ = _check_shape(shape, "block_starts")
    return np.arange(0, min(h, w) - int(block) + 1, int(stride))


def band(shape: Sequence[int], bandwidth: int, *, high: bool = False) -> MaskSubspace:
    """The top-left (``high=False``) or bottom-right B x B block of DCT atoms."""
    h, w, c = _check_shape(shape, "band")
    bandwidth = _check_bandwidth(bandwidth, h, w, "band")
    rows, cols = (
        (slice(h - bandwidth, h), slice(w - bandwidth, w))
        if high
        else (
            slice(0, bandwidth),
            slice(0, bandwidth),
        )
    )
    kind = "high" if high else "low"
    return MaskSubspace(
        jnp.asarray(_block_mask(h, w, rows, cols)), (h, w, c), f"{kind}-pass {bandwidth}"
    )


def whole(shape: Sequence[int]) -> MaskSubspace:
    """The whole image space (every DCT atom): subspace DeepFool becomes DeepFool."""
    h, w, c = _check_shape(shape, "whole")
    return MaskSubspace(jnp.ones((h, w), jnp.float32), (h, w, c), "whole space")


def random(key: jax.Array, shape: Sequence[int], dim: int, num: int | None = None) -> BasisSubspace:
    """Random subspace(s) of dimension ``dim``: orthonormalised Gaussian bases.

    Args:
      key: a JAX PRNG key.
      shape: the image shape ``(H, W, C)``.
      dim: the dimension d (1 <= d <= H*W*C).
      num: if given, a stack of ``num`` independent subspaces.

    Returns:
      ``BasisSubspace`` with basis ``([num,] dim, H, W, C)``.
    """
    shape = _check_shape(shape, "random")
    total = int(np.prod(shape))
    dim = int(dim)
    if not 1 <= dim <= total:
        raise ValueError(f"random: dim must be between 1 and {total} for shape {shape}; got {dim}.")

    def one(k):
        q, _ = jnp.linalg.qr(jax.random.normal(k, (total, dim)))
        return q.T.reshape(dim, *shape)

    basis = one(key) if num is None else jax.vmap(one)(jax.random.split(key, int(num)))
    return BasisSubspace(basis, shape, f"random d={dim}")


def from_basis(basis: Any, *, name: str = "custom", atol: float | None = None) -> BasisSubspace:
    """A subspace spanned by a user-given orthonormal basis.

    Args:
      basis: ``(d, H, W, C)`` array whose flattened rows are orthonormal, or a
        stack ``(..., d, H, W, C)`` of such bases.
      name: a label for plots and reports.
      atol: tolerance of the orthonormality check (default: ``1e-4`` for
        float32, scaled by sqrt of the dimension).

    Raises:
      ValueError: if the basis is not float, has the wrong rank, or its rows are
        not orthonormal (orthonormalise it first, e.g. with ``jnp.linalg.qr``).
    """
    basis = jnp.asarray(basis)
    if basis.ndim < 4:
        raise ValueError(
            f"from_basis: basis must have shape (d, H, W, C); got shape {basis.shape}. "
            "For a basis of flat vectors, reshape each row to the image shape."
        )
    if not jnp.issubdtype(basis.dtype, jnp.floating):
        basis = basis.astype(jnp.float32)
    if _checks.is_concrete(basis):
        flat = np.asarray(basis, np.float64).reshape(
            -1, basis.shape[-4], int(np.prod(basis.shape[-3:]))
        )
        gram = flat @ flat.transpose(0, 2, 1)
        eye = np.eye(basis.shape[-4])
        err = float(np.max(np.abs(gram - eye))) if gram.size else 0.0
        limit = (
            atol
            if atol is not None
            else 100 * float(jnp.finfo(basis.dtype).eps) * np.sqrt(flat.shape[-1])
        )
        if not np.isfinite(err) or err > limit:
            raise ValueError(
                f"from_basis: the basis rows are not orthonormal (max |B B^T - I| = {err:.2e} > "
                f"{limit:.1e}); orthonormalise them first, e.g. q, _ = jnp.linalg.qr(B.T)."
            )
    return BasisSubspace(basis, tuple(int(s) for s in basis.shape[-3:]), name)


def stack(subspaces: Sequence[Subspace]) -> Subspace:
    """Stack single subspaces of one kind and shape into one vmap-able stack."""
    subspaces = list(subspaces)
    if not subspaces:
        raise ValueError("stack: need at least one subspace.")
    kinds = {type(s) for s in subspaces}
    shapes = {s.shape for s in subspaces}
    if len(kinds) > 1 or len(shapes) > 1:
        raise ValueError("stack: every subspace must be of the same kind and image shape.")
    if type(subspaces[0]) is BasisSubspace and len({s.dim for s in subspaces}) > 1:
        raise ValueError("stack: basis subspaces must have the same dimension to be stacked.")
    first = subspaces[0]
    leaves = jnp.stack([s._leaf() for s in subspaces])
    return dataclasses.replace(
        first, **{"mask" if type(first) is MaskSubspace else "basis": leaves}
    )


def check_compatible(subspace: Any, shape: Shape, fn: str) -> None:
    """Raise a ``ValueError`` unless ``subspace`` is ONE subspace of images of ``shape``."""
    if not isinstance(subspace, MaskSubspace | BasisSubspace):
        raise ValueError(
            f"{fn}: subspace must be built by bgeom.subspaces (dct_blocks, random, from_basis, "
            f"band, whole); got {type(subspace).__name__}."
        )
    if tuple(subspace.shape) != tuple(shape):
        raise ValueError(
            f"{fn}: the subspace lives in images of shape {tuple(subspace.shape)} but x has shape "
            f"{tuple(shape)}; build the subspace with the image's (H, W, C)."
        )
    if subspace.batch_shape:
        raise ValueError(
            f"{fn}: got a stack of {subspace.batch_shape[0]} subspaces; pass one (blocks[i]) or "
            "jax.vmap over the stack."
        )


# ------------------------------------------------------------ image filters


def _check_bandwidth(bandwidth: Any, h: int, w: int, fn: str) -> int:
    try:
        bandwidth = int(bandwidth)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: bandwidth must be an integer; got {bandwidth!r}.") from None
    if not 1 <= bandwidth <= min(h, w):
        raise ValueError(
            f"{fn}: bandwidth must be between 1 and {min(h, w)} for {h}x{w} images; "
            f"got {bandwidth}."
        )
    return bandwidth


def _check_images(x: Any, fn: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"{fn}: expected images of shape (..., H, W, C); got shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def flip(x: jax.Array) -> jax.Array:
    """Frequency flip: DCT coefficient (i, j) moves to (H-1-i, W-1-j), per channel.

    ``x_flip = IDCT2(flip_HW(DCT2(x)))``: an orthogonal involution that swaps low
    and high frequencies, so a network trained on flipped data sees the
    discriminative information of the data at mirrored frequencies.

    Args:
      x: images ``(..., H, W, C)``.

    References:
      Method page: docs/subspaces.md.
      Ortiz-Jimenez et al., "Hold me tight!", NeurIPS 2020, section 4.
    """
    x = _check_images(x, "flip")
    return idct2(jnp.flip(dct2(x), axis=(-3, -2)))


def _band_filter(x: jax.Array, bandwidth: int, high: bool, fn: str) -> jax.Array:
    x = _check_images(x, fn)
    h, w = x.shape[-3], x.shape[-2]
    mask = band((h, w, x.shape[-1]), _check_bandwidth(bandwidth, h, w, fn), high=high).mask
    return idct2(mask[..., None].astype(x.dtype) * dct2(x))


def low_pass(x: jax.Array, bandwidth: int) -> jax.Array:
    """Keep only the top-left ``bandwidth`` x ``bandwidth`` DCT coefficients of each channel."""
    return _band_filter(x, bandwidth, False, "low_pass")


def high_pass(x: jax.Array, bandwidth: int) -> jax.Array:
    """Keep only the bottom-right ``bandwidth`` x ``bandwidth`` DCT coefficients."""
    return _band_filter(x, bandwidth, True, "high_pass")
