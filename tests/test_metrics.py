"""/metrics of `redbike serve`: parsed with Prometheus' own text parser, the
values match what real workers did (runs done, failed, retried, expired, the
durations' histogram) and what the queues, resources and processes are."""

from __future__ import annotations

import os
import signal
from typing import Any

from conftest import wait_for
from prometheus_client.parser import text_string_to_metric_families
from webtools import web

from redbike import Redbike, RoundRobin, registry, stats
from redbike.keys import Keys


def scrape(api: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = api.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_count_what_real_workers_did(workdir, client, prefix, daemons):
    keys = Keys(prefix)
    bike = Redbike(RoundRobin("A:B:C:T1"), prefix=prefix, client=client)
    api = web(client, prefix, queues="A:B:C:T1")
    daemons.start("dispatch", cwd=workdir)
    daemons.start("work", "--concurrency", "2", cwd=workdir)
    doomed = daemons.start("work", "testworker:Recorder('T1')", cwd=workdir)
    stats.snapshot(client, keys, bike.clock())  # before any job: the scaling advice's window sees them all
    bike.set_capacity("db:1", 2)
    bike.set("hang-1:A", "NOW", needs="db:1")
    for i in range(5):
        bike.set(f"ok-{i}:A", "NOW")
    bike.set("fail-1:B", "NOW")
    bike.set("fail-2:B", "NOW")
    bike.set("fail-r:B", "NOW", retries=1)  # retried once, then failed
    bike.set("hang-e:T1", "NOW")  # its pool is killed while it runs: the dispatcher reaps it, expired
    bike.set("x1:C", "NOW")
    bike.set("x2:C", "NOW")  # no worker takes queue C

    wait_for(lambda: client.hexists(keys.leases, "hang-e:T1"), timeout=20, what="hang-e:T1 to run")
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(10)
    # Its registry entry would expire within 30 s: gone now.
    [entry] = [e for e in registry.live(client, keys) if e["pid"] == doomed.pid]
    client.delete(keys.process(entry["identity"]))

    def settled() -> dict | None:
        samples = scrape(api)
        done = value(samples, "redbike_jobs_done_total", queue="A") == 5
        failed = value(samples, "redbike_jobs_failed_total", queue="B") == 3
        expired = (value(samples, "redbike_jobs_expired_total", queue="T1") or 0) >= 1
        busy = value(samples, "redbike_slots", state="busy") == 1  # hang-1:A
        return samples if done and failed and expired and busy else None

    samples = wait_for(settled, timeout=30, what="the runs counted")
    assert isinstance(samples, dict)
    assert value(samples, "redbike_jobs_retried_total", queue="B") == 1
    assert value(samples, "redbike_jobs_failed_total", queue="A") == 0
    assert value(samples, "redbike_jobs_due_total", queue="A") == 6
    # The durations' histogram: runs that ended by themselves (not the expired ones).
    assert value(samples, "redbike_run_duration_seconds_count", queue="A") == 5
    assert value(samples, "redbike_run_duration_seconds_bucket", queue="A", le="+Inf") == 5
    assert value(samples, "redbike_run_duration_seconds_count", queue="B") == 4
    assert 0 < (value(samples, "redbike_run_duration_seconds_sum", queue="A") or 0) < 5
    assert value(samples, "redbike_run_duration_seconds_count", queue="T1") in (None, 0)
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                     if name == "redbike_run_duration_seconds_bucket" and dict(labels)["queue"] == "A")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    # Queues, resources, processes.
    assert value(samples, "redbike_queue_waiting", queue="C") == 2
    assert value(samples, "redbike_queue_running", queue="A") == 1
    assert value(samples, "redbike_queue_paused", queue="C") == 0
    assert (value(samples, "redbike_queue_oldest_waiting_seconds", queue="C") or -1) >= 0
    assert value(samples, "redbike_resource_capacity", resource="db:1") == 2
    assert value(samples, "redbike_resource_in_use", resource="db:1") == 1
    assert value(samples, "redbike_resource_waiting", resource="db:1") == 0
    assert value(samples, "redbike_workers") == 1
    assert value(samples, "redbike_slots", state="idle") == 1
    leaders = [(dict(labels), v) for (name, labels), v in samples.items() if name == "redbike_dispatcher_leader"]
    assert [v for _, v in leaders] == [1] and leaders[0][0]["identity"] == client.get(keys.dispatcher).partition(":")[2]
    # The scaling advice.
    assert (value(samples, "redbike_queue_arrivals_per_minute", queue="A") or 0) > 0
    assert value(samples, "redbike_queue_recommended_slots", queue="A") >= 1
    assert value(samples, "redbike_queue_service_seconds_mean", queue="A") is not None
    # Pausing shows.
    bike.pause("C")
    assert value(scrape(api), "redbike_queue_paused", queue="C") == 1


def test_metrics_on_an_empty_installation_and_a_registry_of_their_own(client, prefix):
    from prometheus_client import REGISTRY

    samples = scrape(web(client, prefix))
    assert value(samples, "redbike_workers") == 0 and value(samples, "redbike_slots", state="busy") == 0
    assert not any(name.startswith("redbike_jobs") for name, _ in samples)
    # Not on prometheus_client's global registry (nor its process and Python metrics on ours).
    assert not any(name.startswith("redbike_") for name in REGISTRY._names_to_collectors)  # type: ignore[attr-defined]
    assert not any(name.startswith(("process_", "python_")) for name, _ in samples)
