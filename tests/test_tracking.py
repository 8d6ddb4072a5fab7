"""MLflow experiments as st-scale creates them."""

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
