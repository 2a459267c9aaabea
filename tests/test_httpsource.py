"""`redbike feed --source=URL`: the work-queue pattern's HTTP source, served
by a test server on loopback, fed to a real worker."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import unquote

import pytest
from conftest import wait_for
from test_processes import cli, cli_ok, ends, starts


class Source(BaseHTTPRequestHandler):
    """GET /items: the ItemList of ``names``; GET /items/NAME: its Item with ``data``."""

    names: ClassVar[list[str]] = []
    data: ClassVar[dict[str, Any]] = {}
    kind: ClassVar[str] = "ItemList"

    def do_GET(self) -> None:
        if self.path == "/items":
            body: dict[str, Any] = {"kind": self.kind, "apiVersion": "v1", "items": list(self.names)}
        elif self.path.startswith("/items/") and unquote(self.path[7:]) in self.data:
            body = {"kind": "Item", "apiVersion": "v1", "data": self.data[unquote(self.path[7:])]}
        else:
            self.send_error(404)
            return
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def source() -> Iterator[tuple[str, type[Source]]]:
    handler = type("Handler", (Source,), {"names": [], "data": {}, "kind": "ItemList"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/items", handler
    finally:
        server.shutdown()
        server.server_close()


def test_items_go_in_once_with_their_data_and_leave_when_unlisted(workdir, client, prefix, daemons, testlog,
                                                                     process_env, source):
    url, items = source
    items.names = ["a.mp4", "b.mp4"]
    items.data = {"a.mp4": {"path": "/media/a.mp4"}, "b.mp4": {"path": "/media/b.mp4"}}
    feeder = daemons.start("feed", f"--source={url}", "--queue=A", "--name=media", "--every=0.2", cwd=workdir)
    daemons.start("work", cwd=workdir)
    wait_for(lambda: len(ends(client, testlog)) == 2, timeout=20, what="both items to run")
    seen = {record["job"]: record.get("data") for record in starts(client, testlog)}
    assert seen == {"a.mp4:A": {"path": "/media/a.mp4"}, "b.mp4:A": {"path": "/media/b.mp4"}}

    # Polled again and again: still listed, they are not put in again.
    items.names = ["a.mp4", "b.mp4", "sleep5-c.mp4"]
    items.data["sleep5-c.mp4"] = {"path": "/media/c.mp4"}
    wait_for(lambda: len(starts(client, testlog)) == 3, timeout=20, what="the new item to start")
    # An item that leaves the list before it ran is cancelled: the worker is busy for 5 s.
    items.names = ["a.mp4", "b.mp4", "sleep5-c.mp4", "d.mp4"]
    items.data["d.mp4"] = {"path": "/media/d.mp4"}
    wait_for(lambda: client.hget(f"{prefix}:statuses", "d.mp4:A"), timeout=10, what="d.mp4 to go in")
    items.names = ["a.mp4", "b.mp4", "sleep5-c.mp4"]
    wait_for(lambda: client.hget(f"{prefix}:statuses", "d.mp4:A") is None, timeout=10, what="d.mp4 to be cancelled")
    wait_for(lambda: len(ends(client, testlog)) == 3, timeout=20, what="c.mp4 to end")
    assert sorted(record["job"] for record in starts(client, testlog)) == ["a.mp4:A", "b.mp4:A", "sleep5-c.mp4:A"]
    assert client.hgetall(f"{prefix}:feed:media:seen") == {
        "a.mp4": "a.mp4:A", "b.mp4": "b.mp4:A", "sleep5-c.mp4": "sleep5-c.mp4:A"}
    wait_for(lambda: "its item left the list before it ran: d.mp4:A cancelled" in daemons.log(feeder),
             what="the feeder to log the cancel")
    assert feeder.poll() is None
    # One feeder per name at a time.
    second = cli(workdir, process_env, "feed", f"--source={url}", "--queue=A", "--name=media", "--once")
    assert second.returncode == 1 and "is being fed by" in second.stderr


def test_another_kind_or_version_is_refused_in_one_line(workdir, process_env, source):
    url, items = source
    items.kind = "PodList"
    result = cli(workdir, process_env, "feed", f"--source={url}", "--queue=A", "--once")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    said = (f"redbike: feed 127.0.0.1: GET {url}: expected kind 'ItemList', apiVersion 'v1'; "
            "got kind 'PodList', apiVersion 'v1'")
    assert result.stderr.strip().splitlines() == [said]
    items.kind = "ItemList"
    assert cli_ok(workdir, process_env, "feed", f"--source={url}", "--queue=A", "--once") == ""
    for bad in (["--source=ftp://x/items"], [f"--source={url}", "--every=0"], [f"--source={url}", "--queue=a|b"]):
        result = cli(workdir, process_env, "feed", *bad)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (bad, result.stderr)
