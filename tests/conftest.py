import os
import sys

# Keep tests on one CPU device and quiet; tests that need several devices
# start a subprocess with their own XLA_FLAGS.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

# One persistent XLA compilation cache for the whole run, shared by the xdist workers and
# the notebook kernels they start (they inherit the environment): many processes compile
# the same programs (a digits CNN's training step, DeepFool on it). A fresh folder per run,
# removed at the end, so nothing carries over between runs.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="bgeom-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

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
