"""What a run prints: the epoch line and the message of a failed run, against the figures they show."""

from __future__ import annotations

from ray.train import ControllerError, WorkerGroupError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

from st_scale.config import load_config
from st_scale.train.console import epoch_line, format_duration
from st_scale.train.driver import describe_failure
from st_scale.train.failures import RecurringWorkerError

METRICS = {
    "epoch": 3,
    "train/epoch_loss": 0.81234,
    "val/main_top1": 91.2375,
    "val/subnets_mean_top1": 88.104,
    "val/subnets_std_top1": 2.306,
    "val/subnets_min_top1": 84.0,
    "val/num_subnets": 27.0,
    "train/epoch_images_per_s": 1234.4,
    "train/epoch_time_s": 12.4,
}


def test_epoch_line_shows_each_figure_once_rounded_as_the_summary_table():
    line = epoch_line(METRICS, epochs=12, seconds_left=125)
    assert line == (
        "epoch  3/12  loss 0.8123  main top-1 91.24%  sub-nets 88.10 ± 2.31% (min 84.00, 27 nets)  "
        "1,234 img/s  12 s  2 min 05 s left"
    )


def test_epoch_line_without_subnetworks_and_at_the_end():
    main_only = {k: v for k, v in METRICS.items() if "subnets" not in k} | {"epoch": 12}
    assert epoch_line(main_only, epochs=12, seconds_left=0) == (
        "epoch 12/12  loss 0.8123  main top-1 91.24%  1,234 img/s  12 s"
    )
    with_average = main_only | {"val/ema/main_top1": 91.875}
    assert "main top-1 91.24%  EMA 91.88%  1,234 img/s" in epoch_line(with_average, epochs=12, seconds_left=0)


def test_durations():
    assert [format_duration(s) for s in (0, 59.6, 60, 3599, 3600, 7322)] == [
        "0 s",
        "1 min 00 s",
        "1 min 00 s",
        "59 min 59 s",
        "1 h 00 min",
        "2 h 02 min",
    ]


def test_a_failed_run_is_described_by_its_worker_error_not_rays_traceback():
    cfg = load_config("demo_st", ["run.name=r1", "run.storage_path=/runs"])
    worker = RuntimeError("Traceback (most recent call last):\n  File x\nValueError: shape mismatch in stage 2")
    message = describe_failure(WorkerGroupError("...", {1: worker, 0: OSError("disk full")}), cfg)
    first, logs, checkpoints = message.splitlines()
    assert first == "run 'r1' failed: worker 0: OSError: disk full"  # the lowest failed rank
    assert logs.startswith("  full log: ") and "--verbose" in logs
    assert checkpoints == (
        "  checkpoints: /runs/r1; run again with the same run.name to resume from the last complete one"
    )
    only = describe_failure(WorkerGroupError("...", {1: worker}), cfg).splitlines()[0]
    assert only == "run 'r1' failed: worker 1: RuntimeError: ValueError: shape mismatch in stage 2"
    wrapped = UserExceptionWithTraceback(KeyError("images"), "Traceback (most recent call last):\n  File y\nKeyError")
    shown = describe_failure(WorkerGroupError("...", {0: wrapped}), cfg).splitlines()[0]
    assert shown == "run 'r1' failed: worker 0: KeyError: 'images'"  # the worker's exception, unwrapped


def test_a_recurring_error_is_described_by_its_own_message():
    cfg = load_config("demo_st", ["run.name=r2"])
    error = ControllerError(RecurringWorkerError("worker 1 failed with ConfigError: data.val: gone"))
    assert describe_failure(error, cfg).splitlines()[0] == (
        "run 'r2' failed: RecurringWorkerError: worker 1 failed with ConfigError: data.val: gone"
    )
