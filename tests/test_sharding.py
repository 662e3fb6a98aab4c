"""bgeom.sweep: equal to jit(vmap) on one device, on 4 devices and across 2 processes.

The test process keeps one CPU device; the 4-device and 2-process checks run in
subprocesses with their own ``XLA_FLAGS`` (and ``jax.distributed`` on
127.0.0.1). The 2-process job (process 0 configured explicitly, process 1
from simulated Slurm variables) also runs a tiny ``bgeom suite`` through the CLI
flags and records every file process 1 tries to write (it must write none).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import affine_classifier, affine_margin, tol

import bgeom
from bgeom import sharding

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("perturbation", "margin", "label", "adv_label", "iterations", "converged")


def _assert_close(a, b, scale=16.0):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u), np.asarray(v)
        assert u.shape == v.shape, (u.shape, v.shape)
        if np.issubdtype(u.dtype, np.floating):
            np.testing.assert_allclose(u, v, **tol(u.dtype, scale))
        else:
            np.testing.assert_array_equal(u, v)


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The small smooth classifier every subprocess builds identically, by hand (no
# model initialisation to compile): a softplus MLP 16 -> 12 -> 3, three members.
MODEL = """
from bgeom import deepfool
def apply_fn(p, x):
    return p["w2"] @ jax.nn.softplus(4.0 * (p["w1"] @ x.ravel() + p["b1"])) / 4.0 + p["b2"]
def mlp(seed):
    rng = np.random.default_rng(seed)
    shapes = {"w1": (12, 16), "b1": (12,), "w2": (3, 12), "b2": (3,)}
    return {k: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-1]), jnp.float32)
            for k, s in shapes.items()}
params = mlp(0)
stacked = jax.tree.map(lambda *a: jnp.stack(a), *[mlp(s) for s in (1, 2, 3)])
xs = np.random.default_rng(0).uniform(size=(N, 4, 4, 1)).astype(np.float32)
f = lambda p, x: deepfool(apply_fn, p, x, max_iter=20)
# A cheap per-example function (a forward pass) for the 2-process sweep: the
# suite run there sweeps DeepFool itself.
g = lambda p, x: {"logits": apply_fn(p, x), "label": jnp.argmax(apply_fn(p, x))}
"""


def _reference(n: int, fn: str = "f"):
    """What the subprocesses must reproduce: single-device jit(vmap), here."""
    scope = {"jax": jax, "jnp": jnp, "np": np, "N": n}
    exec(MODEL, scope)
    f, params, stacked, xs = scope[fn], scope["params"], scope["stacked"], scope["xs"]
    single = jax.jit(jax.vmap(f, in_axes=(None, 0)))(params, xs)
    grid = jax.jit(jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None)))(stacked, xs)
    return single, grid


def _load(path: Path, prefix: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {f: z[f"{prefix}/{f}"] for f in FIELDS}


def _as_dict(result) -> dict[str, np.ndarray]:
    return {f: np.asarray(getattr(result, f)) for f in FIELDS}


# --------------------------------------------------------------------------- one device


def _toy(p, x, scale):
    """A per-example function with a pytree result (tuple, dict, ints)."""
    h = jnp.tanh(p["w"] @ x.ravel() + p["b"]) * scale
    return {"h": h, "norm": jnp.linalg.norm(h), "arg": jnp.argmax(h)}, x.sum(-1)


@pytest.mark.parametrize("batch_size", [None, 1, 4, 5, 100])
def test_sweep_equals_jit_vmap_on_one_device(batch_size):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 12)), "b": rng.standard_normal(3)}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    xs = rng.uniform(size=(11, 2, 2, 3)).astype(np.float32)
    ref = jax.jit(jax.vmap(_toy, in_axes=(None, 0, None)))(params, xs, 2.0)
    out, stats = bgeom.sweep(
        _toy,
        params,
        xs,
        2.0,
        in_axes=(None, 0, None),
        batch_size=batch_size,
        progress=False,
        return_stats=True,
    )
    _assert_close(out, ref, scale=1.0)
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(out))
    chunk = 11 if batch_size is None else min(batch_size, 11)
    assert stats.chunk_size == chunk
    assert stats.chunks == -(-11 // chunk)
    assert stats.padding == stats.chunks * chunk - 11
    assert (stats.devices, stats.processes, stats.examples) == (1, 1, 11)


def test_sweep_deepfool_ensemble_on_one_device():
    apply_fn, _ = affine_classifier(0, 5)
    xs = np.random.default_rng(1).uniform(size=(7, 4, 4, 1)).astype(np.float32)
    f = lambda p, x: bgeom.deepfool(apply_fn, p, x)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[affine_classifier(s, 5)[1] for s in range(3)])
    grid, stats = bgeom.sweep(
        f,
        stacked,
        xs,
        in_axes=(None, 0),
        member_axes=(0, None),
        batch_size=4,
        progress=False,
        return_stats=True,
    )
    assert grid.margin.shape == (3, 7) and grid.perturbation.shape == (3, 7, 4, 4, 1)
    assert stats.members == 3 and stats.chunks == 2
    ref = jax.jit(jax.vmap(jax.vmap(f, in_axes=(None, 0)), in_axes=(0, None)))(stacked, xs)
    _assert_close(grid, ref)
    assert bool(np.all(grid.converged))
    # Member 1 is the affine classifier of seed 1: its closed-form margins.
    _, params1 = affine_classifier(1, 5)
    for i in range(len(xs)):
        margin, _ = affine_margin(params1, xs[i], candidates=5, overshoot=0.02)
        np.testing.assert_allclose(grid.margin[1, i], margin, **tol(np.float32, 16))


def test_sweep_compiles_once_for_every_chunk():
    traces = []

    def fn(x):
        traces.append(1)  # runs once per trace, not per call
        return x * 2.0

    out = bgeom.sweep(fn, np.arange(10, dtype=np.float32), batch_size=3, progress=False)
    np.testing.assert_array_equal(out, 2.0 * np.arange(10))
    assert len(traces) == 1
    # A second sweep of the same function and shapes reuses the compiled one.
    out = bgeom.sweep(fn, np.arange(10, 20, dtype=np.float32), batch_size=3, progress=False)
    np.testing.assert_array_equal(out, 2.0 * np.arange(10, 20))
    assert len(traces) == 1
    # Other shapes compile anew.
    bgeom.sweep(fn, np.zeros((4, 2), np.float32), batch_size=3, progress=False)
    assert len(traces) == 2


def test_sweep_reads_only_the_rows_it_needs():
    class Rows:
        """A lazily indexed array that records the row ranges read."""

        def __init__(self, a):
            self.a, self.shape, self.reads = a, a.shape, []

        def __getitem__(self, index):
            self.reads.append((index.start, index.stop))
            return self.a[index]

    rows = Rows(np.arange(10, dtype=np.float32)[:, None])
    out = bgeom.sweep(lambda x: x + 1.0, rows, batch_size=4, progress=False)
    np.testing.assert_array_equal(out[:, 0], np.arange(10) + 1.0)
    # Chunks [0, 4), [4, 8), [8, 10) and one padding row (a copy of row 9).
    assert rows.reads == [(0, 4), (4, 8), (8, 10), (9, 10)]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bgeom.sweep(lambda x: x, np.zeros((0, 2))), "no examples"),
        (lambda: bgeom.sweep(lambda x, y: x, np.zeros((3, 2)), np.zeros((4, 2))), "disagree"),
        (lambda: bgeom.sweep(lambda x: x, np.zeros((3, 2)), in_axes=1), "leading axis"),
        (lambda: bgeom.sweep(lambda x: x, np.zeros((3, 2)), in_axes=None), "maps no argument"),
        (lambda: bgeom.sweep(lambda x: x, np.zeros((3, 2)), batch_size=0), "batch_size"),
        (lambda: bgeom.sweep(lambda x: x, np.zeros((3, 2)), mesh="cpu"), "Mesh"),
        (lambda: bgeom.sweep(lambda x: x, 3.0), "leading axis"),
        (lambda: bgeom.sweep(lambda x, y: x, np.zeros((3,)), 1.0, in_axes=(0,)), "entries"),
        (
            lambda: bgeom.sweep(lambda p, x: x, np.zeros((3,)), np.zeros(3), member_axes=(0, 0)),
            "both examples and members",
        ),
    ],
)
def test_sweep_rejects_misuse(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_initialize_rejects_bad_settings_before_connecting():
    jax.devices()  # the test process's backend is running
    for kwargs, match in [
        ({"coordinator_address": "no-port"}, "HOST:PORT"),
        ({"num_processes": 0}, "num_processes"),
        ({"process_id": 2, "num_processes": 2}, "below num_processes"),
        ({"process_id": -1}, "process_id"),
        # Valid settings, but too late: JAX is already computing in this process.
        (
            {"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 0},
            "before any JAX computation",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            sharding.initialize(**kwargs)
    assert sharding.process_info() == (0, 1)


def test_cli_distributed_flags_give_one_line_errors(tmp_path, capsys):
    from bgeom import cli

    jax.devices()  # JAX is running in this process: too late to start jax.distributed
    out = str(tmp_path / "run")
    assert cli.main(["suite", "--out", out, "--num-processes", "0"]) == 2
    assert "num_processes must be >= 1" in capsys.readouterr().err
    assert cli.main(["margins", "--out", out, "--distributed"]) == 2
    assert "before any JAX computation" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_suite_map_is_a_sweep(tmp_path):
    from bgeom import suite

    ctx = suite.SuiteContext({"models": {}, "datasets": {}}, tmp_path, progress=False)
    xs = np.random.default_rng(2).uniform(size=(9, 3)).astype(np.float32)
    w = jnp.arange(3.0)
    out = ctx.map(lambda w, x: (x @ w, x * 0 + 1), w, xs, in_axes=(None, 0), batch_size=4)
    _assert_close(out, jax.vmap(lambda x: (x @ w, x * 0 + 1))(xs), scale=1.0)


# --------------------------------------------------------------------------- 4 devices

FOUR_DEVICES = """
import sys
import jax, jax.numpy as jnp, numpy as np
from bgeom import sharding
assert jax.device_count() == 4, jax.devices()
N = 10
{model}
out = {{}}
res, st = sharding.sweep(
    f, params, xs, in_axes=(None, 0), batch_size=6, progress=False, return_stats=True
)
out.update({{f"chunked/{{k}}": np.asarray(v) for k, v in res._asdict().items()}})
out["chunked/stats"] = np.asarray([st.devices, st.chunk_size, st.chunks, st.padding])
res, st = sharding.sweep(
    f, stacked, xs, in_axes=(None, 0), member_axes=(0, None), batch_size=6, progress=False,
    return_stats=True,
)
out.update({{f"members/{{k}}": np.asarray(v) for k, v in res._asdict().items()}})
out["members/stats"] = np.asarray([st.devices, st.chunk_size, st.chunks, st.padding])
# The engine: 8 slots split over the 4 devices (2 each), compaction across them.
import bgeom
res, st = bgeom.batched(deepfool)(
    apply_fn, params, xs, max_iter=20, batch_size=8, return_stats=True
)
out.update({{f"engine/{{k}}": np.asarray(v) for k, v in res._asdict().items()}})
out["engine/stats"] = np.asarray([st.devices, st.examples, st.steps])
blocks = bgeom.subspaces.dct_blocks((4, 4, 1), 2)
res = bgeom.subspace_margins(apply_fn, params, xs, blocks, max_iter=20, batch_size=8)
out["subspace/margin"] = np.asarray(res.margin)
# Lanczos under a sweep: with as many forced devices as cores, jaxlib's batched
# CPU eigh used to deadlock XLA's intra-op thread pool (spectra._tridiagonal_eigh).
cnn_fn, cnn_params = bgeom.models.functional(
    bgeom.models.create("cnn", (8, 8, 1), 10, activation="softplus", beta=5.0)
)
images = np.random.default_rng(0).uniform(size=(8, 8, 8, 1)).astype(np.float32)
curv = lambda p, x: bgeom.boundary_curvature(cnn_fn, p, x, k=4, num_matvecs=63)
res = sharding.sweep(curv, cnn_params, images, in_axes=(None, 0), progress=False)
out["curvature/curvatures"] = np.asarray(res.curvatures)
try:
    bgeom.batched(deepfool)(apply_fn, params, xs, batch_size=2)
except ValueError as e:
    assert "number of devices (4)" in str(e), e
else:
    raise AssertionError("batch_size 2 on 4 devices was accepted")
np.savez(sys.argv[1], **out)
"""


def test_sweep_on_four_devices_equals_single_device_vmap(tmp_path):
    script = tmp_path / "four.py"
    script.write_text(FOUR_DEVICES.format(model=MODEL))
    result = tmp_path / "four.npz"
    done = subprocess.run(
        [sys.executable, str(script), str(result)],
        env=_env(4),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single, grid = _reference(10)  # N = 10: not a multiple of 4
    with np.load(result) as z:
        # 4 devices; batch 6 is rounded up to chunks of 8: 2 chunks, 6 padded examples.
        np.testing.assert_array_equal(z["chunked/stats"], [4, 8, 2, 6])
        np.testing.assert_array_equal(z["members/stats"], [4, 8, 2, 6])
    _assert_close(_load(result, "chunked"), _as_dict(single))
    _assert_close(_load(result, "members"), _as_dict(grid))
    assert bool(np.all(single.converged))
    # The engine's slots really were split over the 4 devices, and it agrees
    # with jit(vmap) on one device (sweep's reference) and with its own
    # single-device run.
    with np.load(result) as z:
        devices, examples, steps = z["engine/stats"]
        margin = z["subspace/margin"]
    assert (devices, examples) == (4, 10)
    assert steps == int(np.sum(single.iterations))
    _assert_close(_load(result, "engine"), _as_dict(single))
    scope = {"jax": jax, "jnp": jnp, "np": np, "N": 10}
    exec(MODEL, scope)
    blocks = bgeom.subspaces.dct_blocks((4, 4, 1), 2)
    here = bgeom.subspace_margins(
        scope["apply_fn"], scope["params"], scope["xs"], blocks, max_iter=20
    )
    assert margin.shape == (10, len(blocks))
    np.testing.assert_allclose(margin, here.margin, **tol(margin.dtype, 16.0))
    # The curvature sweep finished (it used to hang) and agrees with one device.
    cnn_fn, cnn_params = bgeom.models.functional(
        bgeom.models.create("cnn", (8, 8, 1), 10, activation="softplus", beta=5.0)
    )
    images = np.random.default_rng(0).uniform(size=(8, 8, 8, 1)).astype(np.float32)
    one = jax.jit(
        jax.vmap(lambda x: bgeom.boundary_curvature(cnn_fn, cnn_params, x, k=4, num_matvecs=63))
    )(images)
    with np.load(result) as z:
        np.testing.assert_allclose(z["curvature/curvatures"], one.curvatures, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- 2 processes

TWO_PROCESSES = """
import builtins, io, json, os, sys
pid, port, work = int(sys.argv[1]), sys.argv[2], sys.argv[3]
from bgeom import sharding
if pid == 0:
    info = sharding.initialize(f"127.0.0.1:{{port}}", 2, 0)
else:  # every setting detected by JAX from a (simulated) Slurm environment, as under srun
    info = sharding.initialize()
assert info == (pid, 2), info
import jax, jax.numpy as jnp, numpy as np
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
N = 7
{model}

class Rows:
    def __init__(self, a):
        self.a, self.shape, self.reads = a, a.shape, []
    def __getitem__(self, index):
        self.reads.append([index.start, index.stop])
        return self.a[index]

rows = Rows(xs)
res, st = sharding.sweep(
    g, params, rows, in_axes=(None, 0), batch_size=4, progress=False, return_stats=True
)
grid = sharding.sweep(
    g, stacked, xs, in_axes=(None, 0), member_axes=(0, None), batch_size=4, progress=False
)
out = {{f"single/{{k}}": np.asarray(v) for k, v in res.items()}}
out.update({{f"members/{{k}}": np.asarray(v) for k, v in grid.items()}})
out["stats"] = np.asarray([st.devices, st.processes, st.chunk_size, st.chunks, st.padding])

# Batched host-side work (the pattern of find_paths): each process runs its share.
seen = []
def host(a, b):
    seen.append(np.asarray(a).tolist())
    return {{"sum": np.asarray(a) + np.asarray(b), "pid": np.full(len(a), pid)}}
split = sharding.split_over_processes(host, np.arange(5.0), 10.0 * np.arange(5.0))
out["split/sum"], out["split/pid"], out["split/seen"] = split["sum"], split["pid"], np.asarray(seen)
np.savez(os.path.join(work, f"sweep{{pid}}.npz"), **out)

# The suite through the CLI flags (jax.distributed is running: the same settings
# are accepted again; process 1 gives --distributed alone, as under srun).
# Process 1 records every write it attempts in the run folder.
run = os.path.join(work, "run")
writes = []
if pid != 0:
    def watch(fn):
        def wrapped(path, *args, **kwargs):
            mode = args[0] if args else kwargs.get("mode", "r")
            if str(os.fspath(path)).startswith(run) and any(c in str(mode) for c in "wax+"):
                writes.append(str(path))
            return fn(path, *args, **kwargs)
        return wrapped
    builtins.open = io.open = watch(io.open)
    for name in ("replace", "rename", "mkdir", "makedirs", "remove"):
        original = getattr(os, name)
        def spy(path, *args, original=original, **kwargs):
            # mkdir of an existing folder (exist_ok) changes nothing.
            if str(os.fspath(path)).startswith(run) and not os.path.isdir(path):
                writes.append(str(path))
            return original(path, *args, **kwargs)
        setattr(os, name, spy)
from bgeom import cli
flags = (
    ["--coordinator-address", f"127.0.0.1:{{port}}", "--num-processes", "2", "--process-id", "0"]
    if pid == 0
    else ["--distributed"]
)
status = cli.main([
    "suite", "--config", os.path.join(work, "tiny.toml"), "--out", run, "--no-progress", *flags
])
with open(os.path.join(work, f"proc{{pid}}.json"), "w") as fh:
    json.dump({{"status": status, "reads": rows.reads, "writes": writes}}, fh)
"""

TINY = """
name = "tiny"
[datasets.d]
name = "digits"
max_train = 160
max_test = 40

[models.m]
dataset = "d"
model = "mlp"
activation = "softplus"
beta = 4.0
options = { hidden = [16] }
train = { epochs = 2, batch_size = 32 }

[[probes]]
probe = "margins"
samples = 11
batch_size = 4
examples = 2

[[probes]]
probe = "connectivity"    # find_paths: the pairs split over the 2 processes
pairs = 3
kinds = ["natural"]
max_anchors = 3
samples = 20
verify_samples = 100
grid = 5
examples = 1
"""


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    work = tmp_path_factory.mktemp("two")
    (work / "two.py").write_text(TWO_PROCESSES.format(model=MODEL))
    (work / "tiny.toml").write_text(TINY)
    port = str(_free_port())
    procs = []
    start = time.time()
    # Process 0 gets explicit settings, process 1 the variables srun sets (JAX's
    # Slurm detection reads them; JAX_COORDINATOR_PORT overrides its port choice).
    slurm = {
        "SLURM_JOB_ID": "1",
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
        "JAX_COORDINATOR_PORT": port,
    }
    for pid in (0, 1):
        env = _env(2)  # two local devices per process: 4 in all
        env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "OMPI_"))}
        if pid == 1:
            env.update(slurm)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(work / "two.py"), str(pid), port, str(work)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1, 400 - (time.time() - start))))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return work, procs, outputs


def test_two_processes_sweep_agrees_with_single_process(two_processes):
    work, procs, outputs = two_processes
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    single, grid = _reference(7, "g")
    assert grid["logits"].shape == (3, 7, 3)
    for pid in (0, 1):
        with np.load(work / f"sweep{pid}.npz") as z:
            # 4 devices over 2 processes; chunks of 4, 2 chunks, 1 padded example.
            np.testing.assert_array_equal(z["stats"], [4, 2, 4, 2, 1])
            for name, ref in (("single", single), ("members", grid)):
                _assert_close({k: z[f"{name}/{k}"] for k in ref}, dict(ref))
    # Each process read only the rows of its own devices: process 0 the first
    # half of each chunk, process 1 the second half (and the padding row).
    # One callback per device (one row each): rows 0-1 and 4-5 live on process
    # 0; rows 2-3, 6 and the padding (a copy of row 6) on process 1.
    reads = [json.loads((work / f"proc{pid}.json").read_text())["reads"] for pid in (0, 1)]
    assert sorted(reads[0]) == [[0, 1], [1, 2], [4, 5], [5, 6]]
    assert sorted(reads[1]) == [[2, 3], [3, 4], [6, 7], [6, 7]]


def test_two_processes_split_host_work_and_share_the_result(two_processes):
    work, procs, outputs = two_processes
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # 5 rows over 2 processes: shares of 3, process 1's padded with a copy of row 4.
    for pid, share in ((0, [[0.0, 1.0, 2.0]]), (1, [[3.0, 4.0, 4.0]])):
        with np.load(work / f"sweep{pid}.npz") as z:
            np.testing.assert_array_equal(z["split/seen"], share)
            np.testing.assert_array_equal(z["split/sum"], 11.0 * np.arange(5))
            np.testing.assert_array_equal(z["split/pid"], [0, 0, 0, 1, 1])


def test_two_process_suite_writes_once_and_agrees(two_processes):
    work, procs, outputs = two_processes
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    records = [json.loads((work / f"proc{pid}.json").read_text()) for pid in (0, 1)]
    assert [r["status"] for r in records] == [0, 0]
    assert records[1]["writes"] == []  # only process 0 writes
    assert "probe margins: done" in outputs[0][0]
    assert "report:" in outputs[0][0]

    # ... and only process 0 logs (process 1's stdout holds Gloo's connection lines only;
    # Gloo's C++ logger may split one of them, so they are recognised by their words too).
    def gloo(line):
        return line.startswith("[Gloo]") or "peer ranks" in line or not line.strip()

    assert [line for line in outputs[1][0].splitlines() if not gloo(line)] == []
    run = work / "run"
    for path in ("config.json", "report.html", "results/margins.json", "models/m/summary.json"):
        assert (run / path).exists(), path
    assert "probe connectivity: done" in outputs[0][0]
    conn = np.load(run / "results" / "connectivity.npz")
    assert len(conn["m/connected"]) == 3  # both processes' shares, gathered

    # The gathered margins equal a single-process computation with the same model.
    from bgeom import data, train

    ds = data.load("digits", max_train=160, max_test=40)
    model = train.fit(
        "mlp",
        ds,
        config=train.recipe("default", epochs=2, batch_size=32),
        seeds=0,
        checkpoint_dir=run / "models" / "m",
        progress=False,
        activation="softplus",
        beta=4.0,
        hidden=[16],
    )
    x = ds.x_test[:11]
    ref = jax.jit(jax.vmap(lambda xi: bgeom.deepfool(model.apply_fn, model.params, xi)))(x)
    with np.load(run / "results" / "margins.npz") as z:
        got = {f: z[f"m/{f}"][0] for f in ("margin", "label", "adv_label", "iterations")}
    assert np.all(np.isfinite(got["margin"])) and np.all(got["adv_label"] != got["label"])
    _assert_close(got, {f: np.asarray(getattr(ref, f)) for f in got})
