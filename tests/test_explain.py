"""redbike explain: the trail, line by line, and why a job is not running.

Driven through Redbike / WorkerPool / Dispatcher with an injected clock on
the real redis-server; the CLI in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from test_jobs import HOUR, HOURLY, NEXT_HOUR, NOW, Env

from redbike.cli import main
from redbike.explain import Explanation, ago, span, utc
from redbike.states import Outcome

FULL = "host:db-host-17"


@pytest.fixture
def env(client: redis.Redis, prefix: str) -> Env:
    return Env(client, prefix, queues="batch:A")


def explained(env: Env, jobid: str) -> Explanation:
    found = env.bike.explain(jobid)
    assert found is not None
    return found


def texts(found: Explanation) -> list[str]:
    """The lines without their time and age columns."""
    return [line.split(")  ", 1)[1] for line in found.lines()[:-1]]


def test_a_job_parked_on_a_full_resource_names_it_and_its_holders(env: Env) -> None:
    env.bike.set_capacity(FULL, 2)
    pool = env.pool()
    for db in ("db1", "db2"):
        env.bike.set(f"scan/db-host-17/{db}:batch", "NOW", needs=FULL)
        assert env.claim(pool) is not None
    env.bike.set("scan/db-host-17/db3:batch", "NOW", needs=FULL)
    env.at(NOW + 5)
    assert env.claim(pool) is None
    env.at(NOW + 185)
    found = explained(env, "scan/db-host-17/db3:batch")
    assert found.why == (f"waiting for {FULL} (1st of 1 in line), which is full: 2/2 held by "
                         "scan/db-host-17/db1:batch and scan/db-host-17/db2:batch")
    assert texts(found)[-1] == f"parked: waits in line for {FULL} (2/2)"
    assert found.lines()[-2].startswith(f"{utc(NOW + 5)}  (3 min ago)  parked")
    assert found.lines()[-1] == found.why
    # a holder runs: explain says so, and names no reason
    running = explained(env, "scan/db-host-17/db1:batch")
    assert running.why.startswith(f"running on w1 since {utc(NOW)} (3 min ago), lease deadline ")
    token = env.leases()["scan/db-host-17/db1:batch"].split("|")[0]
    assert texts(running)[-1] == f"claimed by w1 for occurrence {utc(NOW)} (attempt 1), lease token {token}; running"


def test_holders_beyond_five_are_counted_and_set_aside_amounts_shown(env: Env) -> None:
    env.bike.set_capacity(FULL, 8)
    pool = env.pool()
    holders = []
    for i in range(7):
        env.bike.set(f"h{i}:batch", "NOW", needs=FULL)
        holders.append(env.claim(pool))
    env.bike.set("big:batch", "NOW", needs=f"{FULL}=2")
    assert env.claim(pool) is None
    assert explained(env, "big:batch").why == (
        f"waiting for {FULL} (1st of 1 in line), which has 1 free, not the 2 it needs: 7/8 held by "
        "h0:batch, h1:batch, h2:batch, h3:batch, h4:batch and 2 more")
    # one ends: room is set aside for the woken job until a claim of its
    # queue takes it; explain counts what holders hold and what is set aside
    env.pool().finish(holders[0], Outcome("ok"), "", None, "w1")
    assert explained(env, "big:batch").why == \
        f"woken: {FULL} has room for it; the next claim of queue batch takes it"
    env.bike.set("late:A", "NOW", needs=FULL)
    assert env.claim(env.pool("A")) is None
    assert explained(env, "late:A").why == (
        f"waiting for {FULL} (1st of 1 in line), which is full: 8/8 held by "
        "h1:batch, h2:batch, h3:batch, h4:batch, h5:batch and 1 more (2 set aside for woken jobs not yet claimed)")


def test_set_run_failed_retry_die_reads_in_order_with_the_error(env: Env) -> None:
    env.bike.set("f:A", "NOW", retries=1)
    pool, d = env.pool(), env.dispatcher()
    job = env.claim(pool)
    env.at(NOW + 2)
    pool.finish(job, Outcome("error", error="ValueError: boom"), "Traceback ...", None, "w1")
    assert explained(env, "f:A").why.startswith("retrying: attempt 2 of 2 at ")
    assert d.lead(NOW + 2) and d.move_due(NOW + 2) == 1
    env.at(NOW + 3)
    job = env.claim(pool, "w2")
    env.at(NOW + 7)
    pool.finish(job, Outcome("error", error="ValueError: boom again"), "Traceback ...", None, "w2")
    found = explained(env, "f:A")
    assert found.why == "failed (DIE): ValueError: boom again; `redbike retry f:A` puts it back"
    token1, token2 = (line.rsplit(" ", 1)[1] for line in texts(found) if line.startswith("claimed"))
    due = utc(NOW)
    assert texts(found) == [
        f'set by {_who()}: schedule "NOW", misfire once, retries 1 -> ENQ',  # set enqueued it: no line of its own
        f"claimed by w1 for occurrence {due} (attempt 1), lease token {token1}",
        f"failed after 2.0 s: ValueError: boom; retry 1/1 at {utc(NOW + 2)} (backoff 0.0 s)",
        f"enqueued for occurrence {due} (attempt 2, 2.0 s late)",
        f"claimed by w2 for occurrence {due} (attempt 2), lease token {token2}",
        "failed after 4.0 s: ValueError: boom again; no retries left (DIE)",
    ]
    assert [line[:20] for line in found.lines()[:-1]] == [
        utc(t) for t in (NOW, NOW, NOW + 2, NOW + 2, NOW + 3, NOW + 7)]
    env.bike.retry(["f:A"])
    found = explained(env, "f:A")
    assert texts(found)[-2:] == ["failed after 4.0 s: ValueError: boom again; no retries left (DIE)",
                                 f"retry by {_who()}: put back at once with a fresh attempt count"]
    assert found.why.startswith("waiting in queue A since ") and found.why.endswith("position 1 of 1")


def _who() -> str:
    from redbike.api import who

    return who()


def test_a_recurring_job_shows_its_next_occurrence(env: Env) -> None:
    env.bike.set("h:A", HOURLY)
    found = explained(env, "h:A")
    assert found.why == f"next occurrence at {utc(NEXT_HOUR)} (in 46 min)"
    assert texts(found) == [f'set by {_who()}: schedule "{HOURLY}", misfire once, retries 0 -> TML']
    env.at(NEXT_HOUR + 1)
    d = env.dispatcher()
    assert d.lead(NEXT_HOUR + 1) and d.move_due(NEXT_HOUR + 1) == 1
    job = env.claim()
    env.at(NEXT_HOUR + 31)
    env.pool().finish(job, Outcome("ok"), "", None, "w1")
    found = explained(env, "h:A")
    assert texts(found)[-1] == f"finished after 30.0 s; next occurrence at {utc(NEXT_HOUR + 3600)}"
    assert found.why == f"next occurrence at {utc(NEXT_HOUR + 3600)} (in 59 min)"


def test_a_queued_job_with_no_running_job_of_its_queue_says_so(env: Env) -> None:
    env.bike.set("q1:A", "NOW")
    env.bike.set("q2:A", "NOW")
    assert explained(env, "q2:A").why == f"waiting in queue A since {utc(NOW)} (now), position 2 of 2"
    env.at(NOW + 120)
    assert explained(env, "q1:A").why == (f"waiting in queue A since {utc(NOW)} (2 min ago), position 1 of 2; "
                                          "no job of queue A is running: is a worker working queue A?")


def test_an_unset_job_is_explained_from_its_trail(env: Env) -> None:
    env.bike.set("u:A", HOURLY)
    env.at(NOW + 60)
    env.bike.unset("u:A")
    assert env.bike.tell("u:A") is None
    found = explained(env, "u:A")
    assert found.state is None
    assert found.why == f"unset at {utc(NOW + 60)} (now) by {_who()}: it will not run again"
    assert texts(found)[1:] == [f"occurrence {utc(NEXT_HOUR)} cancelled: unset or set again before it ran",
                                f"unset by {_who()}"]


def test_a_job_set_aside_says_what_it_needs(env: Env) -> None:
    env.bike.set_capacity(FULL, 2)
    env.bike.set("big:A", "NOW", needs=f"{FULL}=3")
    assert env.claim() is None
    found = explained(env, "big:A")
    assert found.why.startswith(f"set aside: needs 3 of {FULL}, capacity 2")
    assert texts(found)[-1] == f"set aside: needs 3 of {FULL}, capacity 2"


@pytest.mark.parametrize(("delta", "text"), [
    (0, "now"), (0.4, "now"), (5, "5 s ago"), (59.9, "59 s ago"), (180, "3 min ago"), (239, "3 min ago"),
    (7200, "2 h ago"), (3 * 86400, "3 d ago"), (-7200, "in 2 h"), (-90, "in 1 min"), (-5, "in 5 s"),
])
def test_relative_ages(delta: float, text: str) -> None:
    assert ago(NOW - delta, NOW) == text


def test_spans_and_utc() -> None:
    assert [span(s) for s in (2.25, 65, 3725)] == ["2.2 s", "1 min 5 s", "1 h 2 min"]
    assert utc(NOW) == "2023-11-14 22:13:20Z"


def test_cli_explain_text_json_and_errors(env: Env, redis_server, tmp_path: Path, capsys) -> None:
    conf = tmp_path / "redbike.conf"
    conf.write_text(f"[redbike]\nprefix = {env.keys.prefix}\n\n[redbike-redis]\nurl = {redis_server.url}\n")

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--config", str(conf), *args])
        out, err = capsys.readouterr()
        return code, out, err

    assert run("set", "c:A", "AT:2100-01-01T00:00:00Z", "--retries=2")[0] == 0
    code, out, _ = run("explain", "c:A")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and 'schedule "AT:2100-01-01T00:00:00Z", misfire once, retries 2 -> TML' in lines[0]
    assert lines[1].startswith("next occurrence at 2100-01-01 00:00:00Z (in ")
    code, out, _ = run("explain", "c:A", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["jobid"] == "c:A" and doc["why"] == lines[1]
    assert doc["events"] == [{"at": doc["events"][0]["at"], "event": "set", "by": _who(), "status": "TML",
                              "needs": "", "misfire": "once", "retries": "2", "schedule": "AT:2100-01-01T00:00:00Z"}]
    assert doc["state"]["status"].startswith("TML:") and doc["state"]["next_run"] == 4102444800.0
    code, _, err = run("explain", "nosuch:A")
    assert code == 3 and err == "redbike: no such job: nosuch:A\n"
    code, _, err = run("explain", "bad|id")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_misfire_lines_say_what_was_coalesced_or_skipped_and_why_skp(env: Env) -> None:
    env.bike.set("m:A", HOURLY, after=NOW - 3 * HOUR)  # 20:00, 21:00 and 22:00 missed
    assert texts(explained(env, "m:A"))[1:] == [
        f"misfire policy once: 2 missed occurrence(s) coalesced into one run (occurrence {utc(NEXT_HOUR - HOUR)})",
    ]
    env.bike.set("s:A", HOURLY, after=NOW - 3 * HOUR, misfire="skip", grace=60)
    found = explained(env, "s:A")
    assert texts(found)[1] == f"misfire policy skip:60: 3 skipped (occurrence {utc(NEXT_HOUR)})"
    assert found.why == f"next occurrence at {utc(NEXT_HOUR)} (in 46 min)"
    env.bike.set("late:A", f"AT:{NOW - 600:.0f}", misfire="skip", grace=60)
    found = explained(env, "late:A")
    assert texts(found)[-1] == "misfire policy skip:60: 1 skipped"
    assert found.why == "skipped (SKP) by its misfire policy skip:60: it was too late to run"


def test_a_reaped_run_did_not_complete_and_is_retried(env: Env) -> None:
    env.bike.set("r:A", "NOW")
    job = env.claim()
    assert job is not None
    d = env.dispatcher()
    env.at(NOW + 12)
    assert d.lead(NOW + 12) and d.reap(NOW + 12) == 1
    found = explained(env, "r:A")
    reason = "lease expired: worker w1 stopped renewing it (12s after it claimed the job)"
    assert texts(found)[-1] == f"did not complete after 12.0 s: {reason}; retry 1/2 at {utc(NOW + 12)} (backoff 0.0 s)"
    assert found.why == f"its last run did not complete ({reason}); retrying: attempt 2 of 3 at {utc(NOW + 12)} (now)"
