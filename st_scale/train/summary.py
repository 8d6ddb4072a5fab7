"""Printing run summaries for people."""

from __future__ import annotations

from collections.abc import Sequence

from ..models import has_batch_norm
from ..tracking import DEFAULT_UI, redacted, resolve_tracking_uri, sqlite_path, training_view_url
from .driver import RunSummary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary_table(summaries: Sequence[RunSummary]) -> str:
    lines = [
        "| method | model | main top-1 | all sub-nets top-1 (mean ± std) | min | sub-nets | epochs | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        spread = "-" if s.subnets_mean_top1 is None else f"{s.subnets_mean_top1:.2f} ± {s.subnets_std_top1:.2f}"
        lines.append(
            f"| {s.method} | {s.model} | {_pct(s.main_top1)} | {spread} | {_pct(s.subnets_min_top1)} | "
            f"{s.num_subnets or '-'} | {s.epochs} | {s.wall_s:.0f} |"
        )
    return "\n".join(lines)


def statistics_note(cfg) -> str:
    """What the accuracies were measured on, BatchNorm-wise."""

    if not has_batch_norm(cfg.model.name):
        return f"{cfg.model.name} has LayerNorm: no statistics to re-estimate"
    if not cfg.eval.recalibrate:
        return "every network on the shared running BatchNorm statistics"
    return "each network on its own re-estimated BatchNorm statistics"


def print_summaries(summaries: Sequence[RunSummary], cfg) -> None:

    print()
    print(summary_table(summaries))
    print(f"\nAccuracies in %, {statistics_note(cfg)}.")
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    print(
        f"MLflow: experiment {cfg.tracking.experiment!r} in {redacted(uri)}; runs "
        + ", ".join(s.mlflow_run_id or "?" for s in summaries)
    )
    experiment_id = next((s.mlflow_experiment_id for s in summaries if s.mlflow_experiment_id), None)
    if sqlite_path(uri) is not None:
        print(
            f"Open the UI:  st-scale mlflow-server --backend-store {sqlite_path(uri)}\n"
            f"         then {training_view_url(DEFAULT_UI, experiment_id)}"
        )
    elif uri.startswith(("http://", "https://")):
        print(f"Open the UI:  {training_view_url(uri, experiment_id)}")
