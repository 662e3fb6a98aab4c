"""The ``bgeom`` command line: parses arguments and calls the suite runner.

Every command writes a run folder (see ``bgeom.suite``). Errors in the input
are reported as one line on stderr with exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset", default="digits", help="digits, synthetic or a TFDS name (default: digits)"
    )
    p.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument(
        "--max-train", type=int, default=None, help="use only the first N training images"
    )
    p.add_argument("--max-test", type=int, default=None, help="use only the first N test images")
    p.add_argument("--model", default="cnn", help="mlp, lenet, cnn or resnet18 (default: cnn)")
    p.add_argument("--activation", default="relu", help="relu, softplus, gelu, tanh or swish")
    p.add_argument("--beta", type=float, default=1.0, help="softplus sharpness (default: 1)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="one seed, or several for a vmapped ensemble",
    )
    p.add_argument("--recipe", default="default", help="training recipe: default or holdmetight")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    p.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<model>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "several processes / hosts (jax.distributed)",
        "Run one copy of the command per process; the probes' work is split over the devices "
        "of all processes and only process 0 writes. Under srun (Slurm) or mpirun (Open MPI) "
        "--distributed alone suffices: JAX detects the rest.",
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="start jax.distributed, detecting unset settings from Slurm / Open MPI",
    )
    g.add_argument(
        "--coordinator-address", default=None, metavar="HOST:PORT", help="address of process 0"
    )
    g.add_argument("--num-processes", type=int, default=None, help="number of processes")
    g.add_argument("--process-id", type=int, default=None, help="this process's id (0 .. N-1)")


def _start_distributed(args: argparse.Namespace) -> None:
    """Start jax.distributed when asked (any distributed flag); before any JAX computation."""
    explicit = (args.coordinator_address, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    from bgeom import sharding

    sharding.initialize(*explicit)


def _single_model_config(args: argparse.Namespace, probes: list[dict[str, Any]]) -> dict[str, Any]:
    dataset = {"name": args.dataset}
    for key in ("size", "data_dir", "max_train", "max_test"):
        if getattr(args, key) is not None:
            dataset[key] = getattr(args, key)
    train: dict[str, Any] = {"recipe": args.recipe}
    for key, field in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "learning_rate")):
        if getattr(args, key) is not None:
            train[field] = getattr(args, key)
    seeds: Any = args.seeds[0] if len(args.seeds) == 1 else list(args.seeds)
    return {
        "name": f"{args.dataset}-{args.model}",
        "datasets": {args.dataset: dataset},
        "models": {
            args.model: {
                "dataset": args.dataset,
                "model": args.model,
                "activation": args.activation,
                "beta": args.beta,
                "seeds": seeds,
                "train": train,
            }
        },
        "probes": probes,
    }


def probes_text(names: list[str] | None = None) -> str:
    """Every registered probe (or those in ``names``) with its options, for ``bgeom probes``."""
    import json

    from bgeom.suite import PROBES

    names = list(names or sorted(PROBES))
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; available: {', '.join(sorted(PROBES))}.")
    lines = []
    for name in names:
        probe = PROBES[name]
        lines += [f"{name}: {probe.description}"]
        for info in probe.options.describe():
            default = json.dumps(list(info.default) if info.is_list else info.default)
            lines.append(f"  {info.name}: {info.type_name} = {default}")
            lines.append(f"      {info.doc}; {info.requirement()}")
        lines.append("")
    lines.append(
        "Every probe also takes models (default: every model of the config) and id "
        "(default: the probe name; set it to run a probe twice)."
    )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bgeom",
        description="Geometry of the decision boundaries of deep image classifiers (JAX).",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "suite",
        help="run a benchmark suite (default: the embedded digits suite)",
        description="Train the configured models, run the configured probes, and write "
        "results, plots and report.html to a run folder. Finished steps are reused. "
        "Run `bgeom probes` to list every probe with its options, types, defaults and "
        "what they do.",
    )
    p.add_argument(
        "--config", default=None, help="TOML or JSON suite config (default: embedded digits suite)"
    )
    p.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _distributed_args(p)

    p = sub.add_parser(
        "probes",
        help="list the suite probes with every option, its type, default and meaning",
        description="Print every suite probe (or the named ones) with its one-line "
        "description and its options: type, default, valid values and meaning. Set them "
        "in a config's [[probes]] table.",
    )
    p.add_argument("names", nargs="*", help="probes to show (default: all)")

    p = sub.add_parser(
        "train",
        help="train one model (or a seed ensemble) and save its checkpoints",
        description="Train a model with optax; re-running the same command resumes or reloads it.",
    )
    _model_args(p)

    p = sub.add_parser(
        "margins",
        help="DeepFool margins of a model on test images",
        description="Train (or reload) a model and compute DeepFool margins on its test images.",
    )
    _model_args(p)
    p.add_argument("--samples", type=int, default=500, help="number of test images (default: 500)")
    p.add_argument(
        "--candidates", type=int, default=10, help="DeepFool candidate classes (default: 10)"
    )
    p.add_argument(
        "--overshoot", type=float, default=0.02, help="DeepFool overshoot (default: 0.02)"
    )
    p.add_argument("--max-iter", type=int, default=50, help="DeepFool iterations (default: 50)")
    _distributed_args(p)

    p = sub.add_parser(
        "prepare",
        help="download and prepare a TFDS dataset (needs network and tensorflow)",
        description="Prepare a TFDS dataset as ArrayRecord files, readable afterwards "
        "without TensorFlow.",
    )
    p.add_argument("name", help="TFDS dataset name, e.g. mnist or cifar10")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")

    p = sub.add_parser("report", help="rebuild report.html of a run folder")
    p.add_argument("run", help="the run folder")
    return parser


def _run(args: argparse.Namespace) -> int:
    from bgeom import suite

    progress = not getattr(args, "no_progress", False)
    if hasattr(args, "distributed"):
        _start_distributed(args)
    if args.command == "suite":
        suite.run(args.config, args.out, progress=progress)
    elif args.command == "probes":
        sys.stdout.write(probes_text(args.names))
    elif args.command == "train":
        if args.out is None:
            args.out = os.path.join("runs", f"{args.dataset}-{args.model}")
        suite.run(_single_model_config(args, []), args.out, progress=progress)
    elif args.command == "margins":
        if args.out is None:
            args.out = os.path.join("runs", f"{args.dataset}-{args.model}")
        if args.max_iter < 0:
            raise ValueError("--max-iter must be >= 0.")
        probe = {
            "probe": "margins",
            "samples": args.samples,
            "candidates": args.candidates,
            "overshoot": args.overshoot,
            "max_iter": args.max_iter,
        }
        suite.run(_single_model_config(args, [probe]), args.out, progress=progress)
    elif args.command == "prepare":
        from bgeom import data

        print(f"prepared {args.name} in {data.prepare(args.name, args.data_dir)}")
    elif args.command == "report":
        from pathlib import Path

        from bgeom import report

        if not (Path(args.run) / "config.json").exists():
            raise ValueError(f"{args.run} is not a bgeom run folder (no config.json).")
        print(f"report: {report.write_report(args.run)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ValueError as e:
        sys.stderr.write(f"bgeom: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("bgeom: interrupted; finished steps are saved, re-run to resume.\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
