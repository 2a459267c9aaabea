"""Reading redbike's ini config file (clients.py turns its Redis settings into
a client).

The file (default ``.redbike.conf`` in the current directory) has two stanzas:

``[redbike]``
    ``prefix``, ``worker``, ``timefile``, ``default-timeout``; the defaults
    of a job's policy, ``misfire`` (once, skip:GRACE, all, all:N) and
    ``retries``; ``retry-backoff`` and ``retry-backoff-max`` (seconds);
    ``keep-finished`` (seconds) and ``trail-length`` (events per job);
    ``max-data-bytes`` (the largest payload ``set`` takes);
    ``api-token``, the token ``redbike serve``'s write endpoints require.
``[redbike-redis]``
    keyword arguments of ``redis.Redis`` (``host``, ``port``, ``password``,
    ``ssl``, ``ssl_ca_certs``, ...) or ``url`` (``rediss://`` for TLS) plus
    extra keyword arguments for ``redis.Redis.from_url``; or, for a primary
    found through Redis Sentinel, ``sentinels = host:port,host:port``,
    ``service = NAME`` (and ``sentinel_username``/``sentinel_password`` for the
    sentinels themselves) plus the keyword arguments of the primary's
    connections; or, for a Redis Cluster, ``url = redis+cluster://host:port,...``
    or ``cluster = true`` with ``host``/``port`` (see :mod:`redbike.cluster`;
    the prefix must then hold a hash tag).  With no such stanza, redbike runs on the
    embedded Redis server kept in ``./.redbike/`` (see :mod:`redbike.embedded`).

``[redbike-nodes]`` (the node model) is read by :mod:`redbike.nodeconfig`.
Every other section is ignored, so the file can be shared with other tools.
Keys may be spelled with ``-`` or ``_`` (``default-timeout`` or
``default_timeout``, ``ssl-ca-certs`` or ``ssl_ca_certs``).  Values are checked
when the file is read: numbers within their range (``port`` 1..65535,
timeouts finite, > 0 and at most a day), ``encoding`` a known text encoding,
``encoding_errors`` a known error handler.
"""

from __future__ import annotations

import codecs
import configparser
import inspect
import logging
import math
import os
from dataclasses import dataclass, field

import redis

from . import cluster, sentinel
from .claims import MAX_TIMEOUT, MIN_TIMEOUT
from .occurrences import Retry
from .records import DEFAULT_MAX_DATA_BYTES, check_misfire
from .scripts import Retention
from .shards import MAX_SHARDS, check_prefix

logger = logging.getLogger(__name__)

DEFAULT_PATH = ".redbike.conf"
MAIN_SECTION = "redbike"
REDIS_SECTION = "redbike-redis"

# configparser copies every key of its default section into every other
# section.  A shared config file's [DEFAULT] (meant for another tool) would
# thus leak host/port/... into [redbike-redis]; naming the default section
# something no one writes makes [DEFAULT] an ordinary, ignored section.
_NO_DEFAULT_SECTION = "redbike: no default section"

DAY = 86400.0
# Inclusive ranges: a value outside them fails late and obscurely (port 0,
# socket_read_size 0 reads nothing and hangs, a huge timeout overflows).
_INT_KEYS: dict[str, tuple[int, int]] = {
    "port": (1, 65535),
    "db": (0, 2**31 - 1),
    "socket_read_size": (1, 64 * 1024 * 1024),
    "max_connections": (1, 1_000_000),
    "protocol": (2, 3),
}
# Seconds, at most a day, and whether 0 is allowed: 0 disables health
# checks, but a zero socket timeout would make every read fail.
_FLOAT_KEYS: dict[str, bool] = {
    "socket_timeout": False,
    "socket_connect_timeout": False,
    "health_check_interval": True,
}
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
        "cluster",
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
_URL_SCHEMES = ("redis://", "rediss://", "unix://", *cluster.SCHEMES)
# What a cluster's nodes cannot have, or what contradicts them.
_NOT_WITH_CLUSTER = ("db", "unix_socket_path", "sentinels", "service")
# Keys of a deployment whose primary is found through Redis Sentinel; the
# other keys of the stanza are the primary's connection settings (TLS, AUTH).
_SENTINEL_KEYS = frozenset({"sentinels", "service", "sentinel_username", "sentinel_password"})
# Where the primary is: given by Sentinel, so these would contradict it.
_NOT_WITH_SENTINELS = ("url", "host", "port", "unix_socket_path")

class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line meant for the user."""


@dataclass
class Config:
    prefix: str = "redbike"
    worker: str | None = None
    timefile: str | None = None
    default_timeout: float = 10.0
    misfire: str = "once"
    retries: int = 0
    retry: Retry = field(default_factory=Retry)
    retention: Retention = field(default_factory=Retention)
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES
    redis: dict[str, object] = field(default_factory=dict)
    api_token: str | None = None
    shards: int = 1


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def redis_parameters() -> frozenset[str]:
    params = inspect.signature(redis.Redis.__init__).parameters
    return frozenset(
        name
        for name, p in params.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def _normalize(key: str) -> str:
    return key.strip().replace("-", "_")


def read_parser(path: str, keep_case: bool = False) -> configparser.ConfigParser:
    """The config file parsed (ConfigError, one line, if it cannot be).
    ``keep_case``: keys keep their case (the node names of [redbike-nodes])."""
    # interpolation=None: a '%' in a password must be taken literally.
    parser = configparser.ConfigParser(interpolation=None, default_section=_NO_DEFAULT_SECTION)
    if keep_case:
        parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path!r}: {exc.strerror or one_line(exc)}"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read config file {path!r}: not UTF-8 text ({exc.reason})"
        ) from None
    except configparser.Error as exc:
        raise ConfigError(f"malformed config file {path!r}: {one_line(exc.message)}") from None
    return parser


_MAIN_KEYS = ("prefix, worker, timefile, default-timeout, misfire, retries, retry-backoff, "
              "retry-backoff-max, keep-finished, trail-length, max-data-bytes, api-token, shards")
MAX_DATA_BYTES = 16 * 1024 * 1024  # the most max-data-bytes may be: a payload is read with its job on every claim
YEAR = 365 * DAY


def _seconds(value: str, where: str, high: float) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and 0 < number <= high):
        raise ConfigError(f"{where} must be a number of seconds above 0 and up to {high:g}, got {value!r}")
    return number


def _count(value: str, where: str, low: int, high: int) -> int:
    if not value.isdigit() or not low <= int(value) <= high:
        raise ConfigError(f"{where} must be an integer from {low} to {high}, got {value!r}")
    return int(value)


def _parse_policy(key: str, value: str, where: str, config: Config) -> bool:
    """The keys of a job's default policy and of retention; False for any other key."""
    if key == "misfire":
        try:
            config.misfire = check_misfire(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    elif key == "retries":
        config.retries = _count(value, where, 0, 1000)
    elif key == "retry_backoff":
        config.retry = Retry(_seconds(value, where, DAY), config.retry.backoff_max)
    elif key == "retry_backoff_max":
        config.retry = Retry(config.retry.backoff, _seconds(value, where, 30 * DAY))
    elif key == "keep_finished":
        config.retention = Retention(config.retention.trail_length, _seconds(value, where, 10 * YEAR))
    elif key == "trail_length":
        config.retention = Retention(_count(value, where, 1, 10000), config.retention.keep_finished)
    elif key == "max_data_bytes":
        config.max_data_bytes = _count(value, where, 1, MAX_DATA_BYTES)
    else:
        return False
    return True


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
        elif key == "shards":
            config.shards = _count(value, where, 1, MAX_SHARDS)
        elif key == "api_token":
            config.api_token = value or None
        elif key == "timefile":
            config.timefile = os.path.expanduser(value) if value else None
        elif key == "default_timeout":
            try:
                timeout = float(value)
            except ValueError:
                timeout = math.nan
            if not (math.isfinite(timeout) and MIN_TIMEOUT <= timeout <= MAX_TIMEOUT):
                raise ConfigError(f"{where} must be seconds from {MIN_TIMEOUT:g} to {MAX_TIMEOUT:.0f}, got {value!r}")
            config.default_timeout = timeout
        elif not _parse_policy(key, value, where, config):
            # Rejected rather than ignored: a misspelt key would otherwise
            # silently fall back to its default.
            raise ConfigError(f"unknown key {raw_key!r} in [{MAIN_SECTION}] of {path!r} (known: {_MAIN_KEYS})")


def _convert(key: str, raw_key: str, value: str, path: str) -> object:
    where = f"[{REDIS_SECTION}] {raw_key} in {path!r}"
    if key in _INT_KEYS:
        low, high = _INT_KEYS[key]
        try:
            integer = int(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if not low <= integer <= high:
            raise ConfigError(f"{where} must be an integer from {low} to {high}, got {value!r}")
        return integer
    if key in _FLOAT_KEYS:
        zero_allowed = _FLOAT_KEYS[key]
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not ((0 <= number if zero_allowed else 0 < number) and number <= DAY):
            smallest = "from 0" if zero_allowed else "above 0 and"
            raise ConfigError(f"{where} must be a number of seconds {smallest} up to {DAY:g}, got {value!r}")
        return number
    if key == "encoding":
        try:
            "".encode(value)  # a LookupError also for codecs such as rot13 that are not text encodings
        except LookupError:
            raise ConfigError(f"{where} must be a text encoding Python knows (e.g. utf-8), got {value!r}") from None
    if key == "encoding_errors":
        try:
            codecs.lookup_error(value)
        except LookupError:
            raise ConfigError(
                f"{where} must be a codec error handler (strict, replace, ignore, ...), got {value!r}"
            ) from None
    if key in _BOOL_KEYS:
        state = configparser.ConfigParser.BOOLEAN_STATES.get(value.lower())
        if state is None:
            raise ConfigError(f"{where} must be true/false/yes/no/on/off/1/0, got {value!r}")
        return state
    return value


def _check_sentinel(settings: dict[str, object], path: str) -> None:
    """``sentinels`` and ``service`` go together, and exclude an address of the primary."""
    if "sentinels" not in settings and "service" not in settings:
        for key in _SENTINEL_KEYS & settings.keys():
            raise ConfigError(f"[{REDIS_SECTION}] {key} in {path!r} needs sentinels and service")
        return
    for needed in ("sentinels", "service"):
        if not settings.get(needed):
            raise ConfigError(f"[{REDIS_SECTION}] in {path!r}: sentinels and service go together; {needed} is missing")
    for key in _NOT_WITH_SENTINELS:
        if key in settings:
            raise ConfigError(
                f"[{REDIS_SECTION}] in {path!r}: {key} cannot be set with sentinels (Sentinel names the primary)"
            )


def _parse_redis(section: configparser.SectionProxy, path: str) -> dict[str, object]:
    accepted = redis_parameters()
    settings: dict[str, object] = {}
    for raw_key, raw_value in section.items():
        key = _normalize(raw_key)
        value = raw_value.strip()
        if key == "sentinels":
            try:
                settings[key] = sentinel.addresses(value)
            except ValueError as exc:
                raise ConfigError(f"[{REDIS_SECTION}] {raw_key} in {path!r} {exc}") from None
            continue
        if key in _SENTINEL_KEYS:
            settings[key] = value
            continue
        if key == "url":
            if not value.startswith(_URL_SCHEMES):
                raise ConfigError(
                    f"[{REDIS_SECTION}] url in {path!r} must start with "
                    f"redis://, rediss://, unix:// or redis+cluster://, got {value!r}"
                )
            settings["url"] = value
            continue
        if key == "cluster":
            settings[key] = _convert(key, raw_key, value, path)
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
    _check_sentinel(settings, path)
    _check_cluster(settings, path)
    return settings


def _check_cluster(settings: dict[str, object], path: str) -> None:
    """A cluster (a redis+cluster:// url, or cluster = true with host and
    port) becomes ``settings['cluster']``: the list of its nodes given."""
    url = settings.get("url")
    if isinstance(url, str) and url.startswith(cluster.SCHEMES):
        if "cluster" in settings:
            raise ConfigError(f"[{REDIS_SECTION}] in {path!r}: cluster cannot be set with a redis+cluster:// url")
        try:
            nodes, tls = cluster.parse_url(settings.pop("url"))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"[{REDIS_SECTION}] url in {path!r} {exc}") from None
        settings["cluster"] = nodes
        if tls:
            settings["ssl"] = True
        if "host" in settings or "port" in settings:
            raise ConfigError(f"[{REDIS_SECTION}] in {path!r}: host and port cannot be set with a redis+cluster:// url")
    elif settings.pop("cluster", False) is True:
        if "url" in settings:
            raise ConfigError(f"[{REDIS_SECTION}] in {path!r}: cluster = true takes host and port, not a url "
                              "(or use url = redis+cluster://host:port,...)")
        settings["cluster"] = [(str(settings.pop("host", "localhost")),
                                int(settings.pop("port", cluster.DEFAULT_PORT)))]  # type: ignore[call-overload]
    else:
        return
    for key in _NOT_WITH_CLUSTER:
        if key in settings:
            raise ConfigError(f"[{REDIS_SECTION}] in {path!r}: {key} cannot be set with a Redis Cluster")


def load_config(path: str | None) -> Config:
    """Read the config file at ``path`` (``None``: ``.redbike.conf`` if present)."""
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            logger.debug("no %s in %s; using defaults", DEFAULT_PATH, os.getcwd())
            return Config()
        path = DEFAULT_PATH
    parser = read_parser(path)
    config = Config()
    if parser.has_section(MAIN_SECTION):
        _parse_main(parser[MAIN_SECTION], path, config)
    if parser.has_section(REDIS_SECTION):
        config.redis = _parse_redis(parser[REDIS_SECTION], path)
    try:
        check_prefix(config.prefix, config.shards)
    except ValueError as exc:
        raise ConfigError(f"{exc} (in {path!r})") from None
    return config
