"""The driver: validate everything that can be checked before a worker starts, connect to Ray
(an existing cluster via --address / RAY_ADDRESS, else a local instance on 127.0.0.1), fit a
TorchTrainer of DeepSpeed workers, and summarise the run."""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import checkpoint
from ..assembly import check_buildable
from ..config import Config
from ..data.integrity import DatasetFileError, verify_beton
from ..errors import ConfigError, RunFailedError
from ..provenance import write_raw
from ..storage import Location, check_object_store, check_writable, is_object_store, ray_storage, resolve
from ..tracking import check_tracking_uri, resolve_tracking_uri
from .console import ConsoleView, quiet_logs
from .engine import resolve_ds_config
from .failures import FailOnRecurringErrors, recurring_cause
from .inputs import FaultInjection, WorkerInputs
from .interrupts import sigterm_as_ctrl_c, stopped
from .loop import train_worker
from .run_lock import RunLock

LOCAL_RAY_TEMP_DIR = "/tmp/st_scale_ray"  # short: Ray's unix sockets have a ~107 character path limit


@dataclass
class RunSummary:
    method: str
    model: str
    dataset: str
    main_top1: float | None
    subnets_mean_top1: float | None
    subnets_std_top1: float | None
    subnets_min_top1: float | None
    num_subnets: int | None
    mlflow_run_id: str | None
    epochs: int
    wall_s: float
    checkpoint: str | None = None  # the last checkpoint folder (for `st-scale eval`)
    mlflow_experiment_id: str | None = None


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_address_answers(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as error:
            raise ConfigError(
                f"--address/RAY_ADDRESS={address!r}: cannot connect to a Ray cluster "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            ) from None
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        object_store_memory=512 * 2**20,
        _temp_dir=LOCAL_RAY_TEMP_DIR,
        log_to_driver=True,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}},
    )


def _check_address_answers(address: str, timeout_s: float = 5.0) -> None:
    """A TCP probe of host:port first: `ray.init` waits minutes on an address nobody listens at."""
    import socket

    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"--address/RAY_ADDRESS={address!r} is a dashboard URL (what `ray job submit` takes); st-scale joins "
            f"the cluster itself: give the head's address without the scheme and with its GCS port "
            f"(host:6379), or `auto` on a cluster node"
        )
    host_port = address.removeprefix("ray://")
    if host_port in ("auto", "local") or ":" not in host_port:
        return  # Ray resolves these itself, and fails fast when nothing is running
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"--address/RAY_ADDRESS={address!r}: no Ray cluster answers there ({error}); start one "
            f"(`ray start --head`) or fix the address (the head's GCS port, default 6379)"
        ) from None
    _check_gcs_speaks(address, f"{host}:{port}", timeout_s)


def _check_gcs_speaks(address: str, target: str, timeout_s: float) -> None:
    """Something listens there: a Ray GCS speaks gRPC (HTTP/2). A channel that does not become ready
    within the bound is another server (a web server, a database), where `ray.init` would retry for
    minutes."""
    import grpc

    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise ConfigError(
            f"--address/RAY_ADDRESS={address!r}: a server listens there but it is not a Ray cluster's GCS (no "
            f"gRPC answer within {timeout_s:.0f} s); give the head's GCS port (default 6379; `ray status` on the "
            f"head prints the address), or `auto` on a cluster node"
        ) from None
    finally:
        channel.close()


def copies_that_fit(needs: list[tuple[str, float, str]], total: dict[str, float], fix: str) -> int:
    """How many copies of `needs` fit in the cluster's resources `total` (at least one, or a
    ConfigError). `needs` holds (resource, amount, phrase) where "<phrase> 4 CPUs" says who asks."""
    limits = []
    for resource, need, phrase in needs:
        if need <= 0:
            continue
        have = total.get(resource, 0.0)
        if need > have + 1e-9:
            raise ConfigError(f"{phrase} {need:g} {resource}s but the Ray cluster has {have:g}; {fix}")
        limits.append(math.floor(have / need + 1e-9))
    return min(limits) if limits else 1


def check_cluster_fits(cfg: Config) -> None:
    import ray

    s = cfg.scaling
    workers = f"scaling.num_workers={s.describe()}" + (f" (at least {s.min_workers})" if s.elastic else "")
    copies_that_fit(
        [
            (
                resource,
                per_worker * s.min_workers,
                f"{workers} x scaling.{field}={per_worker} needs",
            )
            for resource, per_worker, field in (
                ("CPU", s.cpus_per_worker, "cpus_per_worker"),
                ("GPU", s.gpus_per_worker, "gpus_per_worker"),
            )
        ],
        ray.cluster_resources(),
        "lower them or add nodes",
    )


def resolve_inputs(cfg: Config) -> WorkerInputs:
    """Every check of a run that can be made on the driver; returns what every worker is handed. Its
    `config` is `cfg` resolved: data and storage paths absolute, the object store's endpoint and the
    tracking URI filled in. `cfg` itself is left as it was."""
    cfg = cfg.model_copy(deep=True)
    metadata = {}
    for field in ("train", "val"):
        path = str(Path(getattr(cfg.data, field)).expanduser().resolve())
        setattr(cfg.data, field, path)
        try:
            metadata[field] = verify_beton(path)
        except DatasetFileError as error:
            raise ConfigError(f"data.{field}: {error}") from None
    _check_data_against_files(cfg, metadata)
    check_buildable(cfg)
    ds_config = resolve_ds_config(cfg)
    _resolve_storage(cfg)
    checkpoint.check_resumable(
        run_folder(cfg),
        zero_stage=int(ds_config.get("zero_optimization", {}).get("stage", 0)),
        num_workers=cfg.scaling.num_workers,
        model=cfg.model,
    )
    cfg.tracking.tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    experiment_id = check_tracking_uri(cfg.tracking.tracking_uri, cfg.tracking.experiment)
    return WorkerInputs(
        config=cfg,
        ds_config=ds_config,
        tracking_uri=cfg.tracking.tracking_uri,
        experiment_id=experiment_id,
        datasets={
            field: {"path": getattr(cfg.data, field)}
            | {k: meta[k] for k in ("sha256", "source", "num_samples", "num_classes") if k in meta}
            for field, meta in metadata.items()
        },
        fault=_fault_from_env(cfg),
    )


def _check_data_against_files(cfg: Config, metadata: dict[str, dict]) -> None:
    """The recipe's data fields held against what the files hold (their metadata already checked
    against their contents by verify_beton)."""
    train, val = metadata["train"], metadata["val"]
    if train["sha256"] == val["sha256"]:
        raise ConfigError(
            f"data.val: {cfg.data.val} holds the same samples as data.train ({cfg.data.train}); a net is never "
            f"validated on its training data: give data.val the held-out split"
        )
    for field, meta in metadata.items():
        path, sides = getattr(cfg.data, field), meta["image_sides"]
        if cfg.data.pipeline == "cifar" and sides != [cfg.data.image_size]:
            stored = f"{sides[0]} x {sides[0]} images" if len(sides) == 1 else "images of several sizes"
            raise ConfigError(  # the cifar pipeline does not resize: the file's size is the training size
                f"data.image_size={cfg.data.image_size} but data.{field} holds {stored}, which the cifar pipeline "
                f"uses as they are; "
                + (f"set data.image_size={sides[0]}, or " if len(sides) == 1 else "")
                + "set data.pipeline=imagenet to resize"
            )
        classes = meta.get("num_classes")  # every split: a label the head has no output for is never right
        if classes and classes > cfg.model.num_classes:
            raise ConfigError(
                f"data.{field}: {path} has {classes} classes but model.num_classes={cfg.model.num_classes}; "
                f"set model.num_classes={classes} or give data.{field} the run's classes"
            )
    if train.get("num_classes") != val.get("num_classes"):
        raise ConfigError(
            f"data.val: {cfg.data.val} has {val.get('num_classes')} classes but data.train {train.get('num_classes')}: "
            f"splits of two datasets; give data.val the validation split of data.train's dataset"
        )
    if cfg.data.calibration_images > train["num_samples"]:
        raise ConfigError(
            f"data.calibration_images={cfg.data.calibration_images} but data.train holds {train['num_samples']} "
            f"images; set data.calibration_images to at most {train['num_samples']}"
        )


def _resolve_storage(cfg: Config) -> None:
    """The run storage, checked before any worker starts and recorded in the config as the workers
    reach it: a folder made absolute, or an object store with its endpoint (the recipe's, else
    $AWS_ENDPOINT_URL) that answers and lets these credentials write."""
    if is_object_store(cfg.run.storage_path):
        cfg.run.storage_endpoint = check_object_store(cfg.run.storage_path, cfg.run.storage_endpoint)
    else:
        cfg.run.storage_path = str(check_writable(cfg.run.storage_path, "run.storage_path", folder=True))


def run_folder(cfg: Config) -> Location:
    """Where Ray Train keeps this run's checkpoints: <run.storage_path>/<run.name>."""
    return resolve(cfg.run.storage_path, cfg.run.storage_endpoint) / cfg.run.name


def _fault_from_env(cfg: Config) -> FaultInjection | None:
    """ST_SCALE_FAIL_AT_STEP=N [ST_SCALE_FAIL_RANK=r]: a worker exits at global step N, once (tests).
    The marker that makes it once is a local file: beside the checkpoints, or in the temporary folder
    when they are in an object store."""
    step = os.environ.get("ST_SCALE_FAIL_AT_STEP")
    if not step:
        return None
    folder = run_folder(cfg)
    local = Path(folder.path) if not folder.remote else Path(tempfile.gettempdir()) / "st_scale_faults" / cfg.run.name
    marker = local / "injected_failure.txt"
    return FaultInjection(step=int(step), rank=int(os.environ.get("ST_SCALE_FAIL_RANK", "1")), marker=str(marker))


def build_trainer(cfg: Config, inputs: WorkerInputs, *, callbacks: list = ()):
    """The TorchTrainer of one run, its workers handed `inputs` (what `resolve_inputs` returned)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker} | ({"GPU": s.gpus_per_worker} if s.use_gpu else {})
    return TorchTrainer(
        train_worker,
        train_loop_config=inputs.to_loop_config(),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=s.resize_check_s,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            **ray_storage(resolve(cfg.run.storage_path, cfg.run.storage_endpoint)),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=[FailOnRecurringErrors(), *callbacks],
            logging_config=LoggingConfig(log_level="INFO" if inputs.verbose else "WARNING"),
        ),
    )


def train(cfg: Config, *, address: str | None = None, verbose: bool = False) -> RunSummary:
    """Run (or resume, if `run.name` exists under `run.storage_path`) one training run: its progress
    drawn on this console, a failure raised as a RunFailedError that says what failed and where. The
    run name is held for the run's length (run_lock): a second driver of it is refused."""
    if not verbose:
        quiet_logs()
    inputs = resolve_inputs(cfg)
    cfg = inputs.config
    with RunLock(run_folder(cfg), cfg.run.name):
        return _train_holding_the_name(cfg, inputs, address=address, verbose=verbose)


def _train_holding_the_name(cfg: Config, inputs: WorkerInputs, *, address: str | None, verbose: bool) -> RunSummary:
    from ray.train import TrainingFailedError

    connect_ray(address)
    check_cluster_fits(cfg)
    view = ConsoleView(f"{cfg.method.name} {cfg.run.name}")
    trainer = build_trainer(cfg, replace(inputs, progress=view.board, verbose=verbose))
    start = time.perf_counter()
    with sigterm_as_ctrl_c() as received:
        try:
            with view:
                result = trainer.fit()
        except TrainingFailedError as error:
            if verbose:
                raise
            raise RunFailedError(describe_failure(error, cfg)) from error
        except (KeyboardInterrupt, SystemExit):  # Ray Train's Ctrl-C handler aborts the run, then exits
            raise stopped(
                received,
                f"run {cfg.run.name!r}",
                f"its workers were stopped. Run the same command again (same run.name) to resume from the last "
                f"complete checkpoint in {run_folder(cfg)}",
            ) from None
    wall = time.perf_counter() - start
    last = Path(result.checkpoint.path).name if result.checkpoint else None
    return run_summary(cfg, inputs, result.metrics or {}, wall, last)


def run_summary(cfg: Config, inputs: WorkerInputs, m: dict, wall_s: float, last_checkpoint: str | None) -> RunSummary:
    """The summary of a run from the metrics its workers reported last (`m`) and the name of its last
    checkpoint folder."""
    return RunSummary(
        method=cfg.method.name,
        model=cfg.model.name,
        dataset=inputs.dataset,
        main_top1=m.get("val/main_top1"),
        subnets_mean_top1=m.get("val/subnets_mean_top1"),
        subnets_std_top1=m.get("val/subnets_std_top1"),
        subnets_min_top1=m.get("val/subnets_min_top1"),
        num_subnets=int(m["val/num_subnets"]) if "val/num_subnets" in m else None,
        mlflow_run_id=m.get("mlflow_run_id"),
        epochs=int(m.get("epoch", 0)),
        wall_s=round(wall_s, 1),
        checkpoint=(run_folder(cfg) / last_checkpoint).uri if last_checkpoint else None,
        mlflow_experiment_id=inputs.experiment_id,
    )


def write_summary_json(path: str | Path, summaries: list[RunSummary], started: dict) -> None:

    write_raw(path, started, {"runs": [asdict(s) for s in summaries]})


def describe_failure(error: BaseException, cfg: Config) -> str:
    """A failed run in a few lines: which worker failed with what, where Ray keeps the full log, and
    how to continue. Ray's own exception nests the worker's traceback several levels deep."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(error, WorkerGroupError) and error.worker_failures:
        rank, cause = min(error.worker_failures.items())
        what = f"worker {rank}: {_first_line(recurring_cause(cause) or cause)}"
    elif isinstance(error, ControllerError):
        what = _first_line(error.controller_failure)
    else:
        what = _first_line(error)
    return (
        f"run {cfg.run.name!r} failed: {what}\n"
        f"  full log: {ray_logs_dir()} (worker-*.err: each worker's output; train/: Ray Train's logs); "
        f"--verbose shows it here\n"
        f"  checkpoints: {run_folder(cfg)}; run again with the same run.name to resume "
        f"from the last complete one"
    )


def _first_line(error: BaseException) -> str:
    """The worker's own exception and the line that says what went wrong: Ray wraps a worker's
    exception (RayTaskError.cause, Ray Train's UserExceptionWithTraceback) in its traceback text."""
    for attribute in ("cause", "_base_exc"):
        inner = getattr(error, attribute, None)
        if isinstance(inner, BaseException):
            error = inner
            break
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    said = lines[-1] if lines[0].startswith("Traceback") else lines[0]  # a traceback ends with "Type: message"
    return f"{type(error).__name__}: {said}"


def ray_logs_dir() -> str:
    """This node's Ray session log folder (on a cluster, each node holds its own workers' logs)."""
    try:
        from ray._private.worker import _global_node

        return str(Path(_global_node.get_session_dir_path()) / "logs")
    except Exception:  # not connected, or the private API moved: the documented default
        return "/tmp/ray/session_latest/logs"
