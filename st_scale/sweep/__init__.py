"""Ray Tune sweeps over ST's sampling distribution and KL weight, one MLflow parent run per sweep."""
