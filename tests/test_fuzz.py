"""Generated bad input (hypothesis): recipe overrides, sweep specs, damaged .beton sidecars, damaged
checkpoint folders and export arguments, each run through the command line in this process, where
nothing trains (`train --print-config`, `sweep --check`; `eval` and `export` refuse before they work).

Each example must end clear: exit 0 with the input reflected in the result, or exit 2 with a message
that names a field, file or flag it was given; never a traceback, never st-scale's "internal error",
never past the example's deadline. `make test` runs a few examples of each (the same ones every
time); `make fuzz` runs thousands, drawn afresh (README, "Reliability: bad input").

The fields that reach a network (the tracking URI, the run storage and its endpoint) are left out of
the generated overrides: a random host is a DNS lookup or a connection timeout, not a check of
st-scale's; tests/test_bad_input.py covers them by hand.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from digits_data import CHECKPOINT_V1, DIGITS_SIZE
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from st_scale.cli import main
from st_scale.sweep.spec import _known_fields

settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
settings.register_profile(
    "fuzz", max_examples=int(os.environ.get("ST_SCALE_FUZZ_EXAMPLES") or 1000), deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
settings.load_profile(os.environ.get("ST_SCALE_FUZZ_PROFILE", "ci"))

EXAMPLE_BOUND_S = 60  # one in-process check on a loaded 2-core machine
NETWORK_FIELDS = {"tracking.tracking_uri", "run.storage_path", "run.storage_endpoint"}
FIELDS = sorted(set(_known_fields()) - NETWORK_FIELDS)
PATH_FIELDS = {"data.train", "data.val", "deepspeed.config"}  # printed resolved (absolute)


def run_cli(argv: list[str]) -> tuple[int, str]:
    """st-scale's exit code and everything it printed, run in this process."""
    out, start = io.StringIO(), time.monotonic()
    with redirect_stdout(out), redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    elapsed = time.monotonic() - start
    assert elapsed < EXAMPLE_BOUND_S, f"{argv} took {elapsed:.0f} s"
    return code, out.getvalue()


def assert_clear(code: int, text: str, names: list[str]) -> None:
    assert code in (0, 2), f"exit {code}:\n{text}"
    assert "Traceback" not in text and "internal error" not in text, text
    if code == 2:
        assert any(name in text for name in names if name), f"none of {names} named in:\n{text}"


@pytest.fixture(scope="module")
def place(tmp_path_factory, digits_dir):
    """The session's digits files, one tracking store and one run storage for every example; the
    error boundary's traceback files kept here too (the fuzzer asserts none is written)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    saved = os.environ.get("ST_SCALE_ERROR_DIR")
    os.environ["ST_SCALE_ERROR_DIR"] = str(tmp / "errors")
    yield {
        "tmp": tmp,
        "base": [
            "--set", f"data.train={digits_dir / 'train.beton'}", "--set", f"data.val={digits_dir / 'val.beton'}",
            "--set", f"data.image_size={DIGITS_SIZE}", "--set", f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
            "--set", f"run.storage_path={tmp}/runs", "--set", "data.calibration_images=128",
        ],
        "digits": digits_dir,
    }  # fmt: skip
    if saved is None:
        os.environ.pop("ST_SCALE_ERROR_DIR", None)
    else:
        os.environ["ST_SCALE_ERROR_DIR"] = saved
    assert not (tmp / "errors").exists(), "an example ended in the internal-error boundary"


# ------------------------------------------------------------------------------------ values
WORDS = ["", " ", "../x", "a/b", "sgd", "adamw", "ct", "st", "full", "restricted", "cifar", "imagenet", "1e400"]
SCALARS = st.one_of(
    st.integers(-3, 300),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.sampled_from(WORDS),
    st.text(max_size=10),
)
VALUES = st.one_of(SCALARS, st.lists(st.one_of(st.integers(-2, 12), st.floats(0, 1)), max_size=5))


def _yaml(value) -> str:
    """How a user writes the value after `--set key=`."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _misspelt(field: str) -> st.SearchStrategy[str]:
    return st.integers(0, len(field) - 1).map(lambda i: field[:i] + field[i + 1 :])


KEYS = st.one_of(st.sampled_from(FIELDS), st.sampled_from(FIELDS).flatmap(_misspelt))
OVERRIDES = st.lists(st.tuples(KEYS, st.one_of(VALUES.map(_yaml), st.text(max_size=8))), min_size=1, max_size=3)


def _named_parts(key: str) -> list[str]:
    """What a message may name for a dotted key: the key, a section it opens with (an unknown one is
    named alone), or its field."""
    parts = key.split(".")
    return [".".join(parts[: n + 1]) for n in range(len(parts))] + [parts[-1]]


def _printed(text: str) -> dict:
    return yaml.safe_load(text)  # (--print-config prints the config's YAML and nothing else)


def _at(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _same(printed, given) -> bool:
    if isinstance(given, list | tuple):
        return isinstance(printed, list | tuple) and len(printed) == len(given) and all(map(_same, printed, given))
    if isinstance(given, bool) or isinstance(printed, bool):
        return printed is given or printed == given
    if isinstance(given, int | float) and isinstance(printed, int | float):
        return printed == given
    return str(printed) == str(given)  # a name written as a number is kept as its text


@given(overrides=OVERRIDES)
@example(overrides=[("data.val_image_size", "null")])  # found by `make fuzz` (the test's own parsing)
@example(overrides=[("optimizer.name", "adamw"), ("optimizer.momentum", "0.9")])
@example(overrides=[("method.name", "[]")])  # found by `make fuzz`: an unhashable method name
def test_generated_recipe_overrides_end_clear(place, overrides):
    sets = [a for key, value in overrides for a in ("--set", f"{key}={value}")]
    code, text = run_cli(["train", "demo_st", *place["base"], *sets, "--print-config"])
    parts = [part for key, _ in overrides for part in _named_parts(key)]
    assert_clear(code, text, parts + ["--set"])
    if code == 0:  # the printed config holds what was set (the last value of a key given twice)
        printed = _printed(text)
        for key, value in dict(overrides).items():
            if key not in PATH_FIELDS:
                given_value = yaml.safe_load(value)
                assert _same(_at(printed, key), given_value), (key, value, _at(printed, key))


# ------------------------------------------------------------------------------------ sweep specs
DISTRIBUTIONS = st.one_of(
    st.builds(lambda v: {"choice": v}, st.lists(SCALARS, max_size=4)),
    st.builds(lambda v: {"grid": v}, st.lists(SCALARS, max_size=4)),
    st.builds(lambda a, b: {"uniform": [a, b]}, SCALARS, SCALARS),
    st.builds(lambda a, b: {"loguniform": [a, b]}, SCALARS, SCALARS),
    st.builds(lambda a, b: {"randint": [a, b]}, SCALARS, SCALARS),
    VALUES,
)
SPECS = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["fuzz", "a b", "../up", ""]),
        "recipe": st.sampled_from(["demo_st", "demo_ct", "no_such_recipe"]),
        "space": st.dictionaries(KEYS, DISTRIBUTIONS, max_size=3),
        "objective": st.sampled_from(
            [{"metric": "val/main_top1"}, {"metric": "val/subnets_mean_top1", "mode": "min"}, {"metric": "x"}, {}]
        ),
    },
    optional={
        "set": st.dictionaries(KEYS, VALUES, max_size=2),
        "search": st.fixed_dictionaries({"algorithm": st.sampled_from(["random", "hyperopt", "optuna", "grid"])}),
        "num_samples": SCALARS,
    },
)


@given(spec=SPECS)
def test_generated_sweep_specs_end_clear(place, spec):
    path = place["tmp"] / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, text = run_cli(["sweep", str(path), "--check"])
    names = ["space", "set", "objective", "search", "num_samples", "name", "recipe", "spec.yaml"]
    names += [part for key in [*spec["space"], *spec.get("set", {})] for part in _named_parts(key)]
    assert_clear(code, text, names)
    if code == 0:
        assert f"over recipe {spec['recipe']!r}" in text


# ------------------------------------------------------------------------------------ damaged files
def _damaged_json(original: dict) -> st.SearchStrategy[str]:
    """The file's JSON with one key removed, one value replaced, or its text cut short."""
    keys = sorted(original)
    removed = st.sampled_from(keys).map(lambda k: json.dumps({x: v for x, v in original.items() if x != k}))
    replaced = st.tuples(st.sampled_from(keys), VALUES).map(lambda kv: json.dumps(original | {kv[0]: kv[1]}))
    text = json.dumps(original)
    cut = st.integers(0, len(text) - 1).map(lambda n: text[:n])
    return st.one_of(removed, replaced, cut, st.sampled_from(["{}", "[]", "null", "\x00\x01"]))


@given(data=st.data())
def test_a_damaged_sidecar_ends_clear(place, data):
    folder = place["tmp"] / "sidecar"
    folder.mkdir(exist_ok=True)
    for suffix in ("", ".sha256"):
        shutil.copy(place["digits"] / f"val.beton{suffix}", folder / f"val.beton{suffix}")
    original = json.loads((place["digits"] / "val.beton.json").read_text())
    damaged = data.draw(_damaged_json(original))
    (folder / "val.beton.json").write_text(damaged)
    code, text = run_cli(
        ["train", "demo_st", *place["base"], "--set", f"data.val={folder}/val.beton", "--print-config"]
    )
    assert_clear(code, text, ["data.val", "val.beton"])
    if code == 0:  # what it still says agrees with the file
        assert json.loads(damaged).get("num_samples") == 359


CHECKPOINT_FILES = ["st_scale_config.json", "COMMITTED.rank0"]


@given(data=st.data(), damaged_file=st.sampled_from(CHECKPOINT_FILES), command=st.sampled_from(["eval", "resume"]))
def test_a_damaged_checkpoint_ends_clear(place, data, damaged_file, command):
    runs = place["tmp"] / "damaged_runs"
    shutil.rmtree(runs, ignore_errors=True)
    shutil.copytree(CHECKPOINT_V1, runs / "compat-v1")
    folder = next((runs / "compat-v1").glob("checkpoint_*"))
    target = folder / damaged_file
    target.write_text(data.draw(_damaged_json(json.loads(target.read_text()))))
    if command == "eval":
        code, text = run_cli(["eval", str(folder), "--max-subnets", "1"])
        names = [folder.name, damaged_file, "data.train", "data.val"]  # the data it names are not kept
    else:
        argv = ["train", "demo_st", *place["base"], "--set", f"run.storage_path={runs}", "--set", "run.name=compat-v1"]
        code, text = run_cli([*argv, "--set", "model.stage_depths=[2, 2, 2]", "--print-config"])
        names = [folder.name, damaged_file, "run.name"]
    assert_clear(code, text, names)


# ------------------------------------------------------------------------------------ arguments
EXPORT_FLAGS = ["--format", "--budget-macs", "--budget-params", "--subnet", "--out", "--register", "--max-subnets"]
EXPORT_OPTIONS = st.lists(
    st.tuples(
        st.sampled_from(EXPORT_FLAGS),
        st.one_of(st.sampled_from(["onnx", "torchscript", ",", "1e400", "-20M", "20k", "3,9,9", "", "my/model:v1"]),
                  SCALARS.map(str)),
    ),
    max_size=3,
)  # fmt: skip


@given(options=EXPORT_OPTIONS)
@example(options=[("--out", "\x00")])  # found by `make fuzz`: a NUL in a path
def test_generated_export_arguments_end_clear(place, options):
    argv = ["export", str(place["tmp"] / "no_checkpoint"), *[a for pair in options for a in pair]]
    code, text = run_cli(argv)
    assert code == 2, text  # never a result: the checkpoint is not there
    assert_clear(code, text, ["no_checkpoint", "usage:", *EXPORT_FLAGS])


@pytest.mark.parametrize("world_size", [0.0, 0, -1, "2", None, [2], 10**18])
def test_a_commit_marker_that_names_no_count_of_ranks_is_an_incomplete_checkpoint(tmp_path, world_size):
    """Found by `make fuzz`: a marker saying `world_size: 0.0` reached range() inside `st-scale eval`, and
    one saying 10**18 had its missing ranks listed (memory without bound)."""
    from st_scale import checkpoint

    shutil.copytree(CHECKPOINT_V1, tmp_path / "run")
    folder = next((tmp_path / "run").glob("checkpoint_*"))
    (folder / "COMMITTED.rank0").write_text(json.dumps({"epoch": 1, "step": 22, "world_size": world_size}))
    if world_size is None:  # (a marker from before they named the count: the highest rank + 1)
        assert checkpoint.writer_world_size(folder) == 1
        return
    with pytest.raises(RuntimeError, match="is incomplete"):
        checkpoint.writer_world_size(folder)
    assert checkpoint.latest(tmp_path / "run") is None


@pytest.mark.parametrize("damage", [b"", b"\x80\x02garbage", b"PK\x03\x04" + bytes(64)])
@pytest.mark.parametrize("name", ["checkpoint/mp_rank_00_model_states.pt", "ema.pt"])
def test_weights_that_cannot_be_read_name_the_checkpoint_and_the_file(tmp_path, damage, name):
    """What `st-scale eval` and `export` read of a checkpoint's weights: a damaged file is named, not
    torch's unpickling error."""
    from st_scale import checkpoint
    from st_scale.errors import ConfigError

    shutil.copytree(CHECKPOINT_V1, tmp_path / "run")
    folder = next((tmp_path / "run").glob("checkpoint_*"))
    (folder / name).write_bytes(damage)
    read = checkpoint.read_ema if name == "ema.pt" else checkpoint.module_state
    try:  # what torch says of the file, read as st-scale reads it
        torch.load(folder / name, map_location="cpu", weights_only=name == "ema.pt")
    except Exception as error:  # noqa: BLE001
        said = f"{type(error).__name__}: {str(error).strip()[:120]}"
    with pytest.raises(ConfigError) as refused:
        read(folder)
    assert str(refused.value) == (
        f"{folder} is damaged: {Path(name).name} cannot be read ({said}); give an earlier checkpoint_* folder"
    )


def test_a_weights_average_that_would_run_code_when_read_is_refused(tmp_path):
    """ema.pt holds tensors only: one whose pickle names anything else (here a function) is refused as
    damaged, never unpickled with it."""
    from st_scale import checkpoint
    from st_scale.errors import ConfigError

    shutil.copytree(CHECKPOINT_V1, tmp_path / "run")
    folder = next((tmp_path / "run").glob("checkpoint_*"))
    torch.save({"fc.weight": torch.zeros(2), "hook": print}, folder / "ema.pt")
    with pytest.raises(ConfigError) as refused:
        checkpoint.read_ema(folder)
    assert str(refused.value).startswith(f"{folder} is damaged: ema.pt cannot be read (UnpicklingError: ")


def test_model_weights_missing_or_not_a_state_name_the_checkpoint(tmp_path):
    from st_scale import checkpoint
    from st_scale.errors import ConfigError

    shutil.copytree(CHECKPOINT_V1, tmp_path / "run")
    folder = next((tmp_path / "run").glob("checkpoint_*"))
    states = folder / "checkpoint" / "mp_rank_00_model_states.pt"
    for saved in ({"other": 1}, {"module": [1, 2]}, [1, 2]):  # no module weights: another dict, another type
        torch.save(saved, states)
        with pytest.raises(ConfigError) as refused:
            checkpoint.module_state(folder)
        assert str(refused.value) == (
            f"{folder} is damaged: mp_rank_00_model_states.pt holds no module weights; give an earlier "
            "checkpoint_* folder"
        ), saved
    states.unlink()
    with pytest.raises(ConfigError) as refused:
        checkpoint.module_state(folder)
    assert str(refused.value) == (
        f"{folder} has no model weights (checkpoint/mp_rank_00_model_states.pt is missing): the folder is damaged or "
        "was copied in part; give another checkpoint_* folder"
    )


@pytest.mark.parametrize(
    "torch_says, detail",
    [
        (
            "Error(s) in loading state_dict for ElasticNet:\n\tMissing key(s) in state_dict: " + "x" * 300
            + "\n\tUnexpected key(s) in state_dict: y",
            "Missing key(s) in state_dict: " + "x" * 130,
        ),
        ("Error(s) in loading state_dict:\n\n   \n\tsize mismatch for fc", "size mismatch for fc"),
        ("one line only", "one line only"),
        ("", ""),
    ],
)  # fmt: skip
def test_a_weights_mismatch_is_described_by_torchs_first_detail_line(tmp_path, torch_says, detail):
    """The refusal quotes the first non-blank line after torch's heading (the heading itself when there
    is no other), at most 160 characters."""
    from torch import nn

    from st_scale import checkpoint
    from st_scale.errors import ConfigError

    class Refuses(nn.Module):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            raise RuntimeError(torch_says)

    shutil.copytree(CHECKPOINT_V1, tmp_path / "run")
    folder = next((tmp_path / "run").glob("checkpoint_*"))
    with pytest.raises(ConfigError) as refused:
        checkpoint.load_weights(folder, Refuses())
    assert str(refused.value) == (
        f"{folder}: its weights do not fit the network its st_scale_config.json builds ({detail}); the folder "
        "holds files of two runs or was damaged; give another checkpoint_* folder"
    )


def test_a_first_format_checkpoint_reads_its_state_from_the_run_file():
    """tests/data/checkpoint_v1 was saved after epoch 1 of a run of 22 steps an epoch."""
    from st_scale import checkpoint

    folder = next(CHECKPOINT_V1.glob("checkpoint_*"))
    state = checkpoint.read_run(folder).state
    assert (state.epoch, state.step, state.mlflow_run_id) == (1, 22, "265ada1fbbc6426d994db81793337f47")


def test_a_run_file_that_cannot_be_read_or_validated_is_named_with_what_is_wrong(tmp_path):
    from st_scale import checkpoint
    from st_scale.errors import ConfigError

    shutil.copytree(CHECKPOINT_V1, tmp_path / "run")
    folder = next((tmp_path / "run").glob("checkpoint_*"))
    run_file = folder / "st_scale_config.json"
    written = json.loads(run_file.read_text())
    run_file.write_text(json.dumps({k: v for k, v in written.items() if k != "tracking_uri"}))
    with pytest.raises(ConfigError) as refused:
        checkpoint.read_run(folder)
    assert str(refused.value) == (
        f"{folder} is damaged: its st_scale_config.json or train_state.json cannot be read "
        "(KeyError: 'tracking_uri'); give an earlier checkpoint_* folder"
    )
    written["config"]["optimizer"]["epochs"] = "many"
    run_file.write_text(json.dumps(written))
    with pytest.raises(ConfigError) as refused:
        checkpoint.read_run(folder)
    text = str(refused.value)
    assert text.startswith(
        f"{folder}: the config in its st_scale_config.json is not one this version of st-scale reads (config:\n"
        "  optimizer.epochs: Input should be a valid integer"
    ), text
    assert text.endswith(
        "(got 'many')); evaluate or resume it with the st-scale version that wrote it, or give another checkpoint"
    )


def test_resuming_into_another_network_names_every_field_that_differs(tmp_path):
    from st_scale import checkpoint
    from st_scale.errors import ConfigError

    shutil.copytree(CHECKPOINT_V1, tmp_path / "compat-v1")
    model = checkpoint.read_run(next(CHECKPOINT_V1.glob("checkpoint_*"))).config_model().model
    model = model.model_copy(update={"stage_depths": (3, 3, 3), "num_classes": 12})
    with pytest.raises(ConfigError) as refused:
        checkpoint.check_resumable(tmp_path / "compat-v1", zero_stage=0, num_workers=1, model=model)
    found = next((tmp_path / "compat-v1").glob("checkpoint_*"))
    assert str(refused.value) == (
        f"run.name='compat-v1' already holds checkpoints of another network (model.num_classes=10, "
        f"model.stage_depths=[2, 2, 2] in {found}) than this recipe builds (model.num_classes=12, "
        "model.stage_depths=(3, 3, 3)); give this run its own run.name, or remove that folder to start over"
    )


def test_weights_of_another_network_are_named_as_such(tmp_path):
    """The first-format checkpoint's ResNet-20 [2, 2, 2] weights loaded into the network its config
    builds after that config is changed to [3, 3, 3]: a folder holding two runs' files."""
    from st_scale import checkpoint
    from st_scale.assembly import build_model_and_objective
    from st_scale.errors import ConfigError

    shutil.copytree(CHECKPOINT_V1, tmp_path / "run")
    folder = next((tmp_path / "run").glob("checkpoint_*"))
    cfg = checkpoint.read_run(folder).config_model()
    cfg.model.stage_depths = (3, 3, 3)
    with pytest.raises(ConfigError, match="its weights do not fit the network its st_scale_config.json builds"):
        checkpoint.load_weights(folder, build_model_and_objective(cfg)[0])
