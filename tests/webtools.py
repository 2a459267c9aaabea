"""What the web tests share: an app on the test server (Starlette's
TestClient, in-process) and the token they use."""

from __future__ import annotations

import redis
from starlette.testclient import TestClient

from redbike import Redbike, RoundRobin
from redbike.web.app import WebContext, create_app

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def web(client: redis.Redis, prefix: str, token: str | None = TOKEN, queues: str = "A:B") -> TestClient:
    """A test client of the app of ``prefix`` on ``client``'s server (job ids routed as the test worker does)."""
    bike = Redbike(RoundRobin(queues), prefix=prefix, client=client)
    return TestClient(create_app(WebContext.of(bike, token)))
