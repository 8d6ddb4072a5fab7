"""What runs inside one Tune trial: the trial's config, a TorchTrainer fitted in the trial, and the
metrics (with the sweep's objective added) reaching Tune through Ray Train's callback."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from ..config import build_config
from ..train.driver import build_trainer, resolve_inputs
from .spec import SweepObjective, trial_assignments, trial_labels, with_assignments

OBJECTIVE_KEY = "objective"  # the Tune metric every trial reports


class ObjectiveReportCallback(TuneReportCallback):
    """Forwards rank 0's report to Tune with the sweep's objective computed from it."""

    def __init__(self, objective: SweepObjective):
        super().__init__()
        self.objective = objective

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        first = dict(metrics[0])
        value = self.objective.value(first)
        if value is not None:
            first[OBJECTIVE_KEY] = value
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def run_trial(trial_config: dict[str, Any], *, sweep: dict[str, Any]) -> None:
    """The Tune function trainable. `sweep` holds the resolved base config tree, the objective, the
    parent MLflow run and where the trials' training runs live (all absolute: trials run elsewhere)."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    name = f"{sweep['name']}-{trial_id}"
    own = {
        "run.name": name,
        "run.storage_path": sweep["train_runs_dir"],
        "run.storage_endpoint": None,  # the sweep's folder, whatever the recipe's storage
        "tracking.run_name": name,
    }
    cfg = build_config(with_assignments(sweep["base_tree"], trial_assignments(trial_config) | own))
    inputs = resolve_inputs(cfg)  # cheap here: the driver verified the data and created the experiment
    tags = {
        "mlflow.parentRunId": sweep["parent_run_id"],
        "st_scale.sweep": sweep["name"],
        "st_scale.trial_id": trial_id,
    }
    tags |= {f"st_scale.sweep.{label}": str(value) for label, value in trial_labels(trial_config).items()}
    trainer = build_trainer(
        inputs.config,
        replace(inputs, tags=tags),
        callbacks=[ObjectiveReportCallback(SweepObjective.model_validate(sweep["objective"]))],
    )
    trainer.fit()
