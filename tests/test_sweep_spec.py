"""Sweep specs: every mistake is reported with its spec field before Ray or any trial starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from digits_data import digits_overrides

from st_scale.cli import main
from st_scale.errors import ConfigError
from st_scale.sweep.spec import check_spec, load_spec, trial_assignments, trial_labels

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune" / "digits_tiny.yaml"


def spec_file(tmp_path, **changes) -> str:
    tree = yaml.safe_load(TINY.read_text())
    for key, value in changes.items():
        if value is None:
            tree.pop(key, None)
        else:
            tree[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.mark.parametrize("spec", sorted((ROOT / "tune").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_check(spec):
    checked = check_spec(load_spec(str(spec)))
    assert checked.dimensions and checked.spec.objective.metrics


def test_sampling_kl_spec_covers_what_users_sweep():
    checked = check_spec(load_spec(str(ROOT / "tune" / "sampling_kl.yaml")))
    space = checked.spec.space
    assert space["method.kl_weight"] == {"loguniform": [0.1, 10.0]}
    assert {"method.num_subnets", "sampling.per_rank"} <= set(space)
    families = next(d for d in checked.dimensions if d.is_family).options
    assert set(families) == {"uniform", "restricted", "biased_to_large"}
    assert checked.spec.scheduler.name == "asha"


def test_family_options_expand_to_config_fields():
    from ray.tune.search.variant_generator import generate_variants

    checked = check_spec(load_spec(str(TINY)))
    seen = set()
    for _ in range(20):
        for _, variant in generate_variants(checked.param_space()):
            cfg = checked.trial_config(variant)
            family = trial_labels(variant)["sampler"]
            seen.add(family)
            assert cfg.method.kl_weight == variant["method.kl_weight"] and 0.3 <= cfg.method.kl_weight <= 3.0
            if family == "uniform":
                assert cfg.sampling.decay == 1.0
            else:
                assert 0.5 <= cfg.sampling.decay <= 0.9
            assert "family" not in trial_assignments(variant)
    assert seen == {"uniform", "biased_to_large"}


@pytest.mark.parametrize(
    "space_entry, field, message",
    [
        ({"method.kl_wieght": {"loguniform": [0.1, 10]}}, "space.method.kl_wieght", "did you mean method.kl_weight"),
        ({"method.kl_weight": {"loguniform": [10, 0.1]}}, "space.method.kl_weight", "empty or inverted"),
        ({"method.kl_weight": {"uniform": [1.0, 1.0]}}, "space.method.kl_weight", "empty or inverted"),
        ({"method.kl_weight": {"loguniform": [0.0, 1.0]}}, "space.method.kl_weight", "low > 0"),
        ({"method.num_subnets": {"choice": []}}, "space.method.num_subnets", "non-empty list"),
        ({"method.num_subnets": {"randint": [3, 1]}}, "space.method.num_subnets", "empty or inverted"),
        ({"sampling.decay": {"uniform": [0.5, 1.5]}}, "space.sampling.decay", "less than or equal to 1"),
        ({"method.kl_weight": 1.0}, "space.method.kl_weight", "fixed values go under `set:`"),
        ({"sampler": {"family": {"odd": {"sampling.spce": "full"}}}}, "space.sampler (option 'odd')", "sampling.space"),
    ],
)
def test_bad_search_space_names_the_field(tmp_path, space_entry, field, message):
    with pytest.raises(ConfigError) as error:
        check_spec(load_spec(spec_file(tmp_path, space=space_entry)))
    assert field in str(error.value) and message in str(error.value), str(error.value)


@pytest.mark.parametrize(
    "objective, field, message",
    [
        ({"metric": "val/subnet_mean"}, "objective.metric", "never reports 'val/subnet_mean'"),
        ({"weights": {"val/main_top1": 0.5, "val/top1": 0.5}}, "objective.weights.val/top1", "never reports"),
        ({"metric": "val/main_top1", "weights": {"val/main_top1": 1}}, "objective", "exactly one of"),
        ({"metric": "val/main_top1", "mode": "maximise"}, "objective.mode", "'max' or 'min'"),
    ],
)
def test_bad_objective_names_the_field(tmp_path, objective, field, message):
    with pytest.raises(ConfigError) as error:
        check_spec(load_spec(spec_file(tmp_path, objective=objective)))
    assert field in str(error.value) and message in str(error.value), str(error.value)


@pytest.mark.parametrize(
    "search, space_entry, field, message",
    [
        ("optuna", None, "space.sampler", "a family under search.algorithm=optuna; Optuna searches flat spaces"),
        ("hyperopt", {"optimizer.lr": {"grid": [0.1, 0.05]}}, "space.optimizer.lr", "a grid under search.algorithm"),
        (
            "optuna",
            {"sampler": {"family": {"a": {"sampling.decay": 1.0}}, "search": "grid"}},
            "space.sampler",
            "a family under search.algorithm=optuna",
        ),
        (
            "hyperopt",
            {"sampler": {"family": {"a": {"sampling.decay": 1.0}}, "search": "grid"}},
            "space.sampler",
            "a grid under search.algorithm=hyperopt",
        ),
    ],
)
def test_a_model_based_search_refuses_what_it_cannot_search(tmp_path, search, space_entry, field, message):
    space = yaml.safe_load(TINY.read_text())["space"] | (space_entry or {})
    spec = load_spec(spec_file(tmp_path, space=space, search={"algorithm": search}))
    with pytest.raises(ConfigError) as error:
        check_spec(spec)
    assert str(error.value).startswith(field) and message in str(error.value), str(error.value)


def test_search_algorithms_take_the_spaces_they_search(tmp_path):
    """HyperOpt takes digits_tiny's nested family as it is; Optuna a flat space; both seeded and
    limited to the concurrency the cluster allows, as Tune runs them."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.hyperopt import HyperOptSearch
    from ray.tune.search.optuna import OptunaSearch

    from st_scale.sweep.driver import search_algorithm

    hyperopt = check_spec(load_spec(spec_file(tmp_path, search={"algorithm": "hyperopt", "initial_points": 2})))
    flat = {"method.kl_weight": {"loguniform": [0.3, 3.0]}, "sampling.decay": {"uniform": [0.5, 1.0]}}
    optuna = check_spec(load_spec(spec_file(tmp_path, space=flat, search={"algorithm": "optuna"})))
    for checked, kind in ((hyperopt, HyperOptSearch), (optuna, OptunaSearch)):
        limited = search_algorithm(checked.spec, concurrency=3)
        assert isinstance(limited, ConcurrencyLimiter) and limited.max_concurrent == 3
        assert isinstance(limited.searcher, kind)
        searcher = limited.searcher
        assert searcher.set_search_properties("sweep/objective", "max", checked.param_space())
        for i in range(4):  # suggestions become trial configs the recipe accepts
            suggested = searcher.suggest(f"t{i}")
            cfg = checked.trial_config(suggested)
            assert 0.3 <= cfg.method.kl_weight <= 3.0 and 0.5 <= cfg.sampling.decay <= 1.0
            searcher.on_trial_complete(f"t{i}", {"sweep/objective": float(i)})


def test_objective_needs_a_metric_the_scheduler_sees_every_epoch(tmp_path):
    tree_set = yaml.safe_load(TINY.read_text())["set"] | {"eval.subnets_every": 2}
    with pytest.raises(ConfigError, match=r"objective.weights.val/subnets_mean_top1: .*eval.subnets_every=2"):
        check_spec(load_spec(spec_file(tmp_path, set=tree_set)))


def test_weighted_objective_value():
    spec = load_spec(str(TINY))
    assert spec.objective.value({"val/main_top1": 90.0, "val/subnets_mean_top1": 70.0}) == pytest.approx(80.0)
    assert spec.objective.value({"val/main_top1": 90.0}) is None


def test_spec_level_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"num_samples: Input should be greater than or equal to 1"):
        load_spec(spec_file(tmp_path, num_samples=0))
    with pytest.raises(ConfigError, match=r"schedular: unknown key"):
        load_spec(spec_file(tmp_path, schedular={"name": "asha"}))
    with pytest.raises(ConfigError, match=r"set.optimizer.epoch: unknown parameter"):
        check_spec(load_spec(spec_file(tmp_path), ["set.optimizer.epoch=3"]))
    with pytest.raises(ConfigError, match=r"scheduler.grace_period=5 is longer than the trials"):
        check_spec(load_spec(spec_file(tmp_path), ["scheduler.grace_period=5"]))
    with pytest.raises(ConfigError, match=r"sweep spec 'no_such_spec': no such file"):
        load_spec("no_such_spec")
    with pytest.raises(ConfigError, match=r"storage_path='s3://bucket/sweeps': a sweep keeps .* in a folder"):
        load_spec(spec_file(tmp_path, storage_path="s3://bucket/sweeps"))


def test_cli_overrides_reach_set_and_space(tmp_path):
    spec = load_spec(
        spec_file(tmp_path),
        ["num_samples=5", "set.optimizer.epochs=3", "space.method.kl_weight={loguniform: [0.5, 2.0]}"],
    )
    assert spec.num_samples == 5 and spec.set["optimizer.epochs"] == 3
    assert spec.space["method.kl_weight"] == {"loguniform": [0.5, 2.0]}


def test_cli_check_and_errors(tmp_path, capsys):
    assert main(["sweep", spec_file(tmp_path), "--check"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["sweep", spec_file(tmp_path, space={"method.kl_weight": {"loguniform": [3, 1]}}), "--check"]) == 2
    assert "space.method.kl_weight" in capsys.readouterr().err


def test_unreachable_tracking_server_fails_before_ray(tmp_path, digits_dir, capsys):
    """The tracking store is checked before Ray is touched, and without MLflow's minutes of retries."""
    import ray

    path = spec_file(tmp_path, storage_path=str(tmp_path / "sweeps"))
    code = main(
        [
            "sweep",
            path,
            *(part for override in digits_overrides(digits_dir) for part in ("--set", f"set.{override}")),
            "--set",
            "set.tracking.tracking_uri=http://127.0.0.1:9",
        ]
    )
    assert code == 2
    assert "tracking.tracking_uri='http://127.0.0.1:9': no MLflow server answers there" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "sweeps").exists()


def test_missing_data_fails_before_ray(tmp_path, capsys):
    import ray

    code = main(["sweep", spec_file(tmp_path), "--set", f"set.data.train={tmp_path}/none.beton"])
    assert code == 2 and "data.train" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_unreachable_ray_address_fails_fast(tmp_path, digits_dir, capsys):
    import mlflow

    store = f"sqlite:///{tmp_path}/mlflow.db"
    path = spec_file(tmp_path, storage_path=str(tmp_path / "sweeps"))
    code = main(
        [
            "sweep",
            path,
            "--address",
            "127.0.0.1:1",
            *(part for override in digits_overrides(digits_dir) for part in ("--set", f"set.{override}")),
            "--set",
            f"set.tracking.tracking_uri={store}",
        ]
    )
    assert code == 2
    assert "--address/RAY_ADDRESS='127.0.0.1:1': no Ray cluster answers there" in capsys.readouterr().err
    experiment = mlflow.MlflowClient(store).get_experiment_by_name("st-scale-demo")
    assert mlflow.MlflowClient(store).search_runs([experiment.experiment_id]) == []
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize(
    "resources, max_concurrent, expected",
    [
        ({"CPU": 2.0}, None, 1),  # trial 1 CPU + 2 workers x 0.5
        ({"CPU": 4.5}, None, 2),
        ({"CPU": 2.0}, 3, 3),  # the spec's limit: an autoscaler adds the nodes for the others
    ],
)
def test_concurrent_trials_fit_the_cluster(tmp_path, resources, max_concurrent, expected):
    from st_scale.sweep.driver import concurrent_trials

    changes = {"max_concurrent_trials": max_concurrent} if max_concurrent else {}
    checked = check_spec(load_spec(spec_file(tmp_path, **changes)))
    assert concurrent_trials(checked, resources) == expected


def test_a_sweep_refuses_an_elastic_worker_group(tmp_path):
    from st_scale.sweep.driver import concurrent_trials

    checked = check_spec(load_spec(spec_file(tmp_path), ["set.scaling.num_workers=[1, 2]"]))
    with pytest.raises(ConfigError, match=r"scaling.num_workers=\[1, 2\]: a sweep's trials train on a fixed number"):
        concurrent_trials(checked, {"CPU": 64.0})


def test_a_trial_that_needs_gpus_the_cluster_lacks(tmp_path):
    from st_scale.sweep.driver import concurrent_trials

    checked = check_spec(load_spec(spec_file(tmp_path), ["set.scaling.gpus_per_worker=1"]))
    with pytest.raises(
        ConfigError,
        match=r"scaling.num_workers=2 x scaling.gpus_per_worker=1 = 2 GPUs but the Ray "
        r"cluster has 0",
    ):
        concurrent_trials(checked, {"CPU": 64.0})


def test_the_st_cost_search_trades_the_subnetwork_mean_against_time():
    """tune/st_cost.yaml: a slower setting must win by more than its extra seconds are worth."""
    checked = check_spec(load_spec(str(ROOT / "tune" / "st_cost.yaml")))
    objective = checked.spec.objective
    assert checked.spec.search.algorithm == "hyperopt"
    assert set(checked.spec.space) == {"method.subnet_every", "method.subnet_batch_fraction"}
    full = objective.value({"val/subnets_mean_top1": 86.0, "train/epoch_time_s": 70.0})
    cheap = objective.value({"val/subnets_mean_top1": 85.5, "train/epoch_time_s": 50.0})
    assert full == pytest.approx(79.0) and cheap == pytest.approx(80.5) and cheap > full
    assert objective.value({"val/subnets_mean_top1": 86.0}) is None  # no time measured: no objective
