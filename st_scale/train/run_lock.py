"""One run at a time per run name.

Two drivers of the same `run.name` would write one folder of checkpoints and one MLflow run, each
resuming from the other's half-written state. The driver therefore holds `<run folder>/RUN_LOCK`
while it trains: who holds it (host, process, start), and a heartbeat it rewrites every
HEARTBEAT_S. A second driver finds a fresh heartbeat and is refused, naming the holder; a heartbeat
older than STALE_S is a driver that died without cleaning up (a killed laptop, a lost node), and its
lock is taken over with a line saying so.

Taking the lock is atomic in a folder: the claim is written aside and hard-linked into place, which
fails where a lock exists; a stale one is first renamed aside, which one contender alone can do. An
object store has no exclusive create that every S3-compatible store offers, so there the driver
writes its claim, waits SETTLE_S and reads it back: of drivers started within SETTLE_S of each
other, the last writer's claim stands and the others are refused.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from ..errors import ConfigError
from ..storage import Location

LOCK_FILE = "RUN_LOCK"
HEARTBEAT_S = 10.0
STALE_S = 90.0  # nine heartbeats missed: a driver this silent is gone
SETTLE_S = 2.0


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str
    heartbeat: float  # seconds since the epoch
    token: str

    def describe(self) -> str:
        if self.token == "unreadable":
            return "a driver whose lock file is unreadable"
        return f"process {self.pid} on {self.host} (started {self.started})"


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


UNREADABLE = Holder("an unknown host", 0, "unknown", 0.0, "unreadable")  # a damaged lock: stale at once


def read_holder(run_dir: Location) -> Holder | None:
    """The lock's holder; None where there is no lock. One read decides: a lock is never half-written
    (see `_claim_exclusively`), so one that does not parse is damaged, and counts as stale."""
    return _holder_of((run_dir / LOCK_FILE).read_text)


def _holder_of(read) -> Holder | None:
    try:
        text = read()
    except OSError:  # (FileNotFoundError among them: no lock)
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        return UNREADABLE


class RunLock:
    """The lock of one run folder, held from `acquire` to `release`, its heartbeat kept by a thread."""

    def __init__(self, run_dir: Location, run_name: str, *, clock=time.time, say=print):
        self.run_dir, self.run_name = run_dir, run_name
        self.clock, self.say = clock, say
        self.holder = Holder(socket.gethostname(), os.getpid(), _now_text(), clock(), uuid.uuid4().hex)
        self._stop = threading.Event()
        self._made_folder = False
        self._thread: threading.Thread | None = None

    @property
    def lock(self) -> Location:
        return self.run_dir / LOCK_FILE

    def _refuse(self, other: Holder) -> ConfigError:
        age = self.clock() - other.heartbeat
        return ConfigError(
            f"run.name={self.run_name!r} is being trained by {other.describe()}, whose last heartbeat was "
            f"{max(age, 0):.0f} s ago ({self.lock}); wait for it to end or stop it, or choose another run.name"
        )

    def acquire(self) -> RunLock:
        other = read_holder(self.run_dir)
        if other is not None and self.clock() - other.heartbeat < STALE_S:
            raise self._refuse(other)
        if other is not None:
            self.say(
                f"taking over the lock of run {self.run_name!r} from {other.describe()}: no heartbeat for "
                f"{self.clock() - other.heartbeat:.0f} s (more than {STALE_S:.0f} s), so that driver is gone"
            )
        if self.run_dir.remote:
            self._claim_by_settling()
        else:
            self._claim_exclusively(stale=other)
        self._thread = threading.Thread(target=self._beat, name="st-scale-run-lock", daemon=True)
        self._thread.start()
        return self

    def _claim_exclusively(self, *, stale: Holder | None) -> None:
        path = self.lock.path
        self._made_folder = not os.path.isdir(os.path.dirname(path))  # removed again if left empty
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if stale is not None:
            aside = f"{path}.stale-{self.holder.token}"
            try:  # one contender moves the stale lock aside; the others find it gone and race below
                os.rename(path, aside)
            except FileNotFoundError:
                pass
            else:
                moved = _holder_of(lambda: open(aside).read())
                if moved is not None and moved.token != stale.token:  # a fresh lock, taken since it was read
                    os.rename(aside, path)
                    raise self._refuse(moved)
                os.remove(aside)
        claim = f"{path}.claim-{self.holder.token}"
        with open(claim, "w") as f:
            f.write(json.dumps(asdict(self.holder)))
        try:  # a hard link is created whole or not at all: a lock is never seen half-written
            os.link(claim, path)
        except FileExistsError:
            raise self._refuse(read_holder(self.run_dir) or self.holder) from None
        finally:
            os.remove(claim)

    def _claim_by_settling(self) -> None:
        self._write()
        time.sleep(SETTLE_S)
        standing = read_holder(self.run_dir)
        if standing is None or standing.token != self.holder.token:
            raise self._refuse(standing or self.holder)

    def _write(self) -> None:
        with self.lock.filesystem.open_output_stream(self.lock.path) as stream:
            stream.write(json.dumps(asdict(self.holder)).encode())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.beat()

    def beat(self) -> None:
        """Renew the heartbeat, if the lock is still this driver's (one silent past STALE_S may have
        been taken over: the new holder's lock is left alone)."""
        standing = read_holder(self.run_dir)
        if standing is None or standing.token != self.holder.token:
            return
        self.holder = Holder(**{**asdict(self.holder), "heartbeat": self.clock()})
        try:
            self._write()
        except OSError:
            pass  # a storage hiccup: the next beat tries again, well before STALE_S

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        standing = read_holder(self.run_dir)
        if standing is not None and standing.token == self.holder.token:
            try:
                self.lock.filesystem.delete_file(self.lock.path)
            except OSError:
                pass  # gone already; a lock left behind goes stale and is taken over
        if self._made_folder:  # a run refused before it wrote anything leaves no folder behind
            try:
                os.rmdir(os.path.dirname(self.lock.path))
            except OSError:
                pass  # it holds the run's checkpoints

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
