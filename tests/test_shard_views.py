"""The views over shards (issue #12): `redbike info`, `scale` and `serve`
(the API, /metrics, the UI's pages) merge every shard's read model
(overviews.py), on a real server with jobs placed on every shard of four.

Statuses are set as the scripts set them: a per-shard in-process pool
(pooltools' ClaimingPool, on one shard's keys) claims and ends jobs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from conftest import CLUSTER, wait_for
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from test_jobs import Env
from test_processes import cli_ok
from test_shards import COUNT, ids_on_every_shard, sharded  # noqa: F401 - sharded: a fixture
from webtools import AUTH, TOKEN

from redbike import overviews, scale, stats
from redbike.config import load_config
from redbike.keys import Keys
from redbike.records import decode_status
from redbike.roundrobin import RoundRobin
from redbike.sharded import ShardedRedbike
from redbike.shards import Shards, shard_of, shard_prefix
from redbike.states import Outcome
from redbike.web.app import WebContext, create_app

PER_SHARD = 8


def shard_keys(prefix: str) -> list[Keys]:
    return [Keys(shard_prefix(prefix, k, COUNT)) for k in range(COUNT)]


def bike_of(folder: Path, **options: Any) -> ShardedRedbike:
    """The installation of ``folder``'s config, connected as the CLI connects (on a cluster: a client per shard)."""
    config = load_config(str(folder / ".redbike.conf"))
    return ShardedRedbike(RoundRobin("A:B"), Shards.connect(config.redis, config.prefix, config.shards), **options)


def on_shard(k: int, name: str = "db") -> str:
    """A resource name that lives on shard ``k`` (its tag's)."""
    return next(f"{name}{{h{n}}}" for n in range(1000) if shard_of(f"h{n}", COUNT) == k)


def statuses_in_redis(reader: redis.Redis, prefix: str) -> Counter[str]:
    """Every shard's statuses, counted from its hash."""
    return Counter(decode_status(v)[0] for keys in shard_keys(prefix) for v in reader.hvals(keys.statuses))


def place(reader: redis.Redis, prefix: str) -> dict[str, Any]:
    """On every shard: a job of each kind of status (TML, STP, ENQ, END, DIE,
    WRK), shard k's failure k seconds later than shard 0's, k jobs waiting on
    B, shard 2's oldest job of A waiting 300 s, a paused resource. Returns
    what was placed."""
    now = float(reader.time()[0])
    ids = ids_on_every_shard(PER_SHARD)
    b_ids = ids_on_every_shard(COUNT, queue="B")
    failed = []
    for k in range(COUNT):
        env = Env(reader, shard_prefix(prefix, k, COUNT)).at(now)
        mine = ids[k * PER_SHARD:(k + 1) * PER_SHARD]
        env.bike.set(mine[0], "0 3 * * *")
        env.bike.set(mine[1], "STOP")
        for jobid in mine[2:7]:
            env.bike.set(jobid, "NOW")
        for jobid in b_ids[k * COUNT:k * COUNT + k]:
            env.bike.set(jobid, "NOW")
        pool = env.pool("A")
        for outcome in (Outcome("ok"), Outcome("error", error=f"ValueError: boom {k}")):
            run = env.claim(pool)
            assert run is not None
            env.at(now + 1 + k)
            pool.finish(run, outcome, "", None, "w1")
            if outcome.kind == "error":
                failed.append(run.lease.jobid)
        assert env.claim(pool) is not None  # runs on (WRK)
        env.bike.set_capacity(on_shard(k), 0)
    oldest = reader.lindex(shard_keys(prefix)[2].queue("A"), -1)
    reader.hset(shard_keys(prefix)[2].statuses, oldest, f"ENQ:{int(now - 300)}")
    return {"now": now, "failed": failed}


def test_info_sums_the_statuses_and_merges_the_queues_of_every_shard(sharded, process_env) -> None:  # noqa: F811
    folder, prefix, reader = sharded
    placed = place(reader, prefix)
    keys = shard_keys(prefix)
    shown = json.loads(cli_ok(folder, process_env, "info", "--json"))
    counted = statuses_in_redis(reader, prefix)
    assert shown["statuses"] == dict(sorted(counted.items()))
    assert counted == {"TML": COUNT, "STP": COUNT, "ENQ": 2 * COUNT + sum(range(COUNT)), "END": COUNT, "DIE": COUNT,
                       "WRK": COUNT}
    assert (shown["prefix"], shown["shards"]) == (prefix, COUNT)
    queues = {q["queue"]: q for q in shown["queues"]}
    assert queues["A"]["waiting"] == sum(reader.llen(k.queue("A")) for k in keys) == 2 * COUNT
    assert queues["A"]["running"] == sum(reader.hlen(k.leases) for k in keys) == COUNT
    assert queues["B"]["waiting"] == sum(range(COUNT)) and queues["B"]["running"] == 0
    assert queues["A"]["oldest_since"] == int(placed["now"] - 300)  # shard 2's, the oldest of all
    assert shown["failures"]["count"] == COUNT
    assert [f["jobid"] for f in shown["failures"]["recent"]] == placed["failed"][::-1]  # newest first
    assert [r["resource"] for r in shown["resources"]] == sorted(on_shard(k) for k in range(COUNT))
    assert shown["dispatchers"] == [] and shown["leaders"] == [None] * COUNT and shown["leader"] is None
    assert shown["redis"]["version"]
    if CLUSTER:  # the shards' slots are on several primaries: each one's shards
        assert sorted(k for server in shown["servers"] for k in server["shards"]) == list(range(COUNT))
    else:
        assert "servers" not in shown  # one server: once
    text = cli_ok(folder, process_env, "info")
    assert f"(prefix {prefix}, {COUNT} shards)" in text and "shard 3: no leading dispatcher" in text
    assert f"({sum(counted.values())} jobs)" in text
    # top, off a terminal, prints info's text; scale answers (no snapshot yet: no counts).
    assert f"{COUNT} shards" in cli_ok(folder, process_env, "top")
    assert "no counts yet" in cli_ok(folder, process_env, "scale")
    assert cli_ok(folder, process_env, "feeds") == ""  # over shards too: no feed yet


def test_a_dispatcher_process_leads_every_shard_and_info_shows_one_leader_per_shard(
        sharded, process_env, daemons) -> None:  # noqa: F811
    folder, prefix, reader = sharded
    keys = shard_keys(prefix)
    first = daemons.start("dispatch", cwd=folder)
    wait_for(lambda: all(reader.get(k.dispatcher) for k in keys), timeout=20, what="a leader on every shard")
    daemons.start("dispatch", cwd=folder)

    def both_registered() -> dict[str, Any] | None:
        shown = json.loads(cli_ok(folder, process_env, "info", "--json"))
        return shown if len(shown["dispatchers"]) == 2 * COUNT else None

    shown = wait_for(both_registered, timeout=20, what="both processes registered on every shard")
    assert isinstance(shown, dict)
    for k in range(COUNT):
        mine = [d for d in shown["dispatchers"] if d["shard"] == k]
        [leader] = [d for d in mine if d["leads"]]
        assert leader["pid"] == first.pid and len(mine) == 2
        assert shown["leaders"][k] == leader["identity"] == reader.get(keys[k].dispatcher).partition(":")[2]
    text = cli_ok(folder, process_env, "info")
    assert all(f"shard {k}: leader " in text and f"shard {k}: standby" in text for k in range(COUNT))


def test_scale_sums_arrivals_and_weights_service_times_over_shards(sharded) -> None:  # noqa: F811
    folder, prefix, client = sharded
    minute = (float(client.time()[0]) // 60 + 1) * 60
    envs = [Env(client, shard_prefix(prefix, k, COUNT)).at(minute) for k in range(COUNT)]
    ids = ids_on_every_shard(2)
    for k, env in enumerate(envs):
        stats.snapshot(env.c, env.keys, minute)
        for jobid in ids[2 * k:2 * k + 2]:
            env.bike.set(jobid, "NOW")
    for k, seconds in ((0, 10.0), (0, 10.0), (1, 40.0)):  # 3 runs: 60 s of service in all
        env = envs[k].at(minute)
        pool = env.pool("A")
        run = env.claim(pool)
        assert run is not None
        env.at(minute + seconds)
        pool.finish(run, Outcome("ok"), "", None, "w1")
    bike = bike_of(folder, clock=lambda: minute + 120)
    shown = scale.advice_over(bike.parts, minute + 120)
    [a] = [q for q in shown["queues"] if q["queue"] == "A"]
    assert a["arrivals_per_minute"] == pytest.approx(2 * COUNT / 2)  # 8 in 2 minutes
    assert a["service_seconds_mean"] == pytest.approx(20)  # 60 s over 3 runs, not the mean of the shards' means
    assert a["runs"] == 3 and a["waiting"] == 2 * COUNT - 3 and shown["window_seconds"] == 120
    # One part: what scale.advice says.
    assert scale.advice_over(bike.parts[:1], minute + 120) == scale.advice(bike.parts[0].client, bike.parts[0].keys,
                                                                           minute + 120)


def api_of(folder: Path) -> tuple[ShardedRedbike, TestClient]:
    bike = bike_of(folder)
    return bike, TestClient(create_app(WebContext.of(bike, TOKEN)))


def test_the_api_pages_through_a_thousand_jobs_on_every_shard_each_once(sharded) -> None:  # noqa: F811
    folder, _, _ = sharded
    bike, api = api_of(folder)
    jobids = [f"job{n}:A" for n in range(1000)]
    stopped = set(jobids[::20])
    assert bike.set_many([(jobid, "STOP" if jobid in stopped else "0 3 * * *") for jobid in jobids]) == []
    assert {k: sum(shard_of(j, COUNT) == k for j in jobids) > 500 / COUNT for k in range(COUNT)} == dict.fromkeys(
        range(COUNT), True)

    def listed(**query: Any) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(1000):
            answer = api.get("/api/v1/jobs", params={**query, **({"cursor": cursor} if cursor else {})})
            assert answer.status_code == 200, answer.text
            page = answer.json()
            assert len(page["jobs"]) <= query["limit"]
            found += page["jobs"]
            cursor = page["next_cursor"]
            if cursor is None:
                return found
        raise AssertionError("the listing does not end")

    every = listed(limit=37)
    assert len(every) == len(jobids) and {job["jobid"] for job in every} == set(jobids)  # each exactly once
    assert all(job["shard"] == shard_of(job["jobid"], COUNT) for job in every)
    assert {job["jobid"] for job in listed(limit=7, status="STP")} == stopped
    assert api.get("/api/v1/jobs", params={"cursor": "bm9wZQ"}).status_code == 400
    # A queue's waiting jobs, shard after shard: each once, the length of all.
    waiting = ids_on_every_shard(3, queue="B")
    for jobid in waiting:
        bike.set(jobid, "NOW")
    seen: list[str] = []
    cursor = None
    while True:
        page = api.get("/api/v1/queues/B", params={"limit": 5, **({"cursor": cursor} if cursor else {})}).json()
        assert page["length"] == len(waiting) and page["waiting"] == len(waiting)
        seen += [job["jobid"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(waiting)
    assert api.get("/api/v1/queues/B", params={"cursor": "9.0"}).status_code == 400


def test_a_jobs_detail_and_the_writes_go_to_its_shard(sharded) -> None:  # noqa: F811
    folder, prefix, reader = sharded
    keys = shard_keys(prefix)
    _, api = api_of(folder)
    jobids = ids_on_every_shard(1)
    for jobid in jobids:
        assert api.post("/api/v1/jobs", json={"jobid": jobid, "schedule": "0 3 * * *"}, headers=AUTH).status_code == 200
    for jobid in jobids:
        k = shard_of(jobid, COUNT)
        assert [reader.hexists(keys[i].schedules, jobid) for i in range(COUNT)] == [i == k for i in range(COUNT)]
        shown = api.get(f"/api/v1/jobs/{quote(jobid, safe='')}").json()
        assert shown["shard"] == k and shown["tell"]["schedule"] == "0 3 * * *" and shown["tell"]["event"] == "TML"
    gone = jobids[2]
    assert api.delete(f"/api/v1/jobs/{quote(gone, safe='')}", headers=AUTH).json()["result"] == "removed"
    assert not any(reader.hexists(k.schedules, gone) for k in keys)
    assert sum(reader.hlen(k.schedules) for k in keys) == COUNT - 1
    assert api.post(f"/api/v1/jobs/{quote(jobids[3], safe='')}/run-now", headers=AUTH).json()["result"] == "PLACED"
    assert reader.lrange(keys[3].queue("A"), 0, -1) == [jobids[3]]
    # Pause: every shard's queue; the merged queues say so.
    assert api.post("/api/v1/queues/A/pause", headers=AUTH).json() == {"queue": "A", "paused": True, "changed": True}
    assert all(reader.sismember(k.paused, "A") for k in keys)
    assert {q["queue"]: q["paused"] for q in api.get("/api/v1/queues").json()["queues"]} == {"A": True}
    resource = on_shard(1)
    assert api.put(f"/api/v1/resources/{quote(resource, safe='')}", json={"capacity": 2}, headers=AUTH).status_code == 200
    assert [reader.hget(k.capacities, resource) for k in keys] == [("2" if i == 1 else None) for i in range(COUNT)]
    assert api.get("/api/v1/resources").json()["resources"] == [
        {"resource": resource, "capacity": 2, "in_use": 0, "waiting": 0}]
    assert api.get("/api/v1/overview").json()["statuses"] == {"ENQ": 1, "TML": COUNT - 2}
    assert api.get("/api/v1/dispatchers").json() == {"dispatchers": [], "leader": None, "leaders": [None] * COUNT}
    assert api.get("/api/v1/feeds").json() == {"feeds": []}  # summed over the shards (none here)
    for path in ("/api/v1/nodes", "/api/v1/nodes/x"):
        answer = api.get(path)
        assert answer.status_code == 400 and "not yet supported with shards > 1" in answer.json()["error"]
    assert api.post("/api/v1/halt", headers=AUTH).status_code == 200
    assert all(reader.get(k.control).startswith("HALT") for k in keys)


def scrape(api: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = api.get("/metrics")
    assert response.status_code == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_sum_every_shard(sharded) -> None:  # noqa: F811
    folder, prefix, reader = sharded
    place(reader, prefix)
    keys = shard_keys(prefix)
    _, api = api_of(folder)
    samples = scrape(api)
    per_shard = [stats.totals(reader, k) for k in keys]
    for queue in ("A", "B"):
        due = sum(t[queue].due for t in per_shard if queue in t)
        assert samples[("redbike_jobs_due_total", (("queue", queue),))] == due
        waiting = sum(reader.llen(k.queue(queue)) for k in keys)
        assert samples[("redbike_queue_waiting", (("queue", queue),))] == waiting
    assert samples[("redbike_jobs_due_total", (("queue", "A"),))] == 5 * COUNT
    assert samples[("redbike_jobs_done_total", (("queue", "A"),))] == COUNT
    assert samples[("redbike_jobs_failed_total", (("queue", "A"),))] == COUNT
    assert samples[("redbike_queue_running", (("queue", "A"),))] == COUNT
    assert samples[("redbike_run_duration_seconds_count", (("queue", "A"),))] == 2 * COUNT
    for k in range(COUNT):
        assert samples[("redbike_resource_capacity", (("resource", on_shard(k)),))] == 0


def test_the_pages_render_over_shards(sharded) -> None:  # noqa: F811
    folder, prefix, reader = sharded
    placed = place(reader, prefix)
    _, api = api_of(folder)
    overview = api.get("/")
    assert overview.status_code == 200 and f"{COUNT} shards" in overview.text
    assert "No leading dispatcher on shard 3" in overview.text
    jobs = api.get("/jobs", params={"status": "DIE"})  # one page: the failed job of every shard
    assert jobs.status_code == 200 and all(quote(j, safe="") in jobs.text for j in placed["failed"])
    for path in ("/queues", "/queues/A", "/workers", "/resources", "/charts",
                 f"/jobs/{quote(placed['failed'][0], safe='')}"):
        page = api.get(path)
        assert page.status_code == 200, (path, page.text[:300])
    assert all(on_shard(k) in api.get("/resources").text for k in range(COUNT))


def test_pools_registered_on_several_shards_are_one_pool_with_their_slots_merged() -> None:
    entry = {"role": "worker", "identity": "h:1", "host": "h", "pid": 1, "queues": ["A"], "slots": 2,
             "refreshed": 10.0}
    on_0 = dict(entry, running=[{"slot": 0, "jobid": "a:A", "token": "t1", "queue": "A", "since": 1.0},
                                {"slot": 1}])
    on_2 = dict(entry, refreshed=12.0, stopping=True,
                running=[{"slot": 0}, {"slot": 1, "jobid": "b:A", "token": "t2", "queue": "A", "since": 2.0}])
    other = dict(entry, identity="h:2", pid=2, running=[{"slot": 0}])
    [pool, second] = overviews.pools([[on_0], [], [on_2, other]])
    assert [s.get("jobid") for s in pool["running"]] == ["a:A", "b:A"]
    assert pool["shards"] == [0, 2] and pool["stopping"] and pool["refreshed"] == 12.0
    assert second["identity"] == "h:2" and second["running"] == [{"slot": 0}]
    assert overviews.pools([[on_0]]) == [on_0]  # one shard: as it is
