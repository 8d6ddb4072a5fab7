"""MLflow for a sweep: one parent run (the spec, the search space, the best trial, a comparison
plot and table) and the closing of each trial's child run with the status it earned.

Children are ordinary training runs (created by rank 0 of each trial) tagged with
`mlflow.parentRunId`, so the MLflow UI nests them under the parent. A child whose trial the
scheduler stopped, or whose workers died, is left RUNNING by its workers; the driver closes it here.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from ..provenance import provenance
from ..tracking import Store, redacted
from .spec import CheckedSweep, flat_spec_params, trial_labels
from .trial import OBJECTIVE_KEY

STATE_FILE = "st_scale_sweep.json"  # in the sweep's folder: the parent run id, for resuming


@dataclass
class TrialRow:
    trial_id: str
    outcome: str  # see outcome_of
    epochs: int
    objective: float | None
    main_top1: float | None
    subnets_mean_top1: float | None
    labels: dict[str, Any]  # what the trial drew for each search-space entry
    run_id: str | None
    config: dict[str, Any]  # the Tune trial config


def open_parent_run(uri: str, experiment_id: str, checked: CheckedSweep, sweep_dir: Path) -> tuple[str, bool]:
    """Create the sweep's parent run, or reopen the one recorded in the sweep folder. Returns (id, resumed)."""
    store = Store(uri)
    state = sweep_dir / STATE_FILE
    if state.is_file():
        run_id = json.loads(state.read_text())["parent_run_id"]
        store.reopen(run_id)
        return run_id, True
    spec = checked.spec
    code = provenance()
    run_id = store.create_run(
        experiment_id,
        spec.name,
        {
            "st_scale.commit": code["commit"],  # what the study report names as the code its figures ran on
            "st_scale.dirty": str(code["dirty"]).lower(),
            "st_scale.kind": "sweep",
            "st_scale.sweep": spec.name,
            "st_scale.recipe": spec.recipe,
            "st_scale.objective": spec.objective.describe(),
        },
    )
    store.log_params(run_id, flat_spec_params(spec))
    store.log_text(run_id, redacted(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)), "sweep/spec.yaml")
    store.log_text(run_id, yaml.safe_dump(spec.space, sort_keys=False), "sweep/search_space.yaml")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"parent_run_id": run_id, "tracking_uri": uri, "experiment_id": experiment_id}) + "\n")
    return run_id, False


def child_run_id(store: Store, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    return store.find_run(experiment_id, {"mlflow.parentRunId": parent_run_id, "st_scale.trial_id": trial_id})


def outcome_of(last_result: dict, epochs: int, tune_status: str) -> str:
    """completed | stopped early (by the scheduler) | failed | unfinished (the sweep was interrupted)."""
    if tune_status == "ERROR":
        return "failed"
    if tune_status != "TERMINATED":
        return "unfinished"
    return "completed" if int(last_result.get("epoch", 0)) >= epochs else "stopped early"


class CloseChildRuns(Callback):
    """Driver-side Tune callback: as each trial ends, give its child run the status it earned
    (FINISHED, KILLED when the scheduler stopped it, FAILED) and the sweep objective it reached."""

    STATUS = {"completed": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, epochs: int):
        self.uri, self.experiment_id, self.parent_run_id, self.epochs = uri, experiment_id, parent_run_id, epochs

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.close(trial.trial_id, trial.last_result or {}, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.close(trial.trial_id, trial.last_result or {}, "ERROR")

    def close(self, trial_id: str, last_result: dict, tune_status: str) -> None:
        store = Store(self.uri)
        run_id = child_run_id(store, self.experiment_id, self.parent_run_id, trial_id)
        if run_id is None:  # failed before rank 0 opened its run
            return
        outcome = outcome_of(last_result, self.epochs, tune_status)
        if OBJECTIVE_KEY in last_result:
            store.log_metric(
                run_id, "sweep/objective", float(last_result[OBJECTIVE_KEY]), step=int(last_result.get("step", 0))
            )
        store.set_tag(run_id, "st_scale.trial_outcome", outcome)
        if store.status(run_id) == "RUNNING":
            store.end_run(run_id, self.STATUS[outcome])


def trial_rows(sweep_dir: Path, uri: str, experiment_id: str, parent_run_id: str, epochs: int) -> list[TrialRow]:
    """Every trial of the sweep as Tune saved it (including those of earlier, interrupted drivers)."""
    from ray.tune import ExperimentAnalysis

    store = Store(uri)
    rows = []
    for trial in ExperimentAnalysis(str(sweep_dir)).trials:
        m = trial.last_result or {}
        rows.append(
            TrialRow(
                trial.trial_id,
                outcome_of(m, epochs, trial.status),
                int(m.get("epoch", 0)),
                m.get(OBJECTIVE_KEY),
                m.get("val/main_top1"),
                m.get("val/subnets_mean_top1"),
                trial_labels(trial.config or {}),
                child_run_id(store, experiment_id, parent_run_id, trial.trial_id),
                trial.config or {},
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best completed trial (trials stopped early were scored at an earlier epoch); if none
    completed, the best of the rest."""
    scored = [r for r in rows if r.objective is not None and r.outcome == "completed"]
    scored = scored or [r for r in rows if r.objective is not None and r.outcome != "failed"]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.objective)


def rows_csv(rows: list[TrialRow]) -> str:
    labels = sorted({k for r in rows for k in r.labels})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["trial_id", "outcome", "epochs", "objective", "main_top1", "subnets_mean_top1", *labels, "mlflow_run_id"]
    )
    for r in rows:
        writer.writerow(
            [
                r.trial_id,
                r.outcome,
                r.epochs,
                r.objective,
                r.main_top1,
                r.subnets_mean_top1,
                *[r.labels.get(k) for k in labels],
                r.run_id,
            ]
        )
    return out.getvalue()


def finish_parent_run(
    uri: str, parent_run_id: str, checked: CheckedSweep, rows: list[TrialRow], status: str
) -> TrialRow | None:
    """Best trial (tags, metric, its resolved config), the trials table and the comparison plot."""
    import matplotlib.pyplot as plt

    # lazy: matplotlib loads only where a figure is drawn
    from ..evaluate.plots import sweep_figure

    store = Store(uri)
    spec = checked.spec
    best = best_row(rows, spec.objective.mode)
    store.log_text(parent_run_id, rows_csv(rows), "sweep/trials.csv")
    if rows:
        figure = sweep_figure(rows, checked.dimensions, f"{spec.name}: {spec.objective.describe()} per trial")
        store.log_figure(parent_run_id, figure, "plots/objective_vs_search_space.png")
        plt.close(figure)
    counts = {o: sum(r.outcome == o for r in rows) for o in ("completed", "stopped early", "failed", "unfinished")}
    store.log_metrics(parent_run_id, {f"trials/{o.replace(' ', '_')}": n for o, n in counts.items()})
    if best is not None:
        store.log_metric(parent_run_id, "best/objective", best.objective)
        for key, value in {"best_trial_id": best.trial_id, "best_run_id": best.run_id or ""}.items():
            store.set_tag(parent_run_id, f"st_scale.{key}", value)
        for label, value in best.labels.items():
            store.set_tag(parent_run_id, f"best.{label}", str(value))
        store.log_text(
            parent_run_id,
            json.dumps(
                {
                    "trial_id": best.trial_id,
                    "run_id": best.run_id,
                    "objective": best.objective,
                    "search_values": best.labels,
                },
                indent=2,
                default=str,
            )
            + "\n",
            "sweep/best_trial.json",
        )
        best_config = checked.trial_config(best.config).model_dump(mode="json")
        best_yaml = redacted(yaml.safe_dump(best_config, sort_keys=False))
        store.log_text(parent_run_id, best_yaml, "sweep/best_config.yaml")
    store.end_run(parent_run_id, status)
    return best
