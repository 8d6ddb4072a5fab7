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
from ..data.loaders import BatchPreparer, calibration_sets, eval_loader, memory_format, other_protocol
from ..errors import ConfigError
from ..models import ElasticNet
from ..sampling import SubnetSpace
from ..storage import Location, check_object_store, check_storage_fields, is_object_store, resolve
from ..tracking import RunTracker, check_run_recorded
from .artifacts import CHECKPOINT_LAYOUT
from .passes import EvalData, EvalOptions, calibration_suffix, evaluate, log_evaluation
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
    other_calibration: list[Batch] | None = None  # eval.compare_calibration: the other protocol's batches

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
    directory: str | Path, *, storage_endpoint: str | None, recalibrate: bool, command: str, compare: bool = False
) -> TrainedCheckpoint:
    """Open the checkpoint folder `directory`, a local path or an s3:// URI (reached through
    `storage_endpoint`, else $AWS_ENDPOINT_URL; its weights are copied here first), with the data of
    the run that wrote it. `command` names the caller in errors; with `compare`, the other calibration
    protocol's batches too when the run compared them (`eval.compare_calibration`)."""
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
    calibration = other_calibration = None
    if recalibrate:
        calibration, other_calibration = calibration_sets(
            cfg.data,
            preparer,
            compare=compare and cfg.eval.compare_calibration,
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
    return TrainedCheckpoint(location, info, cfg, model, space, val, calibration, ema, other_calibration)


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
    trained = open_checkpoint(
        directory, storage_endpoint=storage_endpoint, recalibrate=recalibrate, command="eval", compare=True
    )
    info, cfg, model, val = trained.info, trained.cfg, trained.model, trained.val
    if info.state.mlflow_run_id:
        check_run_recorded(info.tracking_uri, info.state.mlflow_run_id, f"st-scale eval of {directory}")
    compare = trained.other_calibration is not None
    result = evaluate(
        model,
        EvalData(
            val_shard=lambda: val,
            val_full=lambda: val,
            calibration=trained.calibration,
            device=torch.device("cpu"),
            other_calibration=trained.other_calibration,
            other_suffix=calibration_suffix(other_protocol(cfg.data.calibration_protocol)) if compare else "",
        ),
        EvalOptions(
            prefix="eval",
            shared_stats=cfg.eval.shared_stats,
            subnets=trained.space.sample_subset(max_subnets or cfg.eval.max_subnets, seed=cfg.run.seed),
            latency=latency or cfg.eval.latency,
            destruction=destruction,
            destruction_images=cfg.eval.destruction_images,
        ),
        averaged=trained.ema,
    )
    metrics, reports = result.metrics, result.reports
    tracker = trained.tracker()
    title = f"{cfg.method.name} {cfg.model.name}"
    log_evaluation(tracker, result, CHECKPOINT_LAYOUT, f"{title} (checkpoint, epoch {info.state.epoch})")
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
