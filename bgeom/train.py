"""optax training: a reusable jitted train step, a checkpointed loop, and ``fit``.

Three layers, each usable on its own (see ``docs/training.md``):

- ``make_train_step(loss_fn, tx)``: one jitted optimiser step of any loss
  ``loss_fn(params, state, batch, key) -> (loss, LossAux(state, metrics))``
  over any parameter pytree, vmapped over a leading member axis. ``params``
  are differentiated; ``state`` is carried along undifferentiated (batch-norm
  statistics, a frozen classifier a generator is trained against, ...) and
  replaced by the ``state`` the loss returns.
- ``train_loop(loss_fn, tx, init, data, ...)``: epochs over any arrays, a
  progress bar, a per-epoch hook (evaluation, extra history), orbax
  checkpoints and exact resumption.
- ``fit(model, data, ...)``: Flax NNX classifiers trained with softmax
  cross-entropy (``classifier_loss``) through the loop.

A single model is an ensemble of one: every seed's parameters and optimiser
state are stacked along a leading axis and one jitted, vmapped step updates
them all, each member reading its own seeded shuffle of the same data. The
member trained with seed ``s`` is the model ``fit(..., seeds=s)`` returns.

Checkpoints (orbax) are written at every epoch end, at the end, and when the
run is interrupted (Ctrl-C or SIGTERM); a run restarted with the same
``checkpoint_dir`` resumes at the exact step it stopped at, because the batch
order is a pure function of (seed, epoch).

Training a custom loss, here a least-squares fit of ``y = x @ w + b`` by two
seeds at once (each member shuffles the data with its own seed)::

    import jax.numpy as jnp
    import optax
    from bgeom import train

    def loss_fn(params, state, batch, key):
        pred = batch["x"] @ params["w"] + params["b"]
        loss = jnp.mean((pred - batch["y"]) ** 2)
        return loss, train.LossAux(state, {"max_error": jnp.max(jnp.abs(pred - batch["y"]))})

    tx = optax.adam(1e-2)
    members = [{"w": jnp.zeros(3), "b": jnp.zeros(())} for _ in range(2)]
    init = train.init_train_state(train.stack(members), None, tx)
    done = train.train_loop(
        loss_fn, tx, init, {"x": x, "y": y}, seeds=[0, 1], epochs=20, batch_size=32,
        checkpoint_dir="runs/lstsq",
    )
    done.train.params["w"]       # (2, 3): one row per seed
    done.history["loss"]         # (20, 2): mean loss of each epoch and member
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bgeom import models as models_lib
from bgeom.data import Dataset

# transform(key, x, y, logits_fn) -> (x, y), applied to every training batch
# inside the jitted step. ``logits_fn(x_batch)`` evaluates the current model
# (parameters held fixed), for transforms that attack it (adversarial training).
Transform = Callable[[jax.Array, jax.Array, jax.Array, Callable], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and length of a training run.

    Attributes:
      epochs: passes over the training set.
      batch_size: examples per step (the last incomplete batch is dropped).
      optimizer: ``adam`` or ``sgd`` (with ``momentum``).
      learning_rate: the peak learning rate.
      schedule: ``constant``, ``cosine`` (decay to 0) or ``triangular``
        (0 -> peak at ``peak_fraction`` of training -> 0).
      momentum: SGD momentum.
      weight_decay: L2 penalty added to the gradient (PyTorch SGD's convention).
      clip_norm: clip the global gradient norm to this value (None: no clip).
      peak_fraction: where the triangular schedule peaks.
    """

    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float | None = None
    peak_fraction: float = 0.4

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {self.optimizer!r}.")
        if self.schedule not in ("constant", "cosine", "triangular"):
            raise ValueError(
                f"schedule must be 'constant', 'cosine' or 'triangular'; got {self.schedule!r}."
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}.")
        if not 0 < self.peak_fraction < 1:
            raise ValueError(f"peak_fraction must be in (0, 1); got {self.peak_fraction}.")


RECIPES: dict[str, TrainConfig] = {
    # Fast default for the embedded digits data (>= 97 % with the small CNN).
    "default": TrainConfig(),
    # The reference training of "Hold me tight!" (Ortiz-Jimenez et al. 2020):
    # SGD with momentum 0.9, weight decay 5e-4, batch 128, triangular learning
    # rate 0 -> 0.21 (at 2/5 of training) -> 0, gradient-norm clipping 0.5.
    "holdmetight": TrainConfig(
        epochs=30,
        batch_size=128,
        optimizer="sgd",
        learning_rate=0.21,
        schedule="triangular",
        momentum=0.9,
        weight_decay=5e-4,
        clip_norm=0.5,
        peak_fraction=0.4,
    ),
}


def recipe(name: str, **overrides: Any) -> TrainConfig:
    """The named training recipe (``RECIPES``) with some fields overridden."""
    if name not in RECIPES:
        raise ValueError(f"Unknown training recipe {name!r}; choose one of {', '.join(RECIPES)}.")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"Unknown training option(s) {sorted(unknown)}; valid: {sorted(fields)}.")
    return dataclasses.replace(RECIPES[name], **overrides)


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax chain for ``config``: clip, weight decay, then Adam or SGD on the schedule."""
    peak = config.learning_rate
    if config.schedule == "constant":
        lr = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        lr = optax.cosine_decay_schedule(peak, max(total_steps, 1))
    else:
        up = max(int(round(config.peak_fraction * total_steps)), 1)
        lr = optax.join_schedules(
            [
                optax.linear_schedule(0.0, peak, up),
                optax.linear_schedule(peak, 0.0, max(total_steps - up, 1)),
            ],
            [up],
        )
    chain = []
    if config.clip_norm is not None:
        chain.append(optax.clip_by_global_norm(config.clip_norm))
    if config.weight_decay:
        chain.append(optax.add_decayed_weights(config.weight_decay))
    if config.optimizer == "sgd":
        chain.append(optax.sgd(lr, momentum=config.momentum or None))
    else:
        chain.append(optax.adam(lr))
    return optax.chain(*chain)


# --------------------------------------------------------------------------
# The train step: any loss, any parameter pytree, vmapped over members.


class LossAux(NamedTuple):
    """What a loss returns beside the loss value.

    Attributes:
      state: the new undifferentiated state (return the ``state`` argument
        unchanged when the loss does not update it).
      metrics: scalars to log, e.g. ``{"train_accuracy": ...}``; the loop
        averages each over the steps of an epoch into its history, next to
        ``loss``.
    """

    state: Any
    metrics: Mapping[str, jax.Array]


# loss_fn(params, state, batch, key) -> (loss, LossAux), for ONE member: params
# and state without the member axis, batch that member's batch (a pytree of
# arrays with the batch axis first), key its PRNG key for this step.
LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, LossAux]]


class TrainState(NamedTuple):
    """Everything one step updates, each leaf with a leading member axis.

    Attributes:
      params: the differentiated parameters.
      state: undifferentiated state passed to and returned by the loss
        (``None`` when there is none).
      opt_state: the optax state of ``params``.
    """

    params: Any
    state: Any
    opt_state: Any


def stack(trees: Sequence[Any]) -> Any:
    """Stack pytrees of the same structure along a new leading (member) axis."""
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def init_train_state(params: Any, state: Any, tx: optax.GradientTransformation) -> TrainState:
    """The ``TrainState`` of stacked ``params`` and ``state`` with a fresh ``tx`` state."""
    return TrainState(params, state, jax.vmap(tx.init)(params))


def _member_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, ts: TrainState, batch: Any, key: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(ts.params, ts.state, batch, key)
    updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    return TrainState(params, aux.state, opt_state), {"loss": loss, **aux.metrics}


def make_train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """One jitted optimiser step of every member: ``step(ts, batch, keys) -> (ts, metrics)``.

    Args:
      loss_fn: ``loss_fn(params, state, batch, key) -> (loss, LossAux)`` of one
        member; its gradient in ``params`` drives ``tx``.
      tx: the optax transform (e.g. ``make_optimizer``).

    Returns:
      ``step(ts, batch, keys)``: ``ts`` a ``TrainState`` (donated), ``batch``
      and ``keys`` with the member axis first. ``metrics`` holds ``loss`` and
      the loss's own metrics, shape (members,) each.
    """
    return jax.jit(jax.vmap(functools.partial(_member_step, loss_fn, tx)), donate_argnums=0)


# --------------------------------------------------------------------------
# The checkpointed epoch loop.


class LoopState(NamedTuple):
    """Where a training loop stands (and, once it returns, what it produced).

    Attributes:
      train: the ``TrainState``.
      step: optimiser steps taken (the same for every member).
      history: per-epoch arrays of shape (epochs, members): the mean of each
        step metric (``loss`` and the loss's ``metrics``) over the epoch, and
        whatever the per-epoch hook returned; NaN where not yet computed.
      pending: the step metrics of the current, unfinished epoch, arrays of
        shape (steps per epoch, members) filled up to ``step``; saved with the
        checkpoint so that an interrupted epoch loses none of its steps.
    """

    train: TrainState
    step: int
    history: dict[str, np.ndarray]
    pending: dict[str, np.ndarray] = {}


# on_epoch(epoch, train_state) -> {name: (members,) values} or None.
EpochHook = Callable[[int, TrainState], Mapping[str, Any] | None]


def _batch_indices(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """Member ``seed``'s batch order for ``epoch``: (steps, batch_size) indices."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


def _steps_per_epoch(n: int, batch_size: int) -> int:
    if n < batch_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the training set ({n}); lower it."
        )
    return n // batch_size


def _num_examples(data: Any) -> int:
    sizes = {len(a) for a in jax.tree.leaves(data)}
    if len(sizes) != 1:
        raise ValueError(
            f"training arrays must share their leading (example) axis; got lengths {sorted(sizes)}."
        )
    return sizes.pop()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (e.g. a Slurm pre-emption) into KeyboardInterrupt while training."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _checkpoint_manager(checkpoint_dir: str | Path, record: Mapping[str, Any]) -> Any:
    """The orbax manager of ``checkpoint_dir/steps``, after checking ``run.json``."""
    import orbax.checkpoint as ocp

    checkpoint_dir = Path(checkpoint_dir).absolute()
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    record_path = checkpoint_dir / "run.json"
    if record_path.exists():
        previous = json.loads(record_path.read_text())
        if previous != json.loads(json.dumps(record)):
            raise ValueError(
                f"{checkpoint_dir} holds checkpoints of a different run "
                f"({previous}); use another checkpoint_dir or delete it."
            )
    else:
        record_path.write_text(json.dumps(record, indent=2))
    return ocp.CheckpointManager(
        checkpoint_dir / "steps",
        options=ocp.CheckpointManagerOptions(max_to_keep=2),
        item_handlers=ocp.StandardCheckpointHandler(),
    )


def _restore(manager: Any, loop: LoopState) -> LoopState:
    """``loop`` advanced to the latest checkpoint, if there is one."""
    import orbax.checkpoint as ocp

    latest = manager.latest_step()
    if latest is None:
        return loop
    # The history's entries are whatever the run recorded: read them from the
    # checkpoint (checkpoints written before "pending" existed have none).
    meta = manager.item_metadata(latest)
    target = {**_checkpoint_tree(loop.train)}
    for part in ("history", "pending"):
        if part in meta:
            target[part] = {k: np.zeros(m.shape, m.dtype) for k, m in meta[part].items()}
    restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
    train_state = TrainState(restored["params"], restored["rest"], restored["opt_state"])
    arrays = lambda part: {k: np.asarray(v) for k, v in restored.get(part, {}).items()}
    return LoopState(train_state, int(latest), arrays("history"), arrays("pending"))


def _checkpoint_tree(ts: TrainState) -> dict[str, Any]:
    # The undifferentiated state is stored as "rest" (the name run folders have always used).
    return {"params": ts.params, "rest": ts.state, "opt_state": ts.opt_state}


def _save(manager: Any, loop: LoopState, force: bool = False) -> None:
    """Checkpoint ``loop`` (a step already saved is replaced only with ``force``)."""
    if manager is None or (manager.latest_step() == loop.step and not force):
        return
    if manager.latest_step() == loop.step:
        manager.delete(loop.step)
    import orbax.checkpoint as ocp

    tree = {**_checkpoint_tree(loop.train), "history": loop.history, "pending": loop.pending}
    manager.save(loop.step, args=ocp.args.StandardSave(tree), force=True)
    manager.wait_until_finished()


def _epoch_steps(
    step_fn: Callable, loop: LoopState, data: Any, seeds: Sequence[int], batch_size: int
) -> Iterator[tuple[LoopState, dict[str, jax.Array]]]:
    """Run the rest of the current epoch, yielding the state and metrics after each step."""
    n = _num_examples(data)
    steps_per_epoch = n // batch_size
    epoch, offset = divmod(loop.step, steps_per_epoch)
    order = np.stack([_batch_indices(s, epoch, n, batch_size) for s in seeds])
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    for j in range(offset, steps_per_epoch):
        batch = _take(data, order[:, j])
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, loop.step)
        train_state, metrics = step_fn(loop.train, batch, step_keys)
        loop = loop._replace(train=train_state, step=loop.step + 1)
        yield loop, metrics


def _take(data: Any, idx: np.ndarray) -> Any:
    """The batch of rows ``idx`` (members, batch_size) of every array in ``data``."""
    return jax.tree.map(lambda a: jnp.asarray(a[idx]), data)


def _record_step(loop: LoopState, metrics: Mapping[str, jax.Array], steps_per_epoch: int) -> None:
    """Keep one finished step's metrics in ``loop.pending`` (its row of the epoch)."""
    row = (loop.step - 1) % steps_per_epoch
    for k, v in metrics.items():
        v = np.asarray(v)
        loop.pending.setdefault(k, np.full((steps_per_epoch, *v.shape), np.nan, v.dtype))[row] = v


def _end_epoch(
    loop: LoopState,
    epoch: int,
    on_epoch: EpochHook | None,
    epochs: int,
) -> None:
    """Record the epoch's mean step metrics and the hook's values in the history."""
    values = {k: np.mean(v, 0) for k, v in loop.pending.items()}
    if on_epoch is not None:
        values.update(on_epoch(epoch, loop.train) or {})
    members = len(jax.tree.leaves(loop.train.params)[0])
    for k, v in values.items():
        loop.history.setdefault(k, np.full((epochs, members), np.nan, np.float32))[epoch] = v
    # Only now: an interruption before this point finds the steps still pending.
    loop.pending.clear()


def train_loop(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    init: TrainState,
    data: Any,
    *,
    seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    on_epoch: EpochHook | None = None,
    checkpoint_dir: str | Path | None = None,
    record: Mapping[str, Any] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> LoopState:
    """Train every member of ``init`` for ``epochs`` passes over ``data``.

    Args:
      loss_fn: ``loss_fn(params, state, batch, key) -> (loss, LossAux)`` of
        one member (see ``make_train_step``).
      tx: the optax transform ``init.opt_state`` belongs to.
      init: the stacked starting ``TrainState`` (``init_train_state``).
      data: a pytree of arrays sharing their leading (example) axis, e.g.
        ``{"x": x_train, "y": y_train}``; every member reads all of it, in the
        order of its seed (the last incomplete batch is dropped).
      seeds: one seed per member: its batch order and its step keys
        (``fold_in(PRNGKey(seed), step)``).
      epochs: passes over ``data``.
      batch_size: examples per step.
      on_epoch: ``on_epoch(epoch, train_state)`` at every epoch end; the
        ``{name: (members,) values}`` it returns go into the history.
      checkpoint_dir: where orbax checkpoints go (``steps/``) with the
        ``record`` of the run (``run.json``); an existing folder of the same
        record is resumed at its last step, one of another record refused.
      record: JSON-able description of everything that determines the run
        (model, optimiser, data, ...), the test of "same run" (default: ``{}``).
      progress: show a progress bar.
      desc: label of the progress bar.

    Returns:
      The final ``LoopState``.
    """
    members = len(jax.tree.leaves(init.params)[0])
    if len(seeds) != members:
        raise ValueError(
            f"give one seed per member: {len(seeds)} seeds for {members} members "
            "(the leading axis of init.params)."
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1.")
    steps_per_epoch = _steps_per_epoch(_num_examples(data), batch_size)
    total_steps = steps_per_epoch * epochs
    # A copy: the step donates its input buffers, the caller keeps ``init``.
    loop = LoopState(jax.tree.map(jnp.array, init), 0, {}, {})
    manager = None
    if checkpoint_dir is not None:
        manager = _checkpoint_manager(checkpoint_dir, record or {})
        loop = _restore(manager, loop)
    step_fn = make_train_step(loss_fn, tx)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=loop.step,
        disable=not progress,
        desc=desc,
        leave=False,
        unit="step",
    )
    try:
        with _sigterm_as_interrupt():
            if loop.pending and loop.step % steps_per_epoch == 0:
                # Interrupted after an epoch's last step but before its end was recorded.
                _end_epoch(loop, loop.step // steps_per_epoch - 1, on_epoch, epochs)
                _save(manager, loop, force=True)
            while loop.step < total_steps:
                epoch = loop.step // steps_per_epoch
                for after, step_metrics in _epoch_steps(step_fn, loop, data, seeds, batch_size):
                    loop = after  # the last finished step, saved if interrupted
                    _record_step(loop, step_metrics, steps_per_epoch)
                    bar.update(1)
                _end_epoch(loop, epoch, on_epoch, epochs)
                bar.set_postfix(
                    epoch=epoch + 1,
                    **{k: f"{float(np.mean(v[epoch])):.3f}" for k, v in loop.history.items()},
                )
                _save(manager, loop)
        _save(manager, loop)
    except KeyboardInterrupt:
        _save(manager, loop)
        raise
    finally:
        bar.close()
        if manager is not None:
            manager.close()
    return loop


# --------------------------------------------------------------------------
# Evaluation (one implementation, single models and ensembles).


def evaluate(
    apply_fn: Callable,
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 1000,
    ensemble: bool = False,
    inputs: Callable[[jax.Array], jax.Array] | None = None,
) -> float | np.ndarray:
    """Top-1 accuracy of ``apply_fn(params, .)`` on (x, y), evaluated in jitted batches.

    Args:
      apply_fn: ``apply_fn(params, x)``, logits of one example (eval mode, as
        ``bgeom.models.functional`` returns it).
      params: its parameters; with ``ensemble``, stacked along axis 0.
      x, y: the examples and their integer labels.
      batch_size: examples per jitted call.
      ensemble: ``params`` has a leading member axis; return one accuracy per member.
      inputs: a map applied to every batch of ``x`` first (a transform's
        ``inputs``, see ``bgeom.augment``).

    Returns:
      The accuracy (a float), or with ``ensemble`` an array of shape (members,).
    """
    predict = _predictor(apply_fn, ensemble)
    members = len(jax.tree.leaves(params)[0]) if ensemble else None
    correct = np.zeros(members) if ensemble else 0
    for start in range(0, len(x), batch_size):
        xb = jnp.asarray(x[start : start + batch_size])
        if inputs is not None:
            xb = inputs(xb)
        logits = predict(params, xb)
        hits = jnp.argmax(logits, -1) == jnp.asarray(y[start : start + batch_size])
        correct = correct + np.asarray(jnp.sum(hits, -1))
    accuracy = correct / max(len(x), 1)
    return accuracy if ensemble else float(accuracy)


@functools.lru_cache(maxsize=32)
def _predictor(apply_fn: Callable, ensemble: bool) -> Callable:
    batched = jax.vmap(apply_fn, in_axes=(None, 0))
    return jax.jit(jax.vmap(batched, in_axes=(0, None)) if ensemble else batched)


# --------------------------------------------------------------------------
# fit: NNX classifiers with softmax cross-entropy.


@dataclasses.dataclass
class TrainResult:
    """A trained model (or ensemble) in the functional form the analyses take.

    Attributes:
      apply_fn: ``apply_fn(params, x)``, logits of one example (eval mode).
      params: the model state; for an ensemble, stacked along axis 0
        (``jax.vmap(apply_fn, in_axes=(0, None))`` evaluates every member).
      seeds: the seeds of the members.
      ensemble: whether ``params`` has the leading member axis.
      history: per-epoch arrays of shape (epochs, members): ``loss``,
        ``train_accuracy``, ``test_accuracy``.
      test_accuracy: final accuracy per member, shape (members,).
      features_fn: ``features_fn(params, x)``, penultimate-layer features.
      model: the first member as an NNX module (eval mode), for inspection.
      inputs: the map of raw inputs the model expects at test time (e.g. the
        frequency flip for a model trained on flipped data, see
        ``bgeom.augment``); ``None`` for the identity. Probe it on
        ``inputs(x)``; test accuracy was measured there.
    """

    apply_fn: models_lib.ApplyFn
    params: Any
    seeds: tuple[int, ...]
    ensemble: bool
    history: dict[str, np.ndarray]
    test_accuracy: np.ndarray
    features_fn: models_lib.ApplyFn | None = None
    model: nnx.Module | None = None
    inputs: Callable[[jax.Array], jax.Array] | None = None

    def member(self, i: int) -> tuple[models_lib.ApplyFn, Any]:
        """``(apply_fn, params)`` of member ``i`` (any result, ensemble or not)."""
        if not self.ensemble:
            if i != 0:
                raise ValueError("This result holds one model; only member 0 exists.")
            return self.apply_fn, self.params
        return self.apply_fn, models_lib.unstack(self.params, i)


def classifier_loss(graphdef: Any, transform: Transform | None = None) -> LossFn:
    """Softmax cross-entropy of an NNX classifier split as ``(graphdef, Param, ...)``.

    The loss's ``params`` are the ``nnx.Param`` state, its ``state`` the rest
    (batch statistics, updated by the forward pass in train mode), its
    ``batch`` ``{"x": images, "y": integer labels}``. ``transform(key, x, y,
    logits_fn)`` (see ``fit``) maps the batch first, with the parameters held
    fixed. Metrics: ``train_accuracy`` on the (transformed) batch.

    A transform with a method ``loss(logits, y) -> (loss, metrics)`` replaces
    the cross-entropy: it gets the model's logits on the transformed batch, which
    may hold more rows than ``y`` (PRIME's JSD consistency loss: clean images
    and two augmented copies, see ``bgeom.augment.PRIME``).
    """
    transform_loss = getattr(transform, "loss", None)

    def loss_fn(params, rest, batch, key):
        x, y = batch["x"], batch["y"]
        if transform is not None:
            frozen = jax.lax.stop_gradient(params)
            logits_fn = lambda xb: nnx.merge(graphdef, frozen, rest, copy=True)(xb)
            x, y = transform(key, x, y, logits_fn)
        # copy=True: fresh variables of this trace, which batch norm may update.
        module = nnx.merge(graphdef, params, rest, copy=True)
        logits = module(x)
        new_rest = nnx.split(module, nnx.Param, ...)[2]
        if transform_loss is not None:
            loss, metrics = transform_loss(logits, y)
            return loss, LossAux(new_rest, metrics)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, LossAux(new_rest, {"train_accuracy": jnp.mean(jnp.argmax(logits, -1) == y)})

    return loss_fn


def _member_seeds(seeds: int | Sequence[int]) -> tuple[tuple[int, ...], bool]:
    if isinstance(seeds, int | np.integer) and not isinstance(seeds, bool):
        return (int(seeds),), False
    try:
        out = tuple(int(s) for s in seeds)
    except TypeError:
        raise ValueError(f"seeds must be an int or a sequence of ints; got {seeds!r}.") from None
    if not out:
        raise ValueError("seeds must not be empty.")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds must be distinct; got {out}.")
    return out, True


def _model_factory(
    model: str | Callable[[int], nnx.Module], data: Dataset, model_kwargs: dict[str, Any]
) -> tuple[Callable[[int], nnx.Module], str]:
    """``(seed -> module, description for run.json)`` of ``fit``'s ``model`` argument."""
    if isinstance(model, str):
        desc = json.dumps({"name": model, **model_kwargs}, sort_keys=True, default=str)
        return lambda s: models_lib.create(
            model, data.shape, data.num_classes, seed=s, **model_kwargs
        ), desc
    if callable(model):
        if model_kwargs:
            raise ValueError("model options go into your factory when model is a callable.")
        return model, getattr(model, "__qualname__", repr(model))
    raise ValueError(f"model must be a model name or a factory; got {model!r}.")


def _run_record(
    model_desc: str,
    config: TrainConfig,
    seeds: tuple[int, ...],
    data: Dataset,
    transform: Transform | None,
) -> dict:
    record = {
        "model": model_desc,
        "config": dataclasses.asdict(config),
        "seeds": list(seeds),
        "data": {"name": data.name, "train_shape": list(data.x_train.shape)},
    }
    if transform is not None:
        describe = getattr(transform, "describe", None)
        record["transform"] = describe() if describe else repr(transform)
    return record


def _eval_apply(graphdef: Any, ts: TrainState) -> models_lib.ApplyFn:
    """The eval-mode ``apply_fn`` of the whole state ``nnx.merge_state(params, rest)``."""
    probe = nnx.merge(graphdef, models_lib.unstack(ts.params, 0), models_lib.unstack(ts.state, 0))
    return models_lib.functional(probe)[0]


def _result(
    graphdef: Any, ts: TrainState, seeds: tuple[int, ...], ensemble: bool, history: dict, final
) -> TrainResult:
    full = nnx.merge_state(ts.params, ts.state)
    first = nnx.merge(graphdef, models_lib.unstack(full, 0))
    apply_fn, first_state = models_lib.functional(first)
    features_fn = (
        models_lib.functional(first, features=True)[0] if hasattr(first, "features") else None
    )
    return TrainResult(
        apply_fn=apply_fn,
        params=full if ensemble else first_state,
        seeds=seeds,
        ensemble=ensemble,
        history=history,
        test_accuracy=np.asarray(final, np.float64),
        features_fn=features_fn,
        model=first,
    )


def fit(
    model: str | Callable[[int], nnx.Module],
    data: Dataset,
    *,
    config: TrainConfig | str = "default",
    seeds: int | Sequence[int] = 0,
    transform: Transform | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    name: str | None = None,
    **model_kwargs: Any,
) -> TrainResult:
    """Train one model (``seeds=int``) or an ensemble (``seeds=[...]``) with optax.

    Args:
      model: a name from ``bgeom.models.MODELS`` (built for ``data``'s shape and
        classes with ``model_kwargs``, e.g. ``activation="softplus"``), or a
        factory ``seed -> nnx.Module``.
      data: the training and test data.
      config: a ``TrainConfig`` or a recipe name (``default``, ``holdmetight``).
      seeds: one seed, or several distinct seeds trained together with vmap.
      transform: ``transform(key, x, y, logits_fn) -> (x, y)`` applied to each
        training batch inside the jitted step (frequency flip, low-pass,
        adversarial examples, augmentation, ...; see ``bgeom.augment``). If it
        has a method ``inputs(x)``, test accuracy is measured on
        ``inputs(x_test)`` and the result's ``inputs`` is that map; if it has a
        method ``loss(logits, y)``, that is the training loss (see
        ``classifier_loss``).
      checkpoint_dir: where orbax checkpoints go; an existing one of the same
        run is resumed (a finished one is loaded without training).
      progress: show a progress bar.
      name: label of the progress bar (default: the model name).

    Returns:
      A ``TrainResult``.
    """
    if isinstance(config, str):
        config = recipe(config)
    if not isinstance(data, Dataset):
        raise ValueError("fit expects a bgeom.data.Dataset (see bgeom.data.load).")
    member_seeds, is_ensemble = _member_seeds(seeds)
    factory, model_desc = _model_factory(model, data, model_kwargs)
    steps = _steps_per_epoch(len(data.x_train), config.batch_size) * config.epochs
    tx = make_optimizer(config, steps)

    modules = [factory(s) for s in member_seeds]
    for m in modules:
        m.train()
    graphdef = nnx.split(modules[0], nnx.Param, ...)[0]
    splits = [nnx.split(m, nnx.Param, ...)[1:] for m in modules]
    init = init_train_state(stack([p for p, _ in splits]), stack([r for _, r in splits]), tx)

    input_map = getattr(transform, "inputs", None)
    eval_apply = _eval_apply(graphdef, init)

    def test_accuracy(ts: TrainState) -> np.ndarray:
        full = nnx.merge_state(ts.params, ts.state)
        return evaluate(eval_apply, full, data.x_test, data.y_test, ensemble=True, inputs=input_map)

    label = f"train {name or (model if isinstance(model, str) else 'model')}"
    done = train_loop(
        classifier_loss(graphdef, transform),
        tx,
        init,
        {"x": data.x_train, "y": data.y_train},
        seeds=member_seeds,
        epochs=config.epochs,
        batch_size=config.batch_size,
        on_epoch=lambda epoch, ts: {"test_accuracy": test_accuracy(ts)},
        checkpoint_dir=checkpoint_dir,
        record=_run_record(model_desc, config, member_seeds, data, transform),
        progress=progress,
        desc=label + (f" x{len(member_seeds)}" if is_ensemble else ""),
    )
    last = done.history["test_accuracy"][-1]
    final = test_accuracy(done.train) if np.isnan(last).any() else last
    result = _result(graphdef, done.train, member_seeds, is_ensemble, done.history, final)
    result.inputs = input_map
    return result
