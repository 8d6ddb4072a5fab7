"""MLflow experiments as st-scale creates them."""

from pathlib import Path

import mlflow

from st_scale.tracking import check_tracking_uri


def test_experiments_open_in_the_model_training_view(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = check_tracking_uri(uri, "training")
    assert mlflow.MlflowClient(uri).get_experiment(experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    client = mlflow.MlflowClient(uri)  # an experiment made elsewhere, without a kind, gets one
    other = client.create_experiment("made-elsewhere")
    assert check_tracking_uri(uri, "made-elsewhere") == other
    assert client.get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_new_run_records_each_split_as_a_dataset_input(tmp_path):
    from st_scale.tracking import RunTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = check_tracking_uri(uri, "inputs")
    datasets = {
        split: {"path": str(tmp_path / "fashion" / f"{split}.beton"), "sha256": digest * 64, "num_samples": n}
        for split, digest, n in (("train", "a", 600), ("val", "b", 200))
    }
    tracker = RunTracker(
        uri, experiment_id, run_id=None, run_name="x", params={}, tags={}, system_metrics=False, datasets=datasets
    )
    tracker.finish()
    run = mlflow.MlflowClient(uri).get_run(tracker.run_id)
    got = {
        {t.key: t.value for t in i.tags}["mlflow.data.context"]: (i.dataset.name, i.dataset.digest)
        for i in run.inputs.dataset_inputs
    }
    assert got == {"training": ("fashion/train.beton", "a" * 32), "validation": ("fashion/val.beton", "b" * 32)}


def test_a_database_password_is_never_published(tmp_path):
    """Params and text artifacts go to everyone who opens the UI: a database URI in them (a recipe's
    tracking.tracking_uri) keeps its user and host, its password becomes ***."""
    from st_scale.tracking import RunTracker, redacted

    secret = "postgresql+psycopg://mlflow:pa55:w0rd@db.example:5432/mlflow"
    assert redacted(secret) == "postgresql+psycopg://mlflow:***@db.example:5432/mlflow"
    assert redacted(f"uri: {secret}\nother: mysql://u:p@h/d") == (
        "uri: postgresql+psycopg://mlflow:***@db.example:5432/mlflow\nother: mysql://u:***@h/d"
    )
    assert redacted("http://user:pw@proxy:5000") == "http://user:***@proxy:5000"
    for untouched in ("sqlite:////data/mlflow.db", "http://proxy:5000/x@y", "postgresql://mlflow@db/mlflow"):
        assert redacted(untouched) == untouched

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = check_tracking_uri(uri, "secrets")
    params = {"tracking.tracking_uri": secret, "optimizer.lr": 0.1}
    tracker = RunTracker(
        uri, experiment_id, run_id=None, run_name="x", params=params, tags={}, system_metrics=False, datasets={}
    )
    tracker.log_text(f"tracking:\n  tracking_uri: {secret}\n", "config/resolved.yaml")
    tracker.finish()
    client = mlflow.MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == {
        "tracking.tracking_uri": "postgresql+psycopg://mlflow:***@db.example:5432/mlflow",
        "optimizer.lr": "0.1",
    }
    text = (Path(client.download_artifacts(tracker.run_id, "config/resolved.yaml", str(tmp_path)))).read_text()
    assert "pa55" not in text and "mlflow:***@db.example" in text
