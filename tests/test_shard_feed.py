"""`redbike feed` and `redbike feeds` over shards (shards = 4; feed.py,
feedshards.py): every item in exactly once on its own shard, backpressure
summed over the shards, a feeder SIGKILLed at random and one stopped between
shards resuming without losing an item or putting one in twice, the lease
taken on every shard or none. Real Redis and real processes; the workers
are a `redbike work` per shard (a config whose prefix is the shard's)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import CLUSTER, ROOT, Daemons, RedisServer, redbike_command, wait_for, write_config
from test_feed import COUNT_WORKER, feed_command, one_line, runs

from redbike.feed import FeedBusy, Feeder, Item, Source, feed_source
from redbike.feedshards import FeedShards
from redbike.keys import Keys
from redbike.roundrobin import RoundRobin
from redbike.sharded import ShardedRedbike
from redbike.shards import Shards, shard_of, shard_prefix

COUNT = 4

pytestmark = pytest.mark.skipif(CLUSTER, reason="the samples sum the shards in one MULTI (one server)")


class Installation:
    """A folder whose config names COUNT shards, each shard's keys, and the
    folders of a worker per shard (a config of one shard: the shard's prefix)."""

    def __init__(self, folder: Path, prefix: str, server: RedisServer) -> None:
        self.folder, self.prefix, self.server = folder, prefix, server
        self.keys = [Keys(shard_prefix(prefix, k, COUNT)) for k in range(COUNT)]
        self.client = server.client()

    def work(self, daemons: Daemons, concurrency: int = 2) -> None:
        """A `redbike work` on each shard."""
        for k, keys in enumerate(self.keys):
            folder = write_config(self.folder.parent / f"shard{k}", keys.prefix, self.server.url, worker=COUNT_WORKER)
            shutil.copy(ROOT / "tests" / "feedsource.py", folder / "feedsource.py")
            daemons.start("work", "--concurrency", str(concurrency), cwd=folder)

    def hashes(self, name: str) -> list[dict[str, str]]:
        return [self.client.hgetall(keys.feed(name)) for keys in self.keys]

    def outstanding(self, name: str) -> int:
        """The feed's outstanding jobs over every shard, read at one instant."""
        with self.client.pipeline(transaction=True) as pipe:
            for keys in self.keys:
                pipe.zcard(keys.feed_jobs(name))
            return sum(pipe.execute())

    def fed(self, name: str) -> int:
        return sum(int(stored.get("fed") or 0) for stored in self.hashes(name))

    def bike(self) -> ShardedRedbike:
        return ShardedRedbike(RoundRobin("F"), Shards.on(self.client, self.prefix, COUNT))


@pytest.fixture
def sharded(tmp_path: Path, redis_server: RedisServer) -> Installation:
    prefix = f"s{uuid.uuid4().hex[:8]}"
    folder = write_config(tmp_path / "feed", prefix, redis_server.url, worker=COUNT_WORKER)
    config = folder / ".redbike.conf"
    config.write_text(config.read_text().replace("[redbike]\n", f"[redbike]\nshards = {COUNT}\n", 1))
    shutil.copy(ROOT / "tests" / "feedsource.py", folder / "feedsource.py")
    return Installation(folder, prefix, redis_server)


def numbered(count: int, through: int, k: int) -> int:
    """How many of the items n0 .. n(through-1) of feedsource:numbers live on shard k."""
    return sum(shard_of(f"n{i}:F", COUNT) == k for i in range(through))


def test_5000_items_each_once_on_its_own_shard_never_more_than_the_high_water_mark_outstanding(
        sharded: Installation, daemons: Daemons, testlog: str, process_env: dict[str, str]) -> None:
    count = 5000
    sharded.work(daemons)
    feeder = daemons.start("feed", "feedsource:numbers", f"count={count}", "--queue=F", "--high-water=400",
                           "--batch=100", "--name=big", "--wait", cwd=sharded.folder)
    most = samples = 0
    while feeder.poll() is None:  # sampled as it runs: outstanding, summed over the shards at one instant
        most, samples = max(most, sharded.outstanding("big")), samples + 1
        time.sleep(0.005)
    assert feeder.returncode == 0, daemons.log(feeder)
    assert samples > 20 and 100 <= most <= 400, (samples, most)
    counted = runs(sharded.client, testlog)
    assert set(counted) == {f"n{i}:F" for i in range(count)} and set(counted.values()) == {1}
    assert f"finished: fed {count}, done {count}, failed 0, waiting 0" in daemons.log(feeder)
    # Spread over every shard: each shard's keys hold its own items' counts, and its checkpoint.
    hashes = sharded.hashes("big")
    for k, (keys, stored) in enumerate(zip(sharded.keys, hashes, strict=True)):
        on_shard = numbered(count, count, k)
        assert on_shard > count // COUNT // 2
        assert int(stored["fed"]) == int(stored["done"]) == on_shard and stored["through"] == str(count)
        assert sharded.client.sismember(keys.feeds, "big")
        # Retention: nothing of the finished jobs is left on the shard.
        assert sharded.client.hlen(keys.statuses) == sharded.client.hlen(keys.jobs) == 0
        assert sharded.client.llen(keys.finished) == 0 and sharded.client.zcard(keys.feed_jobs("big")) == 0
    assert hashes[0]["cursor"] == str(count - 1) and hashes[0]["exhausted"] == "1"
    assert all("cursor" not in stored for stored in hashes[1:])  # the feed's cursor is shard 0's
    shown = subprocess.run(redbike_command("feeds"), cwd=sharded.folder, env=process_env, capture_output=True,
                           text=True, check=True).stdout
    assert shown == f"big,{count - 1},{count},{count},0,0,0,finished\n"


def consistent(sharded: Installation, name: str, count: int) -> None:
    """A feed's checkpoint over the shards: shard 0's `through` is where it
    resumes; a shard behind it is behind by the last batch, which shard 0
    recorded; each shard's count fed is exactly its items up to its own
    `through`, and each of them is outstanding or counted as ended."""
    hashes = sharded.hashes(name)
    through = int(hashes[0].get("through") or 0)
    record = sharded.client.get(sharded.keys[0].feed_batch(name))
    for k, stored in enumerate(hashes):
        own = int(stored.get("through") or 0)
        assert own == through or (record is not None and own < through), (k, own, through)
        fed = int(stored.get("fed") or 0)
        assert fed == numbered(count, own, k), (k, fed, own)
        assert fed == int(stored.get("done") or 0) + int(stored.get("failed") or 0) + sharded.client.zcard(
            sharded.keys[k].feed_jobs(name))
    if through:
        assert hashes[0]["cursor"] == str(through - 1)


def test_killed_at_random_and_restarted_every_item_goes_in_once(
        sharded: Installation, daemons: Daemons, testlog: str) -> None:
    count, batch, kills = 20_000, 500, 8
    sharded.work(daemons, concurrency=1)
    args = ("feed", "feedsource:numbers", f"count={count}", "--queue=F", "--high-water=2000", f"--batch={batch}",
            "--name=k", "--wait")
    rng = random.Random()
    killed = 0
    # Up to `kills` feeders, each killed at a random instant once it fed a
    # batch, while items are left to feed (on a fast host the feed may be
    # all in before the last kill).
    while killed < kills and (fed := sharded.fed("k")) < count:
        feeder = daemons.start(*args, cwd=sharded.folder)
        wait_for(lambda fed=fed: sharded.fed("k") > fed, timeout=30, what="a batch fed")
        time.sleep(rng.uniform(0, 0.4))  # a random instant: between batches, or between shards of one
        if feeder.poll() is not None:  # it went on to the end: every item fed, and their runs done
            assert feeder.returncode == 0 and sharded.fed("k") == count, daemons.log(feeder)
            break
        os.killpg(feeder.pid, signal.SIGKILL)
        feeder.wait()
        killed += 1
        consistent(sharded, "k", count)
    assert killed >= 3  # most of the feed went in through feeders killed at random
    last = daemons.start(*args, cwd=sharded.folder)  # takes over at once: the leases' holder is gone
    assert last.wait(180) == 0, daemons.log(last)
    counted = runs(sharded.client, testlog)
    assert set(counted) == {f"n{i}:F" for i in range(count)}
    assert sum(counted.values()) == count  # none ran twice: none was put in twice
    assert sharded.fed("k") == count
    consistent(sharded, "k", count)
    assert all(stored["through"] == str(count) for stored in sharded.hashes("k"))


def test_a_second_feeder_of_the_same_feed_is_refused_and_feeds_sums_the_shards(
        sharded: Installation, daemons: Daemons, process_env: dict[str, str]) -> None:
    first = daemons.start("feed", "feedsource:numbers", "count=5000", "--queue=F", "--high-water=100",
                          "--name=one", cwd=sharded.folder)  # no worker: it holds at its high-water mark
    wait_for(lambda: sharded.outstanding("one") == 100, what="the first feeder at its high-water mark")
    tokens = {sharded.client.get(keys.feed_lease("one")) for keys in sharded.keys}
    assert len(tokens) == 1 and None not in tokens  # one token, on every shard
    second = feed_command(sharded.folder, process_env, "feedsource:numbers", "count=5000", "--queue=F", "--name=one")
    assert one_line(second, 1).startswith(f"redbike: feed one is being fed by {tokens.pop()}")
    assert all(0 < sharded.client.zcard(keys.feed_jobs("one")) < 100 for keys in sharded.keys)  # spread
    shown = subprocess.run(redbike_command("feeds"), cwd=sharded.folder, env=process_env, capture_output=True,
                           text=True, check=True).stdout
    assert shown.startswith("one,99,100,0,0,100,") and shown.endswith(",feeding\n")
    os.killpg(first.pid, signal.SIGTERM)  # stops between batches, gives the lease back on every shard
    assert first.wait(10) == 1
    assert all(sharded.client.get(keys.feed_lease("one")) is None for keys in sharded.keys)
    shown = subprocess.run(redbike_command("feeds"), cwd=sharded.folder, env=process_env, capture_output=True,
                           text=True, check=True).stdout
    assert shown == "one,99,100,0,0,100,0,stopped\n"


def test_feed_source_is_refused_over_shards(sharded: Installation, process_env: dict[str, str]) -> None:
    result = subprocess.run(redbike_command("feed", "--source=http://127.0.0.1:9/items", "--once"),
                            check=False, cwd=sharded.folder, env=process_env, capture_output=True, text=True,
                            timeout=60)
    assert one_line(result, 2) == "redbike: feed --source is not yet supported with shards > 1 (feed FUNCTION is)"


# -- in process: the lease on every shard or none, a feeder stopped between shards ----------


LISTING: list[str] = []


@feed_source
def listing(last: str | None = None) -> Iterator[Any]:
    """The names of LISTING after ``last`` (sorted names, as a folder's)."""
    for name in sorted(LISTING):
        if last is None or name > last:
            yield Item(f"{name}:F", cursor=name)


def listing_feeder(sharded: Installation, batch: int = 10) -> Feeder:
    return Feeder(sharded.bike(), Source("test:listing", listing, [], {}), "l", batch=batch, high_water=1000)


def test_a_feeder_stopped_between_shards_is_completed_by_the_next_even_if_the_items_changed(
        sharded: Installation, monkeypatch: pytest.MonkeyPatch) -> None:
    LISTING[:] = [f"a{i:03d}" for i in range(0, 100, 2)]
    put = FeedShards._put
    calls: list[int] = []

    def stopped_after_shard_1(self: FeedShards, shard: Any, *args: Any, **kwargs: Any) -> Any:
        if len(calls) == COUNT * 2 + 2:  # the third batch: in on shards 0 and 1, not on 2 and 3
            raise KeyboardInterrupt
        calls.append(shard.index)
        return put(self, shard, *args, **kwargs)

    monkeypatch.setattr(FeedShards, "_put", stopped_after_shard_1)
    with pytest.raises(KeyboardInterrupt):
        listing_feeder(sharded).run()
    monkeypatch.setattr(FeedShards, "_put", put)
    hashes = sharded.hashes("l")
    assert [stored["through"] for stored in hashes] == ["30", "30", "20", "20"] and hashes[0]["cursor"] == '"a058"'
    # Meanwhile names were added: before the cursor, among the batch that was going in, and after it.
    original = list(LISTING)
    LISTING.extend(["a001", "a041", "a051", "a059"])
    assert listing_feeder(sharded).run().fed == len(original) + 1  # those before the cursor are not fed
    expected = sorted(f"{name}:F" for name in [*original, "a059"])
    for k, keys in enumerate(sharded.keys):  # each on its shard, once: none lost, none twice
        queued = sharded.client.lrange(keys.queue("F"), 0, -1)
        assert len(queued) == len(set(queued)) and all(shard_of(jobid, COUNT) == k for jobid in queued)
    queued = sorted(jobid for keys in sharded.keys for jobid in sharded.client.lrange(keys.queue("F"), 0, -1))
    assert queued == expected
    assert {stored["through"] for stored in sharded.hashes("l")} == {str(len(expected))}


def test_the_lease_is_taken_on_every_shard_or_none(sharded: Installation) -> None:
    LISTING[:] = ["b0", "b1"]
    other = "otherhost:1:feed"  # a live feeder elsewhere holds shard 2's copy
    sharded.client.set(sharded.keys[2].feed_lease("l"), other, px=60_000)
    with pytest.raises(FeedBusy, match=f"feed l is being fed by {other}"):
        listing_feeder(sharded).run()
    assert [sharded.client.get(keys.feed_lease("l")) for keys in sharded.keys] == [None, None, other, None]
    assert sharded.fed("l") == 0
    # A feeder that lost one shard's copy writes nothing more there, and stops.
    sharded.client.delete(sharded.keys[2].feed_lease("l"))
    feeder = listing_feeder(sharded)
    feeder.shards.take_lease()
    sharded.client.set(sharded.keys[3].feed_lease("l"), other, px=60_000)
    with pytest.raises(FeedBusy, match=f"lost its lease to {other}"):
        feeder.shards.fenced(feeder.shards.shards[3], lambda pipe: pipe.hset(sharded.keys[3].feed("l"), "x", 1))
    assert not sharded.client.hexists(sharded.keys[3].feed("l"), "x")


def test_a_killed_holder_on_this_host_gives_its_leases_up_at_once(sharded: Installation) -> None:
    LISTING[:] = ["c0", "c1", "c2"]
    gone = subprocess.Popen(["true"])  # a pid that is gone
    gone.wait()
    token = f"{socket.gethostname()}:{gone.pid}:dead"
    for keys in sharded.keys[:2]:  # killed while it took the leases: shards 0 and 1 held
        sharded.client.set(keys.feed_lease("l"), token, px=60_000)
    assert listing_feeder(sharded).run().fed == 3
    assert all(sharded.client.get(keys.feed_lease("l")) is None for keys in sharded.keys)


def test_one_shard_keeps_the_layout_of_a_feed_without_shards(client: redis.Redis, prefix: str) -> None:
    from redbike import Redbike

    LISTING[:] = ["d0", "d1", "d2"]
    bike = Redbike(RoundRobin("F"), prefix=prefix, client=client)
    Feeder(bike, Source("test:listing", listing, [], {}), "one", batch=2).run()
    keys = Keys(prefix)
    assert client.hgetall(keys.feed("one")).keys() == {"cursor", "fed", "exhausted", "updated", "source", "started",
                                                     "rate"}
    assert not client.exists(keys.feed_batch("one"))
