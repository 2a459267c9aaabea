"""Redis servers the TLS, ACL and Sentinel tests start themselves: Debian's
redis-server 7 (built with TLS; also runs as redis-sentinel), a test CA and
certificates made with the openssl command, and a config file for them.
No binary is a failure, never a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import free_port, wait_for, write_config

REDIS7 = "/usr/bin/redis-server"  # Debian's package (.ci/run installs it)
SENTINEL = "/usr/bin/redis-sentinel"  # Debian's redis-sentinel package


def redis7_binary() -> str:
    """REDBIKE_TEST_REDIS7_SERVER, else Debian's redis-server: a Redis >= 7 built with TLS."""
    path = os.environ.get("REDBIKE_TEST_REDIS7_SERVER", REDIS7)
    if not os.access(path, os.X_OK):
        pytest.fail(f"no redis-server 7 at {path} (apt-get install redis-server, or set REDBIKE_TEST_REDIS7_SERVER)")
    return path


def sentinel_command() -> list[str]:
    """Debian's redis-sentinel, else (REDBIKE_TEST_REDIS7_SERVER set) that server in sentinel mode."""
    if "REDBIKE_TEST_REDIS7_SERVER" not in os.environ:
        if not os.access(SENTINEL, os.X_OK):
            pytest.fail(f"no redis-sentinel at {SENTINEL} (apt-get install redis-sentinel)")
        return [SENTINEL]
    return [redis7_binary(), "--sentinel"]


def pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


class Server:
    """One redis-server (or sentinel) process: ``args`` after the config
    file, a log in ``folder``; ready when ``client_kwargs`` can PING it."""

    def __init__(self, folder: Path, args: list[str], *, port: int | None = None,
                 command: list[str] | None = None, client_kwargs: dict[str, Any] | None = None,
                 config: str = "") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = port or free_port()
        self.args = args
        self.command = command or [redis7_binary()]
        self.client_kwargs = {"host": "127.0.0.1", "port": self.port, **(client_kwargs or {})}
        self.config = config  # lines of its config file, after the defaults
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        path = self.folder / "redis.conf"
        if not path.exists():  # a sentinel rewrites its config: kept across restarts
            path.write_text(f"port {self.port}\ndir {self.folder}\nbind 127.0.0.1\nsave \"\"\nappendonly no\n{self.config}")
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen([*self.command, str(path), *self.args],
                                            stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.process and self.process.poll() is None and pings(self.client()),
                 what=f"{self.command[-1]} on port {self.port}: {self.log()[-500:]}")
        return self

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(**{**self.client_kwargs, "decode_responses": True, **kwargs})

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
        if self.process:
            self.process.wait(10)


def make_certs(folder: Path) -> dict[str, Path]:
    """A test CA and a server and a client certificate it signed (for 127.0.0.1)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not shutil.which("openssl"):
        pytest.fail("no openssl command to make the test certificates")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=redbike test CA",
            "-keyout", "ca.key", "-out", "ca.crt")
    (folder / "san.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=redbike test {name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt")
    return {name: folder / name for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def write_redis_config(folder: Path, prefix: str, redis_lines: str, **kwargs: Any) -> Path:
    """write_config, with ``redis_lines`` as its [redbike-redis] stanza."""
    write_config(folder, prefix, "redis://unused", **kwargs)
    path = folder / ".redbike.conf"
    text = path.read_text()
    path.write_text(text[: text.index("[redbike-redis]")] + "[redbike-redis]\n" + redis_lines)
    return folder
