"""Batched driver for iterative searches: compaction of finished examples, jitted top-level steps.

An iterative bgeom analysis (DeepFool, targeted DeepFool, margins along a
subspace, boundary points, ...) is written once as an ``Iterative``: four pure
functions of ONE example. ``loop`` runs it as a fixed-shape
``lax.while_loop``, which composes with ``jax.jit`` and ``jax.vmap`` (the
per-example public functions are that). ``run`` drives the same four
functions over a whole batch from the host:

- every step is one jitted, vmapped call at the top level of its program, so
  XLA compiles it with its fast kernels (XLA:CPU rewrites convolutions into
  its fast layout only outside loop bodies);
- compaction: an example leaves its slot as soon as it finishes and a waiting
  one takes it, so no example pays for the slowest one (under
  ``jit(vmap(loop))`` every example runs as many steps as the slowest);
- when no example is waiting, the slots shrink (by halves, down to 8),
  so the tail does not run on a mostly empty batch;
- memory is bounded by ``batch_size`` slots;
- the slots are split over every local device (each of them runs an equal
  share of every step: jit's SPMD partitioning of the vmapped step), and
  ``batched`` splits the examples over the processes of a multi-process run.

The result equals ``jax.jit(jax.vmap(loop))`` up to the rounding of batched
evaluations: every example runs exactly the same steps. ``batched(fn)`` is the
public entry point for the analyses registered here. See docs/engine.md.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import dtypes
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bgeom import sharding
from bgeom.sharding import split_over_processes


class Iterative(NamedTuple):
    """An iterative search over ONE example, as four pure functions.

    ``consts`` is a pytree every example shares (the model's parameters, traced
    options, tables the examples index into); ``example`` is the per-example
    data (arrays without a batch axis).

    Attributes:
      init: ``init(consts, *example) -> state``.
      step: ``step(consts, state) -> state``, one iteration.
      running: ``running(consts, state) -> bool``: whether to take another step.
      finish: ``finish(consts, state) -> result`` (a pytree of arrays).
    """

    init: Callable
    step: Callable
    running: Callable
    finish: Callable


def loop(it: Iterative, consts: Any, *example: Any) -> Any:
    """Run ``it`` on one example as a ``lax.while_loop`` (composes with jit and vmap)."""
    state = it.init(consts, *example)
    state = jax.lax.while_loop(lambda s: it.running(consts, s), lambda s: it.step(consts, s), state)
    return it.finish(consts, state)


class EngineStats(NamedTuple):
    """How ``run`` spent its work.

    Attributes:
      examples: examples processed.
      steps: useful steps (the sum over examples of the steps each one took).
      computed_steps: slot-steps computed (every slot of every call, padding
        and finished slots included).
      calls: step calls (one jitted call each).
      work_efficiency: ``steps / computed_steps``.
      seconds: wall time, compilation included.
      devices: the devices that held the slots (read from the slots' sharding).
      slots: the most slots in flight (over all devices).
    """

    examples: int
    steps: int
    computed_steps: int
    calls: int
    work_efficiency: float
    seconds: float
    devices: int = 1
    slots: int = 0


# Slot counts are ``top / 2^k``, none below this: few shapes to compile (each
# costs a compilation of every piece), and a tail never runs on a mostly empty batch.
_SMALLEST = 8
# Examples are started (``init``) at least this many at a time, whatever the
# slot count: starting is one cheap call per chunk.
_START = 256


def default_batch_size(has_convolution: bool = True) -> int:
    """Slots ``run`` keeps per device when not told.

    256 on an accelerator. On a CPU, 64 for a search whose step has a
    convolution and 256 for one without: the step of a wide batch of conv-net
    gradients overflows the caches (DeepFool on 256 digits took 8.4 s with 32
    slots and 11.6 s with 256 for a plain-JAX CNN, 0.75 s with 64 and 0.86 s
    with 256 for LeNet), while a matmul-only model prefers wide steps (a tanh
    MLP on 1,797 digits: 0.36 s with 64, 0.26 s with 256); benchmarks in
    benchmarks/bench_deepfool.py, 2-core CPU. 256 on an accelerator is the
    earlier default, not a measured optimum. ``run`` reads ``has_convolution``
    from the step's jaxpr (``step_has_convolution``). See docs/engine.md.
    """
    if jax.default_backend() != "cpu":
        return 256
    return 64 if has_convolution else 256


def _has_convolution(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (or any jaxpr inside it) convolves."""
    from jax.extend import core

    if any(e.primitive.name == "conv_general_dilated" for e in jaxpr.eqns):
        return True
    return any(_has_convolution(sub) for sub in core.subjaxprs(jaxpr))


# step_has_convolution's answers, per Iterative (traced once each).
_CONVOLVES: dict[Iterative, bool] = {}


def step_has_convolution(it: Iterative, consts: Any, *example: Any) -> bool:
    """Whether one ``it.step`` (traced on ``example``'s shapes) computes a convolution.

    The answer is cached per ``it``: the model inside it decides, not the shapes.
    """
    if it not in _CONVOLVES:
        state = jax.eval_shape(it.init, consts, *example)
        _CONVOLVES[it] = _has_convolution(jax.make_jaxpr(it.step)(consts, state).jaxpr)
        while len(_CONVOLVES) > 256:  # the oldest first: do not keep every model alive
            _CONVOLVES.pop(next(iter(_CONVOLVES)))
    return _CONVOLVES[it]


def _bucket(n: int, top: int, devices: int = 1) -> int:
    """The smallest of ``top, top / 2, top / 4, ...`` (down to 8) that holds ``n``.

    With several devices every size stays a multiple of ``devices`` (``top``
    is ``devices * 2^k``), so each device holds an equal share.
    """
    per = top // devices
    while per % 2 == 0 and (per // 2) * devices >= max(n, _SMALLEST):
        per //= 2
    return per * devices


def _power_of_two_multiple(n: int, devices: int) -> int:
    """The smallest ``devices * 2^k`` (k >= 0) that is at least ``n``."""
    per = -(-max(n, 1) // devices)
    return devices * (1 << (per - 1).bit_length())


def _tree_rows(tree: Any, rows: np.ndarray) -> Any:
    return jax.tree.map(lambda a: a[rows], tree)


@functools.lru_cache(maxsize=256)
def _compiled(it: Iterative, what: str, slots: Any = None) -> Callable:
    """The jitted, vmapped pieces of ``it`` (compiled once per shape).

    ``slots``: the sharding of every output's leading (slot) axis over several
    devices; ``None`` on one device. There, each device runs the per-example
    functions on its own slots (``shard_map``, no communication: partitioned
    by GSPMD instead, a vmapped loop inside a step would reduce its predicate
    over all devices every iteration); only the gathers and scatters of
    compaction move rows between devices.
    """
    running = jax.vmap(it.running, in_axes=(None, 0))
    jit = jax.jit if slots is None else functools.partial(jax.jit, out_shardings=slots)

    def local(fn: Callable, *batched: bool) -> Callable:
        """``fn`` on each device's share of its ``batched`` arguments (others whole)."""
        if slots is None:
            return fn
        specs = tuple(slots.spec if b else P() for b in batched)
        return jax.shard_map(
            fn, mesh=slots.mesh, in_specs=specs, out_specs=slots.spec, check_vma=False
        )

    if what == "init":
        # ``rows`` picks the examples to start out of the whole (device) arrays.
        def init(consts, rows, *examples):
            example = [_tree_rows(e, rows) for e in examples]
            states = jax.vmap(it.init, in_axes=(None,) + (0,) * len(example))(consts, *example)
            return states, running(consts, states)

        def init_each(consts, rows, *examples):  # examples whole on every device
            return local(init, False, True, *[False] * len(examples))(consts, rows, *examples)

        return jit(init_each)
    if what == "step":

        def step(consts, states):
            states = jax.vmap(it.step, in_axes=(None, 0))(consts, states)
            return states, running(consts, states)

        return jit(local(step, False, True), donate_argnums=1)
    if what == "finish":
        finished = local(jax.vmap(it.finish, in_axes=(None, 0)), False, True)

        def finish(consts, states, rows):
            return finished(consts, _tree_rows(states, rows))

        return jit(finish)
    if what == "place":
        # Slots ``rows`` of ``states`` take ``new`` (rows out of range are dropped).
        def place(states, new, rows):
            return jax.tree.map(lambda a, b: a.at[rows].set(b, mode="drop"), states, new)

        return jit(place, donate_argnums=0)
    if what == "take":
        return jit(_tree_rows)
    raise ValueError(what)


class _Slots:
    """The host's view of the slots: which example each holds, and its steps so far."""

    def __init__(self, size: int):
        self.example = np.full(size, -1, np.int64)
        self.steps = np.zeros(size, np.int64)

    @property
    def size(self) -> int:
        return len(self.example)

    def busy(self) -> np.ndarray:
        return self.example >= 0


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
    """``rows`` padded to ``size`` entries with copies of its first (work nobody keeps)."""
    return np.concatenate([rows, np.full(size - len(rows), rows[0], rows.dtype)])


class _Run:
    """One call of ``run``: the slots on the device, the results on the host."""

    def __init__(
        self, it: Iterative, consts: Any, examples: tuple, n: int, top: int, slots: Any = None
    ):
        self.it, self.consts, self.examples, self.n = it, consts, examples, n
        self.sharding = slots  # of the slot axis over the devices; None: one device
        self.devices = 1 if slots is None else len(slots.device_set)
        whole = _power_of_two_multiple(n, self.devices)
        self.top = min(top, whole)  # slots
        start = _power_of_two_multiple(_START, self.devices)
        self.chunk = max(self.top, min(start, whole))  # examples started at once
        self.states: Any = None
        self.slots = _Slots(0)
        self.results: Any = None
        self.waiting = 0  # the next example to start
        # Started examples still running that no slot has taken yet: their
        # states, and per row the example (-1: placed, finished or padding).
        self.pending: Any = None
        self.pending_ids = np.zeros(0, np.int64)
        self.steps = self.computed = self.calls = self.finished = 0

    def _piece(self, what: str) -> Callable:
        return _compiled(self.it, what, self.sharding)

    def _bucket(self, n: int, top: int) -> int:
        return _bucket(n, top, self.devices)

    # -- results
    def _store(self, rows: np.ndarray, ids: np.ndarray, steps: np.ndarray, states: Any) -> None:
        """Finish the states at ``rows`` (of ``states``) as examples ``ids``."""
        size = self._bucket(len(rows), self.chunk)
        out = self._piece("finish")(self.consts, states, _padded(rows, size))
        out = jax.tree.map(lambda a: np.asarray(a)[: len(rows)], out)
        if self.results is None:
            self.results = jax.tree.map(lambda a: np.empty((self.n, *a.shape[1:]), a.dtype), out)
        jax.tree.map(lambda dst, src: dst.__setitem__(ids, src), self.results, out)
        self.steps += int(np.sum(steps))
        self.finished += len(rows)

    # -- starting examples
    def _start(self, count: int, rows: int | None = None) -> tuple[Any, np.ndarray, np.ndarray]:
        """Initialise the next ``count`` examples; finish those that need no step.

        Returns the new states (``rows`` rows, default a chunk bucket of at
        least ``count``), which of the first ``count`` rows are running, and
        their example ids.
        """
        ids = np.arange(self.waiting, self.waiting + count)
        self.waiting += count
        rows = _padded(ids, rows or self._bucket(count, self.chunk))
        states, running = self._piece("init")(self.consts, rows, *self.examples)
        running = np.asarray(running)[:count]
        idle = np.flatnonzero(~running)
        if idle.size:  # e.g. max_iter = 0, or already where the search goes
            self._store(idle, ids[idle], np.zeros(idle.size, np.int64), states)
        return states, running, ids

    def fill(self) -> None:
        """Give free slots to started or waiting examples (the first call creates the slots).

        Examples start a chunk (at least 256, or the slots) at a time, however
        few slots are free: searches that finish at ``init`` (most of
        ``subspace_margins``' pairs) then cost one call per chunk, and running
        ones wait, started, in ``pending`` until slots free up.
        """
        if self.states is None:
            size = self._bucket(self.n, self.top)
            self.states, running, ids = self._start(min(size, self.n), rows=size)
            self.slots = _Slots(size)
            self.slots.example[: len(ids)] = np.where(running, ids, -1)
        while True:
            free = np.flatnonzero(~self.slots.busy())
            if free.size == 0:
                return
            if not self.has_pending():
                if self.waiting >= self.n:
                    return
                self.pending, running, ids = self._start(min(self.chunk, self.n - self.waiting))
                self.pending_ids = np.full(len(jax.tree.leaves(self.pending)[0]), -1)
                self.pending_ids[: len(ids)] = np.where(running, ids, -1)
                continue
            rows = np.flatnonzero(self.pending_ids >= 0)[: free.size]
            target = np.full(len(self.pending_ids), self.slots.size)  # dropped
            target[rows] = free[: rows.size]
            self.states = self._piece("place")(self.states, self.pending, target)
            self.slots.example[free[: rows.size]] = self.pending_ids[rows]
            self.slots.steps[free[: rows.size]] = 0
            self.pending_ids[rows] = -1

    def has_pending(self) -> bool:
        return bool((self.pending_ids >= 0).any())

    def nobody_waiting(self) -> bool:
        return self.waiting >= self.n and not self.has_pending()

    def shrink(self) -> None:
        """With nobody waiting, move the busy slots into the smallest bucket that holds them."""
        busy = np.flatnonzero(self.slots.busy())
        size = self._bucket(busy.size, self.top)
        if not self.nobody_waiting() or size >= self.slots.size or not busy.size:
            return
        self.states = self._piece("take")(self.states, _padded(busy, size))
        old = self.slots
        self.slots = _Slots(size)
        self.slots.example[: busy.size] = old.example[busy]
        self.slots.steps[: busy.size] = old.steps[busy]

    def step(self) -> None:
        """One step of every slot; finished examples leave."""
        busy = self.slots.busy()
        self.states, running = self._piece("step")(self.consts, self.states)
        self.calls += 1
        self.computed += self.slots.size
        self.slots.steps[busy] += 1
        done = np.flatnonzero(busy & ~np.asarray(running))
        if done.size:
            self._store(done, self.slots.example[done], self.slots.steps[done], self.states)
            self.slots.example[done] = -1

    def busy(self) -> bool:
        return bool(self.slots.busy().any()) or not self.nobody_waiting()

    def devices_used(self) -> int:
        leaves = jax.tree.leaves(self.states)
        return len(leaves[0].sharding.device_set) if leaves else 0


def _leading(examples: tuple) -> int:
    sizes = {int(np.shape(a)[0]) for a in jax.tree.leaves(examples)}
    if len(sizes) != 1:
        raise ValueError(
            f"engine.run: the per-example arrays disagree on the number of examples: "
            f"{sorted(sizes)}; give them the same leading length."
        )
    return sizes.pop()


def run(
    it: Iterative,
    consts: Any,
    *examples: Any,
    batch_size: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = False,
    desc: str = "",
) -> tuple[Any, EngineStats]:
    """Run ``it`` over a batch of examples with compaction; ``(results, stats)``.

    Args:
      it: the search, as an ``Iterative``.
      consts: the pytree every example shares (traced: parameters, options).
      *examples: per-example arrays (or pytrees of arrays) with a common
        leading axis ``n``.
      batch_size: the most slots (examples in flight) over all devices;
        rounded down to ``len(devices) * 2^k``. ``None``:
        ``default_batch_size`` per device (on a CPU 64 when the step has a
        convolution, 256 when not; 256 on an accelerator).
      devices: the devices the slots are split over, every one running an
        equal share of each step; ``None``: ``jax.local_devices()`` (this
        process's devices). ``consts`` and the examples are copied to each.
      progress: show a progress bar of finished examples.
      desc: its label.

    Returns:
      The pytree ``it.finish`` returns, each leaf with a leading axis ``n``,
      as NumPy arrays; and ``EngineStats``.
    """
    started = time.perf_counter()
    n = _leading(examples)
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("engine.run: devices is empty; give at least one device (or None).")
    if batch_size is None:
        convolves = False
        if jax.default_backend() == "cpu":  # the only backend where the answer matters
            first = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], dtypes.canonicalize_dtype(a.dtype)),
                examples,
            )
            convolves = step_has_convolution(it, consts, *first)
        batch_size = default_batch_size(convolves) * len(devices)
    if batch_size < len(devices):
        raise ValueError(
            f"batch_size must be at least the number of devices ({len(devices)}); got {batch_size}."
        )
    per_device = int(batch_size) // len(devices)
    top = len(devices) * (1 << (per_device.bit_length() - 1))
    slots = None
    if len(devices) == 1:
        examples = jax.tree.map(jnp.asarray, examples)  # on the device once, gathered there
    else:
        mesh = Mesh(np.asarray(devices), ("slots",))
        slots = NamedSharding(mesh, P("slots"))
        consts, examples = sharding._replicate((consts, examples), NamedSharding(mesh, P()), False)
    state = _Run(it, consts, examples, n, top, slots)
    from tqdm.auto import tqdm

    with tqdm(total=n, desc=desc, disable=not progress, leave=False, unit="ex") as bar:
        while state.busy():
            state.fill()
            state.shrink()
            if state.slots.busy().any():
                state.step()
            bar.update(state.finished - bar.n)
    stats = EngineStats(
        examples=n,
        steps=state.steps,
        computed_steps=state.computed,
        calls=state.calls,
        work_efficiency=state.steps / state.computed if state.computed else 1.0,
        seconds=time.perf_counter() - started,
        devices=state.devices_used(),
        slots=state.top,
    )
    return state.results, stats


# ----------------------------------------------------------------- batched(fn)

_PLANS: dict[Callable, Callable] = {}


def register(fn: Callable) -> Callable:
    """Register ``plan`` as the batched form of the per-example analysis ``fn``.

    ``plan(apply_fn, params, xs, *args, **options) -> (iterative, consts,
    examples)`` validates the arguments (with ``fn``'s checks) and returns what
    ``run`` needs.
    """

    def decorator(plan: Callable) -> Callable:
        _PLANS[fn] = plan
        return plan

    return decorator


def batched(fn: Callable) -> Callable:
    """The batched form of an iterative bgeom analysis, driven by ``run`` (compaction).

    ``bgeom.batched(bgeom.deepfool)(apply_fn, params, xs, **options)`` equals
    ``jax.jit(jax.vmap(lambda x: bgeom.deepfool(apply_fn, params, x, **options)))(xs)``
    up to float rounding, as NumPy arrays, but every step runs at the top level
    of a jitted program and finished examples leave the batch at once. Extra
    per-example arguments (``targeted_deepfool``'s targets) are batched like
    ``xs``. Keywords ``batch_size`` (default ``default_batch_size`` per
    device: on a CPU 64 for a model with convolutions, 256 without; 256 on an
    accelerator), ``devices`` (default: every
    local device; the slots are split over them), ``progress``, ``desc`` and
    ``return_stats`` (also return ``EngineStats``) control the driver.

    In a multi-process run (``bgeom.sharding.initialize``) every process must
    make the same call: each runs its share of the examples on its own
    devices and every process gets the whole result
    (``bgeom.sharding.split_over_processes``); ``EngineStats`` then describes
    this process's share.

    Args:
      fn: one of ``bgeom.deepfool``, ``bgeom.targeted_deepfool``,
        ``bgeom.subspace_deepfool``, ``bgeom.boundary_point``, ``bgeom.sparsefool``.

    Returns:
      ``run_batch(apply_fn, params, xs, *args, **options)``.
    """
    plan = _PLANS.get(fn)
    if plan is None:
        names = ", ".join(sorted(f"bgeom.{f.__name__}" for f in _PLANS))
        raise ValueError(
            f"bgeom.batched takes an iterative bgeom analysis ({names}); got "
            f"{getattr(fn, '__name__', fn)!r}. For any other per-example function use "
            "jax.jit(jax.vmap(fn)) or bgeom.sweep."
        )

    @functools.wraps(fn)
    def run_batch(
        apply_fn: Callable,
        params: Any,
        xs: Any,
        *args: Any,
        batch_size: int | None = None,
        devices: Sequence[jax.Device] | None = None,
        progress: bool = False,
        desc: str = "",
        return_stats: bool = False,
        **options: Any,
    ) -> Any:
        if np.ndim(xs) != 4:
            raise ValueError(
                f"bgeom.batched({fn.__name__}) expects a batch of images (N, H, W, C); got "
                f"shape {tuple(np.shape(xs))}. For one image call bgeom.{fn.__name__} directly."
            )
        it, consts, examples = plan(apply_fn, params, jnp.asarray(xs), *args, **options)
        stats: list[EngineStats] = []

        def share(*examples: Any) -> Any:
            out, st = run(
                it,
                consts,
                *examples,
                batch_size=batch_size,
                devices=devices,
                progress=progress,
                desc=desc,
            )
            stats.append(st)
            return out

        out = split_over_processes(share, *examples)
        return (out, stats[0]) if return_stats else out

    return run_batch
