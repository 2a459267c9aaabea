"""TLS: a redis-server with only a TLS port (and a test CA made here), and
every redbike command and daemon reaching it through `rediss://` and the
ssl_* settings of [redbike-redis]: the worker's slots (the zygote's
children, each with a connection of its own) included."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import wait_for
from servers import Server, make_certs, write_redis_config
from test_processes import cli, cli_ok, ends, halt, leads, records

from redbike.keys import Keys


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[Server]:
    certs = make_certs(tmp_path / "certs")
    server = Server(
        tmp_path / "tls-redis",
        [],
        client_kwargs={"ssl": True, "ssl_ca_certs": str(certs["ca.crt"]), "ssl_certfile": str(certs["client.crt"]),
                       "ssl_keyfile": str(certs["client.key"])},
    )
    # No plain port: whatever reaches this server speaks TLS, with a client
    # certificate of the test CA (tls-auth-clients defaults to yes).
    server.args = ["--port", "0", "--tls-port", str(server.port), "--tls-cert-file", str(certs["server.crt"]),
                   "--tls-key-file", str(certs["server.key"]), "--tls-ca-cert-file", str(certs["ca.crt"])]
    server.certs = certs  # type: ignore[attr-defined]
    server.start()
    yield server
    server.kill()


def test_commands_and_daemons_work_over_tls(tmp_path, tls_server, client, prefix, daemons, testlog, process_env):
    env = process_env
    certs = tls_server.certs
    home = write_redis_config(
        tmp_path / "home", prefix,
        f"url = rediss://127.0.0.1:{tls_server.port}/0\nssl_ca_certs = {certs['ca.crt']}\n"
        f"ssl-certfile = {certs['client.crt']}\nssl_keyfile = {certs['client.key']}\nssl_cert_reqs = required\n",
    )
    keys = Keys(prefix)
    own = tls_server.client()
    dispatcher = daemons.start("dispatch", cwd=home)
    worker = daemons.start("work", "--concurrency", "2", cwd=home)
    wait_for(lambda: leads(own, keys), what="the dispatcher to lead over TLS")

    for n in range(4):
        cli_ok(home, env, "set", f"sleep1-{n}:A", "NOW")
    cli_ok(home, env, "set", "secondly:B", "FREQ=SECONDLY;INTERVAL=1")
    wait_for(lambda: all(ends(client, testlog, f"sleep1-{n}:A") for n in range(4))
             and Counter(r["job"] for r in records(client, testlog) if r["event"] == "end")["secondly:B"] >= 2,
             timeout=20, what="the jobs to run over TLS")
    # Two slots ran them (a job takes a second: the other slot takes the next): the zygote's children
    # connected over TLS too.
    assert len({r["pid"] for r in records(client, testlog)}) == 2

    statuses = {row[0]: row[1] for row in csv.reader(io.StringIO(cli_ok(home, env, "statuses")))}
    assert all(statuses[f"sleep1-{n}:A"] == "END" for n in range(4)), statuses
    assert json.loads(cli_ok(home, env, "tell", "sleep1-0:A"))["status"].startswith("END:")
    assert json.loads(cli_ok(home, env, "info", "--json"))["redis"]["address"] == f"127.0.0.1:{tls_server.port}"
    assert own.hget(keys.statuses, "sleep1-0:A").startswith("END:")

    # A plain connection to the TLS port fails, and so does TLS without the client certificate.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=tls_server.port, socket_timeout=5).ping()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=tls_server.port, ssl=True, ssl_ca_certs=str(certs["ca.crt"]), socket_timeout=5).ping()
    # ... and so does redbike, configured without TLS.
    plain = write_redis_config(tmp_path / "plain", prefix, f"url = redis://127.0.0.1:{tls_server.port}/0\n")

    result = cli(plain, env, "statuses")
    assert result.returncode != 0 and "cannot reach Redis" in result.stderr, result.stderr
    halt(home, env, dispatcher, worker)
