"""The benchmark suite (bench/) at tiny sizes, so that it cannot rot: it must
run end to end against a real Redis and produce sane numbers. No timing is
asserted; bench/README.md has the real results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis

from bench import report
from bench.run import COMMITTED_OUT, parse_args, run


def finite_positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_smoke(tmp_path: Path) -> None:
    args = parse_args(["--smoke", "--out", str(tmp_path), "--no-plot"])
    results = run(args, say=lambda _line: None)
    assert results["errors"] == {}

    assert finite_positive(results["limit"]["ping_per_s"])
    packages = results["machine"]["packages"]  # the peers' releases are recorded with every run
    assert set(packages) >= {"redis", "rq", "huey", "celery", "kombu", "dramatiq", "arq"}
    assert packages["redis"] == redis.__version__
    assert f"redis {redis.__version__}" in report.as_markdown(results).splitlines()[0]

    for drain in results["drain"].values():
        assert drain["drained"] == drain["jobs"] == args.jobs  # every job set was run, once
        assert finite_positive(drain["jobs_per_s"])
        assert finite_positive(drain["commands_per_job"])
        assert finite_positive(drain["round_trips_per_job"])
        assert drain["by_command"].get("evalsha", 0) > 0
        assert finite_positive(drain["bytes_per_queued_job"])
        assert finite_positive(drain["rss_supervisor"]) and finite_positive(drain["rss_child"])

    assert [s["jobs"] for s in results["scale"]] == [500, 2000]
    for scale in results["scale"]:
        assert finite_positive(scale["dispatch_jobs_per_s"])
        assert finite_positive(scale["dispatch_commands_per_job"])
        assert finite_positive(scale["bytes_per_scheduled_job"]) and finite_positive(scale["bytes_per_queued_job"])
        assert finite_positive(scale["rss_dispatcher"]) and finite_positive(scale["rss_supervisor"])
        assert 0 < scale["worker_jobs_done"] <= scale["jobs"]

    latency = results["latency"]
    assert latency["started"] == latency["jobs"] > 0  # every job that fell due started
    assert math.isfinite(latency["p50_ms"]) and latency["p99_ms"] >= latency["p50_ms"]
    pickup = results["pickup"]
    assert pickup["started"] == pickup["jobs"] == args.pickups
    assert math.isfinite(pickup["p50_ms"])

    for role in ("worker", "dispatcher"):
        assert math.isfinite(results["idle"][role]["commands_per_s"]) and results["idle"][role]["commands_per_s"] >= 0

    beats = results["heartbeats"]
    assert beats["script_calls"].get("finish", 0) >= beats["short_jobs"]

    gating = results["gating"]
    assert [g["parked"] for g in gating] == [10, 100]
    for g in gating:
        assert g["evalsha_per_claim"] == 1.0  # one round trip per claim
        assert finite_positive(g["commands_per_claim"]) and finite_positive(g["server_usec"])

    text = report.as_text(results)
    assert "7. Resource gating" in text
    assert "MISSED" in text or "met" in text
    markdown = (tmp_path / "results.md")
    markdown.write_text(report.as_markdown(results))
    report.write_json(results, str(tmp_path / "results.json"))
    assert json.loads((tmp_path / "results.json").read_text())["drain"]["c1"]["jobs"] == args.jobs


def test_a_run_does_not_overwrite_the_committed_results() -> None:
    latest = parse_args([]).out
    assert latest != COMMITTED_OUT and os.path.dirname(latest) == COMMITTED_OUT
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", os.path.join(latest, "results.json")],
                             check=False)
    assert ignored.returncode == 0, "bench/results/latest/ must be git-ignored"
    assert parse_args(["--commit-results"]).out == COMMITTED_OUT
    assert parse_args(["--out", "/tmp/x"]).out == "/tmp/x"


def test_nodes_scale_smoke(tmp_path: Path) -> None:
    """bench/nodes_scale.py (issue #9) at a tiny size: 200 db nodes, 3 families."""
    from bench import nodes_scale

    out = tmp_path / "nodes.json"
    assert nodes_scale.main(["--dbs", "200", "--parked", "10", "--claims", "50", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["tasks"] == 600 and results["stored_tasks"] == 600 and results["stored_nodes"] == 220
    full, churn, same = results["full"], results["churn"], results["unchanged"]
    assert full["whole"] and full["added"] == 600 and full["removed"] == 0
    assert not churn["whole"] and churn["added"] == churn["removed"] == 3 * results["churned_dbs"] == 12
    assert not same["whole"] and same["summary"] == "nothing changed"
    for done in (full, churn, same):
        assert done["errors"] == [] and finite_positive(done["peak_rss_mb"]) and finite_positive(done["requests"])
        assert finite_positive(done["seconds"]) and done["round_trips"] >= 1
    assert full["commands"] > churn["commands"] > same["commands"]  # a pass sends what changed
    assert finite_positive(results["bytes_per_task"])
    [claims] = results["claims"]
    assert claims["parked"] == 10 and claims["evalsha_per_claim"] == 1.0  # one round trip per claim
    assert finite_positive(claims["commands_per_claim"]) and finite_positive(claims["server_usec"])


def test_ab_smoke(tmp_path: Path) -> None:
    """bench/ab.py at a small size: this tree against itself, one round of 1,000 jobs (CPU is
    counted in clock ticks of 10 ms: enough jobs that Redis' share spans several)."""
    from bench import ab

    out = tmp_path / "ab.json"
    assert ab.main([str(ROOT), str(ROOT), "--rounds", "1", "--jobs", "1000", "--concurrency", "1", "--json",
                    str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(row["tree"], row["concurrency"], row["rounds"]) for row in rows] == [(str(ROOT), 1, 1)] * 2
    assert rows[0]["rate_vs_first"] == rows[0]["redis_cpu_vs_first"] == 0.0  # the first tree is the baseline
    for row in rows:
        assert finite_positive(row["jobs_per_s"]) and finite_positive(row["redis_cpu_us"])
        assert math.isfinite(row["worker_cpu_us"]) and row["worker_cpu_us"] >= 0
        assert 10 <= row["commands_per_job"] <= 30  # the worker's finish+claim, one script call per job
        assert 0.9 <= row["round_trips_per_job"] <= 1.1  # one per job (the last finish may land after the count)


def test_trail_memory_smoke() -> None:
    """bench/trail_memory.py at 2,000 jobs: full trails written by lib.lua's own
    note() (the script it runs after the library must load and run), and the
    bytes per job within the README's budget (about 130 per event a trail may
    hold plus about 80 per job)."""
    from bench import trail_memory

    result = trail_memory.measure(2000, 6)
    assert result["jobs"] == 2000 and result["events_per_job"] == 8  # 6, and half as many again less one
    assert 0 < result["bytes_per_job"] <= 130 * 8 + 80


def test_fcall_cost_smoke(monkeypatch) -> None:
    """bench/fcall_cost.py at a tiny size, on Debian's Redis 7 (functions: both
    commands measured, every call as the command asked) and on the embedded
    Redis 6.2 (none: it says so)."""
    import pytest

    from bench import fcall_cost
    from bench.server import RedisServer

    monkeypatch.setenv("REDBIKE_BENCH_REDIS_SERVER", "/usr/bin/redis-server")
    server = RedisServer().start()
    try:
        found = fcall_cost.measure(server, 2, 50)
    finally:
        server.stop()
    assert set(found) == {"evalsha", "fcall"}
    assert all(len(values) == 2 and all(map(finite_positive, values)) for values in found.values())
    monkeypatch.delenv("REDBIKE_BENCH_REDIS_SERVER")
    server = RedisServer().start()
    try:
        with pytest.raises(SystemExit, match="has no Redis Functions"):
            fcall_cost.measure(server, 1, 10)
    finally:
        server.stop()
