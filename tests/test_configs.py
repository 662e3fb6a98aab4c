"""Every config shipped in configs/ is valid and builds against mock TFDS data at toy size:
the config and every probe's options validate, each dataset loads (tfds mock data), and each
model is built for that dataset's shape with logits of the right size."""

from pathlib import Path

import jax
import numpy as np
import pytest

from bgeom import augment, models, suite
from bgeom.probes.base import SuiteContext

tfds = pytest.importorskip("tensorflow_datasets")

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_configs_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"mnist", "cifar10"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates_and_builds_at_toy_size(path, tmp_path):
    text = path.read_text()
    assert "Run time:" in text and "estimate" in text.lower()  # how long it takes, and how known
    config = suite.load_config(path)  # every key, model, transform and probe option checked
    ctx = SuiteContext(config, tmp_path, False)
    with tfds.testing.mock_data(num_examples=6):
        datasets = {key: ctx.dataset(key) for key in config["datasets"]}
    built = {}
    for key, spec in config["models"].items():
        ds = datasets[spec["dataset"]]
        assert ds.x_train.shape[1:] == ds.x_test.shape[1:] and ds.num_classes == 10
        assert 0.0 <= ds.x_test.min() and ds.x_test.max() <= 1.0
        arch = (spec["model"], spec["activation"], ds.shape)
        if arch not in built:  # one build per architecture: the forward pass is shape-checked
            model = models.create(
                spec["model"], ds.shape, ds.num_classes,
                activation=spec["activation"], beta=spec["beta"], **spec["options"],
            )  # fmt: skip
            apply_fn, params = models.functional(model)
            out = jax.eval_shape(apply_fn, params, np.asarray(ds.x_test[0]))
            assert out.shape == (ds.num_classes,), key
            built[arch] = True
        transform = augment.get(spec["augment"])
        if transform is not None:
            assert transform.inputs(ds.x_test[:2]).shape == ds.x_test[:2].shape
    for probe in config["probes"]:
        assert set(probe["models"]) <= set(config["models"]), probe["probe"]
