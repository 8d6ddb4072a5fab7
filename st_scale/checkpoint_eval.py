"""`st-scale eval`: all-sub-network accuracy and destruction tests of a training checkpoint, in one
process, logged into the run's own MLflow run (metrics `eval/...`, artifacts under `eval/`). It runs
the same evaluation pass as training's per-epoch evaluation."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from . import checkpoint
from .errors import ConfigError
from .storage import Location, check_object_store, check_storage_fields, is_object_store, resolve, resolve_endpoint


def evaluate_checkpoint(
    directory: str | Path,
    *,
    storage_endpoint: str | None = None,
    max_subnets: int | None = None,
    destruction: bool = True,
    recalibrate: bool = True,
) -> dict:
    """Evaluate the checkpoint folder `directory`: a local path or an s3:// URI (reached through
    `storage_endpoint`, else $AWS_ENDPOINT_URL), whose weights are then copied here first."""
    check_storage_fields(str(directory), storage_endpoint, field="checkpoint", endpoint_field="--storage-endpoint")
    if is_object_store(directory):
        storage_endpoint = resolve_endpoint(storage_endpoint)
        check_object_store(str(directory), storage_endpoint, field="checkpoint", write=False)
    location = resolve(directory, storage_endpoint)
    with tempfile.TemporaryDirectory(prefix="st_scale_eval_") as copy:
        weights = checkpoint.local_weights(location, Path(copy))
        return _evaluate(weights, location, max_subnets, destruction, recalibrate)


def _evaluate(directory: Path, shown: Location, max_subnets: int | None, destruction: bool, recalibrate: bool) -> dict:
    from .data.integrity import DatasetFileError, read_metadata, verify_beton
    from .data.loaders import BatchPreparer, calibration_batches, eval_loader
    from .eval_pass import (
        destruction_metrics,
        first_images,
        log_destruction,
        log_subnet_reports,
        main_metrics,
        run_destruction,
        subnet_metrics,
        subnet_reports,
    )
    from .tracking import RunTracker
    from .train_loop import build_model_and_objective

    info = checkpoint.read_run(directory)
    cfg = info.config_model()
    for field in ("train", "val"):  # eval reads the run's own files, as a resume would
        try:
            verify_beton(getattr(cfg.data, field))
        except DatasetFileError as error:
            raise ConfigError(
                f"data.{field} of the run that wrote {shown}: {error}. `st-scale eval` reads the files the run "
                f"trained on; if they moved, put them back at that path (or link them there)"
            ) from None
    model, space, _ = build_model_and_objective(cfg)
    checkpoint.load_weights(directory, model)
    model.eval()
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    preparer = BatchPreparer(cfg.data, device, torch.float32, cfg.run.seed, 0)
    calibration = None
    if recalibrate:
        calibration = calibration_batches(
            cfg.data,
            preparer,
            num_samples=read_metadata(cfg.data.train)["num_samples"],
            seed=cfg.run.seed,
            num_workers=threads,
            device=device,
        )
    val = [
        (x.clone(), y.clone())
        for x, y in preparer.eval_batches(
            eval_loader(cfg.data, cfg.data.val, indices=None, num_workers=threads, device=device)
        )
    ]
    subnets = space.sample_subset(max_subnets or cfg.eval.max_subnets, seed=cfg.run.seed)
    reports = subnet_reports(model, subnets, lambda: val, calibration, shared_stats=cfg.eval.shared_stats)
    metrics = {
        **main_metrics(model, lambda: val, calibration, device, prefix="eval", shared_stats=cfg.eval.shared_stats),
        **subnet_metrics("eval", reports),
    }
    title = f"{cfg.method.name} {cfg.model.name}"
    tracker = RunTracker(
        info.tracking_uri,
        info.experiment_id,
        run_id=info.mlflow_run_id,
        run_name=None,
        params={},
        tags={},
        system_metrics=False,
    )
    log_subnet_reports(
        tracker,
        reports,
        stem="subnets",
        tables="eval",
        figures="eval",
        title=f"{title} (checkpoint, epoch {info.epoch})",
    )
    if destruction:
        rows = run_destruction(model, first_images(val, cfg.eval.destruction_images), calibration)
        metrics.update(destruction_metrics("eval", rows))
        log_destruction(tracker, rows, tables="eval", figures="eval", title=f"{title}: network destruction")
    tracker.log_metrics(metrics, step=info.step)
    tracker.finish("FINISHED")
    s = reports[""].stats
    print(
        f"{title}, epoch {info.epoch}: main top-1 {metrics['eval/main_top1']:.2f}, "
        f"{int(s['num_subnets'])} sub-nets {s['mean_top1']:.2f} ± {s['std_top1']:.2f} (min {s['min_top1']:.2f}); "
        f"logged to MLflow run {info.mlflow_run_id}"
    )
    return metrics
