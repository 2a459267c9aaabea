"""`redbike feed` and `redbike feeds` (redbike/feed.py): real Redis, and real
`redbike feed` and `redbike work` processes for backpressure, resuming after
SIGKILL and the feed's lease."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
import redis
from conftest import ROOT, Daemons, redbike_command, wait_for, write_config

from redbike import Redbike
from redbike.feed import Feeder, Source
from redbike.keys import Keys

COUNT_WORKER = "feedsource:Count('F')"


@pytest.fixture
def feeddir(tmp_path: Path, redis_server, prefix: str) -> Path:
    folder = write_config(tmp_path / "feed", prefix, redis_server.url, worker=COUNT_WORKER)
    shutil.copy(ROOT / "tests" / "feedsource.py", folder / "feedsource.py")
    return folder


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


def runs(client: redis.Redis, testlog: str) -> dict[str, int]:
    return {jobid: int(count) for jobid, count in client.hgetall(f"{testlog}:runs").items()}


def feed_command(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(redbike_command("feed", *args), check=False, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("redbike: ")
    return lines[0]


def test_100k_items_never_more_than_the_high_water_mark_waiting_each_runs_once(
        feeddir: Path, client: redis.Redis, keys: Keys, daemons: Daemons, testlog: str) -> None:
    daemons.start("work", "--concurrency", "4", cwd=feeddir)
    feeder = daemons.start("feed", "feedsource:numbers", "count=100000", "--queue=F", "--high-water=1000",
                           "--name=big", "--wait", cwd=feeddir)
    most = samples = 0
    while feeder.poll() is None:  # sampled as it runs: the feed's jobs waiting in the queue, and outstanding
        with client.pipeline(transaction=False) as pipe:
            pipe.llen(keys.queue("F"))
            pipe.zcard(keys.feed_jobs("big"))
            waiting, outstanding = pipe.execute()
        most, samples = max(most, waiting, outstanding), samples + 1
        time.sleep(0.01)
    assert feeder.returncode == 0, daemons.log(feeder)
    assert samples > 100 and 500 <= most <= 1000
    counted = runs(client, testlog)
    assert len(counted) == 100_000 and set(counted.values()) == {1}
    assert "finished: fed 100000, done 100000, failed 0, waiting 0" in daemons.log(feeder)
    # Retention: nothing of the finished jobs is left (status, record, schedule, finished list).
    assert client.hlen(keys.statuses) == client.hlen(keys.jobs) == client.hlen(keys.schedules) == 0
    assert client.llen(keys.finished) == 0
    assert client.hget(keys.feed("big"), "cursor") == "99999"


def test_killed_at_random_and_restarted_every_item_runs_at_most_one_batch_again_per_kill(
        feeddir: Path, client: redis.Redis, keys: Keys, daemons: Daemons, testlog: str) -> None:
    count, batch, kills = 30_000, 500, 4
    daemons.start("work", "--concurrency", "3", cwd=feeddir)
    args = ("feed", "feedsource:numbers", f"count={count}", "--queue=F", "--high-water=3000", f"--batch={batch}",
            "--name=k", "--wait")
    rng = random.Random()
    for _ in range(kills):
        feeder = daemons.start(*args, cwd=feeddir)
        fed = int(client.hget(keys.feed("k"), "fed") or 0)
        wait_for(lambda fed=fed: int(client.hget(keys.feed("k"), "fed") or 0) > fed, timeout=30, what="a batch fed")
        time.sleep(rng.uniform(0, 0.5))
        assert feeder.poll() is None, daemons.log(feeder)
        os.killpg(feeder.pid, signal.SIGKILL)
        feeder.wait()
    last = daemons.start(*args, cwd=feeddir)  # takes over at once: the lease's holder is gone
    assert last.wait(120) == 0, daemons.log(last)
    counted = runs(client, testlog)
    assert set(counted) == {f"n{i}:F" for i in range(count)}
    # The issue allows a batch again per kill; a batch and its checkpoint go
    # in together or not at all, so none is: each item ran once.
    again = sum(counted.values()) - count
    assert again <= kills * batch
    assert again == 0
    stored = client.hgetall(keys.feed("k"))
    assert stored["cursor"] == str(count - 1) and int(stored["done"]) == int(stored["fed"]) >= count


def test_a_second_feeder_of_the_same_feed_is_refused(feeddir: Path, client: redis.Redis, keys: Keys,
                                                      daemons: Daemons, process_env: dict[str, str]) -> None:
    first = daemons.start("feed", "feedsource:numbers", "count=5000", "--queue=F", "--high-water=100",
                          "--name=one", cwd=feeddir)  # no worker: it holds at its high-water mark
    wait_for(lambda: client.zcard(keys.feed_jobs("one")) == 100, what="the first feeder at its high-water mark")
    second = feed_command(feeddir, process_env, "feedsource:numbers", "count=5000", "--queue=F", "--name=one")
    line = one_line(second, 1)
    assert line.startswith(f"redbike: feed one is being fed by {client.get(keys.feed_lease('one'))}")
    shown = subprocess.run(redbike_command("feeds"), cwd=feeddir, env=process_env, capture_output=True, text=True,
                           check=True).stdout
    assert shown.startswith("one,99,100,0,0,100,") and shown.endswith(",feeding\n")
    os.killpg(first.pid, signal.SIGTERM)  # stops between batches, gives the lease back
    assert first.wait(10) == 1
    assert client.get(keys.feed_lease("one")) is None
    assert "stopped by a signal; fed 100" in daemons.log(first)
    shown = subprocess.run(redbike_command("feeds"), cwd=feeddir, env=process_env, capture_output=True, text=True,
                           check=True).stdout
    assert shown == "one,99,100,0,0,100,0,stopped\n"


@pytest.mark.parametrize(("args", "code", "says"), [
    (("nosuchmodule:items",), 2, "redbike: cannot import feed module 'nosuchmodule': No module named 'nosuchmodule'"),
    (("feedsource:unmarked",), 2, ("redbike: feed 'feedsource:unmarked' is not a function marked with "
                                   "@redbike.feed.feed_source")),
    (("os:system",), 2, "redbike: feed 'os:system' is not a function marked with @redbike.feed.feed_source"),
    (("feedsource:numbers", "count"), 2, "redbike: bad feed argument 'count': expected NAME=VALUE"),
    (("feedsource:numbers", "last=3"), 2, "redbike: the feed argument 'last' is the cursor, given by the feeder"),
    (("feedsource:numbers", "--name=a:b"), 2, "redbike: bad feed name 'a:b': no ':'"),
    (("feedsource:numbers", "--batch=0"), 2, "redbike: --batch must be from 1 to 100000, not 0"),
    (("feedsource:broken_call", "count=3"), 1, ("redbike: feed feedsource:broken_call raised TypeError: "
                                                 "broken_call() got an unexpected keyword argument 'last'")),
    (("feedsource:plain", "--queue=F", "--name=q"), 2, "redbike: item 1: the worker routes 'p0:F' to queue"),
])
def test_bad_feeds_get_one_line(feeddir: Path, process_env: dict[str, str], args: tuple[str, ...], code: int,
                                says: str) -> None:
    if args[-1] == "--name=q":  # a worker routing by something else than the id's suffix
        (feeddir / ".redbike.conf").write_text((feeddir / ".redbike.conf").read_text().replace(
            COUNT_WORKER, "feedsource:Elsewhere('F')"))
        (feeddir / "feedsource.py").write_text((feeddir / "feedsource.py").read_text()
                                               + "\n\nclass Elsewhere(Count):\n    def queue_for(self, jobid):\n"
                                               "        return 'G'\n")
    assert one_line(feed_command(feeddir, process_env, *args), code).startswith(says)


@pytest.mark.parametrize(("what", "says"), [
    ("int", "redbike: item 2: expected a job id or (job id, data), got 42"),
    ("triple", "redbike: item 2: expected a job id or (job id, data), got ('a', 1, 2)"),
    ("set", "redbike: item 2 (b1): the job's data must be JSON: Object of type set is not JSON serializable"),
    ("nan", "redbike: item 2 (b2): the job's data must be JSON: Out of range float values are not JSON compliant"),
])
def test_a_bad_item_stops_the_feed_at_the_last_good_batch(feeddir: Path, client: redis.Redis, keys: Keys,
                                                          process_env: dict[str, str], what: str, says: str) -> None:
    result = feed_command(feeddir, process_env, "feedsource:bad", f"what={what}", "--queue=F", "--batch=1",
                          "--name=bad")
    assert one_line(result, 2).startswith(says)
    stored = client.hgetall(keys.feed("bad"))
    assert stored["cursor"] == '"good0"' and stored["fed"] == "1"
    assert client.lrange(keys.queue("F"), 0, -1) == ["good0:F"]


def test_a_raising_feed_keeps_its_checkpoint_at_the_last_batch_that_went_in(
        feeddir: Path, client: redis.Redis, keys: Keys, process_env: dict[str, str]) -> None:
    result = feed_command(feeddir, process_env, "feedsource:raising", "after=5", "--queue=F", "--batch=2",
                          "--name=r")
    assert one_line(result, 1) == ("redbike: feed feedsource:raising raised RuntimeError: the source broke after 5 "
                                   "item(s) in this run (nothing of the batch in progress was fed)")
    stored = client.hgetall(keys.feed("r"))
    assert stored["cursor"] == '"r3"' and stored["fed"] == "4" and stored["exhausted"] == "0"
    assert sorted(client.lrange(keys.queue("F"), 0, -1)) == ["r0:F", "r1:F", "r2:F", "r3:F"]
    assert client.get(keys.feed_lease("r")) is None


def feeder(client: redis.Redis, prefix: str, function: str, name: str, **options: object) -> Feeder:
    source = Source.load(f"feedsource:{function}", [f"{k}={v}" for k, v in options.pop("args", {}).items()])
    return Feeder(Redbike(prefix=prefix, client=client), source, name, **options)  # type: ignore[arg-type]


@pytest.fixture
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "tests"))


@pytest.mark.usefixtures("importable")
def test_ids_tuples_and_sized_lists_resume_from_their_cursor(client: redis.Redis, prefix: str, keys: Keys) -> None:
    counts = feeder(client, prefix, "plain", "p", args={"count": 7}, queue="F", batch=3).run()
    assert (counts.fed, counts.outstanding) == (7, 7)
    assert client.hget(keys.feed("p"), "cursor") == '"p6"' and client.hget(keys.feed("p"), "exhausted") == "1"
    assert client.lrange(keys.queue("F"), 0, -1) == [f"p{i}:F" for i in reversed(range(7))]
    assert client.hget(keys.statuses, "p3:F").startswith("ENQ:")
    # Fed again with more items: from its cursor on.
    counts = feeder(client, prefix, "plain", "p", args={"count": 9}, queue="F").run()
    assert counts.fed == 9 and client.llen(keys.queue("F")) == 9
    counts = feeder(client, prefix, "sized", "s", args={"count": 4}).run()  # (id, data) items of a list
    assert counts.fed == 4 and client.hget(keys.feed("s"), "cursor") == '"s3"'
    assert client.hget(keys.data, "s2") == '{"i":2}'  # the payload, as work() gets it
    assert client.lrange(keys.queue("s0"), 0, -1) == ["s0"]  # no --queue: routed by the worker (its id's suffix)


@pytest.mark.usefixtures("importable")
def test_feed_done_counts_ended_jobs_and_removes_what_they_left(client: redis.Redis, prefix: str,
                                                               keys: Keys) -> None:
    bike = Redbike(prefix=prefix, client=client)
    fed = feeder(client, prefix, "numbers", "n", args={"count": 6}, queue="F")
    fed.run()
    assert fed.poll() == 6
    bike.set("other:F", "NOW")
    # Three end: n0 done, n1 failed for good, n2 unset; n3 waits for a retry.
    for jobid in ("n0:F", "n1:F", "n2:F", "n3:F", "other:F"):
        client.hset(keys.statuses, jobid, "ENQ:1")
    client.hset(keys.statuses, "n0:F", "END:1")
    client.hset(keys.data, "n0:F", "{}")
    client.rpush(keys.finished, "1|other:F", "1|n0:F", "1|n5:F")
    client.hset(keys.statuses, "n1:F", "DIE:1")
    client.hdel(keys.statuses, "n2:F")
    client.hset(keys.statuses, "n3:F", "RTY:1")
    assert fed.poll() == 3
    assert (fed.counts.done, fed.counts.failed) == (2, 1)
    assert not any(client.hexists(key, "n0:F") for key in (keys.jobs, keys.schedules, keys.statuses, keys.data))
    assert client.hexists(keys.jobs, "n1:F")  # a failure is kept for tell and retry
    assert client.lrange(keys.finished, 0, -1) == ["1|other:F", "1|n5:F"]
    assert client.zrange(keys.feed_jobs("n"), 0, -1) == ["n4:F", "n5:F", "n3:F"]  # the retry to the back
    stored = client.hgetall(keys.feed("n"))
    assert (stored["done"], stored["failed"]) == ("2", "1")


def test_wait_exits_1_when_jobs_failed_and_keeps_the_failures(feeddir: Path, client: redis.Redis, keys: Keys,
                                                                daemons: Daemons, process_env: dict[str, str]) -> None:
    daemons.start("work", "--concurrency", "2", cwd=feeddir)
    result = feed_command(feeddir, process_env, "feedsource:numbers", "count=30", "prefix=fail", "--queue=F",
                          "--name=f", "--wait")
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1].startswith("feed f: finished: fed 30, done 0, failed 30, waiting 0;")
    assert all(status.startswith("DIE:") for status in client.hvals(keys.statuses))
    assert client.hlen(keys.statuses) == 30  # kept for tell, explain and retry


def test_a_terminal_gets_a_progress_bar(feeddir: Path, daemons: Daemons, process_env: dict[str, str]) -> None:
    daemons.start("work", "--concurrency", "2", cwd=feeddir)
    child = pexpect.spawn(sys.executable, ["-m", "redbike", "feed", "feedsource:numbers", "count=3000", "--queue=F",
                                           "--name=t", "--wait", "--batch=100", "--high-water=400"],
                          cwd=str(feeddir), env=dict(process_env, TERM="xterm", LANG="C.UTF-8"), timeout=60,
                          dimensions=(24, 160))
    child.expect(pexpect.EOF)
    child.close()
    shown = child.before.decode(errors="replace")
    assert child.exitstatus == 0, shown
    assert "━" in shown and "fed 3000, done 3000, failed 0, waiting 0" in shown
    assert "feed t: finished: fed 3000, done 3000" in shown
