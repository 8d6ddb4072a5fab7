import os

import pytest
import torch
from digits_data import DIGITS_SIZE
from processes import free_port

# Loopback-only Ray, no usage reporting: before anything imports ray.
import st_scale  # noqa: F401,E402

# Deterministic, quiet CPU runs. Under pytest-xdist (`make test` runs the tests that do not start Ray
# in two processes) each process gets one of the two cores; so does each of `make mutate`'s two test
# processes, which set OMP_NUM_THREADS=1 (two threads each would contend for the two cores).
# (An xdist worker inherits the OMP_NUM_THREADS its controller set for itself: one thread regardless.)
THREADS = 1 if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else int(os.environ.get("OMP_NUM_THREADS", 2))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)
# Ray Train's controller polls its workers every 2 s by default: a digits run returned 4.3 s after its
# workers finished (0.8 s at 0.25 s polls), and the suite trains about forty runs. Set before any Ray
# starts: the clusters the tests start (`ray start`) inherit it, and a driver hands it on to each run's
# controller.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def pytest_collection_modifyitems(config, items):
    """Under `make mutate`, a mutant's tests run fastest first (mutmut's stats give each test's
    duration): mutmut stops at the first failure, and a cheap unit test kills most mutants before a
    15-second end-to-end test would start. mutmut hands the tests over in no particular order."""
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    import json
    from pathlib import Path

    stats = Path("mutmut-stats.json")  # mutmut runs the tests from its mutants/ folder
    if stats.is_file():
        duration = json.loads(stats.read_text())["duration_by_test"]
        items.sort(key=lambda item: duration.get(item.nodeid, float("inf")))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The bundled digits set as .beton files (DIGITS_SIZE px), written once per test session."""
    from st_scale.data.commands import convert

    out = tmp_path_factory.mktemp(f"digits{DIGITS_SIZE}")
    convert("digits", None, out, image_size=DIGITS_SIZE, quiet=True)
    return out


@pytest.fixture(scope="session")
def gloo_process_group():
    """A one-process gloo group (world size 1) for DeepSpeed engines built inside the test process."""
    for key, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(free_port())),
        ("DS_ACCELERATOR", "cpu"),
    ):
        os.environ[key] = value
    torch.distributed.init_process_group("gloo")
    yield
    torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_batches(count: int, batch: int, size: int, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(count)
    ]


def perturb_bn(model, size: int, steps: int = 3) -> None:
    """Give the running statistics non-trivial values, as training would."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(8, 3, size, size) * 2 + 0.5)
