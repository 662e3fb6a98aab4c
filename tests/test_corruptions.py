"""Common corruptions (bgeom.corruptions) and the corruption benchmarks on TFDS (bgeom.data)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tol

import bgeom.probes.robustness as robustness
from bgeom import corruptions as C
from bgeom import data
from bgeom.sharding import sweep

GREY = C.names_for(1)


@pytest.fixture(scope="module")
def digits64(digits):
    return digits.x_test[:64]


FLAT = 128 / 255  # a mid-grey constant image, the last of the corrupted batch


@pytest.fixture(scope="module")
def corrupted(digits):
    """Every greyscale corruption at every severity of 199 digits and a constant image:
    (5, 200, 13, 8, 8, 1). Computed as the robustness probe does it (one compiled
    function for every severity, image i drawing from key i), so that a test run of the
    probe on 200 digits reuses the compilation."""
    x = np.concatenate([digits.x_test[:199], np.full((1, 8, 8, 1), FLAT, np.float32)])
    keys = np.asarray(robustness.image_keys(0, len(x)))
    fn = robustness._corrupt_all(GREY)
    return np.stack(
        [
            sweep(fn, keys, x, np.int32(s), in_axes=(0, 0, None), batch_size=500, progress=False)
            for s in range(1, 6)
        ]
    )


def by_severity(x, name):
    """``name`` applied to ``x`` at severities 1-5, one compiled call: (5, H, W, C)."""
    key = jax.random.PRNGKey(0)
    return np.asarray(jax.jit(jax.vmap(lambda s: C.apply(key, x, name, s)))(jnp.arange(1, 6)))


def rms(a, b):
    return np.sqrt(np.mean((a - b) ** 2, axis=(-3, -2, -1)))


def test_every_corruption_stays_in_range_with_the_input_shape(corrupted, digits64):
    assert corrupted.shape == (5, 200, len(GREY), 8, 8, 1) and corrupted.dtype == np.float32
    assert corrupted.min() >= 0.0 and corrupted.max() <= 1.0
    dev = rms(corrupted[:, :64], digits64[None, :, None]).mean(1)  # (5, names)
    assert np.all(dev[0] > 0)  # severity 1 already changes every corruption's images


def test_deviation_grows_with_severity_for_every_corruption_on_digits(corrupted, digits64):
    dev = rms(corrupted[:, :64], digits64[None, :, None]).mean(1)  # (severity, corruption)
    for j, name in enumerate(GREY):
        assert np.all(np.diff(dev[:, j]) > 0), (name, dev[:, j])


def test_saturate_grows_within_its_two_directions_and_matches_hsv():
    """The benchmark's table desaturates at severities 1-2 and oversaturates at 3-5, so
    its deviation grows within each direction; the values match an HSV round trip."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(12, 12, 3)).astype(np.float32)
    x[0, 0] = [0.4, 0.4, 0.4]  # grey: hue 0 (red) once saturated, as in skimage
    x[0, 1] = 0.0
    out = by_severity(x, "saturate")
    dev = rms(out, x)
    assert dev[1] > dev[0] and dev[3] > dev[2] and dev[4] > dev[3]
    for s, (a, b) in enumerate(C.parameters("saturate", x.shape)):
        hsv = rgb_to_hsv(x.astype(np.float64))
        hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
        np.testing.assert_allclose(out[s], np.clip(hsv_to_rgb(hsv), 0, 1), atol=1e-5)
    out = by_severity(x, "brightness")
    for s, c in enumerate(C.parameters("brightness", x.shape)):
        hsv = rgb_to_hsv(x.astype(np.float64))
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        np.testing.assert_allclose(out[s], np.clip(hsv_to_rgb(hsv), 0, 1), atol=1e-5)


def test_blurs_and_pixelate_match_their_reference_implementations(digits64):
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    x = digits64[3]
    blurred, pixelated = by_severity(x, "gaussian_blur"), by_severity(x, "pixelate")
    for s, sigma in enumerate(C.parameters("gaussian_blur", x.shape)):
        want = np.clip(gaussian_filter(x, (sigma, sigma, 0), mode="nearest", truncate=4.0), 0, 1)
        np.testing.assert_allclose(blurred[s], want, **tol(np.float32, 4))
    for s, f in enumerate(C.parameters("pixelate", x.shape)):
        small = int(8 * f)
        img = Image.fromarray(x[..., 0], mode="F").resize((small, small), Image.BOX)
        want = np.asarray(img.resize((8, 8), Image.BOX))[..., None]
        np.testing.assert_allclose(pixelated[s], np.clip(want, 0, 1), **tol(np.float32, 4))
    # Defocus at severity 1: a one-pixel disk blurred by OpenCV's 3-tap Gaussian (sigma 0.4).
    g = np.exp(-(np.arange(-1, 2) ** 2) / (2 * 0.4**2))
    g /= g.sum()
    padded = np.pad(x[..., 0], 1, mode="reflect")
    want = sum(g[a] * g[b] * padded[a : a + 8, b : b + 8] for a in range(3) for b in range(3))
    got = by_severity(x, "defocus_blur")[0, ..., 0]
    np.testing.assert_allclose(got, np.clip(want, 0, 1), **tol(np.float32, 4))


def test_hand_solvable_cases(corrupted, digits64):
    at = {name: corrupted[:, :, j] for j, name in enumerate(GREY)}  # (5, 200, 8, 8, 1)
    # Averaging corruptions leave a constant image alone; JPEG keeps a mid-grey block
    # (its DC coefficient is 0 after the level shift).
    for name in ("defocus_blur", "gaussian_blur", "motion_blur", "zoom_blur", "contrast",
                 "pixelate", "jpeg_compression"):  # fmt: skip
        np.testing.assert_allclose(at[name][:, -1], FLAT, atol=1e-6, err_msg=name)
    # Contrast scales the deviation from the mean (a convex combination: never clipped).
    mean = digits64.mean(axis=(1, 2), keepdims=True)
    for s, c in enumerate(C.parameters("contrast", (8, 8, 1))):
        np.testing.assert_allclose(at["contrast"][s, :64], (digits64 - mean) * c + mean, atol=1e-6)
    # Impulse noise sets values to 0 or 1 only; speckle noise keeps black pixels black.
    out, changed = at["impulse_noise"][4, :64], at["impulse_noise"][4, :64] != digits64
    assert changed.any() and set(np.unique(out[changed])) <= {0.0, 1.0}
    black = digits64 == 0
    assert black.any() and np.all(at["speckle_noise"][4, :64][black] == 0)


def test_keys_jit_and_vmap(digits64):
    x = digits64[:3]
    k1, k2 = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
    single = jax.jit(lambda k, xi, s: C.apply(k, xi, "motion_blur", s))
    a = single(k1, x[0], 4)
    np.testing.assert_array_equal(a, single(k1, x[0], 4))
    assert float(jnp.abs(a - single(k2, x[0], 4)).max()) > 0.01
    eager = C.apply(k1, x[0], "motion_blur", 4)
    np.testing.assert_allclose(a, eager, **tol(np.float32, 4))
    keys = jax.random.split(k1, 3)
    batched = jax.jit(jax.vmap(single, in_axes=(0, 0, None)))(keys, x, 4)
    looped = np.stack([single(k, xi, 4) for k, xi in zip(keys, x, strict=True)])
    np.testing.assert_allclose(batched, looped, **tol(np.float32, 4))


def test_small_images_use_their_own_table_and_cifar_sizes_the_benchmark_values():
    assert C.parameters("pixelate", (8, 8, 1)) == C.SMALL["pixelate"]
    assert C.parameters("pixelate", (32, 32, 3)) == (0.95, 0.9, 0.85, 0.75, 0.65)
    assert C.parameters("gaussian_noise", (8, 8, 1)) == C.CIFAR["gaussian_noise"]
    assert "saturate" not in C.names_for(1) and C.names_for(3) == C.NAMES


@pytest.mark.parametrize(
    "x,name,severity,match",
    [
        (np.zeros((8, 8, 1)), "fog", 1, "Unknown corruption 'fog'; choose one of gaussian_noise"),
        (np.zeros((8, 8, 1)), "contrast", 0, "severity must be an integer from 1 to 5; got 0"),
        (np.zeros((8, 8, 1)), "contrast", 6, "from 1 to 5; got 6"),
        (np.zeros((8, 8, 1)), "contrast", True, "from 1 to 5; got True"),
        (np.zeros((8, 8)), "contrast", 1, r"ONE image of shape \(H, W, C\).*x\[\.\.\., None\]"),
        (np.zeros((2, 8, 8, 1)), "contrast", 1, "It looks like a batch"),
        (np.full((8, 8, 1), 2.0), "contrast", 1, r"values in \[0, 1\]; got values in \[2, 2\]"),
        (np.zeros((8, 8, 1), np.uint8), "contrast", 1, "floating-point image"),
        (np.zeros((8, 8, 1)), "saturate", 1, "saturate needs a colour image"),
    ],
)
def test_bad_input_says_what_to_do(x, name, severity, match):
    with pytest.raises(ValueError, match=match):
        C.apply(jax.random.PRNGKey(0), x, name, severity)


# ------------------------------------------------------------------ TFDS benchmarks


def test_corruption_benchmarks_through_tfds_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        c10 = data.load("cifar10_corrupted/gaussian_noise_3")
        mn = data.load("mnist_corrupted/shot_noise", max_train=4)
    assert c10.x_test.shape == (6, 32, 32, 3) and c10.x_train.shape == (0, 32, 32, 3)
    assert c10.shape == (32, 32, 3) and c10.num_classes == 10
    assert 0.0 <= c10.x_test.min() and c10.x_test.max() <= 1.0
    assert mn.x_train.shape == (4, 28, 28, 1) and mn.x_test.shape == (6, 28, 28, 1)


@pytest.mark.parametrize(
    "name,match",
    [
        ("cifar10_corrupted", "needs a config, e.g. 'cifar10_corrupted/gaussian_noise_3'"),
        ("cifar10_corrupted/fog_6", "Unknown cifar10_corrupted config 'fog_6'"),
        ("mnist_corrupted/blur", "Unknown mnist_corrupted config 'blur'; use one of identity"),
        ("mnist_corrupted", "default config 'identity'"),
    ],
)
def test_bad_corruption_benchmark_configs_list_the_valid_ones(name, match):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=re.escape(match)):
        data.load(name)
