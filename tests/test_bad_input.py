"""Bad input, as a careless user makes it, through the `st-scale` command line.

One row per case: the arguments, the exit code (2: bad input), a phrase the message must hold (the
field or option, and what to do), and a bound on the time it may take. Every case here is caught
before Ray or any worker starts: the output never shows a Ray instance starting, and never a raw
traceback. Every row runs the command line's `main` in the test's process (what a process adds is an
interpreter start, about 4 s a row); a sample of rows runs as a real `python -m st_scale` process too,
where the exit code is the process's.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from processes import free_port, serve_s3

from st_scale.data.convert import ArrayDataset, WriteOptions, write_beton
from st_scale.storage import resolve
from st_scale.train.run_lock import RunLock

pytestmark = pytest.mark.slow

TIME_BOUND_S = 90  # a command start (torch, pydantic, MLflow imports) on a loaded 2-core machine

PASSWORD, NO_DATABASE = "s3cret-pw", "127.0.0.1:{free_port}/mlflow"  # a port nothing listens on
TRAIN = [
    "train",
    "demo_st",
    "--set",
    "data.train={train}",
    "--set",
    "data.val={val}",
    "--set",
    "tracking.tracking_uri=sqlite:///{tmp}/mlflow.db",
    "--set",
    "run.storage_path={tmp}/runs",
    "--set",
    "data.calibration_images=40",  # the files' size
]

CASES = [
    # (id, arguments, exit code, phrase the message must contain)
    (
        "yaml-in-a-set-value",
        ["train", "demo_st", "--set", "optimizer.epochs=[1"],
        2,
        "--set 'optimizer.epochs=[1', line 1",
    ),
    ("yaml-in-a-recipe", ["train", "{tmp}/broken.yaml"], 2, "broken.yaml, line 4 column 1: invalid YAML"),
    (
        "yaml-in-a-sweep-spec",
        ["sweep", "{tmp}/broken_spec.yaml", "--check"],
        2,
        "broken_spec.yaml, line 4 column 1: invalid YAML",
    ),
    ("unknown-recipe", ["train", "demo_sst"], 2, "unknown recipe 'demo_sst'; packaged recipes:"),
    ("unknown-field", [*TRAIN, "--set", "optimizer.lrr=0.1"], 2, "optimizer.lrr: unknown key; check its spelling"),
    ("negative-kl-weight", [*TRAIN, "--set", "method.kl_weight=-1"], 2, "method.kl_weight"),
    ("missing-data-file", [*TRAIN, "--set", "data.val={tmp}/nothere.beton"], 2, "data.val: dataset file"),
    ("val-split-with-more-classes", [*TRAIN, "--set", "data.val={wide}"], 2, "has 20 classes but model.num_classes=10"),
    (
        "max-dropped-of-the-wrong-length",
        [*TRAIN, "--set", "sampling.space=restricted", "--set", "sampling.max_dropped=[0, 1]"],
        2,
        "sampling.max_dropped=[0, 1] needs one entry per stage",
    ),
    (
        "max-dropped-beyond-a-stage",
        [*TRAIN, "--set", "sampling.space=restricted", "--set", "sampling.max_dropped=[5, 0, 0]"],
        2,
        "sampling.max_dropped[0]=5: stage 0 has 3 blocks",
    ),
    (
        "sampler-that-only-draws-the-full-net",
        [*TRAIN, "--set", "sampling.decay=0.001", "--set", "sampling.include_full=false"],
        2,
        "sampler decay=0.001 with include_full=False: a draw other than the full network comes up with probability",
    ),
    ("sweep-family-with-a-wrong-max-dropped", ["sweep", "{tmp}/family_spec.yaml", "--check"], 2, "max_dropped"),
    ("summary-json-under-a-file", [*TRAIN, "--summary-json", "{plain}/out.json"], 2, "--summary-json: "),
    ("storage-path-is-a-file", [*TRAIN, "--set", "run.storage_path={plain}"], 2, "run.storage_path: "),
    ("convert-out-under-a-file", ["convert", "digits", "--out", "{plain}/digits"], 2, "--out: "),
    ("sqlite-uri-with-one-slash", [*TRAIN, "--set", "tracking.tracking_uri=sqlite:/x.db"], 2, "three slashes"),
    ("empty-experiment-name", [*TRAIN, "--set", "tracking.experiment="], 2, "tracking.experiment"),
    ("dashboard-url-as-address", [*TRAIN, "--address", "http://127.0.0.1:8265"], 2, "is a dashboard URL"),
    ("eval-of-a-folder-that-is-no-checkpoint", ["eval", "{tmp}"], 2, "is not an st-scale checkpoint folder"),
    ("eval-negative-max-subnets", ["eval", "{tmp}", "--max-subnets", "-5"], 2, "--max-subnets: -5 is out of range"),
    ("server-port-out-of-range", ["mlflow-server", "--port", "70000"], 2, "--port: 70000 is out of range"),
    (
        "deepspeed-override-typo",
        [*TRAIN, "--set", "deepspeed.overrides={{zero_optimization.stagee: 1}}"],
        2,
        "DeepSpeed rejects it: DeepSpeedZeroConfig.stagee: Extra inputs are not permitted",
    ),
    ("server-port-in-use", ["mlflow-server", "--port", "{busy_port}"], 2, "--port {busy_port}: 127.0.0.1:{busy_port}"),
    (
        "server-database-nobody-serves",
        ["mlflow-server", "--port", "{free_port}", "--backend-store", f"postgresql://mlflow:{PASSWORD}@{NO_DATABASE}"],
        2,
        f"--backend-store='postgresql://mlflow:***@{NO_DATABASE}': the database cannot be used (OperationalError",
    ),
    (
        "tracking-database-nobody-serves",
        [*TRAIN, "--set", f"tracking.tracking_uri=postgresql://mlflow:{PASSWORD}@{NO_DATABASE}"],
        2,
        f"tracking.tracking_uri='postgresql://mlflow:***@{NO_DATABASE}': the database cannot be used",
    ),
    ("cifar-pipeline-image-size", [*TRAIN, "--set", "data.image_size=64"], 2, "the cifar pipeline uses as they are"),
    ("cifar-pipeline-crop-ratio", [*TRAIN, "--set", "data.val_crop_ratio=0.9"], 2, "the imagenet pipeline only"),
    (
        "convert-of-a-truncated-image",
        ["convert", "imagefolder", "{tmp}/folder", "--out", "{tmp}/folder_out"],
        2,
        "cut.jpg is not a readable image",
    ),
    (
        "zero3-checkpoint-resumed-on-another-number-of-workers",
        [*TRAIN, "--set", "run.name=zero3-run", "--set", "deepspeed.overrides={{zero_optimization.stage: 3}}"]
        + ["--set", "scaling.num_workers=1"],
        2,
        "was written by 2 workers under ZeRO-3, whose parameters are sharded per worker",
    ),
    (
        "storage-in-a-store-st-scale-does-not-speak",
        [*TRAIN, "--set", "run.storage_path=gs://bucket/runs"],
        2,
        "run.storage_path='gs://bucket/runs': st-scale keeps checkpoints in a folder or an S3-compatible store",
    ),
    (
        "storage-endpoint-that-is-not-a-url",
        [*TRAIN, "--set", "run.storage_path=s3://st-scale/runs", "--set", "run.storage_endpoint=127.0.0.1:9000"],
        2,
        "run.storage_endpoint='127.0.0.1:9000' is not an S3 endpoint URL; give the store's address as http(s)://",
    ),
    (
        "object-store-nobody-serves",
        [*TRAIN, "--set", "run.storage_path=s3://st-scale/runs"]
        + ["--set", "run.storage_endpoint=http://127.0.0.1:{free_port}"],
        2,
        "run.storage_path=s3://st-scale/runs: cannot write to the object store at http://127.0.0.1:{free_port}",
    ),
    (
        "object-store-bucket-missing",
        [*TRAIN, "--set", "run.storage_path=s3://no-such-bucket/runs", "--set", "run.storage_endpoint={s3_endpoint}"],
        2,
        "bucket 'no-such-bucket' does not exist at {s3_endpoint}; create it first",
    ),
    (
        "eval-of-a-checkpoint-not-in-the-bucket",
        ["eval", "s3://st-scale/runs/demo-st/checkpoint_2026", "--storage-endpoint", "{s3_endpoint}"],
        2,
        "s3://st-scale/runs/demo-st/checkpoint_2026 is not an st-scale checkpoint folder",
    ),
    ("data-file-is-a-folder", [*TRAIN, "--set", "data.train={tmp}"], 2, "is a folder (it holds "),
    ("val-a-copy-of-train", [*TRAIN, "--set", "data.val={tmp}/copy.beton"], 2, "holds the same samples as data.train"),
    ("val-of-another-dataset", [*TRAIN, "--set", "data.val={three}"], 2, "has 3 classes but data.train 10"),
    ("sidecar-count-edited", [*TRAIN, "--set", "data.val={edited}"], 2, "says num_samples=99999 but the file holds 40"),
    (
        "labels-beyond-the-classes",
        [*TRAIN, "--set", "data.val={narrow}"],
        2,
        "says num_classes=5 but its labels reach 9",
    ),
    (
        "calibration-beyond-the-file",
        [*TRAIN, "--set", "data.calibration_images=100000"],
        2,
        "data.calibration_images=100000 but data.train holds 40 images",
    ),
    (
        "ray-address-of-a-web-server",
        [*TRAIN, "--address", "127.0.0.1:{http_port}"],
        2,
        "a server listens there but it is not a Ray cluster's GCS",
    ),
    ("run-name-held-by-another-driver", [*TRAIN, "--set", "run.name=held"], 2, "run.name='held' is being trained by"),
    ("convert-jpeg-quality-out-of-range", ["convert", "digits", "--out", "{tmp}/d", "--jpeg-quality", "0"], 2, "0 is"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small valid .beton files, a 20-class one, a regular file, broken recipe and spec files, an image
    folder with a truncated JPEG, a port something listens on and an S3 server with one bucket."""
    tmp = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    for name, classes, said in (
        ("train", 10, 10),
        ("val", 10, 10),
        ("wide", 20, 20),
        ("three", 3, 3),
        ("narrow", 10, 5),
    ):
        images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
        labels = np.arange(40) % classes
        metadata = {"num_classes": said, "image_size": 32, "source": "test"}
        write_beton(ArrayDataset(images, labels), tmp / f"{name}.beton", WriteOptions(num_workers=1), metadata)
    for suffix in ("", ".sha256", ".json"):  # the training file under another name; a sidecar edited by hand
        (tmp / f"copy.beton{suffix}").write_bytes((tmp / f"train.beton{suffix}").read_bytes())
        (tmp / f"edited.beton{suffix}").write_bytes((tmp / f"val.beton{suffix}").read_bytes())
    edited = json.loads((tmp / "edited.beton.json").read_text()) | {"num_samples": 99999}
    (tmp / "edited.beton.json").write_text(json.dumps(edited))
    (tmp / "plain").write_text("a regular file\n")
    from PIL import Image

    for split in ("train", "val"):
        (tmp / "folder" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp / "folder" / split / "cat" / "ok.jpg")
    whole = (tmp / "folder" / "train" / "cat" / "ok.jpg").read_bytes()
    (tmp / "folder" / "train" / "cat" / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # opens, cannot decode
    (tmp / "broken.yaml").write_text("base: demo_st\noptimizer:\n  epochs: [1\n")
    (tmp / "broken_spec.yaml").write_text("name: x\nrecipe: demo_st\nspace: {method.kl_weight: [1, 2\n")
    (tmp / "family_spec.yaml").write_text(
        "name: family\nrecipe: demo_st\n"
        "space:\n  variant:\n    family:\n"
        "      uniform: {sampling.space: full}\n"
        "      restricted: {sampling.space: restricted, sampling.max_dropped: [0, 1]}\n"
        "objective: {metric: val/main_top1, mode: max}\n"
    )
    # The newest checkpoint of a 2-worker ZeRO-3 run, as far as the driver reads it: run info and markers.
    written = tmp / "runs" / "zero3-run" / "checkpoint_2026-11-30_10-00-00.000000"
    written.mkdir(parents=True)
    (written / "st_scale_config.json").write_text(json.dumps({}))
    for rank in (0, 1):
        (written / f"COMMITTED.rank{rank}").write_text(json.dumps({"epoch": 1, "step": 22, "world_size": 2}))
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # not a GCS
    threading.Thread(target=web.serve_forever, daemon=True).start()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    held = RunLock(resolve(tmp / "runs" / "held"), "held").acquire()  # a driver training run 'held' meanwhile
    with serve_s3(tmp, buckets=("st-scale",)) as s3:
        yield {name: tmp / f"{name}.beton" for name in ("train", "val", "wide", "three", "narrow", "edited")} | {
            "tmp": tmp,
            "plain": tmp / "plain",
            "busy_port": busy.getsockname()[1],
            "http_port": web.server_address[1],
            "free_port": free_port(),
            "s3_endpoint": s3.endpoint,
        }
    busy.close()
    web.shutdown()
    held.release()


def check_refusal(inputs, code: int, phrase: str, returned: int, output: str, elapsed: float) -> None:
    assert returned == code, output
    assert phrase.format(**inputs) in output, output
    assert PASSWORD not in output, "a database password is never printed"
    assert "Traceback" not in output and "Started a local Ray instance" not in output, output
    assert elapsed < TIME_BOUND_S, f"took {elapsed:.0f} s"


@pytest.mark.parametrize("arguments, code, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_early_with_a_message_that_names_it(inputs, arguments, code, phrase, capfd, monkeypatch):
    from st_scale.cli import main

    monkeypatch.chdir(inputs["tmp"])
    start = time.monotonic()
    try:
        returned = main([a.format(**inputs) for a in arguments])
    except SystemExit as exit_:  # argparse's own refusals
        returned = exit_.code
    elapsed = time.monotonic() - start
    out, err = capfd.readouterr()
    check_refusal(inputs, code, phrase, returned, out + err, elapsed)


# A row of each kind of refusal: argparse's, the configuration's, the data files', a probe of a server.
AS_A_PROCESS = {
    "yaml-in-a-set-value",
    "unknown-field",
    "eval-negative-max-subnets",
    "val-of-another-dataset",
    "ray-address-of-a-web-server",
}


@pytest.mark.parametrize(
    "arguments, code, phrase",
    [c[1:] for c in CASES if c[0] in AS_A_PROCESS],
    ids=[c[0] for c in CASES if c[0] in AS_A_PROCESS],
)
def test_the_installed_command_exits_with_the_refusals_code(inputs, arguments, code, phrase):
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "st_scale", *[a.format(**inputs) for a in arguments]],
        capture_output=True,
        text=True,
        timeout=TIME_BOUND_S * 2,
        cwd=inputs["tmp"],
    )
    check_refusal(inputs, code, phrase, done.returncode, done.stdout + done.stderr, time.monotonic() - start)
