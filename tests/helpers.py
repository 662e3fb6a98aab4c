"""Shared test helpers: the one dtype-aware tolerance and small hand-solvable classifiers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def tol(dtype, scale: float = 1.0) -> dict[str, float]:
    """rtol/atol for comparing results computed in ``dtype`` (``scale`` loosens both)."""
    eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
    return {"rtol": scale * 64 * eps, "atol": scale * 64 * eps}


def affine_classifier(seed: int, num_classes: int, shape=(4, 4, 1)):
    """``f(x) = W vec(x) + b`` with random W, b: its DeepFool answer is known in closed form."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    W = jnp.asarray(rng.standard_normal((num_classes, d)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(num_classes), jnp.float32)
    return (lambda p, x: p[0] @ x.ravel() + p[1]), (W, b)


def affine_margin(params, x, candidates: int, overshoot: float) -> tuple[float, int]:
    """Closed form: (1 + overshoot)(d + 1e-4) with d the distance to the nearest pairwise
    hyperplane among the top ``candidates`` classes, and that class. Float64 NumPy."""
    W, b = (np.asarray(a, np.float64) for a in params)
    f = W @ np.asarray(x, np.float64).ravel() + b
    order = np.argsort(-f, kind="stable")[:candidates]
    k0 = order[0]
    dists = {int(k): abs(f[k] - f[k0]) / np.linalg.norm(W[k] - W[k0]) for k in order[1:]}
    k = min(dists, key=dists.get)
    return (1.0 + overshoot) * (dists[k] + 1e-4), k


# ------------------------------------------------------------------ tiny suite configs


def tiny_dataset(**spec) -> dict:
    """A digits subset for a test (300 training, 40 test images); ``spec`` overrides."""
    return {"name": "digits", "max_train": 300, "max_test": 40, **spec}


def tiny_model(dataset: str = "d", **spec) -> dict:
    """A one-hidden-layer MLP (16 units) trained for 2 epochs on ``dataset``; ``spec`` overrides."""
    return {
        "dataset": dataset,
        "model": "mlp",
        "options": {"hidden": [16]},
        "train": {"epochs": 2, "batch_size": 32},
        **spec,
    }


def tiny_config(*probes: dict, name: str = "tiny", datasets=None, models=None) -> dict:
    """The suite config of a test: ``probes`` on ``models`` (default: one tiny MLP "m") trained
    on ``datasets`` (default: one tiny digits subset "d")."""
    return {
        "name": name,
        "datasets": datasets if datasets is not None else {"d": tiny_dataset()},
        "models": models if models is not None else {"m": tiny_model()},
        "probes": list(probes),
    }


def to_toml(config: dict) -> str:
    """A suite config as TOML (tables of datasets and models, an array of probe tables)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(e) for e in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(e)}" for k, e in v.items()) + " }"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in config.items() if not isinstance(v, dict | list)]
    for section in ("datasets", "models"):
        for key, spec in config.get(section, {}).items():
            lines += ["", f'[{section}."{key}"]'] + [f"{k} = {value(v)}" for k, v in spec.items()]
    for probe in config.get("probes", []):
        lines += ["", "[[probes]]"] + [f"{k} = {value(v)}" for k, v in probe.items()]
    return "\n".join(lines) + "\n"
