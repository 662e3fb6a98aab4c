"""Datasets as in-memory arrays: NHWC float32 images in [0, 1], int32 labels.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images,
  offline), a fixed stratified train/test split, optionally resized. The
  embedded default: the demo and the tests run on it with no network.
- ``synthetic``: the "Hold me tight!" construction (docs/subspaces.md): all the
  discriminative information lies along one known unit direction ``u``
  (a DCT atom, or any direction you give), noise lives in its orthogonal
  complement. Any image size, seeded.
- any TFDS name (``mnist``, ``fashion_mnist``, ``cifar10``, ``svhn_cropped``,
  ...): read with ``tfds.data_source`` from ArrayRecord files (no TensorFlow at
  read time). Preparing a dataset the first time needs the network and, for
  most datasets, TensorFlow: ``bgeom prepare NAME --data-dir DIR``.
- the corruption benchmarks ``cifar10_corrupted/<corruption>_<severity>`` (test
  split only) and ``mnist_corrupted/<corruption>``, one TFDS config each; a
  plain ``cifar10_corrupted`` is refused, since TFDS would load its default
  config, one corruption at severity 1 (docs/prime.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

EMBEDDED = ("digits", "synthetic")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A labelled image dataset held in memory.

    Attributes:
      x_train, x_test: float32 arrays (N, H, W, C) with values in [0, 1]
        (``synthetic`` is centred at 0.5 and not clipped; see ``synthetic``).
      y_train, y_test: int32 labels in [0, num_classes).
      num_classes: number of classes.
      name: the dataset's name as passed to ``load``.
      info: construction details (e.g. the discriminative direction of
        ``synthetic``).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"classes={self.num_classes})"
        )


def resize(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of NHWC images in [0, 1], clipped back to [0, 1]."""
    import jax
    import jax.numpy as jnp

    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"resize: size must be positive; got {size}.")
    n, _, _, c = images.shape
    out = jax.image.resize(jnp.asarray(images), (n, h, w, c), method="linear", antialias=True)
    return np.clip(np.asarray(out, np.float32), 0.0, 1.0)


def _digits(size: int | tuple[int, int] | None = None, test_fraction: float = 0.2) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[..., None]  # pixel values 0..16
    labels = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, random_state=0, stratify=labels
    )
    if size is not None:
        x_tr, x_te = resize(x_tr, size), resize(x_te, size)
    return Dataset(
        np.ascontiguousarray(x_tr),
        y_tr,
        np.ascontiguousarray(x_te),
        y_te,
        10,
        "digits",
        {"source": "sklearn.datasets.load_digits", "size": size},
    )


def dct_atom(shape: tuple[int, int, int], row: int, col: int) -> np.ndarray:
    """The 2-D orthonormal DCT-II basis image (row, col), equal in every channel, unit norm."""
    from scipy.fft import idctn

    h, w, c = shape
    if not (0 <= row < h and 0 <= col < w):
        raise ValueError(f"DCT atom ({row}, {col}) is outside a {h}x{w} image.")
    coeffs = np.zeros((h, w), np.float64)
    coeffs[row, col] = 1.0
    atom = idctn(coeffs, norm="ortho")
    atom = np.repeat(atom[..., None], c, axis=-1) / np.sqrt(c)
    return atom.astype(np.float32)


def synthetic(
    shape: tuple[int, int, int] = (28, 28, 1),
    *,
    n_train: int = 2000,
    n_test: int = 500,
    eps: float = 0.5,
    sigma: float = 0.1,
    atom: tuple[int, int] = (1, 1),
    direction: np.ndarray | None = None,
    center: float = 0.5,
    seed: int = 0,
) -> Dataset:
    """Two-class data whose only discriminative information lies along ``u``.

    ``x = center + eps * y * u + sigma * P_perp n`` with ``y`` in {-1, +1} (label
    ``(y + 1) / 2``), ``n ~ N(0, I)`` and ``P_perp`` the projector onto the
    orthogonal complement of ``u``. A classifier needs only the coordinate
    along ``u``; its margin along ``u`` should be about ``eps`` while margins
    along orthogonal subspaces are much larger (Ortiz-Jimenez et al. 2020).
    Values are not clipped to [0, 1]: clipping would leak label information
    into directions other than ``u``.

    Args:
      shape: (H, W, C) of one image.
      n_train, n_test: numbers of examples (balanced classes).
      eps: distance of each class from the decision hyperplane along ``u``.
      sigma: standard deviation of the noise per coordinate.
      atom: the DCT-II atom (row, col) used as ``u`` when ``direction`` is None;
        low indices are low frequencies.
      direction: any array of ``shape`` to use as ``u`` (normalised here).
      center: constant offset of every pixel.
      seed: random seed.

    References:
      Ortiz-Jimenez, Modas, Moosavi-Dezfooli, Frossard. "Hold me tight!
      Influence of discriminative features on deep network boundaries",
      NeurIPS 2020. https://arxiv.org/abs/2002.06349
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"synthetic: shape must be (H, W, C) with positive sizes; got {shape}.")
    if n_train < 2 or n_test < 2:
        raise ValueError("synthetic: n_train and n_test must be at least 2.")
    if direction is None:
        u = dct_atom(shape, *atom)
        where = {"atom": list(atom)}
    else:
        u = np.asarray(direction, np.float64)
        if u.shape != shape:
            raise ValueError(f"synthetic: direction has shape {u.shape}, expected {shape}.")
        norm = np.linalg.norm(u)
        if not np.isfinite(norm) or norm == 0:
            raise ValueError("synthetic: direction must be finite and non-zero.")
        u = (u / norm).astype(np.float32)
        where = {"atom": None}
    rng = np.random.default_rng(seed)
    flat_u = u.reshape(-1).astype(np.float64)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % 2
        rng.shuffle(labels)
        y = 2.0 * labels - 1.0
        noise = rng.standard_normal((n, flat_u.size))
        noise -= np.outer(noise @ flat_u, flat_u)  # project out u
        x = center + eps * y[:, None] * flat_u[None] + sigma * noise
        return x.reshape((n, *shape)).astype(np.float32), labels.astype(np.int32)

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    info = {"direction": u, "eps": eps, "sigma": sigma, "center": center, "seed": seed, **where}
    return Dataset(x_tr, y_tr, x_te, y_te, 2, "synthetic", info)


# The corruption benchmarks on TFDS: the splits each has.
CORRUPTED = {"cifar10_corrupted": ("test",), "mnist_corrupted": ("train", "test")}


def corruption_configs(benchmark: str) -> dict[str, tuple[str, ...]]:
    """The TFDS configs of a corruption benchmark by corruption, in severity order.

    ``cifar10_corrupted``: 19 corruptions, each with configs ``<name>_1`` ..
    ``<name>_5``; ``mnist_corrupted``: 15 corruptions with one config each (its
    ``identity`` config, the clean test set, is left out). Load one with
    ``load(f"{benchmark}/{config}")``.
    """
    import tensorflow_datasets as tfds

    if benchmark not in CORRUPTED:
        raise ValueError(
            f"Unknown corruption benchmark {benchmark!r}; choose one of {', '.join(CORRUPTED)}."
        )
    configs = [c.name for c in tfds.builder_cls(benchmark).BUILDER_CONFIGS]
    out: dict[str, list[str]] = {}
    for config in configs:
        if benchmark == "cifar10_corrupted":
            out.setdefault(config.rsplit("_", 1)[0], []).append(config)
        elif config != "identity":
            out[config] = [config]
    return {k: tuple(sorted(v)) for k, v in out.items()}


def _corrupted_config(name: str) -> None:
    """Check ``<benchmark>/<config>`` against the benchmark's TFDS configs."""
    import tensorflow_datasets as tfds

    base, _, config = name.partition("/")
    configs = [c.name for c in tfds.builder_cls(base).BUILDER_CONFIGS]
    if base == "cifar10_corrupted":
        kinds = sorted(corruption_configs(base))
        valid = f"<corruption>_<severity>, severity 1-5 and corruption one of {', '.join(kinds)}"
        example = "cifar10_corrupted/gaussian_noise_3"
    else:
        valid = "one of " + ", ".join(configs)
        example = "mnist_corrupted/shot_noise"
    if not config:
        raise ValueError(
            f"{base} needs a config, e.g. {example!r} ({valid}); a plain {base!r} would load "
            f"only its default config {configs[0]!r}."
        )
    if config not in configs:
        raise ValueError(f"Unknown {base} config {config!r}; use {valid}.")


def _tfds(
    name: str,
    data_dir: str | None,
    max_train: int | None,
    max_test: int | None,
    size: int | tuple[int, int] | None,
    split_names: tuple[str, ...] = ("train", "test"),
) -> Dataset:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {name!r}: use 'digits', 'synthetic' or a TFDS name "
            "such as 'mnist', 'fashion_mnist', 'cifar10'."
        ) from None

    def not_prepared() -> ValueError:
        where = data_dir or "~/tensorflow_datasets"
        return ValueError(
            f"Dataset {name!r} is not prepared in {where}. Prepare it once (needs the "
            f"network and tensorflow): bgeom prepare {name}"
            + (f" --data-dir {data_dir}" if data_dir else "")
        )

    splits = {}
    for split, limit in (("train", max_train), ("test", max_test)):
        if split not in split_names:
            continue
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types for a missing dataset
            if not builder.is_prepared():
                raise not_prepared() from e
            raise
        n = len(source) if limit is None else min(limit, len(source))
        # Element-wise reads: ArrayRecord random access is cheap, and batched
        # __getitems__ is not supported by every data source (e.g. mock data).
        records = [source[i] for i in range(n)]
        images = np.stack([r["image"] for r in records]).astype(np.float32) / 255.0
        if images.ndim == 3:
            images = images[..., None]
        labels = np.asarray([r["label"] for r in records], np.int32)
        splits[split] = (images, labels)
        info = source.dataset_info
    num_classes = int(info.features["label"].num_classes)
    x_te, y_te = splits["test"]
    # A benchmark with a test split only has an empty training split.
    x_tr, y_tr = splits.get("train", (x_te[:0], y_te[:0]))
    if size is not None:
        x_tr, x_te = resize(x_tr, size), resize(x_te, size)
    return Dataset(x_tr, y_tr, x_te, y_te, num_classes, name, {"source": "tfds", "size": size})


def load(
    name: str = "digits",
    *,
    size: int | tuple[int, int] | None = None,
    data_dir: str | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    **kwargs: Any,
) -> Dataset:
    """Load a dataset by name as in-memory NHWC float32 arrays.

    Args:
      name: ``digits`` (embedded default), ``synthetic``, or a TFDS name
        (``cifar10_corrupted/<corruption>_<severity>``, ``mnist_corrupted/<corruption>``
        for the corruption benchmarks: their config is required).
      size: resize images to ``size`` x ``size`` (or (H, W)); for ``synthetic``
        pass ``shape=(H, W, C)`` instead.
      data_dir: TFDS data directory (default ``~/tensorflow_datasets``).
      max_train, max_test: keep only the first examples of each split.
      **kwargs: options of ``synthetic`` (``shape``, ``eps``, ``sigma``, ...).

    Returns:
      A ``Dataset``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Dataset name must be a non-empty string; got {name!r}.")
    if name == "digits":
        if kwargs:
            raise ValueError(f"digits takes no options {sorted(kwargs)}; only size= and max_*.")
        data = _digits(size)
    elif name == "synthetic":
        if size is not None:
            raise ValueError("synthetic: pass shape=(H, W, C) instead of size=.")
        data = synthetic(**kwargs)
    else:
        if kwargs:
            raise ValueError(f"TFDS datasets take no options {sorted(kwargs)}.")
        base = name.partition("/")[0]
        if base in CORRUPTED:
            _corrupted_config(name)
            return _tfds(name, data_dir, max_train, max_test, size, CORRUPTED[base])
        return _tfds(name, data_dir, max_train, max_test, size)
    if max_train is not None or max_test is not None:
        data = dataclasses.replace(
            data,
            x_train=data.x_train[:max_train],
            y_train=data.y_train[:max_train],
            x_test=data.x_test[:max_test],
            y_test=data.y_test[:max_test],
        )
    return data


def prepare(name: str, data_dir: str | None = None) -> str:
    """Download and prepare a TFDS dataset as ArrayRecord files; return its directory.

    Needs the network and usually ``tensorflow`` (``pip install tensorflow``);
    reading it afterwards with ``load`` needs neither.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"Unknown TFDS dataset {name!r}.") from None
    builder.download_and_prepare()
    return builder.data_dir
