import logging
import os
import socket
import textwrap
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from redbike import embedded
from redbike.clients import check_reachable, connect, describe_client, keepalive_options
from redbike.config import Config, ConfigError, load_config


def write(tmp_path, text, name="redbike.conf"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


# --- load_config: files -------------------------------------------------------------


def test_defaults_when_no_default_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None) == Config(
        prefix="redbike", worker=None, timefile=None, default_timeout=10.0, redis={}
    )


def test_default_file_in_cwd_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".redbike.conf").write_text("[redbike]\nprefix = fromcwd\n")
    assert load_config(None).prefix == "fromcwd"


def test_explicit_missing_file_is_an_error(tmp_path):
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"config file {missing!r} not found"


def test_unreadable_path_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        load_config(str(tmp_path))  # a directory
    assert "\n" not in str(info.value)


def test_malformed_file_is_one_line_error(tmp_path):
    path = write(tmp_path, "prefix = x\n[redbike]\n")
    with pytest.raises(ConfigError, match="malformed config file") as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_duplicate_key_is_malformed(tmp_path):
    path = write(tmp_path, "[redbike]\nprefix = a\nprefix = b\n")
    with pytest.raises(ConfigError, match="malformed config file.*prefix"):
        load_config(path)


# --- [redbike] ------------------------------------------------------------------------


def test_main_stanza_keys(tmp_path):
    path = write(
        tmp_path,
        """
        [redbike]
        prefix = myapp
        worker = examples.worker:Echo('A:A:B')
        timefile: /var/lib/redbike/time
        default-timeout: 2.5
        """,
    )
    config = load_config(path)
    assert config == Config(
        prefix="myapp",
        worker="examples.worker:Echo('A:A:B')",
        timefile="/var/lib/redbike/time",
        default_timeout=2.5,
        redis={},
    )


def test_underscore_spelling_accepted(tmp_path):
    path = write(tmp_path, "[redbike]\ndefault_timeout = 7\n")
    assert load_config(path).default_timeout == 7.0


def test_empty_worker_and_timefile_mean_none(tmp_path):
    path = write(tmp_path, "[redbike]\nworker =\ntimefile =\n")
    config = load_config(path)
    assert config.worker is None and config.timefile is None


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", "", "0.0001", "1e9"])
def test_bad_default_timeout(tmp_path, value):
    path = write(tmp_path, f"[redbike]\ndefault-timeout = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "default-timeout" in message and repr(value) in message
    assert "seconds from 0.001 to 31622400" in message


def test_empty_prefix_rejected(tmp_path):
    path = write(tmp_path, "[redbike]\nprefix =\n")
    with pytest.raises(ConfigError, match="prefix.*must not be empty"):
        load_config(path)


def test_unknown_main_key_rejected(tmp_path):
    path = write(tmp_path, "[redbike]\ndefault-timout = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'default-timout'"):
        load_config(path)


def test_other_sections_ignored(tmp_path):
    path = write(
        tmp_path,
        """
        [DEFAULT]
        host = leaked.example
        [othertool]
        port = notanumber
        weird = %(x)s
        [redbike]
        prefix = p
        """,
    )
    config = load_config(path)
    assert config.prefix == "p"
    # [DEFAULT] must not leak into [redbike-redis] (which is absent => embedded)
    assert config.redis == {}


def test_interpolation_off(tmp_path):
    path = write(
        tmp_path,
        """
        [redbike]
        prefix = a%b
        [redbike-redis]
        password = p%(user)s%%x
        """,
    )
    config = load_config(path)
    assert config.prefix == "a%b"
    assert config.redis == {"password": "p%(user)s%%x"}


# --- [redbike-redis] ------------------------------------------------------------------


def test_redis_keys_and_conversions(tmp_path):
    path = write(
        tmp_path,
        """
        [redbike-redis]
        host = redis.example
        port = 6380
        db = 3
        password = s3cret
        username = bob
        socket_timeout = 2.5
        socket-connect-timeout = 1
        health_check_interval = 15
        ssl = yes
        ssl_check_hostname = off
        ssl_certfile = /etc/c.pem
        ssl_keyfile = /etc/k.pem
        ssl_ca_certs = /etc/ca.pem
        ssl_cert_reqs = required
        client_name = redbike-test
        """,
    )
    settings = load_config(path).redis
    assert settings == {
        "host": "redis.example",
        "port": 6380,
        "db": 3,
        "password": "s3cret",
        "username": "bob",
        "socket_timeout": 2.5,
        "socket_connect_timeout": 1.0,
        "health_check_interval": 15.0,
        "ssl": True,
        "ssl_check_hostname": False,
        "ssl_certfile": "/etc/c.pem",
        "ssl_keyfile": "/etc/k.pem",
        "ssl_ca_certs": "/etc/ca.pem",
        "ssl_cert_reqs": "required",
        "client_name": "redbike-test",
    }
    assert type(settings["port"]) is int and type(settings["socket_timeout"]) is float


@pytest.mark.parametrize(
    "text,expected",
    [
        ("true", True),
        ("Yes", True),
        ("1", True),
        ("on", True),
        ("false", False),
        ("NO", False),
        ("0", False),
        ("off", False),
    ],
)
def test_boolean_spellings(tmp_path, text, expected):
    path = write(tmp_path, f"[redbike-redis]\nssl = {text}\n")
    assert load_config(path).redis == {"ssl": expected}


@pytest.mark.parametrize(
    "key,value,kind",
    [
        ("port", "63x79", "integer"),
        ("db", "1.5", "integer"),
        ("socket_timeout", "soon", "number of seconds above 0"),
        ("health_check_interval", "-3", "number of seconds from 0"),
        ("ssl", "maybe", "true/false"),
        ("port", "0", "from 1 to 65535"),
        ("port", "65536", "from 1 to 65535"),
        ("db", "-1", "from 0"),
        ("socket_read_size", "0", "from 1"),
        ("max_connections", "0", "from 1"),
        ("protocol", "4", "from 2 to 3"),
        ("socket_timeout", "0", "above 0"),
        ("socket_timeout", "86401", "up to 86400"),
        ("socket_connect_timeout", "1e300", "up to 86400"),
        ("socket_connect_timeout", "inf", "up to 86400"),
        ("health_check_interval", "nan", "from 0"),
        ("encoding", "rot13", "text encoding"),
        ("encoding", "no-such-codec", "text encoding"),
        ("encoding_errors", "bogus", "error handler"),
    ],
)
def test_bad_redis_values(tmp_path, key, value, kind):
    path = write(tmp_path, f"[redbike-redis]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert key in message and repr(value) in message and kind in message


def test_unknown_redis_key_rejected(tmp_path):
    path = write(tmp_path, "[redbike-redis]\nhots = localhost\n")
    with pytest.raises(ConfigError, match="unknown key 'hots'.*redis.Redis"):
        load_config(path)


@pytest.mark.parametrize("key", ["decode_responses", "connection_pool", "retry"])
def test_object_valued_redis_keys_rejected(tmp_path, key):
    path = write(tmp_path, f"[redbike-redis]\n{key} = x\n")
    with pytest.raises(ConfigError, match=f"{key}.*cannot be set"):
        load_config(path)


@pytest.mark.parametrize(
    "url", ["redis://user:pa%40ss@host:6379/0", "rediss://h:6380/1", "unix:///tmp/r.sock"]
)
def test_url_form(tmp_path, url):
    path = write(tmp_path, f"[redbike-redis]\nurl = {url}\nsocket_connect_timeout = 3\n")
    assert load_config(path).redis == {"url": url, "socket_connect_timeout": 3.0}


def test_bad_url_scheme(tmp_path):
    path = write(tmp_path, "[redbike-redis]\nurl = http://host:6379\n")
    with pytest.raises(ConfigError, match="url.*redis://.*'http://host:6379'"):
        load_config(path)


# --- connect / check_reachable -------------------------------------------------------


def test_connect_with_settings_builds_client():
    client = connect({"host": "h.example", "port": 6390, "db": 2, "password": "pw"})
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["host"] == "h.example" and kwargs["port"] == 6390 and kwargs["db"] == 2
    assert kwargs["password"] == "pw"
    assert kwargs["decode_responses"] is True
    assert kwargs["socket_timeout"] == 30  # a dead connection cannot block a read for long
    assert kwargs["health_check_interval"] == 30
    assert kwargs["socket_keepalive"] is True
    assert kwargs["socket_keepalive_options"] == keepalive_options()


def test_keepalive_options_probe_a_dropped_connection_within_a_minute():
    options = keepalive_options()
    idle = options.get(getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", -1)), 0)
    assert idle and idle + options[socket.TCP_KEEPINTVL] * options[socket.TCP_KEEPCNT] <= 60


def test_connect_unix_socket_has_timeout_but_no_keepalive():
    for settings in ({"unix_socket_path": "/tmp/x.sock"}, {"url": "unix:///tmp/x.sock"}):
        kwargs = connect(settings).connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 30
        assert "socket_keepalive_options" not in kwargs


def test_connect_keepalive_can_be_turned_off():
    kwargs = connect({"host": "h", "socket_keepalive": False}).connection_pool.connection_kwargs
    assert kwargs["socket_keepalive"] is False


def test_connect_url_form_gets_keepalive():
    kwargs = connect({"url": "redis://h.example:6391/4"}).connection_pool.connection_kwargs
    assert kwargs["socket_keepalive"] is True and kwargs["socket_keepalive_options"] == keepalive_options()
    assert kwargs["socket_timeout"] == 30


def test_connect_keeps_configured_timeouts():
    client = connect({"socket_timeout": 4.0, "health_check_interval": 5.0})
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 4.0 and kwargs["health_check_interval"] == 5.0


def test_connect_url_form():
    client = connect({"url": "redis://u:p%25w@h.example:6391/4", "client_name": "x"})
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("h.example", 6391, 4)
    assert (kwargs["username"], kwargs["password"]) == ("u", "p%w")
    assert kwargs["client_name"] == "x" and kwargs["decode_responses"] is True


def test_connect_unix_url():
    client = connect({"url": "unix:///tmp/some.sock?db=1"})
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["path"] == "/tmp/some.sock" and kwargs["db"] == 1


def test_connect_bad_url_is_config_error():
    with pytest.raises(ConfigError, match="invalid Redis settings"):
        connect({"url": "redis://h/0?db=notanint"})


def test_check_reachable_unreachable_is_one_line(tmp_path):
    sock = str(tmp_path / "nobody.sock")
    # No retries: redis-py's default retry-with-backoff would only slow the test.
    client = connect({"unix_socket_path": sock, "retry": Retry(NoBackoff(), 0)})
    with pytest.raises(ConfigError) as info:
        check_reachable(client)
    message = str(info.value)
    assert message.startswith(f"cannot reach Redis at unix socket {sock}: ")
    assert "\n" not in message


def test_check_reachable_tcp_message():
    # Port 1 on localhost: nothing listens there, so the connection is refused.
    client = connect({"host": "127.0.0.1", "port": 1, "retry": Retry(NoBackoff(), 0)})
    with pytest.raises(ConfigError, match=r"^cannot reach Redis at 127\.0\.0\.1:1: "):
        check_reachable(client)


@pytest.fixture
def embedded_dir(tmp_path):
    folder = str(tmp_path / "rb")
    yield folder
    embedded.stop_server(folder)


def test_connect_empty_uses_embedded_server(embedded_dir, caplog):
    with caplog.at_level(logging.INFO, logger="redbike.clients"):
        client = connect({}, embedded_dir=embedded_dir)
    check_reachable(client)
    assert client.set("k", "v") is True
    assert client.get("k") == "v"  # str, not bytes: decode_responses
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["path"] == os.path.join(os.path.abspath(embedded_dir), "redis.sock")
    assert kwargs["socket_timeout"] == 30
    messages = [r.getMessage() for r in caplog.records if r.name == "redbike.clients"]
    expected = (
        "redbike: no Redis configured; using the embedded Redis server in "
        f"{os.path.abspath(embedded_dir)} (socket redis.sock)"
    )
    assert messages == [expected]
    client.close()


def test_pubsub_wait_outlives_a_short_socket_timeout(redis_server):
    # Workers and the dispatcher wait on pub/sub with get_message(timeout=...):
    # a socket_timeout shorter than the wait must not break it.
    client = connect({"url": redis_server.url, "socket_timeout": 0.5})
    pubsub = client.pubsub()
    pubsub.subscribe("redbike-test-idle")
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    began = time.monotonic()
    assert pubsub.get_message(timeout=1.5) is None
    assert time.monotonic() - began >= 1.4
    client.publish("redbike-test-idle", "hi")
    assert pubsub.get_message(timeout=2)["data"] == "hi"
    pubsub.close()
    client.close()


def test_connect_missing_binary_is_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REDBIKE_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(ConfigError, match="REDBIKE_REDIS_SERVER"):
        connect({}, embedded_dir=str(tmp_path / "rb"))


def test_shipped_example_config_parses():
    example = os.path.join(os.path.dirname(__file__), os.pardir, "conf", "redbike.conf")
    assert load_config(example) == Config(
        prefix="redbike",
        worker="examples.worker:Echo('A:A:B')",
        timefile=".redbike.time",
        default_timeout=10.0,
        redis={},  # all of [redbike-redis] is commented out: embedded server
    )


# --- Sentinel and TLS settings ----------------------------------------------------------


def test_sentinel_keys(tmp_path):
    path = write(tmp_path, """\
        [redbike-redis]
        sentinels = 10.0.0.1:26379, [::1]:26380,s3.example:26381
        service = mymaster
        sentinel-password = sp
        password = pw
        ssl = true
        ssl_ca_certs = /etc/ca.crt
        """)
    assert load_config(path).redis == {
        "sentinels": [("10.0.0.1", 26379), ("::1", 26380), ("s3.example", 26381)], "service": "mymaster",
        "sentinel_password": "sp", "password": "pw", "ssl": True, "ssl_ca_certs": "/etc/ca.crt",
    }


@pytest.mark.parametrize("text, error", [
    ("sentinels = h:26379\n", "sentinels and service go together; service is missing"),
    ("service = mymaster\n", "sentinels and service go together; sentinels is missing"),
    ("sentinel_password = x\n", "sentinel_password .* needs sentinels and service"),
    ("sentinels = h:26379\nservice = m\nurl = redis://h:6379\n", "url cannot be set with sentinels"),
    ("sentinels = h:26379\nservice = m\nport = 6379\n", "port cannot be set with sentinels"),
    ("sentinels = h\nservice = m\n", r"sentinels .* must be host:port\[,host:port...\], got 'h'"),
    ("sentinels = h:0\nservice = m\n", "must be host:port"),
    ("sentinels = h:1,\nservice = m\n", "must be host:port"),
])
def test_bad_sentinel_settings(tmp_path, text, error):
    path = write(tmp_path, "[redbike-redis]\n" + text)
    with pytest.raises(ConfigError, match=error):
        load_config(path)


def test_connect_through_sentinel_builds_a_primary_client():
    from redbike.sentinel import PrimaryConnection, PrimarySSLConnection

    settings = {"sentinels": [("127.0.0.1", 26379)], "service": "mymaster", "sentinel_password": "sp",
                "password": "pw"}
    client = connect(settings)
    pool = client.connection_pool
    assert pool.service_name == "mymaster" and pool.connection_class is PrimaryConnection
    assert pool.connection_kwargs["password"] == "pw" and pool.connection_kwargs["socket_timeout"] == 30
    sentinel = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert sentinel["password"] == "sp" and sentinel["socket_timeout"] == 2
    assert "sentinels" in settings  # the settings are not consumed
    assert describe_client(client) == "Sentinel service mymaster (sentinels 127.0.0.1:26379)"
    tls = connect({**settings, "ssl": True, "ssl_ca_certs": "/etc/ca.crt"}).connection_pool
    assert tls.connection_class is PrimarySSLConnection and tls.connection_kwargs["ssl_ca_certs"] == "/etc/ca.crt"


def test_connect_tls_settings_reach_the_connections():
    client = connect({"url": "rediss://h.example:6380/0", "ssl_ca_certs": "/etc/ca.crt",
                      "ssl_certfile": "/etc/c.crt", "ssl_keyfile": "/etc/c.key", "ssl_cert_reqs": "required"})
    pool = client.connection_pool
    assert pool.connection_class is redis.SSLConnection
    connection = pool.make_connection()  # what a slot's own connection is made of, too
    assert (connection.ca_certs, connection.certfile, connection.keyfile) == ("/etc/ca.crt", "/etc/c.crt",
                                                                             "/etc/c.key")
