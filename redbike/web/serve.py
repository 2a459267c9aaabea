"""``redbike serve``: the web app (app.py) run by uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import signal

import uvicorn

from ..api import Redbike
from ..overviews import parts_of
from ..sharded import ShardedRedbike
from .app import WebContext, create_app
from .security import LOOPBACK_HOSTS

log = logging.getLogger("redbike.serve")

DEFAULT_BIND = "127.0.0.1:8787"


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8787`` for IPv6) -> (host, port); ValueError with one line."""
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--bind must be HOST:PORT (e.g. {DEFAULT_BIND}), port 1 to 65535, not {text!r}")
    return host, int(port)


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(bike: Redbike | ShardedRedbike, bind: str, token: str | None) -> int:
    """Serve until SIGINT/SIGTERM."""
    host, port = parse_bind(bind)
    if token is None:
        log.warning("no API token (--token, or api-token in [redbike] of the config): the server is read-only")
    local = loopback(host)
    if not local:
        log.warning("listening on %s, not loopback: anyone who reaches it can read every job", host)
    app = create_app(WebContext.of(bike, token, LOOPBACK_HOSTS | {host.lower()} if local else None))
    shown = f"[{host}]" if ":" in host else host
    log.info("serving the API, UI and metrics on http://%s:%d/ (prefix %s)", shown, port,
             ", ".join(part.keys.prefix for part in parts_of(bike)))
    # uvicorn stops on SIGTERM, then raises it again with the handler it found:
    # this one makes that a clean exit (0), as for the other daemons.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    # log_config=None: uvicorn's loggers go through redbike's logging setup.
    uvicorn.run(app, host=host, port=port, log_config=None, server_header=False)
    return 0
