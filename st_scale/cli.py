"""`st-scale`: train, sweep, demo, convert, eval, export, mlflow-server, recipes."""

from __future__ import annotations

import argparse
import os
import re
import sys

from . import __version__
from .errors import ConfigError, RunFailedError, RunStoppedError
from .provenance import provenance
from .schema import checked_name
from .storage import check_writable
from .tracking import serve_mlflow

EPILOG = """examples:
  st-scale demo                                   CT vs ST on the bundled digits, local Ray, 2 CPU workers
  st-scale recipes                                list packaged recipes
  st-scale train demo_st --set optimizer.epochs=5 --set method.kl_weight=0.5
  st-scale train imagenet_resnet50_st --address auto --summary-json out.json
  st-scale convert fashion-mnist --out ~/.cache/st_scale/fashion   Debian's dataset-fashion-mnist as .beton
  st-scale convert imagefolder /data/imagenet --out /shared/imagenet --write-mode proportion --max-resolution 256
  st-scale eval ~/st_scale_runs/demo-st/checkpoint_2026-11-27_...   all sub-nets + destruction tests of a checkpoint
  st-scale eval s3://runs/demo-st/checkpoint_2026-11-27_... --storage-endpoint http://minio:9000
  st-scale export ~/st_scale_runs/demo-st/checkpoint_2026-11-27_... --subnet 1,2,1   a sub-network as its own model
  st-scale sweep tune/sampling_kl.yaml --set num_samples=32 --address auto
  st-scale report tune/fashion_table1.yaml         a study's Table 1, loafing figure and destruction curves
  st-scale mlflow-server --port 5000                 the MLflow UI over ./mlflow.db on http://127.0.0.1:5000

Re-running `train` with the same run.name (under run.storage_path) resumes it from its last complete
checkpoint and continues the same MLflow run; re-running `sweep` with the same spec name resumes the
sweep (Tune restores it, unfinished trials continue from their checkpoints, same parent run).

exit codes: 0 done; 1 a run or sweep failed, or an internal error (one line naming the file that holds
its traceback, under $ST_SCALE_ERROR_DIR, default ~/.cache/st_scale/errors); 2 bad input, found
before any work started (the message names the field or option, the value, and the fix); 130 and 143
stopped by Ctrl-C or SIGTERM (the workers stopped with it; the same command resumes)."""


def counted(minimum: int = 1, maximum: int | None = None):
    """An argparse type for a whole number in [minimum, maximum]: argparse names the option and exits 2."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a number {bound}")
        return value

    return parse


def recipe_pair(text: str) -> tuple[str, str]:
    """An argparse type for two recipe names, CT's and ST's."""
    names = tuple(part.strip() for part in text.split(","))
    if len(names) != 2 or not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give two recipes, e.g. demo_swin_ct,demo_swin_st")
    return names


def _add_ray_address(p) -> None:
    p.add_argument(
        "--address",
        help="Ray cluster address, e.g. 10.0.0.1:6379 or auto (default: $RAY_ADDRESS, which "
        "`ray job submit` sets; else a local Ray on 127.0.0.1)",
    )


def _parser(sub, name: str, help: str, description: str, *, examples: bool = False) -> argparse.ArgumentParser:
    """A sub-command's parser; `examples` adds the shared examples below its options."""
    if examples:
        return sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    return sub.add_parser(name, help=help, description=description)


def _add_verbose(p) -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show everything Ray Train, the workers and MLflow log (default: a progress bar, one line per "
        "epoch, warnings and errors), and a failed run's full traceback",
    )


def _add_set(p, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_train(sub) -> None:
    p = _parser(
        sub,
        "train",
        "train one run (local Ray, or a cluster via --address / RAY_ADDRESS)",
        "Train with Ray Train + DeepSpeed + FFCV; track in MLflow.",
        examples=True,
    )
    p.add_argument("recipe", help="packaged recipe name (see `st-scale recipes`) or a .yaml path")
    _add_set(p, "override a recipe field, e.g. --set optimizer.epochs=5 (repeatable; value parsed as YAML)")
    _add_ray_address(p)
    p.add_argument("--summary-json", metavar="PATH", help="write the run summary as JSON")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="make every check a run makes before Ray starts (the data files against their contents, the model, "
        "the DeepSpeed config, the run storage, the tracking store, a checkpoint to resume), print the resolved "
        "config and exit; it creates the storage folder and the MLflow experiment if missing, and trains nothing",
    )
    _add_verbose(p)


def _add_sweep(sub) -> None:
    p = _parser(
        sub,
        "sweep",
        "a Ray Tune sweep of ST training runs (one MLflow parent run, a child per trial)",
        "Sweep a recipe's fields (sampling distribution, KL weight, ...) with Ray Tune: each "
        "trial fits a TorchTrainer of DeepSpeed workers; the scheduler (ASHA) stops weak "
        "trials early. MLflow gets one parent run per sweep with the best trial and a "
        "comparison plot, and one child run per trial.",
        examples=True,
    )
    p.add_argument("spec", help="a sweep spec .yaml, or the name of one in ./tune/ (e.g. sampling_kl)")
    _add_set(p, "override a spec field, e.g. --set num_samples=4 or --set set.optimizer.epochs=3 (repeatable)")
    _add_ray_address(p)
    p.add_argument("--summary-json", metavar="PATH", help="write the trials table and the best trial as JSON")
    p.add_argument("--check", action="store_true", help="check the spec against its recipe and exit")


def _add_mlflow_server(sub) -> None:
    p = _parser(
        sub,
        "mlflow-server",
        "serve the MLflow UI and tracking API (SQLite or PostgreSQL store)",
        "Run `mlflow server` on 127.0.0.1 over a SQLite file (one machine) or a PostgreSQL database (a cluster, "
        "many concurrent writers). Point training at it with MLFLOW_TRACKING_URI=http://HOST:PORT (or --set "
        "tracking.tracking_uri=...).",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (use 0.0.0.0 only behind a firewall)")
    p.add_argument("--port", type=counted(1, 65535), default=5000)
    p.add_argument(
        "--backend-store",
        default="mlflow.db",
        help="a SQLite file, or a database URI such as postgresql://USER:PASSWORD@HOST:5432/mlflow (checked before "
        "the server starts)",
    )
    p.add_argument(
        "--artifacts",
        default="mlartifacts",
        help="where logged artifacts are stored: a folder (shared storage on a cluster) or an s3:// URI",
    )
    p.add_argument("--workers", type=counted(), default=1)


def _add_demo(sub) -> None:
    p = _parser(
        sub,
        "demo",
        "the embedded default: CT vs ST on the bundled digits set",
        "Convert the bundled digits set once, train CT and ST on a local Ray with 2 CPU "
        "workers through DeepSpeed, log both to MLflow, print main and all-sub-network "
        "accuracy side by side.",
    )
    p.add_argument("--epochs", type=counted(), default=None, help="epochs per run (recipe default: 12)")
    p.add_argument(
        "--recipes",
        type=recipe_pair,
        default="demo_ct,demo_st",
        metavar="CT,ST",
        help="the two digits recipes to compare (default: demo_ct,demo_st, CIFAR ResNet-20; also "
        "demo_vit_ct,demo_vit_st and demo_swin_ct,demo_swin_st for transformers)",
    )
    _add_set(p, "override a field of both demo recipes")
    p.add_argument("--data-dir", default="~/.cache/st_scale/digits32", help="where the digits .beton files go")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--summary-json", metavar="PATH", help="write both runs' summaries as JSON")
    _add_verbose(p)


def _add_convert(sub) -> None:
    p = _parser(
        sub,
        "convert",
        "write train/val .beton files (with checksums) from a dataset",
        "Write <out>/train.beton and <out>/val.beton, each with a .sha256 and a .json metadata file beside it.",
    )
    p.add_argument("source", choices=("digits", "fashion-mnist", "cifar", "imagefolder"))
    p.add_argument(
        "path",
        nargs="?",
        help="cifar: the folder holding cifar-10-batches-py/ or cifar-100-python/; "
        "imagefolder: the root holding train/ and val/; fashion-mnist: the folder "
        "of its IDX files (default /usr/share/datasets/fashion-mnist, where "
        "Debian's dataset-fashion-mnist package puts them)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--write-mode",
        default=None,
        choices=("raw", "jpg", "smart", "proportion"),
        help="image storage (default: raw for digits/cifar, proportion for imagefolder)",
    )
    p.add_argument("--max-resolution", type=counted(8), default=None, help="resize so the longer side is at most this")
    p.add_argument("--jpeg-quality", type=counted(1, 100), default=90)
    p.add_argument("--workers", type=counted(), default=2, help="writer processes")
    p.add_argument("--image-size", type=counted(8), default=32, help="digits: upscaled size")
    p.add_argument(
        "--train-subset",
        type=counted(),
        default=None,
        metavar="N",
        help="fashion-mnist: keep a seeded, class-proportional random subset of N training images",
    )
    p.add_argument(
        "--val-subset", type=counted(), default=None, metavar="N", help="fashion-mnist: the same for the test split"
    )
    p.add_argument("--subset-seed", type=counted(0), default=0, help="seed of the subsets (recorded in the metadata)")
    p.add_argument("--no-validate", action="store_true", help="imagefolder: skip decoding every image first")


def _add_eval(sub) -> None:
    p = _parser(
        sub,
        "eval",
        "all-sub-network evaluation and destruction tests of a checkpoint",
        "Evaluate a training checkpoint (a folder Ray Train wrote) in this process and "
        "log the results into the run's MLflow run.",
    )
    p.add_argument(
        "checkpoint",
        help="a checkpoint_* folder under <run.storage_path>/<run.name>/: a path, or an s3://bucket/... URI when the "
        "run kept its checkpoints in an object store",
    )
    p.add_argument(
        "--storage-endpoint",
        default=None,
        metavar="URL",
        help="for an s3:// checkpoint: the S3-compatible store's URL (http(s)://host:port); default "
        "$AWS_ENDPOINT_URL, else AWS S3",
    )
    p.add_argument(
        "--max-subnets", type=counted(), default=None, help="evaluate a seeded sample of this many sub-networks"
    )
    p.add_argument("--no-destruction", action="store_true")
    p.add_argument(
        "--shared-stats", action="store_true", help="use the shared BN statistics, not per-network re-estimation"
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="also time each sub-network here (one image, and a validation batch): latency_ms and images_per_s",
    )


def _add_export(sub) -> None:
    p = _parser(
        sub,
        "export",
        "one sub-network of a checkpoint as a standalone model",
        "Build the plain network of one sub-network of a training checkpoint (ResNets), its "
        "BatchNorm statistics re-estimated for it as the evaluation does, check on the whole "
        "validation set that its logits equal the trained sub-network's, write it as a state dict, "
        "a torch.export program (.pt2) and TorchScript (both run with torch alone) and log it to the "
        "run's MLflow run.",
    )
    p.add_argument("checkpoint", help="a checkpoint_* folder (a path or an s3:// URI), as `st-scale eval` takes")
    p.add_argument(
        "--subnet", metavar="D1,D2,...", help="blocks kept per stage, e.g. 1,2,1 (the full depths: the main net)"
    )
    p.add_argument(
        "--budget-macs",
        metavar="N",
        help="instead of --subnet: the most accurate evaluated sub-network with at most N MACs per image (2.0G, 150M)",
    )
    p.add_argument(
        "--budget-params", metavar="N", help="instead of --subnet, or with another budget: at most N parameters"
    )
    p.add_argument(
        "--budget-latency-ms",
        type=float,
        metavar="MS",
        help="instead of --subnet, or with another budget: at most MS ms for one image, timed here on this device",
    )
    p.add_argument(
        "--format",
        default="state_dict,pt2,torchscript",
        help="comma-separated: state_dict, pt2 (torch.export), torchscript, onnx (checked with onnxruntime; "
        "pip install 'st-scale[onnx]'); default state_dict,pt2,torchscript",
    )
    p.add_argument("--out", default="exported", help="folder for the files and a JSON summary (default ./exported)")
    p.add_argument("--register", default=None, metavar="NAME", help="also register the model under NAME in MLflow")
    p.add_argument(
        "--storage-endpoint", default=None, metavar="URL", help="for an s3:// checkpoint, as `st-scale eval` takes it"
    )


def _add_report(sub) -> None:
    p = _parser(
        sub,
        "report",
        "a study's table (per method, over seeds), loafing figure and destruction curves",
        "Read a finished (or running) sweep's child runs back from MLflow, average each "
        "group over its seeds and write the paper's Table 1 for it (time per epoch, peak "
        "memory, main top-1, all-sub-network mean ± std, min), the loafing figure "
        "(sub-networks inside CT, inside ST, trained alone), destruction curves and the "
        "sub-network accuracy distribution. Files go to --out and into the sweep's "
        "parent run under study/. Given a report's study.json instead, it draws the "
        "tables and figures again from that file alone (no MLflow store needed), "
        "into --out or beside the file.",
    )
    p.add_argument(
        "sweep", help="the sweep spec (path or name in ./tune/), its results folder, or a report's study.json"
    )
    p.add_argument("--out", help="output folder (default: <sweep folder>/report; for a study.json, its folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="st-scale",
        description="Distributed Stimulative Training of residual networks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"st-scale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_sweep(sub)
    _add_demo(sub)
    _add_convert(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_report(sub)
    _add_mlflow_server(sub)
    sub.add_parser("recipes", help="list the packaged recipes")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_negative_values_joined(sys.argv[1:] if argv is None else argv))
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, RunFailedError, RunStoppedError) as error:  # each carries its exit code
        print(f"st-scale {args.command}: {error}", file=sys.stderr)
        return error.exit_code
    except Exception as error:  # noqa: BLE001 (the one boundary: what st-scale's own checks did not catch)
        print(f"st-scale {args.command}: internal error: {internal_error(args.command, error)}", file=sys.stderr)
        return 1


def _negative_values_joined(argv: list[str]) -> list[str]:
    """`--budget-macs -20M` as `--budget-macs=-20M`: argparse takes a value that starts with a dash for
    another option (plain negative numbers aside), so the option's own range check never saw it."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--") and "=" not in argv[i] and i + 1 < len(argv) and re.match(r"-\d", argv[i + 1]):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def internal_error(command: str, error: BaseException) -> str:
    """One line for an exception that escaped st-scale's checks: its type and message, and the file
    its full traceback was written to (under $ST_SCALE_ERROR_DIR, default ~/.cache/st_scale/errors),
    for a bug report."""
    import traceback
    from datetime import datetime
    from pathlib import Path

    message = (str(error).strip().splitlines() or [""])[0]
    summary = f"{type(error).__name__}: {message}" if message else type(error).__name__
    folder = Path(os.environ.get("ST_SCALE_ERROR_DIR", "~/.cache/st_scale/errors")).expanduser()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{command}-{stamp}.txt"
        path.write_text("".join(traceback.format_exception(error)))
    except OSError:
        traceback.print_exception(error, file=sys.stderr)  # no file to point at: the traceback itself
        return f"{summary} (traceback above)"
    return f"{summary}; full traceback in {path}"


def _check_summary_path(args) -> None:
    """--summary-json is written after the run: a path that cannot be written fails now, not then."""
    if args.summary_json:
        check_writable(args.summary_json, "--summary-json")


def cmd_recipes(args) -> int:
    from importlib import resources

    # lazy: torch, Ray, DeepSpeed and MLflow load only for the command that runs
    from .config import recipe_names

    for name in recipe_names():
        first = (resources.files("st_scale.recipes") / f"{name}.yaml").read_text().splitlines()[0]
        print(f"{name:28s} {first.lstrip('# ')}")
    return 0


def cmd_train(args) -> int:
    import yaml

    # lazy: torch, Ray, DeepSpeed and MLflow load only for the command that runs
    from .config import load_config
    from .train.driver import resolve_inputs, train, write_summary_json
    from .train.summary import print_summaries

    started = provenance()
    cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(resolve_inputs(cfg).config.model_dump(mode="json"), sort_keys=False))
        return 0
    _check_summary_path(args)
    summary = train(cfg, address=args.address, verbose=args.verbose)
    print_summaries([summary], cfg)
    if args.summary_json:
        write_summary_json(args.summary_json, [summary], started)
    return 0


def cmd_sweep(args) -> int:
    # lazy: torch, Ray, DeepSpeed and MLflow load only for the command that runs
    from .sweep.spec import check_spec, load_spec

    if args.check:
        checked = check_spec(load_spec(args.spec, args.overrides))
        print(
            f"{checked.spec.name}: {len(checked.dimensions)} search entries over recipe {checked.spec.recipe!r}, "
            f"objective {checked.spec.objective.describe()} ({checked.spec.objective.mode}): OK"
        )
        return 0
    # lazy: torch, Ray, DeepSpeed and MLflow load only for the command that runs
    from .sweep.driver import print_sweep, run_sweep, write_sweep_json

    started = provenance()
    _check_summary_path(args)
    summary = run_sweep(args.spec, args.overrides, address=args.address)
    print_sweep(summary)
    if args.summary_json:
        write_sweep_json(args.summary_json, summary, started)
    return 0 if summary.status == "FINISHED" else 1


def cmd_mlflow_server(args) -> int:
    return serve_mlflow(
        host=args.host, port=args.port, backend_store=args.backend_store, artifacts=args.artifacts, workers=args.workers
    )


def cmd_demo(args) -> int:
    # lazy: torch, Ray, DeepSpeed and MLflow load only for the command that runs
    from .demo import run_demo

    _check_summary_path(args)
    run_demo(
        recipes=args.recipes,
        epochs=args.epochs,
        overrides=args.overrides,
        data_dir=args.data_dir,
        address=args.address,
        summary_json=args.summary_json,
        verbose=args.verbose,
    )
    return 0


def cmd_convert(args) -> int:
    # lazy: torch, Ray, DeepSpeed and MLflow load only for the command that runs
    from .data.commands import convert

    convert(
        args.source,
        args.path,
        check_writable(args.out, "--out", folder=True),
        write_mode=args.write_mode,
        max_resolution=args.max_resolution,
        jpeg_quality=args.jpeg_quality,
        workers=args.workers,
        image_size=args.image_size,
        validate=not args.no_validate,
        train_subset=args.train_subset,
        val_subset=args.val_subset,
        subset_seed=args.subset_seed,
    )
    return 0


def cmd_eval(args) -> int:
    # lazy: torch, Ray, DeepSpeed and MLflow load only for the command that runs
    from .evaluate.trained import evaluate_checkpoint

    evaluate_checkpoint(
        args.checkpoint,
        storage_endpoint=args.storage_endpoint,
        max_subnets=args.max_subnets,
        destruction=not args.no_destruction,
        recalibrate=not args.shared_stats,
        latency=args.latency,
    )
    return 0


def cmd_export(args) -> int:
    # lazy: torch, Ray, DeepSpeed and MLflow load only for the command that runs
    from .evaluate.export import FORMATS, export_checkpoint, parse_count

    # What the export writes is checked before the checkpoint is read and the sub-network measured.
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if not formats:
        raise ConfigError(f"--format {args.format!r} names no format; choose from {', '.join(FORMATS)}")
    out = check_writable(args.out, "--out", folder=True)
    if args.register is not None:
        try:
            checked_name("--register", args.register)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    export_checkpoint(
        args.checkpoint,
        args.subnet,
        max_macs=parse_count(args.budget_macs, "--budget-macs") if args.budget_macs else None,
        max_params=parse_count(args.budget_params, "--budget-params") if args.budget_params else None,
        max_latency_ms=args.budget_latency_ms,
        formats=formats,
        out=out,
        storage_endpoint=args.storage_endpoint,
        register=args.register,
    )
    return 0


def cmd_report(args) -> int:
    # lazy: torch, Ray, DeepSpeed and MLflow load only for the command that runs
    from .sweep.study import redraw, report

    if args.sweep.endswith(".json"):
        redraw(args.sweep, args.out)
    else:
        report(args.sweep, args.out)
    return 0


COMMANDS = {
    "report": cmd_report,
    "train": cmd_train,
    "sweep": cmd_sweep,
    "demo": cmd_demo,
    "convert": cmd_convert,
    "eval": cmd_eval,
    "export": cmd_export,
    "mlflow-server": cmd_mlflow_server,
    "recipes": cmd_recipes,
}

if __name__ == "__main__":
    sys.exit(main())
