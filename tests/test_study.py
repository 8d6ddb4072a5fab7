"""`st-scale report`: a study's table and figures from its MLflow child runs, checked against the
numbers computed here by hand."""

import json
import statistics

import mlflow
import pytest

from st_scale.cli import main
from st_scale.sweep.study import load_runs, loafing_points, report, rows_from_json, table_markdown

SUBNETS = [(1, 1, 1), (2, 2, 2), (3, 3, 3)]


def _child(client, experiment_id, parent_id, group, seed, main_top1, subnet_top1, *, stage_depths=None, times=(10.0,)):
    run = client.create_run(
        experiment_id,
        tags={"mlflow.parentRunId": parent_id, "st_scale.sweep.run": group, "st_scale.sweep.run.seed": str(seed)},
    )
    run_id = run.info.run_id
    client.log_param(run_id, "run.seed", seed)
    client.log_param(run_id, "eval.destruction_images", 2000)
    client.log_param(run_id, "optimizer.epochs", len(times))
    client.log_param(run_id, "model.stage_depths", json.dumps(stage_depths) if stage_depths else "None")
    for epoch, seconds in enumerate(times, start=1):
        client.log_metric(run_id, "train/epoch_time_s", seconds, step=epoch)
    metrics = {"val/main_top1": main_top1, "train/peak_memory_mib": 100.0 + seed}
    if subnet_top1:
        metrics |= {
            "val/subnets_mean_top1": statistics.fmean(subnet_top1),
            "val/subnets_std_top1": statistics.pstdev(subnet_top1),
            "val/subnets_min_top1": min(subnet_top1),
            "val/main_top1_shared_stats": main_top1 - 5,
        }
        rows = ["depths,blocks,macs,top1,top5"] + [
            f"{'-'.join(map(str, d))},{sum(d)},{1000 * sum(d)},{t},99" for d, t in zip(SUBNETS, subnet_top1)
        ]
        client.log_text(run_id, "\n".join(rows) + "\n", "subnets/subnets_epoch002.csv")
        client.log_text(run_id, "depths\n", "subnets/subnets_epoch001.csv")  # an earlier epoch: not the final table
        client.log_text(
            run_id,
            "test,damage,detail,statistics,top1\nintact,0,,shared,50\nintact,0,,recalibrated,60\n"
            "delete_k,1,stage0.block1,shared,40\ndelete_k,1,stage0.block1,recalibrated,55\n",
            "destruction/destruction.csv",
        )
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=2)
    client.set_terminated(run_id, "FINISHED")


@pytest.fixture
def study(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("study")
    parent = client.create_run(
        experiment_id, run_name="toy-study", tags={"st_scale.commit": "abc1234", "st_scale.dirty": "false"}
    ).info.run_id
    _child(client, experiment_id, parent, "ct", 0, 90.0, [40.0, 60.0, 90.0], times=(10.0, 12.0))
    _child(client, experiment_id, parent, "ct", 1, 92.0, [50.0, 70.0, 92.0], times=(10.0, 10.0))
    _child(client, experiment_id, parent, "st", 0, 91.0, [85.0, 88.0, 91.0], times=(15.0, 15.0))
    _child(client, experiment_id, parent, "st", 1, 90.0, [84.0, 87.0, 90.0], times=(14.0, 16.0))
    _child(client, experiment_id, parent, "alone_1-1-1", 0, 80.0, None, stage_depths=[1, 1, 1])
    _child(client, experiment_id, parent, "alone_1-1-1", 1, 82.0, None, stage_depths=[1, 1, 1])
    sweep_dir = tmp_path / "sweeps" / "toy-study"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "st_scale_sweep.json").write_text(
        json.dumps({"parent_run_id": parent, "tracking_uri": uri, "experiment_id": experiment_id})
    )
    return sweep_dir, uri, experiment_id, parent


def test_the_study_table_averages_each_group_over_its_seeds(study, tmp_path):
    sweep_dir, uri, experiment_id, parent = study
    summary = report(str(sweep_dir), tmp_path / "out")
    table = (tmp_path / "out" / "table.md").read_text()
    ct_line = next(line for line in table.splitlines() if line.startswith("| CT |"))
    st_line = next(line for line in table.splitlines() if line.startswith("| ST |"))
    # CT: time 11 s/epoch (mean of 10, 12, 10, 10); main 91.00 ± sd(90, 92); sub-nets mean of run means
    assert "| 2 | 10.5 | 1.00x | 100 |" in ct_line
    assert f"91.00 ± {statistics.stdev([90.0, 92.0]):.2f}" in ct_line
    ct_means = [statistics.fmean([40, 60, 90]), statistics.fmean([50, 70, 92])]
    ct_stds = [statistics.pstdev([40, 60, 90]), statistics.pstdev([50, 70, 92])]
    assert f"{statistics.fmean(ct_means):.2f} ± {statistics.fmean(ct_stds):.2f} | 45.00 |" in ct_line
    assert "| 15.0 | 1.43x |" in st_line  # 15 s / 10.5 s
    assert "main (shared running BN statistics)" in table and "| CT | 86.00 ± 1.41 |" in table  # 85 and 87
    alone_line = next(line for line in table.splitlines() if line.startswith("| sub-net 1-1-1 trained alone |"))
    assert "| 81.00 ± 1.41 | - | - |" in alone_line  # its main net; its own sub-nets are not the question
    assert [r["group"] for r in summary["rows"]] == ["ct", "st", "alone_1-1-1"]
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "table.md",
        "runs.csv",
        "study.json",
        "loafing.png",
        "destruction.png",
        "subnets.png",
    }
    logged = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent, "study")}
    assert "study/loafing.png" in logged and "study/table.md" in logged
    raw = json.loads((tmp_path / "out" / "study.json").read_text())
    assert raw["provenance"]["commit"] == "abc1234" and raw["provenance"]["dirty"] is False  # the sweep's code
    assert raw["provenance"]["command"] and raw["provenance"]["machine"]
    st0 = next(r for r in raw["runs"] if r["group"] == "st" and r["seed"] == 0)
    assert {s["depths"]: s["top1"] for s in st0["subnets"]} == {"1-1-1": 85.0, "2-2-2": 88.0, "3-3-3": 91.0}
    assert [d["top1"] for d in st0["destruction"]] == [50.0, 60.0, 40.0, 55.0] and st0["destruction_images"] == 2000
    assert st0["epochs"] == 2 and st0["epoch_time_s"] == 15.0


def test_the_untimed_table_leaves_out_the_time_and_its_ratio_alone(study, tmp_path):
    sweep_dir, *_ = study
    rows = rows_from_json(report(str(sweep_dir), tmp_path / "out")["rows"])
    timed, untimed = ([line.split(" | ") for line in table_markdown(rows, t).splitlines()] for t in (True, False))
    assert untimed[0] == [cell for cell in timed[0] if cell not in ("time / epoch (s)", "vs CT")]
    assert len(untimed) == len(timed) == 5  # header, rule, CT, ST, 1-1-1 alone
    for with_time, without in zip(timed[2:], untimed[2:]):
        assert without == with_time[:2] + with_time[4:]


def test_a_reports_study_json_draws_its_tables_and_figures_again(study, tmp_path):
    """From the study.json alone (no MLflow store): the same table.md and the same figures, byte for
    byte; a study.json written before the report kept its runs gives the tables and the loafing figure."""
    sweep_dir, *_ = study
    report(str(sweep_dir), tmp_path / "out")
    assert main(["report", str(tmp_path / "out" / "study.json"), "--out", str(tmp_path / "again")]) == 0
    drawn = {"table.md", "loafing.png", "destruction.png", "subnets.png"}
    assert {p.name for p in (tmp_path / "again").iterdir()} == drawn
    for name in drawn:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name

    raw = json.loads((tmp_path / "out" / "study.json").read_text())
    older = tmp_path / "older"
    older.mkdir()
    (older / "study.json").write_text(json.dumps({k: raw[k] for k in ("sweep", "parent_run_id", "rows", "loafing")}))
    assert main(["report", str(older / "study.json")]) == 0  # beside the file
    assert {p.name for p in older.iterdir()} == {"study.json", "table.md", "loafing.png"}
    assert (older / "table.md").read_text() == (tmp_path / "out" / "table.md").read_text()
    assert (older / "loafing.png").read_bytes() == (tmp_path / "out" / "loafing.png").read_bytes()


def test_redrawing_a_file_that_is_not_a_study_says_what_to_give(tmp_path, capsys):
    (tmp_path / "other.json").write_text(json.dumps({"runs": []}))
    assert main(["report", str(tmp_path / "other.json")]) == 2
    said = capsys.readouterr().err.strip()
    assert said.endswith(
        f"{tmp_path / 'other.json'}: not a study.json `st-scale report` wrote (KeyError: 'rows'); give the "
        "study.json of a report's folder"
    )


def test_the_loafing_points_compare_inside_ct_inside_st_and_alone(study):
    sweep_dir, uri, experiment_id, parent = study
    points = {p["depths"]: p for p in loafing_points(load_runs(uri, experiment_id, parent))}
    assert set(points) == {"1-1-1", "3-3-3"}  # the architectures trained alone, and the full net
    assert points["1-1-1"]["inside_ct"] == [40.0, 50.0] and points["1-1-1"]["inside_st"] == [85.0, 84.0]
    assert points["1-1-1"]["alone"] == [80.0, 82.0]
    assert points["3-3-3"]["alone"] == [90.0, 92.0]  # the full net alone is CT's main net


def test_report_of_a_sweep_that_never_ran_says_what_to_do(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "run `st-scale sweep" in capsys.readouterr().err


def test_a_sweep_without_ct_and_st_groups_draws_no_empty_figures(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("variants")
    parent = client.create_run(experiment_id, run_name="variants").info.run_id
    _child(client, experiment_id, parent, "st_kl3", 0, 84.0, [80.0, 82.0, 84.0])
    sweep_dir = tmp_path / "sweeps" / "variants"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "st_scale_sweep.json").write_text(
        json.dumps({"parent_run_id": parent, "tracking_uri": uri, "experiment_id": experiment_id})
    )
    report(str(sweep_dir), tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"table.md", "runs.csv", "study.json"}


def test_a_sweep_over_seeds_alone_is_one_group_named_after_the_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment_id = client.create_experiment("seeds")
    parent = client.create_run(experiment_id, run_name="quarter-batch").info.run_id
    for seed, top1 in ((0, 86.0), (1, 88.0)):  # no search entry but the seed: an empty label
        _child(client, experiment_id, parent, "", seed, top1, [80.0, 82.0, top1])
    sweep_dir = tmp_path / "sweeps" / "quarter-batch"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "st_scale_sweep.json").write_text(
        json.dumps({"parent_run_id": parent, "tracking_uri": uri, "experiment_id": experiment_id})
    )
    summary = report(str(sweep_dir), tmp_path / "out")
    assert [(r["group"], r["runs"]) for r in summary["rows"]] == [("quarter-batch", 2)]
    assert {r["group"] for r in summary["runs"]} == {"quarter-batch"}
    table = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert table[2].startswith("| quarter-batch | 2 |")
