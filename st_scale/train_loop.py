"""The training loop each Ray Train worker runs: data, model, DeepSpeed engine, resume, epochs of
training, BN re-estimation, evaluation, MLflow logging (rank 0) and checkpoints."""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint_eval import write_run_info
from .config import Config
from .distributed import barrier, gather_lists, sum_accuracy
from .engine import build_engine, load_checkpoint, lr_at, save_checkpoint, set_lr
from .evaluation import SubnetReport, destruction_tests, evaluate_main, evaluate_subnets, recalibrate_bn
from .methods import build_objective
from .models import ElasticNet, create_model
from .sampling import SubnetSampler, SubnetSpace


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


def build_space(cfg: Config, model: ElasticNet) -> SubnetSpace:
    if cfg.sampling.space == "restricted":
        if len(cfg.sampling.max_dropped) != model.num_stages:
            raise ValueError(f"sampling.max_dropped={cfg.sampling.max_dropped} needs one entry per stage of "
                             f"{model.name} ({model.num_stages} stages: {list(model.stage_sizes)})")
        return SubnetSpace.restricted(model.stage_sizes, cfg.sampling.max_dropped)
    return SubnetSpace.full(model.stage_sizes)


def build_model_and_objective(cfg: Config, rank: int = 0):
    """The elastic model, its sub-network space and the training objective, as a run builds them."""
    model = create_model(cfg.model.name, cfg.model.num_classes)
    space = build_space(cfg, model)
    sampler = SubnetSampler(space, seed=cfg.run.seed, decay=cfg.sampling.decay,
                            include_full=cfg.sampling.include_full, per_rank=cfg.sampling.per_rank)
    options = cfg.method.objective_options()
    if cfg.method.name == "st":
        options["rank"] = rank
    objective = build_objective(cfg.method.name, model, sampler if cfg.method.name == "st" else None, **options)
    return model, space, objective


@dataclass
class WorkerContext:
    """Everything one worker's epochs need, built once by `train_worker`."""

    cfg: Config
    loop_config: dict
    rank: int
    world: int
    device: torch.device
    engine: Any
    model: ElasticNet
    preparer: Any  # BatchPreparer
    train: Any  # FFCV loaders: training, this rank's validation shard, the whole validation set
    val_shard: Any
    val_full: Any
    calibration: Any  # () -> list of prepared calibration batches
    subnets: list
    steps_per_epoch: int
    global_batch: int
    run_id: str | None = None
    tracker: Any = None  # RunTracker on rank 0, None elsewhere


def _maybe_inject_fault(fault: dict | None, rank: int, step: int) -> None:
    """Test hook: rank `fault['rank']` dies at global step `fault['step']`, once per run."""
    if not fault or rank != fault["rank"] or step != fault["step"]:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} exited at step {step}\n")
    os._exit(1)


def _subnet_evaluation(ctx: WorkerContext, model, subnets, val_batches_fn, calibration) -> SubnetReport | None:
    mine = subnets[ctx.rank :: ctx.world]
    rows = evaluate_subnets(model, mine, val_batches_fn(), calibration).rows if mine else []
    rows = gather_lists(rows)
    return SubnetReport(sorted(rows, key=lambda r: r.depths), calibration is not None) if rows else None


SUBNET_STATS = ("mean_top1", "std_top1", "min_top1", "max_top1")  # logged as val/subnets_<stat>[_shared_stats]


def _subnet_metrics(report: SubnetReport, suffix: str) -> dict[str, float]:
    s = report.stats
    return {f"val/subnets_{k}{suffix}": s[k] for k in SUBNET_STATS}


def train_worker(loop_config: dict) -> None:
    import ray.train

    from .data.loaders import BatchPreparer, eval_loader, materialise, train_loader
    from .data.integrity import read_metadata

    cfg = Config.model_validate(loop_config["config"])
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    if cfg.scaling.use_gpu:
        device = torch.device("cuda", train_ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    threads = max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank

    model, space, objective = build_model_and_objective(cfg, rank)
    engine = build_engine(model, objective, cfg, loop_config["ds_config"])
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    preparer = BatchPreparer(cfg.data, device, dtype, cfg.run.seed, rank)

    loader_threads = cfg.data.num_workers or threads
    micro_batch = loop_config["ds_config"]["train_micro_batch_size_per_gpu"]
    train = train_loader(cfg.data, batch_size=micro_batch, seed=cfg.run.seed, num_workers=loader_threads,
                         device=device, distributed=world > 1)
    n_train, n_val = read_metadata(cfg.data.train)["num_samples"], read_metadata(cfg.data.val)["num_samples"]
    calibration_raw = materialise(eval_loader(cfg.data, cfg.data.train, indices=range(min(cfg.data.calibration_images, n_train)),
                                              num_workers=loader_threads, device=device))
    val_shard = eval_loader(cfg.data, cfg.data.val, indices=range(rank, n_val, world), num_workers=loader_threads, device=device)
    val_full = eval_loader(cfg.data, cfg.data.val, indices=None, num_workers=loader_threads, device=device)

    def calibration():
        return [(preparer.eval(x), y.to(device).long()) for x, y in calibration_raw]

    start_epoch, step, run_id, last_metrics = 0, 0, None, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(engine, Path(directory), rank, world)
        start_epoch, step, run_id, last_metrics = state["epoch"], state["step"], state["mlflow_run_id"], state["metrics"]

    ctx = WorkerContext(cfg, loop_config, rank, world, device, engine, model, preparer, train, val_shard, val_full,
                        calibration, space.sample_subset(cfg.eval.max_subnets, seed=cfg.run.seed), len(train),
                        micro_batch * world, run_id)
    if rank == 0:
        from .tracking import RUN_KEY_TAG, RunTracker

        ctx.tracker = RunTracker(loop_config["tracking_uri"], loop_config["experiment_id"], run_id=run_id,
                                 run_name=cfg.tracking.run_name or cfg.run.name, params=cfg.flat(),
                                 tags={"st_scale.method": cfg.method.name, "st_scale.model": cfg.model.name,
                                       "st_scale.run_name": cfg.run.name, "st_scale.dataset": loop_config["dataset"],
                                       RUN_KEY_TAG: f"{cfg.run.storage_path}/{cfg.run.name}",
                                       **loop_config.get("tags", {})},
                                 system_metrics=cfg.tracking.system_metrics)
        if run_id is None:
            ctx.tracker.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/resolved.yaml")
        ctx.run_id = ctx.tracker.run_id
    tracker = ctx.tracker
    epochs = cfg.optimizer.epochs
    stop_at = min(epochs, cfg.run.stop_after_epochs or epochs)

    if start_epoch >= stop_at:  # nothing left to train: report what the checkpoint holds
        if tracker:
            tracker.finish("FINISHED" if start_epoch >= epochs else "KILLED")
        ray.train.report(last_metrics)
        return

    try:
        _run_epochs(ctx, start_epoch, stop_at, step)
    except BaseException:
        if tracker:  # a restart (max_failures) or a resume reopens the same run
            tracker.finish("FAILED")
        raise
    barrier()


def _run_epochs(ctx: WorkerContext, start_epoch: int, stop_at: int, step: int) -> None:
    """Train, evaluate, log and checkpoint epochs start_epoch..stop_at-1."""
    for epoch in range(start_epoch, stop_at):
        step = _train_epoch(ctx, epoch, step)
        metrics = {"epoch": epoch + 1, "step": step, **_evaluate(ctx, epoch)}
        if ctx.tracker:
            ctx.tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("val/")} | {"epoch": epoch + 1}, step)
            if epoch + 1 == stop_at:  # before the last report: a Tune scheduler may end the trial right after it
                _close_run(ctx, stop_at)
        _checkpoint(ctx, epoch, step, {**metrics, "mlflow_run_id": ctx.run_id})


def _close_run(ctx: WorkerContext, stop_at: int) -> None:
    if stop_at == ctx.cfg.optimizer.epochs:
        _log_final_model(ctx.tracker, ctx.model)
        ctx.tracker.finish("FINISHED")
    else:
        ctx.tracker.set_tags({"st_scale.stopped_after_epoch": str(stop_at)})
        ctx.tracker.finish("KILLED")


def reported_metrics(cfg: Config) -> tuple[set[str], set[str]]:
    """The metric names each epoch's report carries (what `_evaluate` returns, plus epoch and step):
    (every epoch, only some epochs). A sweep's objective and scheduler can only use these."""
    every = {"epoch", "step", "val/main_top1", "val/main_top5"}
    subnets = {f"val/subnets_{k}" for k in SUBNET_STATS} | {"val/num_subnets"}
    if cfg.eval.shared_stats:
        every.add("val/main_top1_shared_stats")
        if cfg.eval.recalibrate:
            subnets |= {f"val/subnets_{k}_shared_stats" for k in SUBNET_STATS}
    if cfg.eval.subnets_every == 1 or cfg.optimizer.epochs == 1:
        return every | subnets, set()
    return every, subnets


def _evaluate(ctx: WorkerContext, epoch: int) -> dict[str, float]:
    """Main net every epoch (after re-estimating its BN statistics, as the reference does); all
    sub-networks every `eval.subnets_every` epochs and at the end."""
    cfg, model, preparer, device = ctx.cfg, ctx.model, ctx.preparer, ctx.device
    final = epoch + 1 == cfg.optimizer.epochs
    metrics: dict[str, float] = {}
    model.eval()
    if cfg.eval.shared_stats:
        shared = evaluate_main(model, preparer.eval_batches(ctx.val_shard))
        metrics["val/main_top1_shared_stats"] = sum_accuracy(shared, device).top1
    calib = ctx.calibration() if cfg.eval.recalibrate else None
    if calib is not None:
        recalibrate_bn(model, model.plan_for_depths(None), calib)
    main = sum_accuracy(evaluate_main(model, preparer.eval_batches(ctx.val_shard)), device)
    metrics.update({"val/main_top1": main.top1, "val/main_top5": main.top5})
    every = cfg.eval.subnets_every
    if final or (every and (epoch + 1) % every == 0):
        def val_batches():
            return preparer.eval_batches(ctx.val_full)

        reports = {"": _subnet_evaluation(ctx, model, ctx.subnets, val_batches, calib)}
        if cfg.eval.shared_stats and calib is not None:
            reports["_shared_stats"] = _subnet_evaluation(ctx, model, ctx.subnets, val_batches, None)
        for suffix, report in reports.items():
            if report is not None:
                metrics.update(_subnet_metrics(report, suffix))
                metrics["val/num_subnets"] = report.stats["num_subnets"]
                if ctx.tracker:
                    _log_subnet_report(ctx.tracker, report, epoch + 1, suffix, cfg)
    if final and cfg.eval.destruction:
        _destruction(ctx, model, preparer, ctx.val_full, calib)
    return metrics


def _checkpoint(ctx: WorkerContext, epoch: int, step: int, metrics: dict) -> None:
    """Every rank saves its shard, then reports to Ray Train (a barrier) with the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    client_state = {"epoch": epoch + 1, "step": step, "mlflow_run_id": ctx.run_id, "metrics": metrics}
    with tempfile.TemporaryDirectory(prefix="st_scale_ckpt_") as directory:
        if ctx.rank == 0:  # before the shards: the commit markers are written last
            write_run_info(Path(directory), {"config": ctx.cfg.model_dump(mode="json"), "epoch": epoch + 1, "step": step,
                                             "mlflow_run_id": ctx.run_id, "tracking_uri": ctx.loop_config["tracking_uri"],
                                             "experiment_id": ctx.loop_config["experiment_id"]})
        save_checkpoint(ctx.engine, Path(directory), ctx.rank, client_state)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))


def _train_epoch(ctx: WorkerContext, epoch: int, step: int) -> int:
    """One epoch of training steps; returns the global step after it."""
    from tqdm import tqdm

    cfg, engine, loader, preparer = ctx.cfg, ctx.engine, ctx.train, ctx.preparer
    steps_per_epoch, global_batch, fault = ctx.steps_per_epoch, ctx.global_batch, ctx.loop_config.get("fault")
    total_steps = cfg.optimizer.epochs * steps_per_epoch
    loader.next_epoch = epoch  # FFCV's shuffle order is a function of (seed, epoch): resume continues it
    engine.module.train()
    sums: dict[str, float] = {}
    window_steps, window_start = 0, time.perf_counter()
    bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.optimizer.epochs}", disable=ctx.rank != 0,
               mininterval=2.0, dynamic_ncols=True)
    for images, labels in loader:
        _maybe_inject_fault(fault, ctx.rank, step)
        lr = lr_at(step, total_steps, steps_per_epoch, cfg.optimizer)
        set_lr(engine, lr)
        x = preparer.train(images, step)
        y = labels.to(ctx.device, non_blocking=True).long()
        loss, parts, _ = engine(x, y, step)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            shown = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            raise NonFiniteLossError(
                f"loss became {loss_value} at global step {step} (epoch {epoch + 1}; {shown}); training stopped, the "
                f"last good checkpoint is kept. Lower optimizer.lr or method.kl_weight and resume with the same run.name"
            )
        engine.backward(loss)
        engine.step()
        step += 1
        window_steps += 1
        sums["loss"] = sums.get("loss", 0.0) + loss_value
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        bar.update(1)
        if ctx.tracker and step % cfg.tracking.log_every_steps == 0:
            elapsed = time.perf_counter() - window_start
            logged = {f"train/{k}": v / window_steps for k, v in sums.items()}
            logged.update({"train/lr": lr, "train/images_per_s": window_steps * global_batch / max(elapsed, 1e-9)})
            ctx.tracker.log_metrics(logged, step)
            bar.set_postfix(loss=f"{logged['train/loss']:.3f}", lr=f"{lr:.3g}")
            sums, window_steps, window_start = {}, 0, time.perf_counter()
    bar.close()
    return step


def _log_subnet_report(tracker, report: SubnetReport, epoch: int, suffix: str, cfg: Config) -> None:
    from .plots import subnet_figure

    name = f"subnets{suffix}_epoch{epoch:03d}"
    tracker.log_text(report.to_csv(), f"subnets/{name}.csv")
    figure = subnet_figure(report, f"{cfg.method.name} {cfg.model.name}, epoch {epoch}")
    tracker.log_figure(figure, f"plots/{name}.png")
    import matplotlib.pyplot as plt

    plt.close(figure)


def _destruction(ctx: WorkerContext, model, preparer, val_full, calib) -> None:
    """Unraveled-view tests on rank 0 (the others wait at the next collective)."""
    if ctx.rank != 0:
        return
    import matplotlib.pyplot as plt

    from .plots import destruction_figure

    batches = list(preparer.eval_batches(val_full))
    rows = destruction_tests(model, [(x.clone(), y.clone()) for x, y in batches], calib)
    lines = ["test,damage,detail,top1"] + [f"{r.test},{r.damage},{r.detail},{r.top1:.4f}" for r in rows]
    ctx.tracker.log_text("\n".join(lines) + "\n", "destruction/destruction.csv")
    figure = destruction_figure(rows, f"{ctx.cfg.method.name} {ctx.cfg.model.name}: network destruction")
    ctx.tracker.log_figure(figure, "plots/destruction.png")
    plt.close(figure)


def _log_final_model(tracker, model: ElasticNet) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"{model.name}.pt"
        torch.save({k: v.float() if v.is_floating_point() else v for k, v in model.net.state_dict().items()}, path)
        tracker.log_file(path, "model")
