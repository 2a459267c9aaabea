"""The embedded Redis server, against the real redis-server binary (no mocks)."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from conftest import wait_for

import redbike
from redbike import embedded
from redbike.embedded import EmbeddedError, ensure_server, server_running, stop_server

# Subprocesses must import this checkout's redbike, installed or not.
REPO_ROOT = str(Path(next(iter(redbike.__path__))).parent)


@pytest.fixture
def folder(tmp_path):
    path = str(tmp_path / "rb")
    yield path
    # Never leave a daemonized server behind, whatever the test did.
    stop_server(path)
    assert not server_running(path)


def client_for(socket_path):
    return redis.Redis(unix_socket_path=socket_path, decode_responses=True)


def read_pid(folder):
    return int(Path(folder, "redis.pid").read_text().strip())


def run_python(code, *args):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


ENSURE = "import sys; from redbike.embedded import ensure_server; print(ensure_server(sys.argv[1]))"


def test_ensure_server_starts_a_usable_server(folder):
    assert not server_running(folder)
    socket_path = ensure_server(folder)
    assert socket_path == os.path.join(os.path.abspath(folder), "redis.sock")
    assert server_running(folder)
    client = client_for(socket_path)
    assert client.set("greeting", "hello") is True
    assert client.get("greeting") == "hello"
    # The server reported in the pidfile is the one answering.
    assert int(client.info("server")["process_id"]) == read_pid(folder)
    client.close()


def test_server_config(folder):
    client = client_for(ensure_server(folder))
    config = client.config_get("*")
    assert config["port"] == "0"  # no TCP listener
    assert config["unixsocketperm"] == "700"
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["save"] == "60 1000"
    assert config["dir"] == os.path.abspath(folder)
    assert config["daemonize"] == "yes"
    assert (os.stat(os.path.join(folder, "redis.sock")).st_mode & 0o777) == 0o700
    client.close()


def test_second_ensure_reuses_server_in_process_and_from_subprocess(folder):
    socket_path = ensure_server(folder)
    pid = read_pid(folder)
    assert ensure_server(folder) == socket_path
    assert read_pid(folder) == pid

    # A different process started from the same place shares the server.
    result = run_python(ENSURE, folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == socket_path
    assert read_pid(folder) == pid
    client = client_for(socket_path)
    assert int(client.info("server")["process_id"]) == pid
    client.close()


def test_server_outlives_the_process_that_started_it(folder):
    result = run_python(
        ENSURE + "; import redis; redis.Redis(unix_socket_path=sys.argv[1] + '/redis.sock')"
        ".set('from-child', 'yes')",
        folder,
    )
    assert result.returncode == 0, result.stderr
    assert server_running(folder)
    client = client_for(os.path.join(folder, "redis.sock"))
    assert client.get("from-child") == "yes"
    client.close()


def test_data_survives_stop_and_restart(folder):
    client = client_for(ensure_server(folder))
    client.set("persisted", "42")
    client.rpush("list", "a", "b")
    first_pid = read_pid(folder)
    client.close()

    assert stop_server(folder) is True
    assert not server_running(folder)
    assert not os.path.exists(os.path.join(folder, "redis.sock"))
    assert stop_server(folder) is False  # already stopped

    client = client_for(ensure_server(folder))
    assert read_pid(folder) != first_pid
    assert client.get("persisted") == "42"
    assert client.lrange("list", 0, -1) == ["a", "b"]
    client.close()
    assert any(name.startswith("appendonly") for name in os.listdir(folder))


def test_stop_server_when_never_started(tmp_path):
    assert stop_server(str(tmp_path / "never")) is False
    assert not server_running(str(tmp_path / "never"))


def test_concurrent_ensure_server_starts_one_server(folder):
    # All children read one shared pipe and block until its write end is
    # closed: then they are released together and race for the start.
    code = "import sys; sys.stdin.read(); " + ENSURE.split("; ", 1)[1]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    gate_read, gate_write = os.pipe()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, folder],
            stdin=gate_read,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    os.close(gate_read)
    os.close(gate_write)
    try:
        outputs = [child.communicate(timeout=60) for child in children]
    finally:
        # A child left running could start a server after the fixture's stop.
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    for child, (out, err) in zip(children, outputs):
        assert child.returncode == 0, err
    socket_path = os.path.join(os.path.abspath(folder), "redis.sock")
    assert [out.strip() for out, _ in outputs] == [socket_path] * 4
    log = Path(folder, "redis.log").read_text()
    assert log.count("Redis is starting") == 1
    client = client_for(socket_path)
    assert int(client.info("server")["process_id"]) == read_pid(folder)
    client.close()


def test_stale_socket_and_pidfile_are_replaced(folder):
    os.makedirs(folder)
    socket_path = os.path.join(os.path.abspath(folder), "redis.sock")
    # A socket file nobody listens on, as left by a killed server.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(socket_path)
    stale.close()
    # A pid that no longer exists.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(folder, "redis.pid").write_text(f"{dead.pid}\n")
    assert not server_running(folder)

    assert ensure_server(folder) == socket_path
    assert read_pid(folder) != dead.pid
    client = client_for(socket_path)
    assert client.ping() is True
    assert int(client.info("server")["process_id"]) == read_pid(folder)
    client.close()


def test_restart_after_server_crash(folder):
    socket_path = ensure_server(folder)
    pid = read_pid(folder)
    os.kill(pid, signal.SIGKILL)  # a crash leaves its socket file and pidfile behind
    wait_for(lambda: not server_running(folder), what="the killed server to stop answering")
    assert os.path.exists(socket_path) and read_pid(folder) == pid

    assert ensure_server(folder) == socket_path
    assert read_pid(folder) != pid
    client = client_for(socket_path)
    assert int(client.info("server")["process_id"]) == read_pid(folder)
    client.close()


def test_missing_binary_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REDBIKE_REDIS_SERVER", "/nonexistent")
    with pytest.raises(EmbeddedError, match="REDBIKE_REDIS_SERVER='/nonexistent'"):
        embedded.server_binary()
    with pytest.raises(EmbeddedError, match="not an executable file"):
        ensure_server(str(tmp_path / "rb"))
    assert not server_running(str(tmp_path / "rb"))


def test_binary_found_without_override(monkeypatch):
    monkeypatch.delenv("REDBIKE_REDIS_SERVER", raising=False)
    binary = embedded.server_binary()
    assert os.path.isabs(binary) and os.access(binary, os.X_OK)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    assert "Redis server v=" in version.stdout


def test_server_that_cannot_start_reports_log_tail(tmp_path, monkeypatch):
    # A "server" that exits at once with an error, as redis-server does on a
    # bad config: the error must say so in one line, not hang.
    fake = tmp_path / "fake-redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR: nope' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("REDBIKE_REDIS_SERVER", str(fake))
    with pytest.raises(EmbeddedError) as info:
        ensure_server(str(tmp_path / "rb"))
    message = str(info.value)
    assert "failed to start" in message and "FATAL CONFIG FILE ERROR: nope" in message
    assert "\n" not in message


def test_socket_path_too_long(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with pytest.raises(EmbeddedError, match="longer than"):
        ensure_server(str(deep))
    assert not deep.exists()


# --- the CLI: which folder's server, status, demo ----------------------------------


@pytest.fixture
def project(tmp_path):
    """A project folder (its embedded server stopped afterwards) with a subfolder."""
    sub = tmp_path / "sub" / "deeper"
    sub.mkdir(parents=True)
    yield tmp_path
    stop_server(str(tmp_path / ".redbike"))
    assert not server_running(str(tmp_path / ".redbike"))


def redbike_cli(cwd, *args):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "redbike", *args],
        check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )


def test_find_folder_looks_upwards(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert not (embedded.find_folder(str(tmp_path / "a" / "b")) or "").startswith(str(tmp_path))
    (tmp_path / ".redbike").mkdir()
    assert embedded.find_folder(str(tmp_path / "a" / "b")) == str(tmp_path / ".redbike")
    (tmp_path / "a" / ".redbike").mkdir()
    assert embedded.find_folder(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / ".redbike")


def test_the_search_does_not_climb_into_a_ceiling(tmp_path, monkeypatch):
    (tmp_path / ".redbike").mkdir()
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.setenv(embedded.CEILING_VARIABLE, f"relative/ignored{os.pathsep}{tmp_path}")
    assert embedded.find_folder(str(tmp_path / "a" / "b")) is None
    assert embedded.find_folder(str(tmp_path)) == str(tmp_path / ".redbike")  # the ceiling itself, when started there
    monkeypatch.setenv(embedded.CEILING_VARIABLE, str(tmp_path / "a" / "b"))
    assert embedded.find_folder(str(tmp_path / "a" / "b")) == str(tmp_path / ".redbike")


def test_a_new_server_is_announced_and_a_subfolder_uses_it(project):
    first = redbike_cli(project, "set", "top:A", "STOP")
    assert first.returncode == 0, first.stderr
    assert (
        "no .redbike/ folder here or above: started a new embedded Redis server in "
        f"{project / '.redbike'}" in first.stderr
    )
    assert "WARNING" in first.stderr
    listed = redbike_cli(project / "sub" / "deeper", "schedules")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == "top:A,STOP\n"
    assert listed.stderr == ""  # found, not new: nothing to warn about
    assert not (project / "sub" / ".redbike").exists()
    assert not (project / "sub" / "deeper" / ".redbike").exists()


def test_embedded_status_and_stop_from_a_subfolder(project):
    deeper = project / "sub" / "deeper"
    down = redbike_cli(deeper, "embedded", "status")
    assert down.returncode == 1 and down.stdout.startswith("not running"), down
    assert redbike_cli(project, "set", "x:A", "STOP").returncode == 0
    up = redbike_cli(deeper, "embedded", "status")
    assert up.returncode == 0, up.stderr
    lines = dict(line.split(":", 1) for line in up.stdout.splitlines()[1:])
    assert up.stdout.startswith("running\n")
    folder = str(project / ".redbike")
    assert lines["folder"].strip() == folder
    assert lines["socket"].strip() == os.path.join(folder, "redis.sock")
    assert int(lines["pid"]) == read_pid(folder)
    assert lines["version"].strip()[0].isdigit()
    assert lines["uptime"].strip().split()[1] == "s"
    assert lines["memory"].strip()[0].isdigit()
    stopped = redbike_cli(deeper, "embedded", "stop")
    assert stopped.returncode == 0 and stopped.stdout == f"stopped the embedded Redis server in {folder}\n"
    assert not server_running(folder)
    again = redbike_cli(deeper, "embedded", "status")
    assert again.returncode == 1 and again.stdout == f"not running ({folder})\n"


def test_config_with_redis_stanza_starts_no_embedded_server(project, redis_server):
    (project / ".redbike.conf").write_text(f"[redbike-redis]\nurl = {redis_server.url}\n")
    result = redbike_cli(project, "schedules")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert not (project / ".redbike").exists()


def test_demo_says_the_embedded_server_still_runs(project):
    done = redbike_cli(project, "demo", "--seconds", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"the embedded Redis server in {project / '.redbike'} still runs (it keeps the demo's data); "
        "stop it with 'redbike embedded stop'"
    ) in done.stdout
    assert server_running(str(project / ".redbike"))
