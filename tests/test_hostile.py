"""Hostile arguments (issue #7, bug 10): Redis does not roll back a script
that fails half-way, so every script checks all of its arguments before its
first write, and resource amounts and capacities are bounded where they
enter. Each script is called on the real server with each of its arguments
replaced by hostile values: a refused call changes nothing stored, and an
accepted one leaves the state consistent.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_jobs import NOW, Env

from redbike.resources import MAX_AMOUNT, MAX_CAPACITY, ResourceError, parse_capacity
from redbike.scripts import SCRIPT_NAMES, sources
from redbike.states import Placement

HOSTILE = [
    "1e17", "100000000000000000", "200000000000000", "1e400", "-1", "abc", "nan", "NaN", "inf", "-inf",
    "", " 1", "0x10", "1|2", "a|b", "a\nb", "\x00", "r=100000000000000000", "r=200000000000000", "r=1e17",
    "r=-1", "r=nan", "r=0", "r", "r=1,", "a|b=1", "r=1,r=x", "Q", "T", "Z",
]


def dump_all(client: redis.Redis) -> dict[str, bytes]:
    """Every key and its DUMP: a snapshot to restore."""
    return {key: client.dump(key) for key in sorted(client.keys("*"))}


def contents(client: redis.Redis) -> dict[str, Any]:
    """Every key and what it holds: a snapshot to compare (a DUMP's bytes
    are not: a big hash dumps in its table's order, which a RESTORE may change)."""
    read = {"string": client.get, "hash": client.hgetall, "list": lambda key: client.lrange(key, 0, -1),
            "set": client.smembers, "zset": lambda key: client.zrange(key, 0, -1, withscores=True)}
    return {key: read[client.type(key)](key) for key in sorted(client.keys("*"))}


def restore_all(client: redis.Redis, snapshot: dict[str, bytes]) -> None:
    client.flushall()
    for key, value in snapshot.items():
        client.restore(key, 0, value)


def consistent(env: Env) -> None:
    """Every queued job is in its queue, in line or woken; every lease has a deadline."""
    c, keys = env.c, env.keys
    placed = set(c.lrange(keys.queue("A"), 0, -1)) | set(c.hkeys(keys.parking))
    for jobid, status in c.hgetall(keys.statuses).items():
        if status.startswith("ENQ:"):
            assert jobid in placed, f"{jobid} is ENQ in no queue"
    assert set(c.hkeys(keys.leases)) == set(c.zrange(keys.deadlines, 0, -1))
    for resource, used in c.hgetall(keys.usage).items():
        assert int(used) >= 0, f"usage of {resource} is {used}"


class Stage:
    """A job in the timeline, one queued, one running (holding r) and one in
    line for r (capacity 1), and a leading dispatcher: every script has work."""

    def __init__(self, env: Env) -> None:
        self.env = env
        bike, keys = env.bike, env.keys
        bike.set_capacity("r", 1)
        bike.set("t:A", "AT:2030-01-01T00:00:00Z")
        bike.set("run:A", "NOW", needs="r")
        self.running = env.claim()
        assert self.running is not None
        bike.set("wait:A", "NOW", needs="r")
        bike.set("q:A", "NOW")
        assert env.claim() is not None  # parks wait:A, claims q:A
        bike.set("q2:A", "NOW")
        self.leader = env.dispatcher()
        assert self.leader.lead(NOW)
        self.snapshot = dump_all(env.c)
        self.contents = contents(env.c)
        channel = keys.queue_channel("A")
        token = self.running.lease.token
        queue = [keys.queue("A")]
        claim = ["tok2", "w2", "", "", "A", "10", "10"]
        self.calls: dict[str, tuple[list[str], list[str]]] = {
            "set": (queue, ["NOW", Placement("Q", "ENQ", due=NOW, attempt=1).script_arg, channel, "0",
                            "skip:30", "once", "2", "0", "me@here", "n:A", "r=1", "", "0", "{\"k\":1}"]),
            "unset": (queue, ["me@here", "q2:A", repr(NOW), "2"]),
            "claim": (queue, claim),
            "finish": (queue + queue, ["run:A", token, Placement("S", "END").script_arg, "", channel, "0",
                                       "A|done|3|2\nA|ms|40", *claim]),
            "tally": ([], ["A|done|3|2\nA|ms|40"]),
            "feed_done": ([keys.feed("f"), keys.feed_jobs("f")], ["100", "200", "1.5"]),
            "move_due": (queue, [str(self.leader.token), "1", channel, "t:A", "1", "1893456000.0",
                                 Placement("Q", "ENQ").script_arg]),
            "reap": (queue, [str(self.leader.token), "1", channel, "run:A", token,
                             Placement("T", "EXP", NOW, attempt=2).script_arg, "{}", "0", "1"]),
            "retire": ([], [str(self.leader.token), repr(NOW), "100"]),
            "revoke": (queue, ["1", channel, "run:A", token, Placement("D", "").script_arg, "{}", "1"]),
            "renew": ([], ["run:A", token, repr(NOW + 30)]),
            "lead": ([keys.dispatcher_epoch], [str(self.leader.token), "5000", "me"]),
            "capacity": ([], ["r", "2"]),
        }

    def run(self, name: str, args: list[str]) -> Any:
        """EVAL script ``name`` with ``args`` after the job-state keys: the
        first three are the common ones (now, channels)."""
        keys = self.env.keys.job_state() + self.calls[name][0]
        return self.env.c.eval(sources()[name], len(keys), *keys, *args)

    def common(self) -> list[str]:
        return [repr(NOW + 20), self.env.keys.dispatcher_channel, self.env.keys.queue_channel(""), "10"]

    def check(self, name: str, args: list[str]) -> bool:
        """Run; a refusal must change nothing. Returns whether it was refused."""
        try:
            self.run(name, args)
        except redis.ResponseError as exc:
            assert contents(self.env.c) == self.contents, f"{name}{args!r} changed state, then failed: {exc}"
            assert "BADARG" in str(exc) or "FENCED" in str(exc), f"{name}{args!r} failed unchecked: {exc}"
            return True
        consistent(self.env)
        restore_all(self.env.c, self.snapshot)
        return False


@pytest.fixture
def stage(client: redis.Redis, prefix: str) -> Stage:
    return Stage(Env(client, prefix))


def test_every_script_is_staged(stage: Stage) -> None:
    assert set(stage.calls) == set(SCRIPT_NAMES)
    for name, (_keys, args) in stage.calls.items():
        assert not stage.check(name, stage.common() + args), f"the staged {name} call is refused"


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_hostile_arguments_change_nothing_or_are_refused(stage: Stage, name: str) -> None:
    args = stage.common() + stage.calls[name][1]
    refused = set()
    for position in range(len(args)):
        if position in (1, 2):  # channel names: any string is one
            continue
        for value in HOSTILE:
            if stage.check(name, args[:position] + [value] + args[position + 1:]):
                refused.add(position)
    assert 0 in refused  # a bad now is refused by every script


def test_hostile_arguments_that_broke_scripts_half_way_are_refused(stage: Stage) -> None:
    common = stage.common()
    # claim: the lease was written before a non-numeric timeout failed the deadline
    claim = stage.calls["claim"][1]
    for bad in ("nan", "abc", "inf"):
        assert stage.check("claim", common + claim[:5] + ["10", bad])
        assert stage.check("claim", common + claim[:5] + [bad, "10"])
    # set: needs too large for HINCRBY, or unreadable
    set_args = stage.calls["set"][1]
    at = set_args.index("r=1")  # the staged job's needs
    for needs in ("r=100000000000000000", "r=200000000000000", f"r={MAX_AMOUNT + 1}", "r=x", "a|b=1"):
        assert stage.check("set", common + set_args[:at] + [needs] + set_args[at + 1:])
    assert stage.check("capacity", [*common, "r", str(MAX_CAPACITY + 1)])
    assert stage.check("capacity", [*common, "a|b", "1"])
    # renew: a bad deadline after good ones was applied half-way
    token = stage.running.lease.token
    assert stage.check("renew", [*common, "run:A", token, repr(NOW + 30), "run:A", token, "nan"])
    # finish: the lease was deleted before an unknown placement kind failed
    finish = stage.calls["finish"][1]
    at = finish.index(Placement("S", "END").script_arg)
    for placement in ("Z,,END,,,0,0", "T,soon,RTY,,,0,0", "S,,END,,,0", "S,,END,,,0,0,0", "S|,END,,,0,0", "Z"):
        assert stage.check("finish", common + finish[:at] + [placement] + finish[at + 1:])


def test_resource_amounts_and_capacities_are_bounded_at_input(client: redis.Redis, prefix: str) -> None:
    env = Env(client, prefix)
    before = contents(client)
    for needs in ("r=100000000000000000", "r=200000000000000", {"r": 10**17}, f"r={MAX_AMOUNT},r=1"):
        with pytest.raises(ResourceError) as raised:
            env.bike.set("j:A", "NOW", needs=needs)
        assert "\n" not in str(raised.value)
    for needs in ("a\x00b", "a\x1bb=1", "a\x85b"):
        with pytest.raises(ResourceError, match="bad resource name"):
            env.bike.set("j:A", "NOW", needs=needs)
    for capacity in (MAX_CAPACITY + 1, 10**17, -1):
        with pytest.raises(ResourceError):
            env.bike.set_capacity("r", capacity)
    with pytest.raises(ResourceError, match="at most"):
        parse_capacity("10000000000000")
    assert contents(client) == before
    env.bike.set("j:A", "NOW", needs=f"r={MAX_AMOUNT}")
    env.bike.set_capacity("r", MAX_CAPACITY)
    assert env.claim() is not None


def test_a_woken_record_of_the_largest_amount_reads_back(client: redis.Redis, prefix: str) -> None:
    """Amounts are written with %d: a large one was written as 2e+14."""
    env = Env(client, prefix)
    env.bike.set_capacity("r", 0)
    env.bike.set("big:A", "NOW", needs=f"r={MAX_AMOUNT}")
    assert env.claim() is None  # parked
    env.bike.set_capacity("r", MAX_CAPACITY)
    assert client.hget(env.keys.parking, "big:A").startswith(f"Rr={MAX_AMOUNT}|")
    assert client.hget(env.keys.usage, "r") == str(MAX_AMOUNT)
    run = env.claim()
    assert run is not None and run.lease.jobid == "big:A"
    assert client.hget(env.keys.usage, "r") == str(MAX_AMOUNT)


@pytest.fixture(scope="module")
def fuzz_stage(redis_server: Any) -> Stage:
    return Stage(Env(redis_server.client(), "fuzz"))


text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12), st.floats().map(repr),
                 st.integers(min_value=-10**20, max_value=10**20).map(str))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(SCRIPT_NAMES), data=st.data())
def test_fuzz_scripts_refuse_or_stay_consistent(fuzz_stage: Stage, name: str, data: st.DataObject) -> None:
    restore_all(fuzz_stage.env.c, fuzz_stage.snapshot)
    args = fuzz_stage.common() + fuzz_stage.calls[name][1]
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        position = data.draw(st.integers(min_value=3, max_value=len(args) - 1) if len(args) > 3 else st.just(0))
        args[position] = data.draw(text)
    fuzz_stage.check(name, args)
