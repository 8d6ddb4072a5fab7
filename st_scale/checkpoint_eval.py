"""`st-scale eval`: all-sub-network accuracy and destruction tests of a training checkpoint, in one
process, logged into the run's own MLflow run (metrics `eval/...`, artifacts under `eval/`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Config, ConfigError
from .engine import CHECKPOINT_TAG

CONFIG_FILE = "st_scale_config.json"


def write_run_info(directory: Path, info: dict) -> None:
    (directory / CONFIG_FILE).write_text(json.dumps(info, indent=1))


def load_weights(checkpoint: Path, model) -> None:
    states = torch.load(checkpoint / CHECKPOINT_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    module = states["module"]
    weights = {k[len("model."):]: v.float() if v.is_floating_point() else v for k, v in module.items() if k.startswith("model.")}
    model.load_state_dict(weights)


def evaluate_checkpoint(checkpoint: Path, *, max_subnets: int | None = None, destruction: bool = True,
                        recalibrate: bool = True) -> dict:
    from .data.integrity import verify_beton
    from .data.loaders import BatchPreparer, eval_loader, materialise
    from .evaluation import destruction_tests, evaluate_main, evaluate_subnets, summarise_destruction
    from .plots import destruction_figure, subnet_figure
    from .tracking import RunTracker
    from .train_loop import build_model_and_objective

    info_file = checkpoint / CONFIG_FILE
    if not info_file.is_file():
        raise ConfigError(f"{checkpoint} is not an st-scale checkpoint folder (no {CONFIG_FILE}); give a "
                          f"checkpoint_* folder under <run.storage_path>/<run.name>/")
    info = json.loads(info_file.read_text())
    cfg = Config.model_validate(info["config"])
    for field in ("train", "val"):
        verify_beton(getattr(cfg.data, field))
    model, space, _ = build_model_and_objective(cfg)
    load_weights(checkpoint, model)
    model.eval()
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    preparer = BatchPreparer(cfg.data, device, torch.float32, cfg.run.seed, 0)
    n_calib = cfg.data.calibration_images
    calibration = None
    if recalibrate:
        raw = materialise(eval_loader(cfg.data, cfg.data.train, indices=range(n_calib), num_workers=threads, device=device))
        calibration = [(preparer.eval(x), y.long()) for x, y in raw]
    val = [(x.clone(), y.clone()) for x, y in preparer.eval_batches(eval_loader(cfg.data, cfg.data.val, indices=None,
                                                                                 num_workers=threads, device=device))]
    subnets = space.sample_subset(max_subnets or cfg.eval.max_subnets, seed=cfg.run.seed)
    report = evaluate_subnets(model, subnets, val, calibration)
    main = evaluate_main(model, val, calibration)
    metrics = {"eval/main_top1": main.top1, "eval/main_top5": main.top5,
               **{f"eval/subnets_{k}": v for k, v in report.stats.items()}}
    tracker = RunTracker(info["tracking_uri"], info["experiment_id"], run_id=info["mlflow_run_id"], run_name=None,
                         params={}, tags={}, system_metrics=False)
    tracker.log_text(report.to_csv(), "eval/subnets.csv")
    tracker.log_figure(subnet_figure(report, f"{cfg.method.name} {cfg.model.name} (checkpoint, epoch {info['epoch']})"),
                       "eval/subnets.png")
    if destruction:
        rows = destruction_tests(model, val, calibration)
        metrics.update({f"eval/destruction/{k}": v for k, v in summarise_destruction(rows).items()})
        tracker.log_text("test,damage,detail,top1\n" + "".join(f"{r.test},{r.damage},{r.detail},{r.top1:.4f}\n" for r in rows),
                         "eval/destruction.csv")
        tracker.log_figure(destruction_figure(rows, f"{cfg.method.name} {cfg.model.name}: network destruction"),
                           "eval/destruction.png")
    tracker.log_metrics(metrics, step=info["step"])
    tracker.finish("FINISHED")
    s = report.stats
    print(f"{cfg.method.name} {cfg.model.name}, epoch {info['epoch']}: main top-1 {main.top1:.2f}, "
          f"{int(s['num_subnets'])} sub-nets {s['mean_top1']:.2f} ± {s['std_top1']:.2f} (min {s['min_top1']:.2f}); "
          f"logged to MLflow run {info['mlflow_run_id']}")
    return metrics
