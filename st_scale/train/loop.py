"""The training loop each Ray Train worker runs. Set-up reads as steps (process, model and engine,
data, resume, tracker), then epochs of training, evaluation, MLflow logging (rank 0) and checkpoints."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import checkpoint
from ..assembly import build_model_and_objective, speed_up
from ..config import Config
from ..data.integrity import read_metadata
from ..data.loaders import BatchPreparer, calibration_sets, eval_loader, memory_format, other_protocol, train_loader
from ..ema import WeightEma
from ..evaluate.artifacts import epoch_layout
from ..evaluate.distributed import barrier
from ..evaluate.export import standalone_subnet
from ..evaluate.passes import EvalData, EvalOptions, calibration_suffix, evaluate, log_evaluation
from ..evaluate.subnets import Batch, preserved_bn, recalibrate_bn
from ..models import ElasticNet, has_standalone_subnets
from ..models.utilisation import peak_bf16_flops, training_flops_per_image
from ..storage import checkpoint_upload, with_retries
from ..tracking import RUN_KEY_TAG, RunTracker
from .console import ProgressPoster, quiet_logs
from .engine import batch_sizes, build_engine, set_lr
from .inputs import FaultInjection, WorkerInputs
from .memory import SavedTensorBytes
from .schedule import lr_at
from .step_window import StepWindow


@dataclass
class WorkerData:
    """This worker's loaders and the fixed BN calibration batches."""

    preparer: Any  # BatchPreparer
    train: Any  # FFCV loaders: training, this rank's validation shard, the whole validation set
    val_shard: Any
    val_full: Any
    calibration: list[Batch] | None  # None when eval.recalibrate is off
    other_calibration: list[Batch] | None = None  # eval.compare_calibration: the other protocol's batches


@dataclass
class WorkerContext:
    """Everything one worker's epochs need, built once by `train_worker`."""

    cfg: Config
    inputs: WorkerInputs
    rank: int
    world: int
    device: torch.device
    engine: Any
    model: ElasticNet
    data: WorkerData
    subnets: list
    images_per_step: int  # micro-batch x workers: what one loader step consumes across the group
    # {training resolution: the factor that turns the group's images/s into MFU} (GPUs of a known peak only)
    mfu_scales: dict[int, float] = field(default_factory=dict)
    ema: WeightEma | None = None  # optimizer.ema_decay: the weights' moving average
    run_id: str | None = None
    tracker: Any = None  # RunTracker on rank 0, None elsewhere
    progress: ProgressPoster = field(default_factory=lambda: ProgressPoster(None))  # rank 0 posts to the console


def train_worker(loop_config: dict) -> None:
    """Ray Train's worker function: this rank's context, then the epochs left to train."""
    import ray.train

    inputs = WorkerInputs.from_loop_config(loop_config)
    if not inputs.verbose:
        quiet_logs()
    train_ctx = ray.train.get_context()
    ctx, resumed = build_worker_context(
        inputs,
        rank=train_ctx.get_world_rank(),
        world=train_ctx.get_world_size(),
        local_rank=train_ctx.get_local_rank(),
        resume_from=ray.train.get_checkpoint(),
    )
    epochs = ctx.cfg.optimizer.epochs
    stop_at = min(epochs, ctx.cfg.run.stop_after_epochs or epochs)

    if resumed.epoch >= stop_at:  # nothing left to train: report what the checkpoint holds
        if ctx.tracker:
            ctx.tracker.finish("FINISHED" if resumed.epoch >= epochs else "KILLED")
        ray.train.report(resumed.metrics)
        return

    try:
        _run_epochs(ctx, resumed.epoch, stop_at, resumed.step)
    except BaseException:
        if ctx.tracker:  # a restart (max_failures) or a resume reopens the same run
            ctx.tracker.finish("FAILED")
        raise
    barrier()


def build_worker_context(
    inputs: WorkerInputs, *, rank: int, world: int, local_rank: int, resume_from: Any = None
) -> tuple[WorkerContext, checkpoint.TrainState]:
    """Everything rank `rank` of `world` trains with (the process group must exist), resumed from
    `resume_from` (a Ray Train checkpoint) when one is given; rank 0 opens the MLflow run. Needs no Ray:
    the recipe tests build it in one process."""
    cfg = inputs.config
    device = _setup_process(cfg, local_rank)
    model, space, objective = build_model_and_objective(cfg, rank)
    mfu_scales = _mfu_scales(model, cfg, device, world)  # on the plain CPU model, before compiling and moving it
    speed_up(model, cfg)
    # The group's size may differ from the recipe's maximum (an elastic run): the global batch does not.
    ds_config = inputs.ds_config | batch_sizes(
        cfg.data.batch_size, world, int(inputs.ds_config["gradient_accumulation_steps"])
    )
    engine = build_engine(model, objective, cfg, ds_config)
    data = _setup_data(cfg, inputs, engine, rank, world, device)
    resumed, ema_state = _resume(engine, cfg, rank, world, resume_from)
    ema = None
    if cfg.optimizer.ema_decay:  # from the trained weights, or the average the checkpoint kept
        ema = WeightEma(model, cfg.optimizer.ema_decay)
        if ema_state is not None:
            ema.load_state_dict(ema_state)
    ctx = WorkerContext(
        cfg=cfg,
        inputs=inputs,
        rank=rank,
        world=world,
        device=device,
        engine=engine,
        model=model,
        data=data,
        subnets=space.sample_subset(cfg.eval.max_subnets, seed=cfg.run.seed),
        images_per_step=engine.train_micro_batch_size_per_gpu() * world,
        mfu_scales=mfu_scales,
        ema=ema,
        run_id=resumed.mlflow_run_id,
    )
    if rank == 0:
        ctx.tracker = _open_tracker(cfg, inputs, resumed.mlflow_run_id)
        ctx.run_id = ctx.tracker.run_id
        ctx.progress = ProgressPoster(inputs.progress)
    return ctx, resumed


def _mfu_scales(model: ElasticNet, cfg: Config, device: torch.device, world: int) -> dict[int, float]:
    """Training FLOPs per image over the group's bf16 peak, for each resolution the run trains at,
    where the card's peak is known."""
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if not peak:
        return {}
    sizes = {cfg.data.train_image_size(epoch) for epoch in range(cfg.optimizer.epochs)}
    return {size: training_flops_per_image(model, size) / (peak * world) for size in sorted(sizes)}


def _setup_process(cfg: Config, local_rank: int) -> torch.device:
    if cfg.scaling.use_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    return device


def _setup_data(cfg: Config, inputs: WorkerInputs, engine, rank: int, world: int, device: torch.device) -> WorkerData:

    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    preparer = BatchPreparer(cfg.data, device, dtype, cfg.run.seed, rank, memory_format=memory_format(cfg.model))
    threads = cfg.data.num_workers or max(1, int(cfg.scaling.cpus_per_worker))
    micro_batch = engine.train_micro_batch_size_per_gpu()
    # Sharded by torch's DistributedSampler at every world size, one included: rank r reads every
    # world-th sample of one seeded order, so a global batch holds the same images whatever the number
    # of workers, and a run resumed on another number continues the same data order.
    train = train_loader(
        cfg.data, batch_size=micro_batch, seed=cfg.run.seed, num_workers=threads, device=device, distributed=True
    )
    n_train, n_val = read_metadata(cfg.data.train)["num_samples"], read_metadata(cfg.data.val)["num_samples"]
    calibration = other = None
    if cfg.eval.recalibrate:
        calibration, other = calibration_sets(
            cfg.data,
            preparer,
            compare=cfg.eval.compare_calibration,
            num_samples=n_train,
            seed=cfg.run.seed,
            num_workers=threads,
            device=device,
        )
    val_shard = eval_loader(
        cfg.data, cfg.data.val, indices=range(rank, n_val, world), num_workers=threads, device=device
    )
    # One worker's shard is the whole set: one loader, one pipeline compiled instead of two
    val_full = (
        val_shard
        if world == 1
        else eval_loader(cfg.data, cfg.data.val, indices=None, num_workers=threads, device=device)
    )
    return WorkerData(preparer, train, val_shard, val_full, calibration, other)


def _resume(engine, cfg: Config, rank: int, world: int, found: Any) -> tuple[checkpoint.TrainState, dict | None]:
    """Ray Train checkpoint `found` loaded into `engine`: where training stands and the weights'
    moving average, if the checkpoint holds one; a fresh start without a checkpoint."""
    if found is None:
        return checkpoint.TrainState(), None
    from pyarrow.fs import LocalFileSystem

    with tempfile.TemporaryDirectory(prefix="st_scale_resume_") as directory:
        if isinstance(found.filesystem, LocalFileSystem):  # a folder (shared on a cluster): read where it is
            local = found.path
        else:  # an object store: downloaded first, waiting out a store that does not answer
            local = with_retries(
                lambda: found.to_directory(directory), "reading the checkpoint to resume from", cfg.run.storage_retry_s
            )
        state = checkpoint.load(engine, Path(local), rank, world)
        ema_state = checkpoint.read_ema(Path(local))
    return state, ema_state


def _open_tracker(cfg: Config, inputs: WorkerInputs, run_id: str | None):

    tracker = RunTracker(
        inputs.tracking_uri,
        inputs.experiment_id,
        run_id=run_id,
        run_name=cfg.tracking.run_name or cfg.run.name,
        params=cfg.flat(),
        tags={
            "st_scale.method": cfg.method.name,
            "st_scale.model": cfg.model.name,
            "st_scale.run_name": cfg.run.name,
            "st_scale.dataset": inputs.dataset,
            RUN_KEY_TAG: f"{cfg.run.storage_path}/{cfg.run.name}",
            **inputs.tags,
        },
        system_metrics=cfg.tracking.system_metrics,
        datasets=inputs.datasets,
    )
    if run_id is None:
        tracker.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/resolved.yaml")
    return tracker


def _run_epochs(ctx: WorkerContext, start_epoch: int, stop_at: int, step: int) -> None:
    """Train, evaluate, log and checkpoint epochs start_epoch..stop_at-1."""
    for epoch in range(start_epoch, stop_at):
        started = time.perf_counter()
        step, epoch_stats = train_epoch(ctx, epoch, step)
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "train/epoch_time_s": time.perf_counter() - started,
            "train/world_size": ctx.world,  # a resumed run may continue on another number of workers
            **epoch_stats,
            **evaluate_epoch(ctx, epoch),
        }
        ctx.progress.epoch(metrics, ctx.cfg.optimizer.epochs)
        if ctx.tracker:
            ctx.tracker.log_metrics(
                {k: v for k, v in metrics.items() if k.startswith(("val/", "train/"))} | {"epoch": epoch + 1}, step
            )
            if epoch + 1 == stop_at:  # before the last report: a Tune scheduler may end the trial right after it
                _close_run(ctx, stop_at)
        _checkpoint(ctx, epoch, step, {**metrics, "mlflow_run_id": ctx.run_id})


def _close_run(ctx: WorkerContext, stop_at: int) -> None:
    if stop_at == ctx.cfg.optimizer.epochs:
        _log_final_model(ctx)
        ctx.tracker.finish("FINISHED")
    else:
        ctx.tracker.set_tags({"st_scale.stopped_after_epoch": str(stop_at)})
        ctx.tracker.finish("KILLED")


def evaluate_epoch(ctx: WorkerContext, epoch: int) -> dict[str, float]:
    """Main net every epoch (on BN statistics re-estimated for it, as the reference does), and the
    weights' average with `optimizer.ema_decay`; all sub-networks every `eval.subnets_every` epochs and
    at the end; after the last epoch, the other calibration protocol (`eval.compare_calibration`) and
    the destruction tests. Rank 0 logs the tables and figures. The model is left as it was."""
    cfg, model, data = ctx.cfg, ctx.model, ctx.data
    final = epoch + 1 == cfg.optimizer.epochs
    every = cfg.eval.subnets_every
    model.eval()
    compare = final and data.other_calibration is not None
    result = evaluate(
        model,
        EvalData(
            val_shard=lambda: data.preparer.eval_batches(data.val_shard),
            val_full=lambda: data.preparer.eval_batches(data.val_full),
            calibration=data.calibration,
            device=ctx.device,
            other_calibration=data.other_calibration if compare else None,
            other_suffix=calibration_suffix(other_protocol(cfg.data.calibration_protocol)) if compare else "",
        ),
        EvalOptions(
            prefix="val",
            shared_stats=cfg.eval.shared_stats,
            subnets=ctx.subnets if final or (every and (epoch + 1) % every == 0) else (),
            latency=final and cfg.eval.latency,
            destruction=final and cfg.eval.destruction,
            destruction_images=cfg.eval.destruction_images,
        ),
        averaged=ctx.ema.weights() if ctx.ema is not None else None,
    )
    if ctx.tracker:
        log_evaluation(
            ctx.tracker, result, epoch_layout(epoch + 1), f"{cfg.method.name} {cfg.model.name}, epoch {epoch + 1}"
        )
    return result.metrics


def _checkpoint(ctx: WorkerContext, epoch: int, step: int, metrics: dict) -> None:
    """Every rank saves its shard, then reports to Ray Train (a barrier) with the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    state = checkpoint.TrainState(epoch=epoch + 1, step=step, mlflow_run_id=ctx.run_id, metrics=metrics)
    run_info = None
    if ctx.rank == 0:
        run_info = checkpoint.RunInfo(
            config=ctx.cfg.model_dump(mode="json"),
            tracking_uri=ctx.inputs.tracking_uri,
            experiment_id=ctx.inputs.experiment_id,
        )
    with tempfile.TemporaryDirectory(prefix="st_scale_ckpt_") as directory:
        ema_state = ctx.ema.state_dict() if ctx.ema is not None and ctx.rank == 0 else None
        checkpoint.save(ctx.engine, Path(directory), ctx.rank, ctx.world, state, run_info, ema_state)
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(directory),
            checkpoint_upload_fn=checkpoint_upload(ctx.cfg.run.storage_retry_s),
        )


def _with_fault(batches: Iterable, fault: FaultInjection | None, rank: int, first_step: int) -> Iterator:
    """Test hook around the batch stream: rank `fault.rank` exits as it reaches global step
    `fault.step`, once per run. Without a fault the loader is returned untouched."""
    if fault is None or rank != fault.rank:
        return iter(batches)

    def stream():
        for step, batch in enumerate(batches, start=first_step):
            marker = Path(fault.marker)
            if step == fault.step and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"rank {rank} exited at step {step}\n")
                os._exit(1)
            yield batch

    return stream()


def _state_bytes(engine, optimizer: str) -> int:
    """Weights, gradients and optimizer state (SGD's momentum; AdamW's two moments) of the trained module."""
    params = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    return (3 if optimizer == "sgd" else 4) * params


def train_epoch(ctx: WorkerContext, epoch: int, step: int) -> tuple[int, dict[str, float]]:
    """One epoch of training steps; returns the global step after it and the epoch's figures: mean
    loss, images per second, and the step's peak memory in MiB (GPU: the allocator's peak; CPU:
    activations saved for backward plus weights, gradients and momentum, measured on the epoch's
    first step). Losses are read back to the host once per logging window, not every step."""
    cfg, engine, data = ctx.cfg, ctx.engine, ctx.data
    steps_per_epoch = len(data.train)
    total_steps = cfg.optimizer.epochs * steps_per_epoch
    image_size = data.train.set_epoch(epoch)
    mfu_scale = ctx.mfu_scales.get(image_size)
    engine.module.train()
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    measure_saved = ctx.device.type != "cuda"  # on GPU the allocator's peak is read after the epoch instead
    memory_bytes = None
    log_every = cfg.tracking.log_every_steps
    window, window_start = StepWindow(first_step=step), time.perf_counter()
    epoch_loss, epoch_steps, epoch_start = 0.0, 0, time.perf_counter()
    mean_loss = None  # the epoch's mean loss so far, as of the last window read
    for images, labels in _with_fault(data.train, ctx.inputs.fault, ctx.rank, step):
        lr = lr_at(step, total_steps, steps_per_epoch, cfg.optimizer)
        set_lr(engine, lr)
        x = data.preparer.train(images, step)
        y = labels.to(ctx.device, non_blocking=True).long()
        if measure_saved:  # the epoch's first step only
            with SavedTensorBytes() as saved:
                loss, parts, _ = engine(x, y, step)
            memory_bytes, measure_saved = saved.total + _state_bytes(engine, cfg.optimizer.name), False
        else:
            loss, parts, _ = engine(x, y, step)
        window.add(loss, parts)
        engine.backward(loss)
        updates = engine.global_steps
        engine.step()
        if ctx.ema is not None and engine.global_steps != updates:  # the weights moved (not mid-accumulation)
            ctx.ema.update(ctx.model)
        step += 1
        if step % log_every == 0:  # every rank: each checks its own losses
            read = window.read(epoch)
            elapsed = time.perf_counter() - window_start
            epoch_loss, epoch_steps = epoch_loss + read.loss_sum, epoch_steps + read.steps
            mean_loss = epoch_loss / epoch_steps
            if ctx.tracker:
                images_per_s = read.steps * ctx.images_per_step / max(elapsed, 1e-9)
                logged = {f"train/{k}": v for k, v in read.means.items()}
                logged.update({"train/lr": lr, "train/images_per_s": images_per_s})
                if mfu_scale:
                    logged["train/mfu"] = images_per_s * mfu_scale
                ctx.tracker.log_metrics(logged, step)
            window_start = time.perf_counter()
        ctx.progress.step(step, total_steps, mean_loss)
    read = window.read(epoch)
    epoch_loss, epoch_steps = epoch_loss + read.loss_sum, epoch_steps + read.steps
    if ctx.device.type == "cuda":
        memory_bytes = torch.cuda.max_memory_allocated(ctx.device)
    seconds = time.perf_counter() - epoch_start
    return step, {
        "train/peak_memory_mib": (memory_bytes or 0) / 2**20,
        "train/epoch_loss": epoch_loss / max(epoch_steps, 1),  # this rank's; ranks differ only by their shards
        "train/epoch_images_per_s": epoch_steps * ctx.images_per_step / max(seconds, 1e-9),
        "train/image_size": image_size,
    }


def _log_final_model(ctx: WorkerContext) -> None:
    """The trained main network with its BN statistics re-estimated on the calibration set (as the
    main-net figures were measured), as a plain state dict file and, for the families `st-scale
    export` builds (not MobileNetV3), as a model unless `tracking.log_model` is off
    (`mlflow.pytorch.log_model`; its URI in the tag `st_scale.final_model_uri`). The trained model
    itself is untouched."""
    model, calibration = ctx.model, ctx.data.calibration
    with preserved_bn(model), tempfile.TemporaryDirectory() as directory:
        if calibration is not None:
            recalibrate_bn(model, model.plan_for_depths(None), calibration)
        path = Path(directory) / f"{model.name}.pt"
        torch.save({k: v.float() if v.is_floating_point() else v for k, v in model.net.state_dict().items()}, path)
        ctx.tracker.log_file(path, "model")
    # A stochastic-depth net scales its branches at test time, which the plain network does not.
    if ctx.cfg.tracking.log_model and has_standalone_subnets(model.name) and not model.has_branch_scales:
        network = standalone_subnet(model, ctx.cfg.model.num_classes, model.full_depths, calibration)
        size = ctx.cfg.data.val_image_size or ctx.cfg.data.image_size
        example = calibration[0][0][:2] if calibration else torch.zeros(2, 3, size, size)
        uri = ctx.tracker.log_network(network, example, "final-model")
        ctx.tracker.set_tags({"st_scale.final_model_uri": uri})
