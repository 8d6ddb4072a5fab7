"""`st-scale sweep`: check the spec against the recipe and the cluster, open the parent MLflow run,
and run (or resume) the Tune experiment: one TorchTrainer of DeepSpeed workers per trial."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError
from ..provenance import write_raw
from ..tracking import Store
from ..train.driver import connect_ray, copies_that_fit, resolve_inputs
from ..train.interrupts import sigterm_as_ctrl_c
from .parent import CloseChildRuns, TrialRow, finish_parent_run, open_parent_run, trial_rows
from .spec import CheckedSweep, check_spec, load_spec
from .trial import OBJECTIVE_KEY, run_trial


@dataclass
class SweepSummary:
    name: str
    path: str
    parent_run_id: str
    resumed: bool
    status: str  # the parent run's: FINISHED, KILLED (interrupted: run it again to resume), FAILED
    mode: str  # the objective's: max or min
    rows: list[TrialRow]
    best: TrialRow | None
    wall_s: float


def concurrent_trials(checked: CheckedSweep, total: dict[str, float]) -> int:
    """How many trials run at once: as many as fit the cluster's resources `total` now (each trial is
    its own process plus its Train workers), or the spec's `max_concurrent_trials` when it sets one
    (on an autoscaling cluster the autoscaler adds the nodes). One trial must fit now."""
    spec, s = checked.spec, checked.base.scaling
    if s.elastic:
        raise ConfigError(
            f"scaling.num_workers={list(s.num_workers)}: a sweep's trials train on a fixed number of workers "
            f"(Tune places each trial's resources); give one number"
        )
    fit = copies_that_fit(
        [
            (
                "CPU",
                spec.trial.cpus + s.num_workers * s.cpus_per_worker,
                f"a trial needs trial.cpus={spec.trial.cpus:g} + scaling.num_workers={s.num_workers} x "
                f"scaling.cpus_per_worker={s.cpus_per_worker:g} =",
            ),
            (
                "GPU",
                s.num_workers * s.gpus_per_worker,
                f"a trial needs scaling.num_workers={s.num_workers} x scaling.gpus_per_worker={s.gpus_per_worker:g} =",
            ),
        ],
        total,
        "lower them (e.g. `--set set.scaling.cpus_per_worker=0.5`) or add nodes",
    )
    return spec.max_concurrent_trials or fit


def search_algorithm(spec, concurrency: int):
    """The spec's search algorithm, seeded by `seed`, running at most `concurrency` trials at a time.
    Tune saves its state with the sweep, so a resumed sweep proposes from every result so far."""
    if spec.search.algorithm == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # a BasicVariantGenerator ignores TuneConfig.max_concurrent_trials: it takes its own limit
        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=concurrency)
    from ray.tune.search import ConcurrencyLimiter

    if spec.search.algorithm == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(n_initial_points=spec.search.initial_points, random_state_seed=spec.seed)
    else:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=spec.search.initial_points)
        searcher = OptunaSearch(sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency)


def _tuner(checked: CheckedSweep, payload: dict, sweep_dir: Path, concurrency: int, callback: CloseChildRuns):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = checked.spec
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=payload), {"CPU": spec.trial.cpus})
    if tune.Tuner.can_restore(str(sweep_dir)):
        return tune.Tuner.restore(
            str(sweep_dir),
            trainable,
            param_space=checked.param_space(),
            resume_unfinished=True,
            resume_errored=spec.trial.max_failures != 0,
        ), True
    if spec.scheduler.name == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=checked.base.optimizer.epochs,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    tuner = tune.Tuner(
        trainable,
        param_space=checked.param_space(),
        tune_config=tune.TuneConfig(
            metric=OBJECTIVE_KEY,
            mode=spec.objective.mode,
            scheduler=scheduler,
            num_samples=spec.num_samples,
            search_alg=search_algorithm(spec, concurrency),
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(sweep_dir.parent),
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=spec.trial.max_failures),
        ),
    )
    return tuner, False


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def run_sweep(spec_name: str, overrides: list[str] = (), *, address: str | None = None) -> SweepSummary:
    """Run the sweep, or resume it if `storage_path/name` holds an interrupted one."""
    checked = check_spec(load_spec(spec_name, overrides))
    spec, base = checked.spec, checked.base
    inputs = resolve_inputs(base)  # data checksums, DeepSpeed config, tracking store: before any trial
    checked.base = base = inputs.config
    checked.base_tree = base.model_dump(mode="json")  # absolute paths: trials run in their own folders
    sweep_dir = Path(spec.storage_path).expanduser().resolve() / spec.name
    connect_ray(address)
    import ray

    concurrency = concurrent_trials(checked, ray.cluster_resources())
    uri, experiment_id = inputs.tracking_uri, inputs.experiment_id
    parent_run_id, resumed = open_parent_run(uri, experiment_id, checked, sweep_dir)
    payload = {
        "name": spec.name,
        "base_tree": checked.base_tree,
        "objective": spec.objective.model_dump(),
        "parent_run_id": parent_run_id,
        "train_runs_dir": str(sweep_dir / "train_runs"),
    }
    callback = CloseChildRuns(uri, experiment_id, parent_run_id, base.optimizer.epochs)
    tuner, restored = _tuner(checked, payload, sweep_dir, concurrency, callback)
    print(
        f"st-scale sweep {spec.name}: {'resuming' if restored else 'starting'} in {sweep_dir} "
        f"({spec.num_samples} samples, up to {concurrency} at a time; MLflow parent run {parent_run_id})",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    try:
        with sigterm_as_ctrl_c():  # a SIGTERM too: Tune saves the sweep's state, the same command resumes it
            tuner.fit()  # returns (rather than raises) when interrupted with Ctrl+C, after saving the experiment
    except BaseException as error:  # the parent shows why the sweep ended; running it again resumes it
        Store(uri).end_run(parent_run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    rows = trial_rows(sweep_dir, uri, experiment_id, parent_run_id, base.optimizer.epochs)
    if any(r.outcome == "unfinished" for r in rows):
        status = "KILLED"  # interrupted (Ctrl+C): the same command resumes it
    else:
        status = "FINISHED" if any(r.outcome != "failed" for r in rows) else "FAILED"
    best = finish_parent_run(uri, parent_run_id, checked, rows, status)
    return SweepSummary(
        spec.name,
        str(sweep_dir),
        parent_run_id,
        resumed or restored,
        status,
        spec.objective.mode,
        rows,
        best,
        round(time.perf_counter() - start, 1),
    )


def print_sweep(summary: SweepSummary) -> None:
    sign = -1 if summary.mode == "max" else 1
    rows = sorted(summary.rows, key=lambda r: (r.objective is None, sign * (r.objective or 0)))
    labels = sorted({k for r in rows for k in r.labels})
    header = f"{'trial':14s} {'outcome':14s} {'epochs':>6s} {'objective':>9s} " + " ".join(
        f"{k[:22]:>22s}" for k in labels
    )
    print(f"\nsweep {summary.name}: {len(rows)} trials in {summary.wall_s:.0f} s  (results: {summary.path})")
    print(header)
    for r in rows:
        objective = f"{r.objective:9.3f}" if r.objective is not None else f"{'-':>9s}"
        values = " ".join(f"{_short(r.labels.get(k)):>22s}" for k in labels)
        mark = "  <- best" if r is summary.best else ""
        print(f"{r.trial_id:14s} {r.outcome:14s} {r.epochs:6d} {objective} {values}{mark}")
    print(
        f"MLflow parent run {summary.parent_run_id} ({summary.status}); best child run "
        f"{summary.best.run_id if summary.best else '-'}"
    )
    if summary.status == "KILLED":
        print("the sweep was interrupted: run the same command again to resume it")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_sweep_json(path: str | Path, summary: SweepSummary, started: dict) -> None:
    write_raw(path, started, asdict(summary))
