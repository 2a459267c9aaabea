"""Who may write: the API token and the cross-site check, shared by the API
and the UI's forms.

Reads are open (the server listens on loopback unless told otherwise). A
server on loopback answers only requests whose ``Host`` is a loopback name
(LOOPBACK_HOSTS): a page of another site whose name was made to resolve to
127.0.0.1 (DNS rebinding) would otherwise read the API as if it were the
same site.
Writes need ``Authorization: Bearer TOKEN`` with the token the server was
given (compared in constant time); a server given none is read-only. A
write whose ``Origin`` names another host than the request's ``Host`` is
refused whatever it carries: a page of another site must not drive the API
through the user's browser.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from starlette.requests import Request

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
READ_ONLY = "this server is read-only: start redbike serve with --token (or api-token in the config) to allow writes"


class ApiError(Exception):
    """An answer other than 2xx (app.py makes it JSON for the API): ``status``
    and one line for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Refused(ApiError):
    """A write that may not be done (401 or 403)."""


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def host_of(header: str) -> str:
    """The host of a ``Host`` header, without its port: ``[::1]:8787`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def cross_site(request: Request) -> bool:
    """Whether the request comes from a page of another site: its Origin
    header (browsers send it with every fetch() and form POST) names a host
    other than the one the request was sent to. No Origin (curl, scripts): not."""
    origin = request.headers.get("origin")
    if origin is None:
        return False
    host = request.headers.get("host", "")
    return origin == "null" or urlsplit(origin).netloc.lower() != host.lower()


def token_matches(request: Request, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (constant-time compare)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def check_write(request: Request, token: str | None) -> None:
    """Raise Refused unless ``request`` may write: same site (else 403), the
    server has a token (else 403: read-only), and the request carries it (else 401)."""
    if cross_site(request):
        raise Refused(403, f"cross-site request refused (Origin {request.headers.get('origin')!r} "
                           f"is not this server, {request.headers.get('host')!r})")
    if token is None:
        raise Refused(403, READ_ONLY)
    if not token_matches(request, token):
        raise Refused(401, "a write needs the header 'Authorization: Bearer <token>' with the server's token")
