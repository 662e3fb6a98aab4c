"""What every suite probe builds on: typed options, the context, the registry, statistics.

A probe is a function ``probe(ctx, opts, *, probe_id, models) -> ProbeOutput``
registered with ``@register_probe(name, Options)``. ``Options`` is a frozen
dataclass deriving from ``ProbeOptions`` whose fields are declared with
``option(default, doc, ...)``: the one place where an option's type, default,
valid range and one-line documentation live. The suite validates a config's
probe table against it, writes the resolved options to ``config.json``, and
``bgeom probes`` prints them. ``ctx`` (a ``SuiteContext``) hands the probe the
members of each model (``ctx.members``: every member of an ensemble, each
analysed as an entry of its own) and the images as each model sees them
(``ctx.test_inputs``, ``ctx.train_inputs``). The summary statistics every probe
reports (medians, quartiles, fractions, JSON-safe values) are the functions at
the end of this module. See docs/suite.md.

This module never imports ``bgeom.suite``: the suite imports it and the probes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bgeom import augment as augment_lib
from bgeom import data as data_lib
from bgeom import train as train_lib

# ------------------------------------------------------------------ options


def option(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[str] | None = None,
) -> Any:
    """Declare one probe option: its default, its one-line doc and its valid values.

    The type is the field's annotation: ``int``, ``float``, ``str``, ``bool``,
    or ``tuple[int | float | str, ...]`` (a list in configs). The bounds
    ``ge``/``gt``/``le``/``lt`` and ``choices`` apply to the value, or to every
    element of a tuple.
    """
    limits = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    meta = {"doc": doc, "limits": {k: v for k, v in limits.items() if v is not None}}
    meta["choices"] = tuple(choices) if choices is not None else None
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One option of a probe, as ``bgeom probes`` lists it.

    Attributes:
      name: the key in a config's probe table.
      kind: the element type (``int``, ``float``, ``str`` or ``bool``).
      is_list: whether the option is a list of ``kind``.
      default: the default value (a tuple for lists).
      doc: one-line description.
      limits: bounds among ``ge``, ``gt``, ``le``, ``lt``.
      choices: the allowed strings, or ``None``.
    """

    name: str
    kind: type
    is_list: bool
    default: Any
    doc: str
    limits: dict[str, float]
    choices: tuple[str, ...] | None

    @property
    def type_name(self) -> str:
        return f"list[{self.kind.__name__}]" if self.is_list else self.kind.__name__

    def requirement(self) -> str:
        """What a valid value is, in words: 'an integer >= 1', 'one of 'a', 'b''."""
        if self.choices is not None:
            one = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            noun = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
            symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
            bounds = [f"{symbols[k]} {v:g}" for k, v in self.limits.items()]
            one = noun[self.kind] + (" " + " and ".join(bounds) if bounds else "")
        return f"a non-empty list, each element {one}" if self.is_list else one

    def convert(self, value: Any) -> Any:
        """``value`` as this option's type; raises ``ValueError`` (without context)."""
        if self.is_list:
            if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
                raise ValueError
            if len(value) == 0:
                raise ValueError
            return tuple(self._convert_one(v) for v in value)
        return self._convert_one(value)

    def _convert_one(self, value: Any) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool | np.bool_):
                raise ValueError
            return bool(value)
        if self.kind is str:
            if not isinstance(value, str):
                raise ValueError
            if self.choices is not None and value not in self.choices:
                raise ValueError
            return value
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
            raise ValueError
        if self.kind is int:
            if isinstance(value, float | np.floating):
                if not float(value).is_integer():
                    raise ValueError
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
        checks = {
            "ge": lambda v, b: v >= b,
            "gt": lambda v, b: v > b,
            "le": lambda v, b: v <= b,
            "lt": lambda v, b: v < b,
        }
        for name, bound in self.limits.items():
            if not checks[name](value, bound):
                raise ValueError
        return value


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
    """Base of every probe's options: a frozen dataclass whose fields come from ``option``."""

    @classmethod
    def describe(cls) -> list[OptionInfo]:
        """Every option of this probe, in declaration order."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            kind, is_list = hints[f.name], False
            if typing.get_origin(kind) is tuple:
                kind, is_list = typing.get_args(kind)[0], True
            if kind not in (int, float, str, bool):
                raise TypeError(f"{cls.__name__}.{f.name}: unsupported option type {kind!r}.")
            if "doc" not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name}: declare options with option(...).")
            out.append(
                OptionInfo(
                    f.name,
                    kind,
                    is_list,
                    f.default,
                    f.metadata["doc"],
                    dict(f.metadata["limits"]),
                    f.metadata["choices"],
                )
            )
        return out

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], where: str) -> ProbeOptions:
        """Options from a config's probe table (without probe/id/models), validated.

        Args:
          spec: option name -> value; missing options take their default.
          where: how errors name the table, e.g. ``"probes[2] (curvature)"``.

        Raises:
          ValueError: an unknown option, or a value of the wrong type or range.
        """
        infos = {info.name: info for info in cls.describe()}
        bad = set(spec) - set(infos)
        if bad:
            raise ValueError(
                f"{where}: unknown option(s) {sorted(bad)}; valid: {sorted(infos)} "
                "(`bgeom probes` lists them)."
            )
        values = {}
        for name, value in spec.items():
            info = infos[name]
            try:
                values[name] = info.convert(value)
            except (ValueError, TypeError):
                raise ValueError(
                    f"{where}: {name} must be {info.requirement()}; got {value!r}."
                ) from None
        return cls(**values)

    def to_spec(self) -> dict[str, Any]:
        """Every option with its value, JSON-ready (lists for tuples): for ``config.json``."""
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }


# ------------------------------------------------------------------ outputs and registry


@dataclasses.dataclass
class ProbeOutput:
    """What a probe returns: numbers for the summary, arrays, and figures.

    Attributes:
      summary: JSON-serialisable numbers (every number behind every plot);
        NaN and infinities are written as ``null``.
      arrays: named NumPy arrays saved to ``results/<probe>.npz``.
      figures: named matplotlib figures saved as PNG and embedded in the report.
      notes: sentences for the report (caveats, what was skipped and why).
    """

    summary: dict[str, Any]
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Probe:
    """A registered probe.

    Attributes:
      name: its name in configs (``probe = "<name>"``).
      fn: ``fn(ctx, opts, *, probe_id, models) -> ProbeOutput``.
      options: its options class (a ``ProbeOptions`` dataclass).
      description: one line, the first line of ``fn``'s docstring.
    """

    name: str
    fn: Callable[..., ProbeOutput]
    options: type[ProbeOptions]
    description: str

    @property
    def defaults(self) -> dict[str, Any]:
        """Every option with its default value, JSON-ready."""
        return self.options().to_spec()

    def run(self, ctx: SuiteContext, spec: Mapping[str, Any]) -> ProbeOutput:
        """Run on a resolved config entry (``probe``, ``id``, ``models`` and the options)."""
        raw = {k: v for k, v in spec.items() if k not in ("probe", "id", "models")}
        opts = self.options.from_spec(raw, f"probe {spec['id']} ({self.name})")
        return self.fn(ctx, opts, probe_id=spec["id"], models=tuple(spec["models"]))


PROBES: dict[str, Probe] = {}


def register_probe(name: str, options: type[ProbeOptions]) -> Callable:
    """Register ``fn(ctx, opts, *, probe_id, models) -> ProbeOutput`` as the probe ``name``.

    ``options`` is the probe's ``ProbeOptions`` dataclass: a config may set any
    of its fields and nothing else. Every probe also takes ``models`` (default:
    all) and ``id`` (default: its name). The first line of ``fn``'s docstring is
    the probe's description.
    """
    if not (isinstance(options, type) and issubclass(options, ProbeOptions)):
        raise TypeError(f"register_probe({name!r}): options must be a ProbeOptions dataclass.")
    options.describe()  # fails now on a field declared without option(...)

    def decorator(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()
        PROBES[name] = Probe(name, fn, options, doc[0] if doc else name)
        return fn

    return decorator


# ------------------------------------------------------------------ the context


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """One member of a model: what a probe analyses, one summary entry each.

    Attributes:
      name: the key of the entry in summaries and arrays: the model key for a
        single model, ``"<key>[i]"`` for member i of an ensemble.
      model: the model key in the config.
      index: the member's index in the ensemble (0 for a single model).
      seed: the member's training seed.
      apply_fn: ``apply_fn(params, x)``, logits of one example.
      params: this member's parameters (no ensemble axis).
      features_fn: ``features_fn(params, x)``, the penultimate-layer features of
        one example (same ``params``), or ``None`` when the model has none.
    """

    name: str
    model: str
    index: int
    seed: int
    apply_fn: Callable
    params: Any
    features_fn: Callable | None


class SuiteContext:
    """What a probe sees: the datasets, the trained models, the output folder."""

    def __init__(self, config: dict[str, Any], out: Path, progress: bool = True):
        self.config = config
        self.out = Path(out)
        self.progress = progress
        # The mesh ctx.map sweeps over; None: every device of every process.
        self.mesh = None
        self._datasets: dict[str, data_lib.Dataset] = {}
        self._models: dict[str, train_lib.TrainResult] = {}
        self._members: dict[str, list[Member]] = {}

    def dataset(self, key: str) -> data_lib.Dataset:
        """The dataset defined as ``key`` in the config (loaded once)."""
        if key not in self._datasets:
            spec = dict(self.config["datasets"][key])
            options = spec.pop("options", {}) or {}
            name = spec.pop("name")
            if name == "synthetic" and "shape" in options:
                options = {**options, "shape": tuple(options["shape"])}
            self._datasets[key] = data_lib.load(name, **spec, **options)
        return self._datasets[key]

    def model_dataset(self, model_key: str) -> data_lib.Dataset:
        """The dataset model ``model_key`` was trained on."""
        return self.dataset(self.config["models"][model_key]["dataset"])

    def model(self, key: str) -> train_lib.TrainResult:
        """The model defined as ``key``, trained on first use (or loaded if finished)."""
        if key not in self._models:
            spec = self.config["models"][key]
            train_spec = dict(spec["train"])
            config = train_lib.recipe(train_spec.pop("recipe"), **train_spec)
            folder = self.out / "models" / key
            seeds = spec["seeds"]
            result = train_lib.fit(
                spec["model"],
                self.model_dataset(key),
                config=config,
                seeds=seeds if isinstance(seeds, int) else list(seeds),
                checkpoint_dir=folder,
                progress=self.progress,
                name=key,
                transform=augment_lib.get(spec.get("augment")),
                activation=spec["activation"],
                beta=spec["beta"],
                **spec["options"],
            )
            summary = {
                "model": key,
                "spec": spec,
                "test_accuracy": np.atleast_1d(result.test_accuracy).tolist(),
                "history": {k: v.tolist() for k, v in result.history.items()},
            }
            if _is_writer():  # in a multi-process run only process 0 writes
                (folder / "summary.json").write_text(json.dumps(summary, indent=2))
            self._models[key] = result
        return self._models[key]

    def members(self, key: str) -> list[Member]:
        """Every member of model ``key`` (one unless an ensemble), each a ``Member``.

        The one ensemble policy of the suite: a probe analyses every member and
        reports each under ``member.name``.
        """
        if key not in self._members:
            result = self.model(key)
            seeds = tuple(result.seeds)
            out = []
            for i, seed in enumerate(seeds):
                apply_fn, params = result.member(i)
                name = key if len(seeds) == 1 else f"{key}[{i}]"
                out.append(Member(name, key, i, int(seed), apply_fn, params, result.features_fn))
            self._members[key] = out
        return self._members[key]

    def all_members(self, keys: Sequence[str]) -> list[Member]:
        """The members of every model in ``keys``, in order."""
        return [m for key in keys for m in self.members(key)]

    def as_seen(self, key: str, x: np.ndarray) -> np.ndarray:
        """Images ``x`` mapped as model ``key`` saw its training inputs.

        Models trained with a transform that maps inputs (``augment = "flip"``,
        ``low_pass``) are probed on the mapped images, as in "Hold me tight!";
        for the others ``x`` is returned unchanged.
        """
        inputs = self.model(key).inputs
        return x if inputs is None else np.asarray(inputs(x))

    def test_inputs(self, key: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` (default: all) test images and labels, as model ``key`` sees them."""
        data = self.model_dataset(key)
        n = len(data.x_test) if n is None else min(int(n), len(data.x_test))
        return self.as_seen(key, data.x_test[:n]), data.y_test[:n]

    def train_inputs(self, key: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` (default: all) training images and labels, as model ``key`` sees them."""
        data = self.model_dataset(key)
        n = len(data.x_train) if n is None else min(int(n), len(data.x_train))
        return self.as_seen(key, data.x_train[:n]), data.y_train[:n]

    def map(
        self,
        fn: Callable,
        *args: Any,
        in_axes: tuple[int | None, ...] | int = 0,
        batch_size: int = 128,
        desc: str = "",
    ) -> Any:
        """``jax.jit(jax.vmap(fn, in_axes))(*args)`` through ``bgeom.sweep``, with progress.

        Arguments with ``in_axes`` 0 are mapped over their leading axis, split
        over every device (and every process of a multi-process run) and
        chunked ``batch_size`` examples at a time; those with ``None``
        (parameters) are passed whole and replicated. One compiled function
        serves every chunk; the padding of the last chunk is dropped. Returns
        NumPy arrays, the whole result on every process.
        """
        from bgeom.sharding import sweep

        return sweep(
            fn,
            *args,
            in_axes=in_axes,
            mesh=self.mesh,
            batch_size=batch_size,
            progress=self.progress,
            desc=desc,
        )

    def batched(
        self,
        fn: Callable,
        member: Member,
        *rows: Any,
        batch_size: int | None = None,
        desc: str = "",
        **options: Any,
    ) -> Any:
        """``bgeom.batched(fn)`` for one member: an iterative analysis with compaction.

        ``fn`` is an iterative bgeom analysis (``deepfool``, ``targeted_deepfool``,
        ``subspace_deepfool``, ``boundary_point``) or ``subspace_margins``;
        ``rows`` are its per-example arguments (images first), ``options`` its
        keywords. Every step runs as a jitted top-level call and finished
        examples leave the batch at once (``bgeom.engine``); the slots are
        split over this process's devices. In a multi-process run the rows
        are split over the processes and the result gathered. Returns NumPy
        arrays, the whole result on every process.
        """
        from bgeom import engine, margins

        kw = dict(batch_size=batch_size, progress=self.progress, desc=desc, **options)
        run = fn if fn is margins.subspace_margins else engine.batched(fn)
        return run(member.apply_fn, member.params, *rows, **kw)


def _is_writer() -> bool:
    from bgeom.sharding import process_info

    return process_info().index == 0


def is_flip(augment: Any) -> bool:
    """Whether a model's ``augment`` entry is the frequency flip."""
    return augment == "flip" or (isinstance(augment, dict) and augment.get("name") == "flip")


# ------------------------------------------------------------------ summary statistics
#
# Every probe reports its numbers through these: statistics of the finite
# values (None when there are none), fractions (None of nothing), and
# json_safe, which the suite applies to every summary before writing it.


def finite(values: Any) -> np.ndarray:
    """The finite entries of ``values``, flattened, in their own dtype."""
    a = np.asarray(values).ravel()
    return a[np.isfinite(a)] if a.dtype.kind in "fc" else a


def median(values: Any) -> float | None:
    """Median of the finite values; ``None`` when there are none."""
    a = finite(values)
    return float(np.median(a)) if a.size else None


def mean(values: Any) -> float | None:
    """Mean of the finite values; ``None`` when there are none."""
    a = finite(values)
    return float(np.mean(a)) if a.size else None


def censored_median(values: Any) -> float | None:
    """Median of all values, infinities counting as larger than every finite value.

    ``None`` when the median lands on an infinity (most searches never flipped
    the label) or there is no value.
    """
    a = np.asarray(values)
    if a.size == 0:
        return None
    m = float(np.median(a))
    return m if math.isfinite(m) else None


def quantiles(values: Any, qs: Sequence[float], axis: int | None = None) -> list | None:
    """Quantiles ``qs`` of the finite values (``axis=None``), or along ``axis`` of all values.

    Along an axis, infinities count as larger than every finite value (a search
    that never flipped the label), and a quantile that lands on one is ``None``.
    Returns a list (of lists along an axis), or ``None`` when there is no value.
    """
    if axis is None:
        a = finite(values)
        return np.quantile(a, list(qs)).tolist() if a.size else None
    a = np.asarray(values)
    if a.shape[axis] == 0:
        return None
    with np.errstate(invalid="ignore"):  # inf - inf while interpolating between infinities
        q = np.quantile(a, list(qs), axis=axis)
    return json_safe(q.tolist())


def fraction(mask: Any, axis: int | None = None) -> Any:
    """Fraction of True entries (a list along ``axis``); ``None`` when ``mask`` is empty."""
    m = np.asarray(mask, bool)
    if m.size == 0:
        return None
    return float(np.mean(m)) if axis is None else np.mean(m, axis=axis).tolist()


def flipped_fraction(margin: Any, axis: int | None = None) -> Any:
    """Fraction of searches that flipped the label: finite entries of ``margin`` (inf: no flip)."""
    return fraction(np.isfinite(np.asarray(margin, np.float64)), axis)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as ``None``, NumPy scalars and arrays as Python values."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
