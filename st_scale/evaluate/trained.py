"""`st-scale eval`: all-sub-network accuracy and destruction tests of a training checkpoint, in one
process, logged into the run's own MLflow run (metrics `eval/...`, artifacts under `eval/`). It runs
the same evaluation pass as training's per-epoch evaluation. `open_checkpoint` gives `eval` and
`export` the trained model with its run's data."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint
from ..assembly import build_model_and_objective
from ..config import Config
from ..data.integrity import DatasetFileError, read_metadata, verify_beton
from ..data.loaders import BatchPreparer, calibration_batches, eval_loader, memory_format
from ..ema import weights_applied
from ..errors import ConfigError
from ..models import ElasticNet
from ..sampling import SubnetSpace
from ..storage import Location, check_object_store, check_storage_fields, is_object_store, resolve
from ..tracking import RunTracker
from .passes import (
    destruction_metrics,
    first_images,
    log_destruction,
    log_subnet_reports,
    main_metrics,
    run_destruction,
    subnet_metrics,
    subnet_reports,
)
from .subnets import Batch


@dataclass
class TrainedCheckpoint:
    """A checkpoint opened for evaluation: its run, the trained elastic model (fp32, CPU, eval mode),
    the whole validation set and, unless BN statistics are shared, the calibration batches."""

    location: Location
    info: checkpoint.RunInfo
    cfg: Config
    model: ElasticNet
    space: SubnetSpace
    val: list[Batch]
    calibration: list[Batch] | None
    ema: dict[str, torch.Tensor] | None = None  # the weights' moving average, if the run kept one

    def tracker(self):
        """The training run's own MLflow run, reopened."""

        return RunTracker(
            self.info.tracking_uri,
            self.info.experiment_id,
            run_id=self.info.state.mlflow_run_id,
            run_name=None,
            params={},
            tags={},
            system_metrics=False,
        )


def open_checkpoint(
    directory: str | Path, *, storage_endpoint: str | None, recalibrate: bool, command: str
) -> TrainedCheckpoint:
    """Open the checkpoint folder `directory`, a local path or an s3:// URI (reached through
    `storage_endpoint`, else $AWS_ENDPOINT_URL; its weights are copied here first), with the data of
    the run that wrote it. `command` names the caller in errors."""

    check_storage_fields(str(directory), storage_endpoint, field="checkpoint", endpoint_field="--storage-endpoint")
    if is_object_store(directory):
        storage_endpoint = check_object_store(str(directory), storage_endpoint, field="checkpoint", write=False)
    location = resolve(directory, storage_endpoint)
    with tempfile.TemporaryDirectory(prefix="st_scale_checkpoint_") as copy:
        weights = checkpoint.local_weights(location, Path(copy))
        info = checkpoint.read_run(weights)
        cfg = info.config_model()
        for split in ("train", "val"):  # the run's own files, as a resume would read them
            try:
                verify_beton(getattr(cfg.data, split))
            except DatasetFileError as error:
                raise ConfigError(
                    f"data.{split} of the run that wrote {location}: {error}. `st-scale {command}` reads the files the "
                    f"run trained on; if they moved, put them back at that path (or link them there)"
                ) from None
        model, space, _ = build_model_and_objective(cfg)
        checkpoint.load_weights(weights, model)
        ema = checkpoint.read_ema(weights)
    model.eval()
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    preparer = BatchPreparer(cfg.data, device, torch.float32, cfg.run.seed, 0, memory_format=memory_format(cfg.model))
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
    return TrainedCheckpoint(location, info, cfg, model, space, val, calibration, ema)


def evaluate_checkpoint(
    directory: str | Path,
    *,
    storage_endpoint: str | None = None,
    max_subnets: int | None = None,
    destruction: bool = True,
    recalibrate: bool = True,
    latency: bool = False,
) -> dict:
    """Evaluate the checkpoint folder `directory` (a local path or an s3:// URI) and log the results
    into its run."""

    trained = open_checkpoint(directory, storage_endpoint=storage_endpoint, recalibrate=recalibrate, command="eval")
    info, cfg, model, val, calibration = trained.info, trained.cfg, trained.model, trained.val, trained.calibration
    subnets = trained.space.sample_subset(max_subnets or cfg.eval.max_subnets, seed=cfg.run.seed)
    reports = subnet_reports(
        model,
        subnets,
        lambda: val,
        calibration,
        shared_stats=cfg.eval.shared_stats,
        latency=latency or cfg.eval.latency,
    )
    device = torch.device("cpu")
    metrics = {
        **main_metrics(model, lambda: val, calibration, device, prefix="eval", shared_stats=cfg.eval.shared_stats),
        **subnet_metrics("eval", reports),
    }
    if trained.ema is not None and calibration is not None:  # the average needs BN statistics of its own
        with weights_applied(model, trained.ema):
            metrics.update(main_metrics(model, lambda: val, calibration, device, prefix="eval/ema", shared_stats=False))
    tracker = trained.tracker()
    title = f"{cfg.method.name} {cfg.model.name}"
    log_subnet_reports(
        tracker,
        reports,
        stem="subnets",
        tables="eval",
        figures="eval",
        title=f"{title} (checkpoint, epoch {info.state.epoch})",
    )
    if destruction:
        rows = run_destruction(model, first_images(val, cfg.eval.destruction_images), calibration)
        metrics.update(destruction_metrics("eval", rows))
        log_destruction(tracker, rows, tables="eval", figures="eval", title=f"{title}: network destruction")
    tracker.log_metrics(metrics, step=info.state.step)
    tracker.finish("FINISHED")
    s = reports[""].stats
    average = f" (EMA {metrics['eval/ema/main_top1']:.2f})" if "eval/ema/main_top1" in metrics else ""
    print(
        f"{title}, epoch {info.state.epoch}: main top-1 {metrics['eval/main_top1']:.2f}{average}, "
        f"{int(s['num_subnets'])} sub-nets {s['mean_top1']:.2f} ± {s['std_top1']:.2f} (min {s['min_top1']:.2f}); "
        f"logged to MLflow run {info.state.mlflow_run_id}"
    )
    return metrics
