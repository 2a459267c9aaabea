"""Reading redbike's ini config file and turning it into a Redis client.

The file (default ``.redbike.conf`` in the current directory) has two stanzas:

``[redbike]``
    ``prefix``, ``worker``, ``timefile``, ``default-timeout``.
``[redbike-redis]``
    keyword arguments of ``redis.Redis`` (``host``, ``port``, ``password``,
    ``ssl``, ...) or ``url`` plus extra keyword arguments for
    ``redis.Redis.from_url``.  With no such stanza, redbike runs on the
    embedded Redis server kept in ``./.redbike/`` (see :mod:`redbike.embedded`).

Every other section is ignored, so the file can be shared with other tools.
Keys may be spelled with ``-`` or ``_`` (``default-timeout`` or
``default_timeout``, ``ssl-ca-certs`` or ``ssl_ca_certs``).
"""

from __future__ import annotations

import configparser
import inspect
import logging
import math
import os
from dataclasses import dataclass, field

import redis

from . import embedded

logger = logging.getLogger(__name__)

DEFAULT_PATH = ".redbike.conf"
MAIN_SECTION = "redbike"
REDIS_SECTION = "redbike-redis"

# configparser copies every key of its default section into every other
# section.  A shared config file's [DEFAULT] (meant for another tool) would
# thus leak host/port/... into [redbike-redis]; naming the default section
# something no one writes makes [DEFAULT] an ordinary, ignored section.
_NO_DEFAULT_SECTION = "redbike: no default section"

_INT_KEYS = frozenset({"port", "db", "socket_read_size", "max_connections", "protocol"})
_FLOAT_KEYS = frozenset({"socket_timeout", "socket_connect_timeout", "health_check_interval"})
_BOOL_KEYS = frozenset(
    {
        "ssl",
        "ssl_check_hostname",
        "ssl_validate_ocsp",
        "ssl_validate_ocsp_stapled",
        "socket_keepalive",
        "retry_on_timeout",
        "single_connection_client",
        "legacy_responses",
    }
)
# redis.Redis arguments that take Python objects (or that redbike must control
# itself): a string from a config file cannot express them, and passing one
# would only fail later with an obscure error.
_NOT_CONFIGURABLE = frozenset(
    {
        "decode_responses",
        "connection_pool",
        "retry",
        "retry_on_error",
        "redis_connect_func",
        "credential_provider",
        "cache",
        "cache_config",
        "event_dispatcher",
        "socket_keepalive_options",
        "ssl_include_verify_flags",
        "ssl_exclude_verify_flags",
        "ssl_ocsp_context",
        "ssl_min_version",
        "driver_info",
        "maint_notifications_config",
        "oss_cluster_maint_notifications_handler",
    }
)
_URL_SCHEMES = ("redis://", "rediss://", "unix://")

# Used when nothing else is configured: a dead connection (e.g. after a
# NAT/firewall silently dropped it) is noticed before a command is sent on it.
DEFAULT_HEALTH_CHECK_INTERVAL = 30


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line meant for the user."""


@dataclass
class Config:
    prefix: str = "redbike"
    worker: str | None = None
    timefile: str | None = None
    default_timeout: float = 10.0
    redis: dict[str, object] = field(default_factory=dict)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _redis_parameters() -> frozenset[str]:
    params = inspect.signature(redis.Redis.__init__).parameters
    return frozenset(
        name
        for name, p in params.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def _normalize(key: str) -> str:
    return key.strip().replace("-", "_")


def _read_parser(path: str) -> configparser.ConfigParser:
    # interpolation=None: a '%' in a password must be taken literally.
    parser = configparser.ConfigParser(interpolation=None, default_section=_NO_DEFAULT_SECTION)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path!r}: {exc.strerror or _one_line(exc)}"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read config file {path!r}: not UTF-8 text ({exc.reason})"
        ) from None
    except configparser.Error as exc:
        raise ConfigError(f"malformed config file {path!r}: {_one_line(exc.message)}") from None
    return parser


def _parse_main(section: configparser.SectionProxy, path: str, config: Config) -> None:
    for raw_key, value in section.items():
        key = _normalize(raw_key)
        value = value.strip()
        where = f"[{MAIN_SECTION}] {raw_key} in {path!r}"
        if key == "prefix":
            if not value:
                raise ConfigError(f"{where} must not be empty")
            config.prefix = value
        elif key == "worker":
            config.worker = value or None
        elif key == "timefile":
            config.timefile = os.path.expanduser(value) if value else None
        elif key == "default_timeout":
            try:
                timeout = float(value)
            except ValueError:
                timeout = math.nan
            if not (math.isfinite(timeout) and timeout > 0):
                raise ConfigError(f"{where} must be a positive number, got {value!r}")
            config.default_timeout = timeout
        else:
            # Rejected rather than ignored: a misspelt key would otherwise
            # silently fall back to its default.
            raise ConfigError(
                f"unknown key {raw_key!r} in [{MAIN_SECTION}] of {path!r} "
                "(known: prefix, worker, timefile, default-timeout)"
            )


def _convert(key: str, raw_key: str, value: str, path: str) -> object:
    where = f"[{REDIS_SECTION}] {raw_key} in {path!r}"
    if key in _INT_KEYS:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
    if key in _FLOAT_KEYS:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number >= 0):
            raise ConfigError(f"{where} must be a non-negative number, got {value!r}")
        return number
    if key in _BOOL_KEYS:
        state = configparser.ConfigParser.BOOLEAN_STATES.get(value.lower())
        if state is None:
            raise ConfigError(f"{where} must be true/false/yes/no/on/off/1/0, got {value!r}")
        return state
    return value


def _parse_redis(section: configparser.SectionProxy, path: str) -> dict[str, object]:
    accepted = _redis_parameters()
    settings: dict[str, object] = {}
    for raw_key, raw_value in section.items():
        key = _normalize(raw_key)
        value = raw_value.strip()
        if key == "url":
            if not value.startswith(_URL_SCHEMES):
                raise ConfigError(
                    f"[{REDIS_SECTION}] url in {path!r} must start with "
                    f"redis://, rediss:// or unix://, got {value!r}"
                )
            settings["url"] = value
            continue
        if key not in accepted:
            raise ConfigError(
                f"unknown key {raw_key!r} in [{REDIS_SECTION}] of {path!r}: "
                "not a keyword argument of redis.Redis"
            )
        if key in _NOT_CONFIGURABLE:
            raise ConfigError(
                f"key {raw_key!r} in [{REDIS_SECTION}] of {path!r} cannot be set from a config file"
            )
        settings[key] = _convert(key, raw_key, value, path)
    return settings


def load_config(path: str | None) -> Config:
    """Read the config file at ``path`` (``None``: ``.redbike.conf`` if present)."""
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            logger.debug("no %s in %s; using defaults", DEFAULT_PATH, os.getcwd())
            return Config()
        path = DEFAULT_PATH
    parser = _read_parser(path)
    config = Config()
    if parser.has_section(MAIN_SECTION):
        _parse_main(parser[MAIN_SECTION], path, config)
    if parser.has_section(REDIS_SECTION):
        config.redis = _parse_redis(parser[REDIS_SECTION], path)
    return config


def connect(settings: dict[str, object], *, embedded_dir: str = ".redbike") -> redis.Redis:
    """A client (``decode_responses=True``) for ``settings``; empty: the embedded server.

    Does not contact the server (except to start the embedded one); use
    :func:`check_reachable` for that.
    """
    if not settings:
        try:
            socket_path = embedded.ensure_server(embedded_dir)
        except embedded.EmbeddedError as exc:
            raise ConfigError(str(exc)) from exc
        folder = os.path.dirname(socket_path)
        logger.info(
            "redbike: no Redis configured; using the embedded Redis server in %s (socket %s)",
            folder,
            os.path.basename(socket_path),
        )
        settings = {"unix_socket_path": socket_path}
    kwargs = dict(settings)
    url = kwargs.pop("url", None)
    # redis-py >= 8 defaults socket_timeout to 5 s, which would break the
    # long blocking reads (BLPOP, XREADGROUP BLOCK, ...) workers rely on.
    kwargs.setdefault("socket_timeout", None)
    kwargs.setdefault("health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL)
    kwargs["decode_responses"] = True
    try:
        if url is not None:
            return redis.Redis.from_url(str(url), **kwargs)
        return redis.Redis(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid Redis settings: {_one_line(exc)}") from exc


def describe_client(client: redis.Redis) -> str:
    """Where ``client`` connects to, for messages: ``host:port`` or the socket path."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix socket {kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def check_reachable(client: redis.Redis) -> None:
    """PING the server; raise :class:`ConfigError` (one line) if that fails."""
    try:
        client.ping()
    except redis.RedisError as exc:
        # Covers ConnectionError, TimeoutError and AuthenticationError and
        # also e.g. "-ERR ... AUTH" replies: none leaves a usable connection.
        reason = _one_line(exc) or type(exc).__name__
        raise ConfigError(f"cannot reach Redis at {describe_client(client)}: {reason}") from exc
