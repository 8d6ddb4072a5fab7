"""The sweep's MLflow bookkeeping on a real (SQLite) store: the parent run, children closed with the
status their trial earned, the best trial, the comparison table and plot."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from st_scale.sweep.parent import (
    CloseChildRuns,
    TrialRow,
    best_row,
    finish_parent_run,
    open_parent_run,
    outcome_of,
    rows_csv,
)
from st_scale.sweep.spec import check_spec, load_spec
from st_scale.tracking import RUN_KEY_TAG, RunTracker, check_tracking_uri

TINY = Path(__file__).resolve().parents[1] / "tune" / "digits_tiny.yaml"


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, check_tracking_uri(uri, "sweeps")


def child(uri, experiment_id, parent_id, trial_id) -> str:
    run = mlflow.MlflowClient(uri).create_run(
        experiment_id, tags={"mlflow.parentRunId": parent_id, "st_scale.trial_id": trial_id}
    )
    return run.info.run_id


def test_parent_run_is_created_once_and_reopened(store, tmp_path):
    uri, experiment_id = store
    checked = check_spec(load_spec(str(TINY)))
    first, resumed = open_parent_run(uri, experiment_id, checked, tmp_path / "sweep")
    assert not resumed
    client = mlflow.MlflowClient(uri)
    client.set_terminated(first, "KILLED")  # the driver was interrupted
    again, resumed = open_parent_run(uri, experiment_id, checked, tmp_path / "sweep")
    assert resumed and again == first and client.get_run(first).info.status == "RUNNING"
    run = client.get_run(first)
    assert run.data.tags["st_scale.kind"] == "sweep" and run.data.params["num_samples"] == "3"
    assert run.data.params["objective"] == "0.5*val/main_top1 + 0.5*val/subnets_mean_top1"
    assert {a.path for a in client.list_artifacts(first, "sweep")} == {"sweep/spec.yaml", "sweep/search_space.yaml"}


@pytest.mark.parametrize(
    "tune_status, epoch, expected_status, outcome",
    [
        ("TERMINATED", 2, "FINISHED", "completed"),
        ("TERMINATED", 1, "KILLED", "stopped early"),  # ASHA stopped it
        ("ERROR", 1, "FAILED", "failed"),
    ],
)
def test_children_end_with_the_status_their_trial_earned(store, tune_status, epoch, expected_status, outcome):
    uri, experiment_id = store
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(experiment_id).info.run_id
    run_id = child(uri, experiment_id, parent, "t1")
    other = child(uri, experiment_id, parent, "t2")
    CloseChildRuns(uri, experiment_id, parent, epochs=2).close(
        "t1", {"epoch": epoch, "step": 44, "objective": 71.5}, tune_status
    )
    run = client.get_run(run_id)
    assert run.info.status == expected_status and run.data.tags["st_scale.trial_outcome"] == outcome
    assert run.data.metrics["sweep/objective"] == 71.5
    assert client.get_run(other).info.status == "RUNNING"  # only the trial that ended


def test_a_finished_child_keeps_its_status(store):
    uri, experiment_id = store
    client = mlflow.MlflowClient(uri)
    parent = client.create_run(experiment_id).info.run_id
    run_id = child(uri, experiment_id, parent, "t1")
    client.set_terminated(run_id, "FINISHED")
    CloseChildRuns(uri, experiment_id, parent, epochs=2).close("t1", {"epoch": 1}, "ERROR")
    assert client.get_run(run_id).info.status == "FINISHED"


def test_outcome_of_an_interrupted_trial():
    assert outcome_of({"epoch": 1}, 2, "RUNNING") == "unfinished"
    assert outcome_of({}, 2, "PENDING") == "unfinished"


def test_a_restarted_run_without_checkpoint_reuses_its_mlflow_run(store):
    """No duplicate child when a trial is retried before its first checkpoint: the run key finds it."""
    uri, experiment_id = store
    tags = {RUN_KEY_TAG: "/runs/sweep-t1", "st_scale.trial_id": "t1"}
    first = RunTracker(
        uri, experiment_id, run_id=None, run_name="sweep-t1", params={"a": 1}, tags=tags, system_metrics=False
    )
    first.log_metrics({"train/loss": 2.0}, step=10)
    first.finish("FAILED")
    second = RunTracker(
        uri, experiment_id, run_id=None, run_name="sweep-t1", params={"a": 1}, tags=tags, system_metrics=False
    )
    second.log_metrics({"train/loss": 2.0}, step=10)  # replayed: skipped
    second.log_metrics({"train/loss": 1.5}, step=20)
    second.finish()
    assert second.run_id == first.run_id
    client = mlflow.MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == [10, 20]
    assert len(client.search_runs([experiment_id])) == 1


def rows() -> list[TrialRow]:
    def row(trial_id, outcome, objective, kl, family):
        return TrialRow(
            trial_id,
            outcome,
            2 if outcome == "completed" else 1,
            objective,
            objective,
            objective,
            {"method.kl_weight": kl, "sampler": family},
            f"run-{trial_id}",
            {
                "method.kl_weight": kl,
                "sampler": {"family": family, "sampling.decay": 1.0 if family == "uniform" else 0.7},
            },
        )

    return [
        row("a", "completed", 80.0, 1.0, "uniform"),
        row("b", "stopped early", 85.0, 0.5, "biased_to_large"),
        row("c", "completed", 82.5, 2.0, "biased_to_large"),
        row("d", "failed", None, 0.4, "uniform"),
    ]


def test_best_is_the_best_completed_trial():
    assert best_row(rows(), "max").trial_id == "c"  # b scored higher, but at an earlier epoch
    assert best_row(rows(), "min").trial_id == "a"
    assert best_row([r for r in rows() if r.outcome != "completed"], "max").trial_id == "b"
    assert best_row([], "max") is None


def test_finish_parent_run_records_best_table_and_plot(store, tmp_path):
    uri, experiment_id = store
    checked = check_spec(load_spec(str(TINY)))
    parent, _ = open_parent_run(uri, experiment_id, checked, tmp_path / "sweep")
    best = finish_parent_run(uri, parent, checked, rows(), "FINISHED")
    client = mlflow.MlflowClient(uri)
    run = client.get_run(parent)
    assert best.trial_id == "c" and run.info.status == "FINISHED"
    assert run.data.tags["st_scale.best_trial_id"] == "c" and run.data.tags["st_scale.best_run_id"] == "run-c"
    assert run.data.tags["best.sampler"] == "biased_to_large" and run.data.metrics["best/objective"] == 82.5
    assert run.data.metrics["trials/completed"] == 2 and run.data.metrics["trials/stopped_early"] == 1
    artifacts = {a.path for folder in ("sweep", "plots") for a in client.list_artifacts(parent, folder)}
    assert {
        "sweep/trials.csv",
        "sweep/best_config.yaml",
        "sweep/best_trial.json",
        "plots/objective_vs_search_space.png",
    } <= artifacts
    local = Path(client.download_artifacts(parent, "sweep/best_config.yaml", str(tmp_path)))
    import yaml

    best_config = yaml.safe_load(local.read_text())
    assert best_config["method"]["kl_weight"] == 2.0 and best_config["sampling"]["decay"] == 0.7
    assert rows_csv(rows()).splitlines()[0] == (
        "trial_id,outcome,epochs,objective,main_top1,subnets_mean_top1,method.kl_weight,sampler,mlflow_run_id"
    )
