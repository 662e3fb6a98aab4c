import os
import sys

# Keep tests on one CPU device and quiet; tests that need several devices
# start a subprocess with their own XLA_FLAGS.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    from bgeom import data

    return data.load("digits")


@pytest.fixture(scope="session")
def digits_cnn(digits):
    """The small CNN trained on digits with the default recipe (shared by the tests)."""
    import time

    from bgeom import train

    t0 = time.time()
    result = train.fit("cnn", digits, seeds=0, progress=False)
    result.seconds = time.time() - t0
    return result
