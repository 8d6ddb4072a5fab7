"""Rules that tie a config's fields together, and the names and keys a user writes: each case is a
command as a user types it, run in-process (`--print-config`, `sweep --check`: nothing starts), and
must end in exit 2 with a message that names the field and says what to do, or in exit 0 where the
input is right."""

from __future__ import annotations

import pytest
from digits_data import DIGITS_SIZE

from st_scale.cli import main

# The session's digits files (conftest's digits_dir), as --set arguments: the data are checked first.
DIGITS = ["--set", "data.train={train}", "--set", "data.val={val}", "--set", "data.image_size={size}"]

RECIPE_WITH_A_KEY_TWICE = """\
base: demo_st
run:
  name: first
  name: second
"""
SPEC = """\
name: {name}
recipe: demo_st
set: {{optimizer.lr: 0.1}}
space: {space}
objective: {{metric: val/main_top1}}
"""


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    "overrides, phrase",
    [
        (["run.name=../escape"], "run.name='../escape': a name takes letters, digits"),
        (["run.name="], "run.name='': a name takes"),
        (["run.name=démo run ✓"], "run.name='démo run ✓': a name takes"),
        (["tracking.experiment='   '"], "tracking.experiment='   ': a name takes"),
        (["tracking.run_name=a/b"], "tracking.run_name='a/b'"),
        (["optimizer.epochs=1", "optimizer.warmup_epochs=50"], "optimizer.warmup_epochs=50 is longer than"),
        (["optimizer.lr=0.1", "optimizer.lr_min=0.5"], "optimizer.lr_min=0.5 is above optimizer.lr=0.1"),
        (["optimizer.lr=.inf"], "optimizer.lr"),
        (["method.kl_weight=.nan"], "method.kl_weight"),
        (["data.train=/data/a.beton", "data.val=/data/../data/a.beton"], "data.val='/data/../data/a.beton' is the"),
    ],
    ids=["name-escapes", "name-empty", "name-unicode", "experiment-blank", "mlflow-run-name-with-a-slash",
         "warmup-past-the-end", "lr-min-above-lr", "lr-infinite", "kl-weight-nan", "val-is-the-train-file"],
)  # fmt: skip
def test_a_bad_field_is_named_with_what_to_do(capsys, overrides, phrase):
    code, text = _run(capsys, "train", "demo_st", *[a for o in overrides for a in ("--set", o)], "--print-config")
    assert code == 2 and phrase in text, text
    assert "Traceback" not in text


def _checkable(digits_dir, tmp_path) -> list[str]:
    """--set arguments that give a recipe the session's digits files, a tracking store and run storage:
    --print-config makes every check a run makes before Ray starts."""
    where = DIGITS + ["--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    where += ["--set", f"run.storage_path={tmp_path}/runs"]
    return [a.format(train=digits_dir / "train.beton", val=digits_dir / "val.beton", size=DIGITS_SIZE) for a in where]


def test_a_number_as_a_name_is_its_text(capsys, digits_dir, tmp_path):
    checkable = _checkable(digits_dir, tmp_path)
    code, text = _run(capsys, "train", "demo_st", *checkable, "--set", "run.name=2024", "--print-config")
    assert code == 0 and "name: '2024'" in text, text


@pytest.mark.parametrize(
    "overrides, phrase",
    [
        (["data.val={tmp}/missing.beton"], "data.val: dataset file"),
        (["sampling.space=restricted", "sampling.max_dropped=[9, 9, 9]"], "sampling.max_dropped[0]=9"),
        (["deepspeed.config={tmp}/missing.json"], "deepspeed.config"),
        (["data.calibration_images=100000"], "data.calibration_images=100000 but data.train holds 1438 images"),
    ],
    ids=["missing-data-file", "max-dropped-beyond-the-stages", "missing-deepspeed-json", "calibration-beyond-the-file"],
)
def test_print_config_makes_every_check_a_run_makes_before_ray(capsys, digits_dir, tmp_path, overrides, phrase):
    sets = [a for o in overrides for a in ("--set", o.format(tmp=tmp_path))]
    code, text = _run(capsys, "train", "demo_st", *_checkable(digits_dir, tmp_path), *sets, "--print-config")
    assert code == 2 and phrase in text, text


def test_a_key_given_twice_in_a_recipe_is_refused_with_both_lines(tmp_path, capsys):
    recipe = _write(tmp_path / "twice.yaml", RECIPE_WITH_A_KEY_TWICE)
    code, text = _run(capsys, "train", recipe, "--print-config")
    assert code == 2 and "twice.yaml, line 4 column 3" in text and "'name' appears twice (first at line 3)" in text


@pytest.mark.parametrize("base", ["[demo_st]", "5", "''"])
def test_a_base_that_is_not_one_recipe_name_is_refused(tmp_path, capsys, base):
    recipe = _write(tmp_path / "child.yaml", f"base: {base}\n")
    code, text = _run(capsys, "train", recipe, "--print-config")
    assert code == 2 and "must name one recipe: a packaged recipe's name or a .yaml path" in text, text


def test_a_relative_base_is_found_beside_its_recipe(tmp_path, capsys, monkeypatch, digits_dir):
    _write(tmp_path / "recipes" / "parent.yaml", "base: demo_st\nrun: {name: from-the-parent}\n")
    child = _write(tmp_path / "recipes" / "child.yaml", "base: parent.yaml\noptimizer: {lr: 0.05}\n")
    monkeypatch.chdir(tmp_path)  # not the recipes' folder
    code, text = _run(capsys, "train", child, *_checkable(digits_dir, tmp_path), "--print-config")
    assert code == 0 and "name: from-the-parent" in text and "lr: 0.05" in text


@pytest.mark.parametrize(
    "name, space, phrase",
    [
        ("ok", "{optimizer.lr: {choice: [0.1, 0.2]}}", "optimizer.lr is in both `set:` and `space:`"),
        ("a/b", "{method.kl_weight: {choice: [1, 2]}}", "name='a/b': a name takes"),
        ("ok", "{method.kl_weight: {choice: [1, 2]}, method.kl_weight: {choice: [3]}}", "appears twice"),
    ],
    ids=["field-fixed-and-searched", "name-with-a-slash", "space-key-twice"],
)
def test_a_sweep_spec_that_contradicts_itself_is_refused(tmp_path, capsys, name, space, phrase):
    spec = _write(tmp_path / "spec.yaml", SPEC.format(name=name, space=space))
    code, text = _run(capsys, "sweep", spec, "--check")
    assert code == 2 and phrase in text, text


def test_an_exception_no_check_caught_ends_in_one_line_and_a_traceback_file(tmp_path, capsys, monkeypatch):
    """The one error boundary: whatever escapes st-scale's checks is one line on the console, naming
    the file that holds the traceback, and exit code 1 (bad input stays 2)."""
    from st_scale import cli

    def broken(args):
        raise KeyError("a key nobody checked")

    monkeypatch.setitem(cli.COMMANDS, "recipes", broken)
    monkeypatch.setenv("ST_SCALE_ERROR_DIR", str(tmp_path / "errors"))
    code, text = _run(capsys, "recipes")
    written = list((tmp_path / "errors").iterdir())
    assert code == 1 and len(written) == 1 and written[0].name.startswith("recipes-")
    assert text.strip() == (
        f"st-scale recipes: internal error: KeyError: 'a key nobody checked'; full traceback in {written[0]}"
    )
    assert "Traceback" not in text and 'raise KeyError("a key nobody checked")' in written[0].read_text()


@pytest.mark.parametrize(
    "options, phrase",
    [
        (["--subnet", "1,1,1", "--format", ","], "--format ',' names no format; choose from state_dict"),
        (["--subnet", "1,1,1", "--out", "{file}"], "--out: {file} is a file; give a folder path"),
        (["--subnet", "1,1,1", "--register", "my/model:v1"], "--register='my/model:v1': a name takes"),
        (["--budget-macs", "1e400"], "--budget-macs '1e400': give a positive, finite count"),
    ],
    ids=["no-format", "out-is-a-file", "registered-name", "budget-overflows"],
)
def test_an_export_that_cannot_be_written_is_refused_before_the_checkpoint_is_read(tmp_path, capsys, options, phrase):
    file = tmp_path / "a-file"
    file.write_text("x")
    argv = [o.format(file=file) for o in options]
    code, text = _run(capsys, "export", str(tmp_path / "no-checkpoint-here"), *argv)
    assert code == 2 and phrase.format(file=file) in text, text


def test_a_budget_takes_its_suffix_in_either_case():
    from st_scale.evaluate.export import parse_count

    assert parse_count("20m", "--budget-macs") == parse_count("20M", "--budget-macs") == 20_000_000
    assert parse_count("1.5g", "--budget-macs") == 1_500_000_000 and parse_count("3e8", "--budget-macs") == 300_000_000


def test_the_demo_checks_every_recipe_and_its_folder_before_training(tmp_path, capsys):
    code, text = _run(capsys, "demo", "--recipes", "demo_ct,demo_stt", "--data-dir", str(tmp_path / "digits"))
    assert code == 2 and "unknown recipe 'demo_stt'" in text and "===" not in text  # nothing trained first
    file = tmp_path / "a-file"
    file.write_text("x")
    code, text = _run(capsys, "demo", "--data-dir", str(file))
    assert code == 2 and f"--data-dir: {file} is a file; give a folder path" in text


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["mlflow-server", "--port", "{port}", "--backend-store", "{text}"], "is not a SQLite database"),
        (["mlflow-server", "--port", "{port}", "--backend-store", "{tmp}/db", "--artifacts", "{text}"], "--artifacts"),
        (["mlflow-server", "--port", "{port}", "--backend-store", "{tmp}"], "is a folder; name a database file in it"),
        (["train", "demo_st", *DIGITS, "--set", "tracking.tracking_uri=sqlite:///{tmp}"], "is a folder; name a"),
    ],
    ids=["backend-store-a-text-file", "artifacts-a-file", "backend-store-a-folder", "tracking-uri-a-folder"],
)
def test_a_tracking_store_that_is_no_database_is_refused_before_mlflow_starts(
    tmp_path, capsys, digits_dir, argv, phrase
):
    from processes import free_port

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a database\n")
    values = {"port": str(free_port()), "text": str(text_file), "tmp": str(tmp_path)}
    values |= {"train": f"{digits_dir}/train.beton", "val": f"{digits_dir}/val.beton", "size": str(DIGITS_SIZE)}
    code, text = _run(capsys, *[a.format(**values) for a in argv])
    assert code == 2 and phrase in text, text


def test_a_run_name_that_holds_another_network_is_refused_without_advice_to_resume(capsys, digits_dir, tmp_path):
    """tests/data/checkpoint_v1 holds a ResNet-20 of stage depths [2, 2, 2]; demo_st builds the full one."""
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).parent / "data" / "checkpoint_v1" / "runs", tmp_path / "runs")
    name = ["--set", "run.name=compat-v1"]
    code, text = _run(capsys, "train", "demo_st", *_checkable(digits_dir, tmp_path), *name, "--print-config")
    assert code == 2 and "run.name='compat-v1' already holds checkpoints of another network" in text, text
    assert "model.stage_depths=[2, 2, 2] in" in text and "builds (model.stage_depths=None)" in text
    assert "resume" not in text and "give this run its own run.name" in text
    same = ["--set", "model.stage_depths=[2, 2, 2]"]
    code, text = _run(capsys, "train", "demo_st", *_checkable(digits_dir, tmp_path), *name, *same, "--print-config")
    assert code == 0, text


def test_a_sweep_whose_entries_break_a_rule_only_together_is_refused(tmp_path, capsys):
    """Each entry alone makes a valid trial; adamw drawn with a momentum does not."""
    space = "{optimizer.name: {choice: [sgd, adamw]}, optimizer.momentum: {uniform: [0.8, 0.95]}}"
    spec = _write(tmp_path / "pair.yaml", SPEC.format(name="pair", space=space))
    code, text = _run(capsys, "sweep", spec, "--check")
    assert code == 2, text
    assert "space.optimizer.name (value 'adamw') with space.optimizer.momentum (value 0.8)" in text
    assert "the search may draw them together" in text and "optimizer.momentum=0.8 is set but" in text


def test_the_weights_average_is_an_objective_only_where_training_reports_it(tmp_path, capsys):
    space = "{method.kl_weight: {choice: [1, 2]}}"
    spec = SPEC.format(name="ema", space=space).replace("val/main_top1", "val/ema/main_top1")
    code, text = _run(capsys, "sweep", _write(tmp_path / "ema.yaml", spec), "--check")
    assert code == 2 and "reported only when optimizer.ema_decay is set" in text, text
    with_average = spec.replace("set: {optimizer.lr: 0.1}", "set: {optimizer.lr: 0.1, optimizer.ema_decay: 0.99}")
    code, text = _run(capsys, "sweep", _write(tmp_path / "ema2.yaml", with_average), "--check")
    assert code == 0, text


@pytest.mark.parametrize(
    "given, expected",
    [
        ("runs/mlflow.db", "sqlite:///{cwd}/runs/mlflow.db"),
        ("sqlite:///mlflow.db", "sqlite:///{cwd}/mlflow.db"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("file:///abs/mlruns", "file:///abs/mlruns"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("postgresql://u:p@db:5432/mlflow", "postgresql://u:p@db:5432/mlflow"),
    ],
)
def test_a_tracking_store_is_read_one_way_wherever_it_is_given(tmp_path, monkeypatch, given, expected):
    """A bare path is a SQLite file both as tracking.tracking_uri and as mlflow-server --backend-store."""
    from st_scale.tracking import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(given) == expected.format(cwd=tmp_path)


@pytest.mark.parametrize(
    "given, phrase",
    [
        ("ftp://host/x", "st-scale does not track to ftp://"),
        ("file:relative/mlruns", "a URI is scheme:// then its place"),
        ("file://relative/mlruns", "file:// and an absolute path"),
        ("http://", "names no host"),
        ("   ", "is not a tracking store"),
    ],
)
def test_a_tracking_store_of_no_documented_form_is_refused_naming_the_forms(given, phrase):
    from st_scale.errors import ConfigError
    from st_scale.tracking import resolve_tracking_uri

    with pytest.raises(ConfigError, match=phrase):
        resolve_tracking_uri(given, "--backend-store")


def test_a_negative_budget_reaches_its_own_check(capsys):
    code, text = _run(capsys, "export", "/nonexistent/checkpoint", "--budget-macs", "-20M")
    assert code == 2 and "--budget-macs '-20M': give a positive, finite count" in text, text


@pytest.mark.parametrize(
    "host, phrase", [("10.9.9.9", "--host 10.9.9.9: cannot serve there"), ("no.such.host.invalid", "not an address")]
)
def test_an_mlflow_server_host_that_cannot_serve_is_named(capsys, tmp_path, host, phrase):
    code, text = _run(capsys, "mlflow-server", "--host", host, "--port", "5999", "--backend-store", f"{tmp_path}/m.db")
    assert code == 2 and phrase in text, text
