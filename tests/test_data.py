import numpy as np
import pytest

from bgeom import data


def test_digits_shapes_ranges_and_split(digits):
    assert digits.x_train.shape == (1437, 8, 8, 1) and digits.x_test.shape == (360, 8, 8, 1)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
    assert digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    assert digits.num_classes == 10 and digits.shape == (8, 8, 1)
    # stratified: every class has 35-37 test images
    assert set(np.bincount(digits.y_test)) <= {35, 36, 37}


def test_digits_is_deterministic(digits):
    again = data.load("digits")
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)


def test_digits_resize():
    d = data.load("digits", size=28, max_train=50, max_test=20)
    assert d.x_train.shape == (50, 28, 28, 1) and d.x_test.shape == (20, 28, 28, 1)
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    # resizing back to 8x8 recovers the original image (the ink stays where it was)
    small = data.load("digits", max_train=50).x_train
    back = data.resize(d.x_train, 8)
    corr = np.corrcoef(back.ravel(), small.ravel())[0, 1]
    assert corr > 0.95


@pytest.mark.parametrize("shape", [(16, 16, 1), (12, 10, 3)])
def test_synthetic_puts_all_information_along_u(shape):
    s = data.load("synthetic", shape=shape, n_train=200, n_test=40, eps=0.3, sigma=0.2, seed=3)
    u = s.info["direction"].reshape(-1).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-6)
    x = s.x_train.reshape(len(s.x_train), -1).astype(np.float64) - 0.5
    coord = x @ u
    np.testing.assert_allclose(coord, 0.3 * (2 * s.y_train - 1), atol=1e-5)
    # the noise is orthogonal to u and has the requested scale
    residual = x - np.outer(coord, u)
    np.testing.assert_allclose(residual @ u, 0.0, atol=1e-5)
    assert abs(residual.std() - 0.2) < 0.02
    assert np.bincount(s.y_train).tolist() == [100, 100]
    again = data.load("synthetic", shape=shape, n_train=200, n_test=40, eps=0.3, sigma=0.2, seed=3)
    np.testing.assert_array_equal(again.x_train, s.x_train)


def test_synthetic_custom_direction():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((8, 8, 1))
    s = data.synthetic((8, 8, 1), n_train=10, n_test=4, direction=d)
    np.testing.assert_allclose(s.info["direction"], d / np.linalg.norm(d), rtol=1e-5, atol=1e-6)


def test_dct_atom_is_orthonormal():
    a = data.dct_atom((8, 8, 2), 1, 2).ravel()
    b = data.dct_atom((8, 8, 2), 3, 0).ravel()
    np.testing.assert_allclose(a @ a, 1.0, rtol=1e-6)
    np.testing.assert_allclose(a @ b, 0.0, atol=1e-6)


def test_tfds_through_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        m = data.load("mnist", max_train=10)
    assert m.x_train.shape == (10, 28, 28, 1) and m.x_test.shape == (12, 28, 28, 1)
    assert m.x_train.dtype == np.float32 and 0.0 <= m.x_train.min() and m.x_train.max() <= 1.0
    assert m.y_train.dtype == np.int32 and m.num_classes == 10


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(ValueError, match="bgeom prepare cifar10"):
        data.load("cifar10", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("no_such_dataset_xyz", {}, "Unknown dataset"),
        ("", {}, "non-empty"),
        ("digits", {"eps": 1.0}, "no options"),
        ("synthetic", {"size": 8}, "shape="),
        ("synthetic", {"shape": (8, 8)}, r"\(H, W, C\)"),
    ],
)
def test_bad_dataset_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load(name, **kwargs)
