"""Sweeps at scale: per-example functions sharded over devices and hosts.

``sweep(fn, *arrays)`` computes ``jax.jit(jax.vmap(fn))(*arrays)`` with the
sample axis split over every device of a ``jax.sharding.Mesh`` (all devices by
default), in fixed-size chunks so memory stays bounded, with a progress bar.
Sizes that do not divide evenly are padded and the padding is dropped. One
compiled function serves every chunk. A vmapped parameter axis (a seed
ensemble) can be swept together with the sample axis (``member_axes``).

Several hosts: start every process with ``initialize`` (explicit coordinator,
or detected from Slurm / Open MPI by ``jax.distributed.initialize``), then call
``sweep`` with the same arguments on every process. The mesh then spans the
devices of all processes; each process reads and transfers only the rows its
own devices compute, and the result is gathered so that every process holds
all of it.

Why a global mesh rather than independent per-process loops: one compiled
SPMD program keeps every process in lock step (no process can run ahead and
write partial results), and the gather at the end of each chunk is the only
communication.

The iterative searches (DeepFool and the others ``bgeom.batched`` takes) do
not go through ``sweep``: under ``vmap`` every example would run as many
steps as the slowest. ``bgeom.batched`` scales them the same way instead: its
slots are split over every local device, and a multi-process run splits the
examples over the processes (``split_over_processes``), each compacting its
own share (docs/engine.md).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bgeom import _checks

__all__ = [
    "ProcessInfo",
    "SweepStats",
    "default_mesh",
    "initialize",
    "on_process_zero",
    "process_info",
    "split_over_processes",
    "sweep",
]

# Mesh axis name of the default mesh: the sample axis is split along it.
SAMPLE_AXIS = "samples"

# How long processes other than 0 wait for process 0 (training a model can take
# hours on real datasets); the heartbeat of jax.distributed still detects a
# process that died.
_WAIT_MS = 7 * 24 * 3600 * 1000


class SweepStats(NamedTuple):
    """How a sweep was run (``sweep(..., return_stats=True)``).

    Attributes:
      examples: number of examples mapped over (``n``).
      members: size of the ensemble axis, or ``None`` without one.
      devices: devices the result was computed on (the sample axis split over them).
      processes: JAX processes taking part.
      chunk_size: examples per compiled call, over all devices together.
      chunks: number of compiled calls.
      padding: padded examples computed and then dropped, over all chunks.
      compile_seconds: time to lower and compile the one function (0 when a
        previous sweep with the same ``fn`` object and shapes compiled it).
      seconds: wall time of the whole sweep, compilation included.
    """

    examples: int
    members: int | None
    devices: int
    processes: int
    chunk_size: int
    chunks: int
    padding: int
    compile_seconds: float
    seconds: float


class ProcessInfo(NamedTuple):
    """This process's index and the number of JAX processes."""

    index: int
    count: int


# --------------------------------------------------------------------------- processes


def _distributed_state() -> Any:
    from jax._src import distributed

    return distributed.global_state


def process_info() -> ProcessInfo:
    """This process's index and the process count, without starting a JAX backend.

    ``jax.process_index()`` initialises the backend (and on a GPU grabs its
    memory); the suite runner needs to know which process it is before that,
    so this reads the state ``jax.distributed.initialize`` left instead.
    """
    try:
        state = _distributed_state()
        if state.client is not None:
            return ProcessInfo(int(state.process_id), int(state.num_processes))
    except (ImportError, AttributeError):  # a JAX without that private state
        pass
    return ProcessInfo(jax.process_index(), jax.process_count())


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cluster_detection_method: str | None = None,
    timeout: int = 300,
) -> ProcessInfo:
    """Start ``jax.distributed`` so that several processes share one device mesh.

    Call it first thing in every process, before any JAX computation. Settings
    left ``None`` are detected by ``jax.distributed.initialize`` from the
    cluster environment (Slurm: ``srun``; Open MPI: ``mpirun``; TPU pods), so
    under ``srun`` no argument is needed. Calling it again with the same (or
    no) settings returns the running configuration.

    Args:
      coordinator_address: ``HOST:PORT`` of process 0, reachable from every process.
      num_processes: how many processes take part.
      process_id: this process's index, ``0 <= process_id < num_processes``.
      local_device_ids: restrict this process to these local devices.
      cluster_detection_method: passed to ``jax.distributed.initialize``
        (e.g. ``"mpi4py"``, or ``"deactivate"`` to detect nothing).
      timeout: seconds to wait for every process to connect.

    Returns:
      ``ProcessInfo(index, count)`` of this process.
    """
    if coordinator_address is not None:
        host, _, port = str(coordinator_address).rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"coordinator_address must look like HOST:PORT (e.g. 10.0.0.1:1234); "
                f"got {coordinator_address!r}."
            )
    if num_processes is not None:
        num_processes = _checks.check_positive_int(num_processes, "num_processes", "initialize")
    if process_id is not None:
        process_id = _checks.check_positive_int(process_id, "process_id", "initialize", 0)
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(
            f"process_id must be below num_processes: got process_id={process_id} with "
            f"num_processes={num_processes} (ids run 0 .. num_processes - 1)."
        )
    if not isinstance(timeout, int) or timeout < 1:
        raise ValueError(f"timeout must be a positive number of seconds; got {timeout!r}.")

    state = _distributed_state()
    if state.client is not None:
        running = ProcessInfo(int(state.process_id), int(state.num_processes))
        asked = (
            (coordinator_address, state.coordinator_address),
            (num_processes, running.count),
            (process_id, running.index),
        )
        if any(a is not None and a != b for a, b in asked):
            raise ValueError(
                "jax.distributed is already running with other settings "
                f"(coordinator {state.coordinator_address}, {running.count} processes, "
                f"process {running.index}); it can be started once per process."
            )
        return running

    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise ValueError(
            "jax.distributed must be started before any JAX computation: call "
            "bgeom.sharding.initialize(...) first thing in the program."
        )
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            cluster_detection_method=cluster_detection_method,
            initialization_timeout=timeout,
        )
    except ValueError as e:
        if "should be defined" in str(e) or "must be defined" in str(e):
            raise ValueError(
                "No cluster environment (Slurm srun, Open MPI mpirun, ...) was detected to "
                "fill in the missing jax.distributed settings: pass coordinator_address, "
                "num_processes and process_id (CLI: --coordinator-address HOST:PORT "
                f"--num-processes N --process-id I). ({e})"
            ) from None
        raise
    return process_info()


_ONCE_COUNTER = itertools.count()


def on_process_zero(fn: Callable[[], Any], name: str = "step") -> Any:
    """Run ``fn()`` on process 0 only; every other process waits for it.

    The value (JSON-serialisable) is returned on every process; an exception on
    process 0 is raised as ``RuntimeError`` on the others, so no process waits
    forever. Single-process: just ``fn()``. Every process must call this the
    same number of times in the same order (the calls are matched by count).
    Uses the key-value store of ``jax.distributed``, so no JAX backend is
    started (process 0 may train in a child process meanwhile).
    """
    info = process_info()
    if info.count == 1:
        return fn()
    client = _distributed_state().client
    key = f"bgeom/once/{next(_ONCE_COUNTER)}/{name}"
    if info.index == 0:
        try:
            value = fn()
        except BaseException as e:
            client.key_value_set(key, json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise
        client.key_value_set(key, json.dumps({"value": value}))
        return value
    message = json.loads(client.blocking_key_value_get(key, _WAIT_MS))
    if "error" in message:
        raise RuntimeError(f"process 0 failed at {name}: {message['error']}")
    return message["value"]


# --------------------------------------------------------------------------- sweep


def default_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, axis ``"samples"``."""
    return Mesh(np.asarray(jax.devices()), (SAMPLE_AXIS,))


def _axes(value: Any, count: int, name: str) -> tuple[int | None, ...]:
    axes = (value,) * count if value is None or isinstance(value, int) else tuple(value)
    if len(axes) != count:
        raise ValueError(
            f"sweep: {name} has {len(axes)} entries for {count} arguments; give one per "
            "argument (0 or None) or a single value for all."
        )
    for ax in axes:
        if ax is not None and (isinstance(ax, bool) or ax != 0):
            raise ValueError(
                f"sweep: {name} entries must be 0 (leading axis) or None; got {ax!r}. "
                "Move the axis to the front first (np.moveaxis)."
            )
    return axes


def _leading_size(tree: Any, what: str) -> int:
    sizes = set()
    for leaf in jax.tree.leaves(tree):
        shape = getattr(leaf, "shape", None)
        if shape is None or len(shape) == 0:
            raise ValueError(
                f"sweep: every leaf of an argument mapped over {what} needs a leading axis; "
                f"got {type(leaf).__name__} with shape {shape}. Mark it None in the axes "
                "to pass it whole."
            )
        sizes.add(int(shape[0]))
    if not sizes:
        raise ValueError(f"sweep: an argument mapped over {what} has no arrays in it.")
    if len(sizes) > 1:
        raise ValueError(
            f"sweep: the arrays mapped over {what} disagree on its size: {sorted(sizes)}; "
            "give them the same leading length."
        )
    return sizes.pop()


def _rows(a: Any, lo: int, hi: int, n: int) -> np.ndarray:
    """Rows ``lo:hi`` of ``a`` as NumPy, past ``n`` padded with copies of row ``n - 1``.

    Only these rows are read, so ``a`` may be any lazily indexed array (a
    memory map, a data source wrapper) and each process reads its share only.
    """
    real = min(hi, n)
    parts = [np.asarray(a[lo:real])] if real > lo else []
    if hi > real:
        last = np.asarray(a[n - 1 : n])
        parts.append(np.repeat(last, hi - max(lo, real), axis=0))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _place_chunk(a: Any, start: int, chunk: int, n: int, sharding: NamedSharding, multi: bool):
    """Rows ``start : start + chunk`` of ``a`` (padded past ``n``), sharded over the mesh."""
    if not multi:
        stop = min(start + chunk, n)
        if isinstance(a, jax.Array):  # stays on device
            part = a[start:stop]
            if stop - start < chunk:
                part = jnp.concatenate([part, jnp.repeat(a[n - 1 : n], chunk - (stop - start), 0)])
        else:
            part = _rows(a, start, start + chunk, n)
        return jax.device_put(part, sharding)
    shape = (chunk, *tuple(a.shape[1:]))

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        lo, hi, _ = index[0].indices(chunk)
        return _rows(a, start + lo, start + hi, n)[(slice(None), *index[1:])]

    return jax.make_array_from_callback(shape, sharding, shard)


def _replicate(tree: Any, sharding: NamedSharding, multi: bool) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    # Python scalars stay as they are (weakly typed, as under jax.jit).
    arrays = [i for i, a in enumerate(leaves) if isinstance(a, np.ndarray | np.generic | jax.Array)]
    placed = jax.device_put(  # one batched transfer for all leaves
        [np.asarray(leaves[i]) if multi else leaves[i] for i in arrays], sharding
    )
    for i, a in zip(arrays, placed, strict=True):
        leaves[i] = a
    return jax.tree.unflatten(treedef, leaves)


def _fetch(out: Any, multi: bool) -> Any:
    if multi:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(out, tiled=True)
    return jax.device_get(out)


# Compiled sweeps of the last few (fn, axes, mesh, chunk signature): calling
# sweep again with the same function object and shapes does not recompile.
# Small, because each entry holds fn (and what it closes over) alive.
_COMPILED: dict[Any, Any] = {}
_COMPILED_MAX = 8


def _signature(fn: Callable, axes: Any, maxes: Any, mesh: Mesh, call: list[Any]) -> Any:
    def leaf(a: Any) -> Any:
        if isinstance(a, jax.Array):
            return (a.shape, a.dtype, a.weak_type, a.sharding)
        return ("python", type(a))  # traced like jax.jit does: by type, not value

    leaves, treedef = jax.tree.flatten(call)
    return (fn, axes, maxes, mesh, treedef, tuple(leaf(a) for a in leaves))


class _SweepArgs(NamedTuple):
    """The checked arguments of a sweep."""

    axes: tuple[int | None, ...]  # in_axes, one per argument
    maxes: tuple[int | None, ...] | None  # member_axes, None without an ensemble
    n: int  # examples
    members: int | None  # ensemble size, None without an ensemble
    batch_size: int | None
    mesh: Mesh


def _check_sweep_args(
    fn: Callable,
    args: tuple[Any, ...],
    in_axes: Any,
    member_axes: Any,
    batch_size: int | None,
    mesh: Mesh | None,
) -> _SweepArgs:
    """Validate ``sweep``'s arguments (ValueError saying what to do) and read the sizes."""
    if not callable(fn):
        raise ValueError(f"sweep: fn must be a callable; got {type(fn).__name__}.")
    if not args:
        raise ValueError("sweep: give at least one array to map over.")
    axes = _axes(in_axes, len(args), "in_axes")
    maxes = None if member_axes is None else _axes(member_axes, len(args), "member_axes")
    if all(ax is None for ax in axes):
        raise ValueError("sweep: in_axes maps no argument; mark the examples' argument 0.")
    if maxes is not None:
        both = [i for i, (a, m) in enumerate(zip(axes, maxes, strict=True)) if a == 0 == m]
        if both:
            raise ValueError(
                f"sweep: argument(s) {both} are mapped over both examples and members; an "
                "argument carries one of the two axes (stack per-member data as params)."
            )
        if all(m is None for m in maxes):
            raise ValueError("sweep: member_axes marks no argument; mark the stacked params 0.")
    sizes = {_leading_size(a, "examples") for a, ax in zip(args, axes, strict=True) if ax == 0}
    if len(sizes) > 1:
        raise ValueError(
            f"sweep: the mapped arguments disagree on the number of examples: {sorted(sizes)}; "
            "give them the same leading length."
        )
    n = sizes.pop()
    if n == 0:
        raise ValueError("sweep: there are no examples (the leading axis has length 0).")
    members = None
    if maxes is not None:
        sizes = {_leading_size(a, "members") for a, m in zip(args, maxes, strict=True) if m == 0}
        if len(sizes) > 1:
            raise ValueError(
                f"sweep: the member-stacked arguments disagree on the number of members: "
                f"{sorted(sizes)}."
            )
        members = sizes.pop()
    if batch_size is not None:
        batch_size = _checks.check_positive_int(batch_size, "batch_size", "sweep")
    if mesh is None:
        mesh = default_mesh()
    elif not isinstance(mesh, Mesh):
        raise ValueError(f"sweep: mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
    return _SweepArgs(axes, maxes, n, members, batch_size, mesh)


class _ChunkPlan(NamedTuple):
    """How the sample axis is cut into chunks and laid out over the mesh."""

    n: int  # examples
    members: int | None
    chunk: int  # examples per compiled call, a multiple of the device count
    num_chunks: int
    devices: int
    processes: int
    multi: bool  # the mesh spans several processes: gather across them
    sample_sharding: NamedSharding  # a chunk's rows split over every mesh axis
    replicated: NamedSharding
    out_sharding: NamedSharding


def _chunk_plan(checked: _SweepArgs) -> _ChunkPlan:
    """Chunk size and count, device layout and shardings of a checked sweep."""
    mesh, n, members = checked.mesh, checked.n, checked.members
    devices = int(mesh.devices.size)
    processes = len({d.process_index for d in mesh.devices.flat})
    wanted = n if checked.batch_size is None else min(checked.batch_size, n)
    chunk = devices * math.ceil(wanted / devices)
    names = tuple(mesh.axis_names)
    sample_sharding = NamedSharding(mesh, P(names))
    return _ChunkPlan(
        n=n,
        members=members,
        chunk=chunk,
        num_chunks=math.ceil(n / chunk),
        devices=devices,
        processes=processes,
        multi=processes > 1,
        sample_sharding=sample_sharding,
        replicated=NamedSharding(mesh, P()),
        out_sharding=sample_sharding if members is None else NamedSharding(mesh, P(None, names)),
    )


def _chunk_args(
    args: tuple[Any, ...],
    axes: tuple[int | None, ...],
    fixed: list[Any],
    start: int,
    plan: _ChunkPlan,
) -> list[Any]:
    """The call arguments of the chunk at ``start``: mapped ones sliced and sharded."""

    def place(leaf: Any) -> Any:
        return _place_chunk(leaf, start, plan.chunk, plan.n, plan.sample_sharding, plan.multi)

    return [
        jax.tree.map(place, a) if ax == 0 else f for a, ax, f in zip(args, axes, fixed, strict=True)
    ]


def _compiled_sweep(
    fn: Callable, checked: _SweepArgs, plan: _ChunkPlan, first: list[Any]
) -> tuple[Any, float]:
    """The compiled vmapped ``fn`` for these chunk arguments (cached), and its compile time."""
    key = _signature(fn, checked.axes, checked.maxes, checked.mesh, first)
    try:
        compiled = _COMPILED.pop(key, None)
    except TypeError:  # an unhashable callable: no reuse
        key, compiled = None, None
    t0 = time.perf_counter()
    if compiled is None:
        mapped = jax.vmap(fn, in_axes=checked.axes)
        if checked.maxes is not None:
            mapped = jax.vmap(mapped, in_axes=checked.maxes)
        # Each device maps fn over its own rows (shard_map), with no communication:
        # partitioned by GSPMD instead, a vmapped while_loop reduces its predicate
        # over all devices every iteration, which can deadlock XLA:CPU's forced
        # host devices, and makes every device run as long as the slowest.
        local = jax.shard_map(
            mapped,
            mesh=checked.mesh,
            in_specs=tuple(plan.sample_sharding.spec if ax == 0 else P() for ax in checked.axes),
            out_specs=plan.out_sharding.spec,
            check_vma=False,
        )
        lowered = jax.jit(local, out_shardings=plan.out_sharding).lower(*first)
        compiled = lowered.compile()
    compile_seconds = time.perf_counter() - t0
    if key is not None:
        _COMPILED[key] = compiled  # most recently used last
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
    return compiled, compile_seconds


def _strip(tree: Any, size: int, members: int | None) -> Any:
    """Fetched chunk outputs without their padding (rows past ``size``)."""
    if members is None:
        return jax.tree.map(lambda x: np.asarray(x)[:size], tree)
    return jax.tree.map(lambda x: np.asarray(x)[:, :size], tree)


def _run_chunks(
    compiled: Any,
    chunk_args: Callable[[int], list[Any]],
    first: list[Any],
    plan: _ChunkPlan,
    bar: Any,
) -> tuple[list[Any], int]:
    """Call ``compiled`` on every chunk, fetching each result while the next one computes.

    Returns:
      The chunks' outputs (NumPy, padding dropped) and the number of devices
      that really held the first chunk's result.
    """
    outputs: list[Any] = []
    pending: tuple[Any, int] | None = None
    used = plan.devices
    for k in range(plan.num_chunks):
        start = k * plan.chunk
        out = compiled(*(first if k == 0 else chunk_args(start)))  # dispatched asynchronously
        if k == 0:
            leaves = jax.tree.leaves(out)
            used = len(leaves[0].sharding.device_set) if leaves else plan.devices
        if pending is not None:  # fetch the previous chunk while this one computes
            outputs.append(_strip(_fetch(pending[0], plan.multi), pending[1], plan.members))
            bar.update(pending[1])
        pending = (out, min(plan.chunk, plan.n - start))
    outputs.append(_strip(_fetch(pending[0], plan.multi), pending[1], plan.members))
    bar.update(pending[1])
    return outputs, used


def sweep(
    fn: Callable,
    *args: Any,
    in_axes: int | None | Sequence[int | None] = 0,
    member_axes: int | None | Sequence[int | None] = None,
    mesh: Mesh | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "sweep",
    return_stats: bool = False,
) -> Any:
    """Map a per-example function over the leading axis, sharded over devices and hosts.

    The result equals ``jax.jit(jax.vmap(fn, in_axes))(*args)`` (as NumPy
    arrays, on every process), computed with the sample axis split over every
    device of ``mesh``: in chunks of ``batch_size`` examples, each chunk one call
    of the same compiled function, the last chunk padded with copies of the
    last example and the padding dropped.

    With ``member_axes`` (a seed ensemble), arguments marked 0 there carry a
    leading member axis (stacked parameters) and the result has shape
    ``(members, n, ...)``: entry ``[m, i]`` is ``fn`` with member ``m`` and
    example ``i``, i.e. ``jax.vmap(jax.vmap(fn, in_axes), member_axes)``. The
    members are vmapped inside every chunk; the member-stacked arguments are
    replicated on every device.

    Args:
      fn: ``fn(*per_example_args) -> pytree of arrays`` for ONE example.
      *args: arrays or pytrees; those mapped (``in_axes`` 0) share a leading
        length ``n`` and may be any array-like supporting ``a.shape`` and row
        slicing (only the rows each process computes are read); the others
        (``None``: parameters, options) are passed whole and replicated.
      in_axes: 0 or None per argument (or one value for all), as in ``jax.vmap``.
      member_axes: 0 or None per argument: which arguments carry an ensemble
        member axis. ``None`` (default): no ensemble.
      mesh: the ``jax.sharding.Mesh`` to split the sample axis over (over all of
        its axes together). Default: every device of every process.
      batch_size: examples per compiled call over all devices, rounded up to a
        multiple of the device count; bounds memory. Default: all at once.
      progress: show a progress bar (on process 0).
      desc: label of the progress bar.
      return_stats: also return a ``SweepStats``.

    Returns:
      The pytree ``fn`` returns, each leaf with a leading axis ``n`` (or
      ``(members, n)``), as NumPy arrays; with ``return_stats``, the pair
      ``(result, stats)``.

    In a multi-process run (after ``initialize``) every process must call
    ``sweep`` with the same arguments; every process gets the whole result.
    """
    started = time.perf_counter()
    checked = _check_sweep_args(fn, args, in_axes, member_axes, batch_size, mesh)
    plan = _chunk_plan(checked)
    fixed = [
        None if ax == 0 else _replicate(a, plan.replicated, plan.multi)
        for a, ax in zip(args, checked.axes, strict=True)
    ]
    chunk_args = functools.partial(_chunk_args, args, checked.axes, fixed, plan=plan)
    first = chunk_args(0)
    compiled, compile_seconds = _compiled_sweep(fn, checked, plan, first)
    from tqdm.auto import tqdm

    show = progress and process_info().index == 0
    with tqdm(total=plan.n, desc=desc, disable=not show, leave=False, unit="ex") as bar:
        outputs, used = _run_chunks(compiled, chunk_args, first, plan, bar)
    axis = 0 if plan.members is None else 1
    result = (
        outputs[0]
        if len(outputs) == 1
        else jax.tree.map(lambda *parts: np.concatenate(parts, axis=axis), *outputs)
    )
    if not return_stats:
        return result
    stats = SweepStats(
        examples=plan.n,
        members=plan.members,
        devices=used,
        processes=plan.processes,
        chunk_size=plan.chunk,
        chunks=plan.num_chunks,
        padding=plan.num_chunks * plan.chunk - plan.n,
        compile_seconds=compile_seconds,
        seconds=time.perf_counter() - started,
    )
    return result, stats


# --------------------------------------------------------------------------- host-side work


def split_over_processes(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` for a BATCHED host-side function, its rows split over processes.

    ``sweep`` needs one jitted per-example function; some analyses are a host
    loop over a whole batch instead (``bgeom.find_paths`` schedules a pool of
    pending segments), and vmapping them would make every example wait for the
    hardest. This runs such a function with the leading axis (length ``n``,
    shared by every argument) cut into one contiguous share per process,
    padded to equal size with copies of the last row; each process calls
    ``fn`` on its share only (on its own devices), and the results are
    gathered so that every process holds all ``n`` rows, padding dropped.

    Single process: exactly ``fn(*args)`` (as NumPy). Every process must call
    it with the same arguments.

    Args:
      fn: ``fn(*batched_args) -> pytree`` whose leaves have a leading axis of
        the same length as the arguments.
      *args: arrays (or pytrees of arrays) with a common leading length ``n``.

    Returns:
      The pytree of ``fn``, leaves as NumPy arrays of leading length ``n``.
    """
    n = _leading_size(args, "the arguments")
    info = process_info()
    if info.count == 1 or n == 0:
        return jax.tree.map(np.asarray, fn(*args))
    share = -(-n // info.count)
    lo = info.index * share
    mine = jax.tree.map(lambda a: _rows(a, lo, lo + share, n), args)  # all padding past n
    gathered = _fetch(jax.tree.map(np.asarray, fn(*mine)), multi=True)
    return jax.tree.map(lambda a: np.asarray(a)[:n], gathered)
