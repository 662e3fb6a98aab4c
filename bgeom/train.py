"""optax training of Flax NNX classifiers: one model or a vmapped ensemble of seeds.

A single model is an ensemble of one: every seed's parameters and optimiser
state are stacked along a leading axis and one jitted, vmapped step updates
them all, each member reading its own seeded shuffle of the same data. The
member trained with seed ``s`` is the model ``fit(..., seeds=s)`` returns.

Checkpoints (orbax) are written at every epoch end, at the end, and when the
run is interrupted (Ctrl-C or SIGTERM); a run restarted with the same
``checkpoint_dir`` resumes at the exact step it stopped at, because the batch
order is a pure function of (seed, epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

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
    # "Hold me tight!" (Ortiz-Jimenez et al. 2020, SPEC.md section 1): SGD with
    # momentum 0.9, weight decay 5e-4, batch 128, triangular learning rate
    # 0 -> 0.21 (at 2/5 of training) -> 0, gradient-norm clipping 0.5.
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


def evaluate(
    apply_fn: Callable, params: Any, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``apply_fn(params, .)`` on (x, y), evaluated in jitted batches."""
    predict = _predictor(apply_fn)
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = predict(params, jnp.asarray(x[start : start + batch_size]))
        correct += int(
            jnp.sum(jnp.argmax(logits, -1) == jnp.asarray(y[start : start + batch_size]))
        )
    return correct / max(len(x), 1)


@functools.lru_cache(maxsize=32)
def _predictor(apply_fn: Callable) -> Callable:
    return jax.jit(jax.vmap(apply_fn, in_axes=(None, 0)))


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


def _batch_indices(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """Member ``seed``'s batch order for ``epoch``: (steps, batch_size) indices."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


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


def _run_record(
    model_desc: str, config: TrainConfig, seeds: tuple[int, ...], data: Dataset
) -> dict:
    return {
        "model": model_desc,
        "config": dataclasses.asdict(config),
        "seeds": list(seeds),
        "data": {"name": data.name, "train_shape": list(data.x_train.shape)},
    }


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
        ``inputs(x_test)`` and the result's ``inputs`` is that map.
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
    if isinstance(model, str):
        model_desc = json.dumps({"name": model, **model_kwargs}, sort_keys=True, default=str)
        factory = lambda s: models_lib.create(
            model, data.shape, data.num_classes, seed=s, **model_kwargs
        )
    elif callable(model):
        if model_kwargs:
            raise ValueError("model options go into your factory when model is a callable.")
        model_desc = getattr(model, "__qualname__", repr(model))
        factory = model
    else:
        raise ValueError(f"model must be a model name or a factory; got {model!r}.")

    n = len(data.x_train)
    if n < config.batch_size:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the training set ({n}); lower it."
        )
    steps_per_epoch = n // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    tx = make_optimizer(config, total_steps)
    num_members = len(member_seeds)

    modules = [factory(s) for s in member_seeds]
    for m in modules:
        m.train()
    graphdef, _, _ = nnx.split(modules[0], nnx.Param, ...)
    splits = [nnx.split(m, nnx.Param, ...)[1:] for m in modules]
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
    params = stack([p for p, _ in splits])
    rest = stack([r for _, r in splits])
    opt_state = jax.vmap(tx.init)(params)
    history = {
        k: np.full((config.epochs, num_members), np.nan, np.float32)
        for k in ("loss", "train_accuracy", "test_accuracy")
    }
    step = 0

    def member_step(params, rest, opt_state, x, y, key):
        if transform is not None:
            frozen = jax.lax.stop_gradient(params)
            logits_fn = lambda xb: nnx.merge(graphdef, frozen, rest)(xb)
            x, y = transform(key, x, y, logits_fn)

        def loss_fn(p):
            module = nnx.merge(graphdef, p, rest)
            logits = module(x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (nnx.split(module, nnx.Param, ...)[2], logits)

        (loss, (new_rest, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return params, new_rest, opt_state, loss, accuracy

    train_step = jax.jit(jax.vmap(member_step), donate_argnums=(0, 1, 2))

    manager = None
    if checkpoint_dir is not None:
        import orbax.checkpoint as ocp

        checkpoint_dir = Path(checkpoint_dir).absolute()
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        record = _run_record(model_desc, config, member_seeds, data)
        if transform is not None:
            describe = getattr(transform, "describe", None)
            record["transform"] = describe() if describe else repr(transform)
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
        manager = ocp.CheckpointManager(
            checkpoint_dir / "steps", options=ocp.CheckpointManagerOptions(max_to_keep=2)
        )
        latest = manager.latest_step()
        if latest is not None:
            target = {"params": params, "rest": rest, "opt_state": opt_state, "history": history}
            restored = manager.restore(latest, args=ocp.args.StandardRestore(target))
            params, rest, opt_state = restored["params"], restored["rest"], restored["opt_state"]
            history = {k: np.asarray(v) for k, v in restored["history"].items()}
            step = int(latest)

    def save() -> None:
        if manager is None or manager.latest_step() == step:
            return
        import orbax.checkpoint as ocp

        tree = {"params": params, "rest": rest, "opt_state": opt_state, "history": history}
        manager.save(step, args=ocp.args.StandardSave(tree), force=True)
        manager.wait_until_finished()

    eval_graphdef = None
    input_map = getattr(transform, "inputs", None)

    def test_accuracy() -> np.ndarray:
        nonlocal eval_graphdef
        # Evaluation uses batch-norm running statistics (eval mode).
        if eval_graphdef is None:
            probe = nnx.merge(graphdef, models_lib.unstack(params, 0), models_lib.unstack(rest, 0))
            probe.eval()
            eval_graphdef = nnx.split(probe, nnx.Param, ...)[0]
        run = _eval_predictor(eval_graphdef)
        correct = np.zeros(num_members)
        for start in range(0, len(data.x_test), 1000):
            xb = jnp.asarray(data.x_test[start : start + 1000])
            if input_map is not None:
                xb = input_map(xb)
            logits = run(params, rest, xb)
            correct += np.asarray(
                jnp.sum(jnp.argmax(logits, -1) == data.y_test[start : start + 1000], -1)
            )
        return correct / max(len(data.x_test), 1)

    keys = jnp.stack([jax.random.PRNGKey(s) for s in member_seeds])
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not progress,
        desc=f"train {name or (model if isinstance(model, str) else 'model')}"
        + (f" x{num_members}" if is_ensemble else ""),
        unit="step",
        leave=False,
    )
    try:
        with _sigterm_as_interrupt():
            while step < total_steps:
                epoch, offset = divmod(step, steps_per_epoch)
                order = np.stack(
                    [_batch_indices(s, epoch, n, config.batch_size) for s in member_seeds]
                )
                losses, accs = [], []
                for j in range(offset, steps_per_epoch):
                    idx = order[:, j]
                    xb = jnp.asarray(data.x_train[idx])
                    yb = jnp.asarray(data.y_train[idx])
                    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
                    params, rest, opt_state, loss, acc = train_step(
                        params, rest, opt_state, xb, yb, step_keys
                    )
                    losses.append(loss)
                    accs.append(acc)
                    step += 1
                    bar.update(1)
                history["loss"][epoch] = np.mean(np.asarray(losses), 0) if losses else np.nan
                history["train_accuracy"][epoch] = np.mean(np.asarray(accs), 0) if accs else np.nan
                history["test_accuracy"][epoch] = test_accuracy()
                bar.set_postfix(
                    epoch=epoch + 1,
                    loss=f"{float(np.mean(history['loss'][epoch])):.3f}",
                    test_acc=f"{float(np.mean(history['test_accuracy'][epoch])):.3f}",
                )
                save()
    except KeyboardInterrupt:
        save()
        bar.close()
        raise
    bar.close()
    save()
    if manager is not None:
        manager.close()

    final = (
        test_accuracy()
        if np.isnan(history["test_accuracy"][-1]).any()
        else history["test_accuracy"][-1]
    )
    members = []
    for i in range(num_members):
        module = nnx.merge(graphdef, models_lib.unstack(params, i), models_lib.unstack(rest, i))
        members.append(module)
    apply_fn, first_state = models_lib.functional(members[0])
    features_fn = (
        models_lib.functional(members[0], features=True)[0]
        if hasattr(members[0], "features")
        else None
    )
    states = [first_state] + [models_lib.functional(m)[1] for m in members[1:]]
    out_params = stack(states) if is_ensemble else first_state
    return TrainResult(
        apply_fn=apply_fn,
        params=out_params,
        seeds=member_seeds,
        ensemble=is_ensemble,
        history=history,
        test_accuracy=np.asarray(final, np.float64),
        features_fn=features_fn,
        model=members[0],
        inputs=input_map,
    )


@functools.lru_cache(maxsize=32)
def _eval_predictor(eval_graphdef: Any) -> Callable:
    return jax.jit(
        jax.vmap(lambda p, r, xb: nnx.merge(eval_graphdef, p, r)(xb), in_axes=(0, 0, None))
    )
