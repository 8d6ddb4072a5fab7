"""The run storage over a real S3 server (moto's, on 127.0.0.1, spoken to over HTTP): checkpoint
folders found, read and copied the same as in a local folder, a store that stops answering waited
for within the deadline, and a store that cannot be used refused before any work starts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from processes import serve_s3

from st_scale import checkpoint
from st_scale.config import RunSection, load_config
from st_scale.errors import ConfigError
from st_scale.storage import check_object_store, ray_storage, resolve, with_retries

BUCKET = "st-scale"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with serve_s3(tmp_path_factory.mktemp("s3"), buckets=(BUCKET,)) as server:
        yield server


def _write_checkpoint(folder: Path, epoch: int, ranks_committed: tuple[int, ...], world: int = 2) -> dict:
    """A checkpoint folder as a run of `world` ranks leaves it (written here by hand, from the format's
    description): run info, module weights, an optimizer shard per rank, the committed ranks' markers."""
    weights = {"model.fc.weight": torch.full((2, 3), float(epoch)), "model.fc.bias": torch.zeros(2)}
    (folder / "checkpoint").mkdir(parents=True)
    run_info = {
        "config": load_config("demo_st").model_dump(mode="json"),
        "epoch": epoch,
        "step": 10,
        "mlflow_run_id": "r",
        "tracking_uri": "x",
        "experiment_id": "0",
    }
    (folder / checkpoint.RUN_FILE).write_text(json.dumps(run_info))
    torch.save({"module": weights}, folder / "checkpoint" / "mp_rank_00_model_states.pt")
    for rank in range(world):
        (folder / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    for rank in ranks_committed:
        (folder / f"COMMITTED.rank{rank}").write_text(json.dumps({"epoch": epoch, "step": 10, "world_size": world}))
    return weights


def _upload(local: Path, s3, prefix: str):
    from pyarrow.fs import LocalFileSystem, copy_files

    location = resolve(f"s3://{BUCKET}/{prefix}", s3.endpoint)
    copy_files(
        str(local), location.path, source_filesystem=LocalFileSystem(), destination_filesystem=location.filesystem
    )
    return location


def test_the_newest_complete_checkpoint_is_found_in_an_object_store_as_in_a_folder(s3, tmp_path):
    run = tmp_path / "run"
    _write_checkpoint(run / "checkpoint_2026-01-01_00-00-00.000000", 1, (0, 1))
    _write_checkpoint(run / "checkpoint_2026-01-01_00-10-00.000000", 2, (0, 1))
    _write_checkpoint(run / "checkpoint_2026-01-01_00-20-00.000000", 3, (0,))  # rank 1 died before its marker
    remote = _upload(run, s3, "found/run")

    assert checkpoint.latest(run).name == checkpoint.latest(remote).name == "checkpoint_2026-01-01_00-10-00.000000"
    newest = checkpoint.latest(remote)
    assert newest.uri == f"s3://{BUCKET}/found/run/checkpoint_2026-01-01_00-10-00.000000"
    assert checkpoint.committed_ranks(newest) == [0, 1] and checkpoint.writer_world_size(newest) == 2
    assert checkpoint.read_run(newest).state.epoch == 2  # a folder of the first format
    with pytest.raises(ConfigError, match=r"no commit marker from ranks \[1\] of the 2"):
        checkpoint.read_run(remote / "checkpoint_2026-01-01_00-20-00.000000")
    with pytest.raises(ConfigError, match="is not an st-scale checkpoint folder"):
        checkpoint.read_run(remote)
    assert checkpoint.latest(resolve(f"s3://{BUCKET}/nothing/here", s3.endpoint)) is None


def test_evaluating_a_checkpoint_in_an_object_store_copies_its_weights_only(s3, tmp_path):
    weights = _write_checkpoint(tmp_path / "run" / "checkpoint_1", 1, (0, 1))
    remote = _upload(tmp_path / "run", s3, "copied/run") / "checkpoint_1"

    copy = checkpoint.local_weights(remote, tmp_path / "copy")
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == [
        "COMMITTED.rank0",
        "COMMITTED.rank1",
        "checkpoint/mp_rank_00_model_states.pt",
        checkpoint.RUN_FILE,
    ]  # no optimizer shard
    assert checkpoint.module_state(copy).keys() == weights.keys()
    assert all(torch.equal(checkpoint.module_state(copy)[k], v) for k, v in weights.items())
    local = tmp_path / "run" / "checkpoint_1"
    assert checkpoint.local_weights(local, tmp_path / "unused") == local  # a local folder is read where it is
    assert not (tmp_path / "unused").exists()


def test_a_store_that_stops_answering_is_waited_for_until_the_deadline(s3, tmp_path):
    location = resolve(f"s3://{BUCKET}/waited", s3.endpoint)

    def write():
        with location.filesystem.open_output_stream(f"{location.path}/object") as stream:
            stream.write(b"written")

    s3.cut()
    back = threading.Timer(4.0, s3.restore)
    back.start()
    try:
        with_retries(write, "writing a test object", deadline_s=120)  # the first tries meet the outage
    finally:
        back.join(timeout=60)
    assert s3.keys(BUCKET, "waited/") == ["waited/object"]

    s3.cut()
    try:
        with pytest.raises(OSError, match="NETWORK_CONNECTION"):
            with_retries(write, "writing a test object", deadline_s=0)
    finally:
        s3.restore()


def test_retries_back_off_until_the_deadline_and_only_for_errors_a_store_recovers_from():
    now, waits = [0.0], []

    def sleep(seconds):
        waits.append(seconds)
        now[0] += seconds

    def unreachable():
        raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation: Could not connect to server")

    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        with_retries(unreachable, "x", deadline_s=100, sleep=sleep, clock=lambda: now[0])
    assert waits == [1, 2, 4, 8, 16, 30, 30, 9]  # doubling, at most 30 s, the last one up to the deadline

    calls = []

    def denied():
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED during PutObject operation: Access Denied")

    waits.clear()
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        with_retries(denied, "x", deadline_s=100, sleep=sleep, clock=lambda: now[0])
    assert calls == [1] and waits == []

    attempts = iter([OSError("AWS Error SERVICE_UNAVAILABLE"), OSError("AWS Error SLOW_DOWN"), "done"])

    def recovers():
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert with_retries(recovers, "x", deadline_s=100, sleep=sleep, clock=lambda: now[0]) == "done"
    assert waits == [1, 2]


def test_a_store_that_cannot_be_used_is_refused_before_any_work(s3):
    check_object_store(f"s3://{BUCKET}/writable/prefix", s3.endpoint)
    assert s3.keys(BUCKET, "writable/") == ["writable/prefix/"], "the write probe is removed (the folder stays)"
    with pytest.raises(ConfigError, match=r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1:\d+; create"):
        check_object_store("s3://no-such-bucket/runs", s3.endpoint)
    with pytest.raises(ConfigError, match=r"cannot write to the object store at http://127\.0\.0\.1:1 \("):
        check_object_store(f"s3://{BUCKET}/runs", "http://127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"checkpoint=s3://st-scale/x: cannot read the object store"):
        check_object_store(f"s3://{BUCKET}/x", "http://127.0.0.1:1", field="checkpoint", write=False)


@pytest.mark.parametrize(
    "path, endpoint, phrase",
    [
        ("gs://bucket/runs", None, "give a folder path or an s3://bucket/prefix URI"),
        ("s3://", None, "names no bucket"),
        ("s3://bucket/runs", "minio:9000", "run.storage_endpoint='minio:9000' is not an S3 endpoint URL"),
        ("s3://bucket/runs", "http://minio:9000/path", "is not an S3 endpoint URL"),
        ("/shared/runs", "http://minio:9000", "is set but run.storage_path='/shared/runs' is a folder"),
    ],
)
def test_a_storage_the_recipe_gets_wrong_is_named(path, endpoint, phrase):
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(").replace("?", r"\?")):
        RunSection(name="x", storage_path=path, storage_endpoint=endpoint)


def test_ray_train_gets_the_object_store_as_its_filesystem(s3, tmp_path):
    from pyarrow.fs import S3FileSystem

    remote = ray_storage(resolve(f"s3://{BUCKET}/runs", s3.endpoint))
    assert remote["storage_path"] == f"{BUCKET}/runs" and isinstance(remote["storage_filesystem"], S3FileSystem)
    assert remote["storage_filesystem"].get_file_info(BUCKET).type.name == "Directory"  # reaches the store
    assert ray_storage(resolve(tmp_path / "runs")) == {"storage_path": str(tmp_path / "runs")}


# ------------------------------------------------------------------------------------ one run at a time
def _run_dir(where: str, s3, tmp_path, name: str):
    return resolve(f"s3://{BUCKET}/locks/{name}", s3.endpoint) if where == "s3" else resolve(tmp_path / name)


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_second_driver_of_a_run_is_refused_naming_the_holder_until_the_first_ends(s3, tmp_path, where):
    import os
    import socket

    from st_scale.train.run_lock import RunLock

    run_dir = _run_dir(where, s3, tmp_path, "dup")
    first = RunLock(run_dir, "dup").acquire()
    with pytest.raises(ConfigError) as refused:
        RunLock(run_dir, "dup").acquire()
    assert f"run.name='dup' is being trained by process {os.getpid()} on {socket.gethostname()}" in str(refused.value)
    assert "choose another run.name" in str(refused.value)
    first.release()
    assert not (run_dir / "RUN_LOCK").is_file()
    if where == "folder":  # the folder the lock made is gone with it: a run refused early leaves nothing
        assert not (tmp_path / "dup").exists()
    with RunLock(run_dir, "dup"):  # the run name is free again
        assert (run_dir / "RUN_LOCK").is_file()


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_stale_lock_is_taken_over_with_a_line_and_left_to_its_new_holder(s3, tmp_path, where):
    from st_scale.train import run_lock
    from st_scale.train.run_lock import RunLock, read_holder

    run_dir = _run_dir(where, s3, tmp_path, "stale")
    now = [1_000_000.0]
    gone = RunLock(run_dir, "stale", clock=lambda: now[0]).acquire()
    gone._stop.set()  # its heartbeat thread stops, as a killed driver's would
    now[0] += run_lock.STALE_S - 1
    with pytest.raises(ConfigError, match="last heartbeat was 89 s ago"):
        RunLock(run_dir, "stale", clock=lambda: now[0]).acquire()
    now[0] += 2
    lines = []
    taker = RunLock(run_dir, "stale", clock=lambda: now[0], say=lines.append).acquire()
    assert len(lines) == 1 and "taking over the lock of run 'stale'" in lines[0] and "no heartbeat for 91 s" in lines[0]
    assert read_holder(run_dir).token == taker.holder.token
    gone.beat()  # the old driver wakes up: it neither renews nor removes the new holder's lock
    gone.release()
    assert read_holder(run_dir).token == taker.holder.token
    now[0] += 5
    taker.beat()
    assert read_holder(run_dir).heartbeat == now[0]
    taker.release()


def test_a_damaged_lock_is_taken_over_as_stale(tmp_path):
    from st_scale.train.run_lock import RunLock

    run_dir = resolve(tmp_path / "damaged")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "RUN_LOCK").write_text('{"host": "a", "pi')
    lines = []
    with RunLock(run_dir, "damaged", say=lines.append) as held:
        assert "from a driver whose lock file is unreadable" in lines[0]
        assert json.loads((tmp_path / "damaged" / "RUN_LOCK").read_text())["token"] == held.holder.token


def test_drivers_started_together_on_a_folder_leave_exactly_one_holder(tmp_path):
    from st_scale.train.run_lock import RunLock

    run_dir = resolve(tmp_path / "together")
    outcomes, start = [], threading.Barrier(4)

    def contend():
        start.wait(timeout=10)
        try:
            outcomes.append(RunLock(run_dir, "together").acquire())
        except ConfigError as refused:
            outcomes.append(refused)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    held = [o for o in outcomes if isinstance(o, RunLock)]
    assert len(outcomes) == 4 and len(held) == 1, outcomes
    held[0].release()
