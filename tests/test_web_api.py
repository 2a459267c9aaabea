"""The REST API of `redbike serve` (redbike/web/), in-process with Starlette's
TestClient against the real test server and real `redbike work` and
`redbike dispatch` processes, and once as a real `redbike serve` process
over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from conftest import RedisServer, free_port, redbike_command, wait_for
from starlette.routing import Route
from webtools import AUTH, TOKEN, web

from redbike import Redbike, RoundRobin, stats
from redbike.keys import Keys
from redbike.web.app import WebContext, create_app
from redbike.web.security import host_of

HTML_ID = "<script>alert(1)</script>/x:A"


def path(jobid: str) -> str:
    return quote(jobid, safe="")


def cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(redbike_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def status_of(client: redis.Redis, prefix: str, jobid: str) -> str | None:
    value = client.hget(Keys(prefix).statuses, jobid)
    return value.partition(":")[0] if value else None


# -- reads, with real processes ------------------------------------------------------

def test_reads_agree_with_the_cli_while_real_workers_run_and_fail_jobs(workdir, client, prefix, daemons,
                                                                      process_env, redis_server):
    # Connected as the CLI is (its config's URL), so that both name the server alike.
    api = web(redis.Redis.from_url(redis_server.url, decode_responses=True), prefix)
    dispatcher = daemons.start("dispatch", cwd=workdir)
    pool = daemons.start("work", "--concurrency", "2", cwd=workdir)
    # The leading dispatcher's first snapshot of the counters: the per-minute counts start there.
    wait_for(lambda: client.keys(f"{prefix}:stats:*"), timeout=20, what="the counters' first snapshot")
    for jobid, schedule in (("hang-1:A", "NOW"), ("fail-1:B", "NOW"), ("later:A", "0 3 * * *")):
        assert api.post("/api/v1/jobs", json={"jobid": jobid, "schedule": schedule}, headers=AUTH).json() == {
            "jobid": jobid, "result": "PLACED"}
    wait_for(lambda: status_of(client, prefix, "fail-1:B") == "DIE", timeout=20, what="fail-1:B to die")

    def running() -> Any:
        workers = api.get("/api/v1/workers").json()["workers"]
        return workers if any(s.get("jobid") == "hang-1:A" for w in workers for s in w["running"]) else None

    [worker] = wait_for(running, timeout=20, what="the pool to show hang-1:A running")  # type: ignore[misc]
    assert worker["pid"] == pool.pid and worker["queues"] == ["A", "B"] and worker["slots"] == 2
    shown = api.get("/api/v1/dispatchers").json()
    assert [d["leads"] for d in shown["dispatchers"]] == [True] and shown["leader"]
    # The overview is what `redbike info --json` prints (apart from what changes from one moment to the next).
    info = json.loads(cli(workdir, process_env, "info", "--json").stdout)
    over = api.get("/api/v1/overview").json()
    for reading in (info, over):
        del reading["at"], reading["redis"]["uptime_seconds"], reading["redis"]["used_memory"]
        del reading["redis"]["used_memory_human"]
        for q in reading["queues"]:  # (rates: the dispatcher may take its minute's snapshot in between)
            del q["oldest_since"], q["per_minute_5m"], q["per_minute_60m"]
        for p in reading["dispatchers"] + reading["workers"]:
            p.pop("refreshed")
    assert over == info and over["statuses"] == {"DIE": 1, "TML": 1, "WRK": 1}
    light = api.get("/api/v1/overview", params={"scan": 0}).json()
    assert light["statuses"] is None and light["failures"] is None and light["queues"]
    # Per-minute counts for the charts: the failed run is in one of the last minutes.
    # (a slot sends its tally of runs after the run's end: with a later finish or when it goes idle)
    def failed_in_minutes() -> list | None:
        minutes = api.get("/api/v1/stats", params={"minutes": 5}).json()["minutes"]
        return minutes if sum(m["queues"].get("B", {}).get("failed", 0) for m in minutes) else None

    minutes = wait_for(failed_in_minutes, timeout=20, what="the failed run counted")
    assert isinstance(minutes, list) and 1 <= len(minutes) <= 5 and all(m["at"] % 60 == 0 for m in minutes)
    assert sum(m["queues"].get("B", {}).get("failed", 0) for m in minutes) == 1
    assert minutes[-1]["queues"]["B"].keys() == {"done", "failed", "retried", "expired", "due", "runs", "seconds"}
    queues = {q["queue"]: q for q in api.get("/api/v1/queues").json()["queues"]}
    assert queues["A"]["running"] == 1 and queues["B"]["running"] == 0
    # A failed job: tell's fields, the trail, its run with the error, the traceback.
    job = api.get(f"/api/v1/jobs/{path('fail-1:B')}").json()
    assert job["tell"]["event"] == "DIE" and job["tell"]["schedule"] == "NOW"
    assert "failed on purpose" in job["last_error"]["error"]
    assert "Traceback" in job["last_error"]["traceback"] and "ValueError" in job["last_error"]["traceback"]
    [run] = job["runs"]
    assert run["status"] == "DIE" and "failed on purpose" in run["error"]
    assert [e["event"] for e in job["trail"]] == ["set", "run"] and job["why"]
    assert job["next"]["occurrences"] == []
    # A recurring job: its next occurrences, as `redbike preview` gives them.
    later = api.get(f"/api/v1/jobs/{path('later:A')}").json()
    preview = json.loads(cli(workdir, process_env, "preview", "later:A", "--count", "5", "--json").stdout)
    assert [o["due"] for o in later["next"]["occurrences"]] == [o["due"] for o in preview]
    # The running one: its lease, as tell shows it.
    hang = api.get(f"/api/v1/jobs/{path('hang-1:A')}").json()
    assert hang["tell"]["lease"]["queue"] == "A" and hang["tell"]["event"] == "WRK"
    # Retry the failed job from the API: it runs (and fails) again.
    assert api.post(f"/api/v1/jobs/{path('fail-1:B')}/retry", headers=AUTH).json()["result"] == "PLACED"
    wait_for(lambda: len(api.get(f"/api/v1/jobs/{path('fail-1:B')}").json()["runs"]) == 2, timeout=20,
             what="the retried job's second run")
    assert api.post(f"/api/v1/jobs/{path('later:A')}/retry", headers=AUTH).status_code == 409
    # Resources and nodes.
    assert api.put("/api/v1/resources/db:1", json={"capacity": 3}, headers=AUTH).json() == {
        "resource": "db:1", "capacity": 3, "woken": 0}
    assert api.get("/api/v1/resources").json() == {
        "resources": [{"resource": "db:1", "capacity": 3, "in_use": 0, "waiting": 0}]}
    assert api.put("/api/v1/resources/db:1", json={"capacity": None}, headers=AUTH).status_code == 200
    assert api.get("/api/v1/resources").json() == {"resources": []}
    assert api.get("/api/v1/nodes").json() == {"nodes": []}
    assert api.get("/api/v1/nodes/db3").status_code == 404
    # Pause and resume a queue.
    assert api.post("/api/v1/queues/B/pause", headers=AUTH).json() == {"queue": "B", "paused": True, "changed": True}
    assert [q["paused"] for q in api.get("/api/v1/queues").json()["queues"] if q["queue"] == "B"] == [True]
    assert api.post("/api/v1/queues/B/pause", headers=AUTH).json()["changed"] is False
    assert api.post("/api/v1/queues/B/resume", headers=AUTH).json() == {"queue": "B", "paused": False,
                                                                        "changed": True}
    assert api.get("/api/v1/queues/B").json()["paused"] is False
    # HALT stops the processes (the pool once its hanging job ends: not waited for).
    assert api.post("/api/v1/halt", headers=AUTH).json()["control"].startswith("HALT:")
    assert dispatcher.wait(30) == 0


def test_run_now_sets_an_existing_job_now_and_unset_removes_it(workdir, client, prefix, daemons):
    api = web(client, prefix)
    keys = Keys(prefix)
    assert api.post("/api/v1/jobs", json={"jobid": "sleep0-r:A", "schedule": "0 3 * * *", "needs": "db:x=2"},
                    headers=AUTH).status_code == 200
    answer = api.post(f"/api/v1/jobs/{path('sleep0-r:A')}/run-now", headers=AUTH).json()
    assert answer == {"jobid": "sleep0-r:A", "result": "PLACED", "schedule_before": "0 3 * * *"}
    assert client.lrange(keys.queue("A"), 0, -1) == ["sleep0-r:A"]
    assert api.get(f"/api/v1/jobs/{path('sleep0-r:A')}").json()["tell"]["needs"] == "db:x=2"
    daemons.start("work", cwd=workdir)
    wait_for(lambda: status_of(client, prefix, "sleep0-r:A") == "END", timeout=20, what="the run")
    assert api.post(f"/api/v1/jobs/{path('nope:A')}/run-now", headers=AUTH).status_code == 404
    assert api.delete(f"/api/v1/jobs/{path('sleep0-r:A')}", headers=AUTH).json()["result"] == "removed"
    gone = api.get(f"/api/v1/jobs/{path('sleep0-r:A')}").json()  # its trail is kept a while (keep-finished)
    assert gone["tell"] is None and gone["trail"][-1]["event"] == "unset" and gone["runs"][0]["status"] == "END"
    assert api.delete(f"/api/v1/jobs/{path('sleep0-r:A')}", headers=AUTH).status_code == 404


# -- paging and filters --------------------------------------------------------------

def test_paging_through_10000_jobs_answers_each_once_with_filters(client, prefix):
    bike = Redbike(RoundRobin("A:B"), prefix=prefix, client=client)
    ids = [f"job-{i:05d}:{'AB'[i % 2]}" for i in range(10_000)]
    for start in range(0, len(ids), 2000):
        chunk = ids[start:start + 2000]
        results = bike.set_alike([(j, None) for j in chunk[:1000]], "0 3 * * *")
        results.update(bike.set_alike([(j, None) for j in chunk[1000:]], "NOW"))
        assert set(results.values()) == {"PLACED"}
    api = web(client, prefix)

    def collect(query: str, limit: int) -> tuple[list[dict[str, Any]], int]:
        found: list[dict[str, Any]] = []
        cursor, pages = None, 0
        while True:
            params = f"{query}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
            page = api.get(f"/api/v1/jobs?{params}")
            assert page.status_code == 200, page.text
            body = page.json()
            assert len(body["jobs"]) <= limit
            found += body["jobs"]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                return found, pages

    every, pages = collect("", 37)
    answered = [job["jobid"] for job in every]
    assert len(answered) == len(set(answered)) == 10_000 and set(answered) == set(ids)
    assert pages >= 10_000 // 37
    assert every[0].keys() == {"jobid", "status", "since", "queue", "schedule"}
    assert {(j["status"], j["schedule"]) for j in every} == {("TML", "0 3 * * *"), ("ENQ", "NOW")}
    queued, _ = collect("status=ENQ", 50)
    assert sorted(j["jobid"] for j in queued) == sorted(j for i, j in enumerate(ids) if i % 2000 >= 1000)
    on_b, _ = collect("queue=B&status=tml,ENQ", 1000)
    assert sorted(j["jobid"] for j in on_b) == sorted(ids[1::2])
    prefixed, _ = collect("prefix=job-012", 7)
    assert sorted(j["jobid"] for j in prefixed) == ids[1200:1300]
    # One page never scans the whole hash: a filter nothing passes answers pages with a cursor.
    page = api.get("/api/v1/jobs?status=DIE&limit=10").json()
    assert page["jobs"] == [] and page["next_cursor"] is not None


def test_status_time_filters_and_queue_pages(client, prefix):
    keys = Keys(prefix)
    api = web(client, prefix)
    client.hset(keys.statuses, mapping={"old:A": "DIE:1000", "mid:A": "DIE:2000", "new:B": "END:3000"})
    def jobids(query: str) -> list[str]:
        return sorted(j["jobid"] for j in api.get(f"/api/v1/jobs?{query}").json()["jobs"])

    assert jobids("before=2000") == ["old:A"]
    assert jobids("after=2000") == ["mid:A", "new:B"]
    assert jobids("after=1500&before=1970-01-01T00:50:00Z") == ["mid:A"]
    assert jobids("status=DIE&queue=A") == ["mid:A", "old:A"]
    # A small hash (listpack: HSCAN answers it whole) paged 2 at a time: each job once.
    client.hset(keys.statuses, mapping={f"s{i}:B": f"END:{4000 + i}" for i in range(17)})
    seen, cursor, pages = [], None, 0
    while True:
        page = api.get("/api/v1/jobs", params={"limit": 2, "after": 4000, **({"cursor": cursor} if cursor else {})})
        seen += [j["jobid"] for j in page.json()["jobs"]]
        pages += 1
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(f"s{i}:B" for i in range(17)) and len(seen) == 17 and pages == 9
    # A queue's waiting jobs, oldest (next claimed) first, a page at a time.
    bike = Redbike(RoundRobin("A:B"), prefix=prefix, client=client)
    waiting = [f"w{i:03d}:A" for i in range(250)]
    for jobid in waiting:
        bike.set(jobid, "NOW")
    seen, cursor = [], None
    while True:
        page = api.get("/api/v1/queues/A", params={"limit": 100, **({"cursor": cursor} if cursor else {})}).json()
        assert page["queue"] == "A" and page["waiting"] == 250 and page["length"] == 250
        seen += [w["jobid"] for w in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == waiting
    assert api.get("/api/v1/queues/nope").status_code == 404


# -- writes: the token and the origin --------------------------------------------------

WRITES = [
    ("POST", "/api/v1/jobs", {"jobid": "w:A", "schedule": "0 3 * * *"}),
    ("DELETE", f"/api/v1/jobs/{path('w:A')}", None),
    ("POST", f"/api/v1/jobs/{path('w:A')}/retry", None),
    ("POST", f"/api/v1/jobs/{path('w:A')}/run-now", None),
    ("PUT", "/api/v1/resources/db:1", {"capacity": 2}),
    ("POST", "/api/v1/queues/A/pause", None),
    ("POST", "/api/v1/queues/A/resume", None),
    ("POST", "/api/v1/halt", None),
]


@pytest.mark.parametrize(("method", "url", "body"), WRITES, ids=[f"{m} {u}" for m, u, _ in WRITES])
def test_every_write_needs_the_token_and_the_same_origin(client, prefix, method, url, body):
    keys = Keys(prefix)
    Redbike(RoundRobin("A:B"), prefix=prefix, client=client).set("w:A", "0 4 * * *")
    before = {key: client.dump(key) for key in client.keys(f"{prefix}:*")}

    def unchanged() -> bool:
        return {key: client.dump(key) for key in client.keys(f"{prefix}:*")} == before

    read_only = web(client, prefix, token=None).request(method, url, json=body, headers=AUTH)
    assert read_only.status_code == 403 and "read-only" in read_only.json()["error"]
    api = web(client, prefix)
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                            ({"Authorization": f"Basic {TOKEN}"}, 401),
                            ({**AUTH, "Origin": "http://evil.example"}, 403),
                            ({**AUTH, "Origin": "null"}, 403)):
        refused = api.request(method, url, json=body, headers=headers)
        assert refused.status_code == status and refused.json()["error"], (headers, refused.text)
        assert unchanged()
    if status == 401:
        assert refused.headers["www-authenticate"] == "Bearer"
    done = api.request(method, url, json=body, headers={**AUTH, "Origin": "http://testserver"})
    assert done.status_code in (200, 404, 409, 501), done.text  # retry: the job has not failed (409)
    assert not unchanged() or url.endswith(("/retry", "/resume")), done.text
    assert client.exists(keys.control) == (url == "/api/v1/halt")


def test_errors_are_json_with_their_status(client, prefix):
    api = web(client, prefix)
    keys = Keys(prefix)
    cases = [
        (api.post("/api/v1/jobs", json={"jobid": "bad:A", "schedule": "every tuesday"}, headers=AUTH), 400,
         "bad:A"),
        (api.post("/api/v1/jobs", json={"jobid": "a|b:A", "schedule": "NOW"}, headers=AUTH), 400, "job id"),
        (api.post("/api/v1/jobs", json={"schedule": "NOW"}, headers=AUTH), 400, "jobid"),
        (api.post("/api/v1/jobs", json={"jobid": "x:A", "schedule": "NOW", "needs": "db:x=0"}, headers=AUTH), 400,
         "amount"),
        (api.post("/api/v1/jobs", json={"jobid": "x:A", "schedule": "NOW", "retries": "3"}, headers=AUTH), 400,
         "retries"),
        (api.post("/api/v1/jobs", json={"jobid": "x:A", "schedule": "NOW", "misfire": "twice"}, headers=AUTH),
         400, "misfire"),
        (api.post("/api/v1/jobs", json={"jobid": "x:A", "schedule": "NOW", "data": "x" * 70000}, headers=AUTH),
         400, "max-data-bytes"),
        (api.post("/api/v1/jobs", content=b'{"jobid": "x:A", "schedule": "NOW", "data": NaN}', headers=AUTH),
         400, "must be JSON"),
        (api.post("/api/v1/jobs", json={"jobid": "x:A", "schedule": "NOW", "data": "x" * 140000}, headers=AUTH),
         413, "request body over"),
        (api.post("/api/v1/jobs", content=b"{not json", headers=AUTH), 400, "JSON"),
        (api.post("/api/v1/jobs", json=["x:A", "NOW"], headers=AUTH), 400, "object"),
        (api.put("/api/v1/resources/db:1", json={"capacity": -1}, headers=AUTH), 400, "capacity"),
        (api.put("/api/v1/resources/db:1", json={}, headers=AUTH), 400, "capacity"),
        (api.put("/api/v1/resources/a b", json={"capacity": 1}, headers=AUTH), 400, "resource name"),
        (api.get("/api/v1/jobs?status=NOPE"), 400, "unknown status"),
        (api.get("/api/v1/jobs?limit=0"), 400, "limit"),
        (api.get("/api/v1/jobs?limit=x"), 400, "limit"),
        (api.get("/api/v1/jobs?cursor=garbage"), 400, "cursor"),
        (api.get("/api/v1/jobs?before=yesterday"), 400, "timestamp"),
        (api.get("/api/v1/queues/A?cursor=-1"), 404, "no such queue"),
        (api.get("/api/v1/stats?minutes=0"), 400, "minutes"),
        (api.get("/api/v1/overview?scan=no"), 400, "scan"),
        (api.get(f"/api/v1/jobs/{path('nope:A')}"), 404, "no such job"),
        (api.delete(f"/api/v1/jobs/{path('nope:A')}", headers=AUTH), 404, "no such job"),
        (api.post(f"/api/v1/jobs/{path('nope:A')}/retry", headers=AUTH), 404, "no such job"),
        (api.get("/api/v1/nope"), 404, "Not Found"),
        (api.put("/api/v1/jobs", headers=AUTH), 405, "Method Not Allowed"),
        (api.delete("/api/v1/overview", headers=AUTH), 405, "Method Not Allowed"),
    ]
    for response, status, said in cases:
        assert (response.status_code, response.headers["content-type"]) == (status, "application/json"), (
            response.request.url, response.text)
        assert said in response.json()["error"], response.text
    # As with `redbike set`, a new job with a bad schedule is recorded BAD.
    assert client.hget(keys.statuses, "bad:A").startswith("BAD:")
    assert not client.hexists(keys.schedules, "x:A")


def test_feeds_and_scaling_advice(client, prefix):
    api = web(client, prefix)
    bike = Redbike(RoundRobin("A:B"), prefix=prefix, client=client)
    keys = Keys(prefix)
    client.sadd(keys.feeds, "media")
    client.hset(keys.feed("media"), mapping={"cursor": '"b.mp4"', "fed": 2, "done": 1, "exhausted": 1})
    client.zadd(keys.feed_jobs("media"), {"b.mp4:A": 1})
    assert api.get("/api/v1/feeds").json() == {"feeds": [
        {"name": "media", "cursor": '"b.mp4"', "fed": 2, "done": 1, "failed": 0, "waiting": 1, "rate": "0",
         "state": "exhausted"}]}
    assert api.get("/api/v1/scale").json()["window_seconds"] is None  # no snapshot yet
    stats.snapshot(client, keys, bike.clock() - 120)
    bike.set("x:A", "NOW")
    shown = api.get("/api/v1/scale", params={"target": "0.5", "window": "600"}).json()
    assert shown["target"] == 0.5 and {q["queue"]: q["waiting"] for q in shown["queues"]}["A"] == 1
    assert api.get("/api/v1/scale", params={"target": "2"}).status_code == 400
    assert api.get("/api/v1/scale", params={"window": "5"}).status_code == 400


def test_a_job_set_with_data_shows_it(client, prefix):
    api = web(client, prefix)
    body = {"jobid": "d:A", "schedule": "NOW", "data": {"url": "https://example.org/x.png"}}
    assert api.post("/api/v1/jobs", json=body, headers=AUTH).json()["result"] == "PLACED"
    assert json.loads(api.get(f"/api/v1/jobs/{path('d:A')}").json()["tell"]["data"]) == body["data"]
    api.post("/api/v1/jobs", json={"jobid": "d:A", "schedule": "NOW", "data": None}, headers=AUTH)
    assert "data" not in api.get(f"/api/v1/jobs/{path('d:A')}").json()["tell"]


def test_a_job_id_with_slashes_colons_and_html_round_trips(client, prefix):
    api = web(client, prefix)
    assert api.post("/api/v1/jobs", json={"jobid": HTML_ID, "schedule": "0 3 * * *"}, headers=AUTH).status_code == 200
    shown = api.get(f"/api/v1/jobs/{path(HTML_ID)}")
    assert shown.json()["jobid"] == HTML_ID and shown.headers["content-type"] == "application/json"
    # Unquoted slashes work too (the id is the rest of the path).
    assert api.get("/api/v1/jobs/" + HTML_ID.replace("<", "%3C").replace(">", "%3E")).json()["jobid"] == HTML_ID
    assert [j["jobid"] for j in api.get("/api/v1/jobs", params={"prefix": "<script>"}).json()["jobs"]] == [HTML_ID]
    assert api.post(f"/api/v1/jobs/{path(HTML_ID)}/run-now", headers=AUTH).json()["jobid"] == HTML_ID
    assert api.get(f"/api/v1/jobs/{path(HTML_ID)}").json()["tell"]["queue"] == "A"
    assert api.delete(f"/api/v1/jobs/{path(HTML_ID)}", headers=AUTH).json()["result"] == "removed"


def test_the_openapi_document_lists_every_endpoint(client, prefix):
    api = web(client, prefix)
    document = api.get("/api/v1/openapi.json").json()
    assert document["openapi"].startswith("3.")
    routes = {(route.path.replace(":path", ""), method.lower())
              for route in api.app.routes if isinstance(route, Route) and route.path.startswith("/api/v1")  # type: ignore[attr-defined]
              for method in route.methods or () if method != "HEAD"}
    listed = {(p, m) for p, methods in document["paths"].items() for m in methods}
    assert listed == routes and len(listed) == 22
    assert document["paths"]["/api/v1/jobs/{jobid}"]["delete"]["security"] == [{"bearer": []}]
    assert "status" in [p["name"] for p in document["paths"]["/api/v1/jobs"]["get"]["parameters"]]


def test_the_redis_password_is_never_shown(redis_server: RedisServer, client, prefix):
    # A user without a password accepts any: the client authenticates with one it must never show.
    secret = "pw-never-shown-1234"
    authed = redis.Redis.from_url(f"redis://default:{secret}@127.0.0.1:{redis_server.port}/0", decode_responses=True)
    bike = Redbike(RoundRobin("A:B"), prefix=prefix, client=authed)
    bike.set("x:A", "NOW")
    from starlette.testclient import TestClient

    api = TestClient(create_app(WebContext.of(bike, TOKEN)))
    overview = api.get("/api/v1/overview")
    assert overview.json()["redis"]["address"] == f"127.0.0.1:{redis_server.port}"
    for url in ("/api/v1/overview", "/api/v1/queues", f"/api/v1/jobs/{path('x:A')}", "/metrics",
                "/api/v1/openapi.json"):
        assert secret not in api.get(url).text


# -- the real process ------------------------------------------------------------------

def answering(base: str) -> bool:
    try:
        return httpx.get(f"{base}/api/v1/openapi.json", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_redbike_serve_runs_as_a_process_read_only_without_a_token(workdir, client, prefix, daemons):
    port = free_port()
    served = daemons.start("serve", "--bind", f"127.0.0.1:{port}", cwd=workdir)
    base = f"http://127.0.0.1:{port}"

    def answers() -> httpx.Response | None:
        try:
            return httpx.get(f"{base}/api/v1/overview", timeout=5)
        except httpx.TransportError:
            return None

    assert wait_for(answers, timeout=20, what="redbike serve to answer").json()["prefix"] == prefix  # type: ignore[union-attr]
    refused = httpx.post(f"{base}/api/v1/jobs", json={"jobid": "x:A", "schedule": "NOW"}, headers=AUTH)
    assert refused.status_code == 403 and "read-only" in refused.json()["error"]
    # On loopback it answers loopback names only: a rebound DNS name (another site's page) gets nothing.
    assert httpx.get(f"{base}/api/v1/queues", headers={"Host": f"localhost:{port}"}).status_code == 200
    rebound = httpx.get(f"{base}/api/v1/queues", headers={"Host": f"evil.example:{port}"})
    assert rebound.status_code == 400 and "unknown Host 'evil.example'" in rebound.json()["error"]
    assert [host_of(h) for h in ("[::1]:8787", "LocalHost:1", "127.0.0.1", "::1")] == [
        "::1", "localhost", "127.0.0.1", "::1"]
    log = daemons.log(served)
    assert "WARNING no API token" in log and "read-only" in log


def test_redbike_serve_with_the_config_token_writes_over_http(workdir, client, prefix, daemons):
    config = workdir / ".redbike.conf"
    config.write_text(config.read_text().replace("[redbike]\n", f"[redbike]\napi-token = {TOKEN}\n"))
    port = free_port()
    served = daemons.start("serve", "--bind", f"127.0.0.1:{port}", cwd=workdir)
    base = f"http://127.0.0.1:{port}"

    def set_job() -> httpx.Response | None:
        try:
            return httpx.post(f"{base}/api/v1/jobs", json={"jobid": "x:A", "schedule": "NOW"}, headers=AUTH,
                              timeout=5)
        except httpx.TransportError:
            return None

    response = wait_for(set_job, timeout=20, what="redbike serve to answer")
    assert response.json() == {"jobid": "x:A", "result": "PLACED"}  # type: ignore[union-attr]
    assert status_of(client, prefix, "x:A") == "ENQ"
    assert httpx.post(f"{base}/api/v1/halt", headers={"Authorization": "Bearer nope"}).status_code == 401
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.status_code == 200 and 'redbike_queue_waiting{queue="A"} 1.0' in metrics.text
    assert "no API token" not in daemons.log(served)
    served.terminate()
    assert served.wait(10) == 0
    # --token wins over the config's.
    port = free_port()
    daemons.start("serve", "--bind", f"127.0.0.1:{port}", "--token", "other", cwd=workdir)
    wait_for(lambda: answering(f"http://127.0.0.1:{port}"), timeout=20, what="the second server")
    halt = f"http://127.0.0.1:{port}/api/v1/halt"
    assert httpx.post(halt, headers=AUTH).status_code == 401
    assert httpx.post(halt, headers={"Authorization": "Bearer other"}).status_code == 200


def test_serve_bad_bind_and_missing_extra_are_one_line(workdir, process_env):
    bad = cli(workdir, process_env, "serve", "--bind", "localhost")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--bind must be HOST:PORT" in bad.stderr
    blocked = subprocess.run(
        [sys.executable, "-c", ("import sys; sys.modules['starlette'] = None\n"
                                "from redbike.cli import main; sys.exit(main(['serve']))")],
        cwd=workdir, env=process_env, capture_output=True, text=True, timeout=60, check=False)
    assert blocked.returncode == 1, blocked.stderr
    assert blocked.stderr.strip() == ("redbike: serve needs the web extra (starlette is missing): "
                                      "pip install 'redbike[web]'")


def test_nodes_and_a_task_s_page(client, prefix, tmp_path):
    from test_nodes import fleet, node_config

    from redbike.reconcile import Reconciler

    bike = Redbike(RoundRobin("A"), prefix=prefix, client=client)
    Reconciler(bike, node_config(tmp_path)).reconcile(fleet({"h1": ["d1", "d2"], "h2": ["d3"]}))
    api = web(client, prefix, queues="A")
    nodes = api.get("/api/v1/nodes").json()["nodes"]
    assert [(n["level"], n["name"], n["parent"], n["tasks"], n["running"]) for n in nodes] == list(bike.nodes())
    assert {n["name"] for n in nodes} == {"h1", "h2", "d1", "d2", "d3"}
    assert [n["name"] for n in api.get("/api/v1/nodes", params={"level": "host"}).json()["nodes"]] == ["h1", "h2"]
    assert api.get("/api/v1/nodes/d1").json() == json.loads(json.dumps(bike.node("d1")))
    task = next(j["jobid"] for j in api.get("/api/v1/jobs", params={"prefix": "scan"}).json()["jobs"])
    shown = api.get(f"/api/v1/jobs/{path(task)}").json()
    assert shown["tell"]["task"]["family"] == "scan" and shown["tell"] == json.loads(json.dumps(bike.tell(task)))
