"""The web UI's pages in-process (Starlette's TestClient on the test Redis):
escaping of every user value a page shows, the headers, the answers to bad
input, and the charts' geometry. The browser tests (test_web_ui.py) drive
the same pages in Chromium."""

from __future__ import annotations

import json
import re

from webtools import web

from redbike import Redbike, RoundRobin
from redbike.keys import Keys
from redbike.records import error_record
from redbike.stats import QueueTotals
from redbike.web import charts, views

EVIL = "<b>x</b>&\"'"


def hostile_state(client, prefix: str) -> None:
    """A registry entry, a job, an error and a resource whose names and texts hold HTML."""
    keys = Keys(prefix)
    bike = Redbike(RoundRobin("A:B"), prefix=prefix, client=client)
    bike.set(f"{EVIL}:A", "STOP")
    bike.set_capacity("db", 1)
    entry = {"role": "worker", "identity": f"id{EVIL}", "host": f"host{EVIL}", "pid": 1, "version": EVIL,
             "started": 1.0, "queues": ["A"], "slots": 1, "resources": {},
             "running": [{"slot": 0, "jobid": f"{EVIL}:A", "token": "t", "queue": "A", "since": 2.0}]}
    client.set(keys.process("x"), json.dumps(entry))
    client.hset(keys.errors, f"{EVIL}:A", error_record("DIE", f"Boom{EVIL}", f"w{EVIL}", bike.clock(),
                                                         f"Traceback{EVIL}"))


def test_user_values_are_escaped_on_every_page(client, prefix):
    hostile_state(client, prefix)
    pages = web(client, prefix)
    for path in ["/", "/queues", "/queues/A", "/jobs", "/workers", "/resources", "/charts",
                 "/jobs/%3Cb%3Ex%3C%2Fb%3E%26%22'%3AA"]:
        answer = pages.get(path)
        assert answer.status_code == 200, (path, answer.text)
        assert "<b>x</b>" not in answer.text, path
    job = pages.get("/jobs/%3Cb%3Ex%3C%2Fb%3E%26%22'%3AA").text
    assert "&lt;b&gt;x&lt;/b&gt;&amp;&#34;&#39;:A" in job
    assert "Traceback&lt;b&gt;" in job and "Boom&lt;b&gt;" in job
    assert "id&lt;b&gt;x" in pages.get("/workers").text


def test_pages_say_how_scripts_may_run(client, prefix):
    answer = web(client, prefix).get("/")
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert answer.headers["x-content-type-options"] == "nosniff"
    # No inline script: the CSP would block it (only static/ui.js runs).
    assert re.findall(r"<script[^>]*>", answer.text) == ['<script src="/static/ui.js" defer>']
    assert web(client, prefix).get("/static/ui.js").status_code == 200


def test_bad_input_is_answered_with_a_page_saying_what(client, prefix):
    pages = web(client, prefix)
    Redbike(RoundRobin("A:B"), prefix=prefix, client=client).set("waits:A", "NOW")  # queue A holds a job
    assert "waits:A" in pages.get("/queues/A").text
    missing = pages.get("/jobs/nothing:A")
    assert missing.status_code == 404 and "No such job" in missing.text
    assert pages.get("/queues/nowhere").status_code == 404
    for path, words in [("/jobs?status=NOPE", "status: one of"), ("/jobs?cursor=zzz", "bad cursor"),
                        ("/queues/A?cursor=x", "bad cursor"),
                        ("/jobs/a%7Cb:A", "not a job id")]:
        answer = pages.get(path)
        assert answer.status_code == 400 and words in answer.text, (path, answer.text)


def test_read_only_and_writable_headers(client, prefix):
    assert "read-only" in web(client, prefix, token=None).get("/").text
    writable = web(client, prefix).get("/").text
    assert 'id="token"' in writable and "read-only" not in writable


def test_charts_stack_each_minutes_counts_in_proportion():
    minutes = [(60, {"A": QueueTotals(done=4, failed=1), "B": QueueTotals(done=1)}),
               (120, {"A": QueueTotals(retried=2)})]
    runs, failures = charts.charts(minutes)
    assert runs.total == {"done": 5, "retried": 2, "failed": 1}
    first = [b for b in runs.bars if b.minute == 60]
    assert [(b.series, b.value) for b in first] == [("done", 5), ("failed", 1)]
    assert first[0].height == 5 * first[1].height  # a bar's height is its count on one scale
    assert abs(first[1].y + first[1].height - first[0].y) < 1e-9  # stacked: failed sits on done
    assert runs.y_ticks[-1].label == "6"  # the axis' top: 6 >= the highest bar
    assert failures.total == {"retried": 2, "failed": 1, "expired": 0}
    only_b = charts.charts(minutes, "B")[0]
    assert only_b.total == {"done": 1, "retried": 0, "failed": 0}


def test_the_overview_scans_every_job_again_only_when_its_last_scan_is_old_enough(client, prefix):
    bike = Redbike(RoundRobin("A:B"), prefix=prefix, client=client)
    bike.set("one:A", "STOP")
    scans: list[bool] = []
    real = bike.overview

    def overview(scan: bool = True) -> dict:
        scans.append(scan)
        return real(scan)

    bike.overview = overview  # type: ignore[method-assign]
    overviews = views.Overviews(min_age=3600)
    first = overviews.read(bike)
    bike.set("two:A", "STOP")
    second = overviews.read(bike)
    assert scans == [True, False]
    assert first["statuses"] == second["statuses"] == {"STP": 1}  # the first scan's, not counted again
    assert second["counted_at"] == first["at"] and "counted_at" not in first
    assert views.Overviews(min_age=0).read(bike)["statuses"] == {"STP": 2}
