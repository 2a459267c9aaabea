"""The contract between the Python side and the Lua scripts, checked so that
the two cannot drift: the scripts' headers and lib.lua's constants against
redbike's modules, the arguments Python passes against each header, and
every shared record encoded on one side and decoded on the other, on the
real server.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pooltools import ClaimingPool
from test_jobs import HOURLY, NEXT_HOUR, NOW, Env
from test_nodes import node_config

from redbike import RoundRobin, parking, records, states, stats
from redbike import keys as keys_module
from redbike import scripts as scripts_module
from redbike.api import who
from redbike.claims import MAX_TIMEOUT, MIN_TIMEOUT, Rotation
from redbike.feed import Feeder, Source
from redbike.keys import Keys
from redbike.parking import (
    Aside,
    Parked,
    Ready,
    SetAside,
    Woken,
    decode_aside,
    decode_parked,
    decode_parking,
    decode_ready,
    encode_aside,
    encode_parked,
    encode_parking,
    encode_ready,
)
from redbike.reconcile import Reconciler
from redbike.records import (
    Claimed,
    Halt,
    JobRecord,
    LeaseRecord,
    TrailEvent,
    decode_claim,
    decode_finish,
    decode_job,
    decode_lease,
    decode_local_room,
    decode_needs,
    decode_placement,
    decode_status,
    decode_trail_event,
    encode_job,
    encode_lease,
    encode_local_room,
    encode_needs,
    encode_placement,
    encode_time,
    encode_trail_event,
    trail_of,
)
from redbike.resources import LOCAL_PREFIX, MAX_AMOUNT, MAX_CAPACITY
from redbike.scripts import (
    FUNCTION_SCRIPTS,
    HOT_PATH,
    SCRIPT_NAMES,
    TRAIL_LENGTH,
    Scripts,
    function_library,
    sources,
)
from redbike.states import FORGET, Outcome, Placement

LUA = resources.files("redbike") / "lua"
LIB = (LUA / "lib.lua").read_text(encoding="utf-8")
WAITING = (LUA / "waiting.lua").read_text(encoding="utf-8")  # lib.lua's functions defined on first use


def source(name: str) -> str:
    return (LUA / f"{name}.lua").read_text(encoding="utf-8")


def lua_constant(name: str) -> str:
    match = re.search(rf"^L\.{name} = ('[^']*'|[\d.e]+)", LIB, re.MULTILINE)
    assert match, f"lib.lua defines no {name}"
    return match.group(1).strip("'")


def header(text: str, label: str) -> str:
    """The ``-- LABEL:`` paragraph of a script's header comment, on one line,
    without its parenthesised remarks."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"-- {label}:"))
    part = [lines[start][len(f"-- {label}:"):]]
    for line in lines[start + 1:]:
        if not line.startswith("--       "):
            break
        part.append(line[2:])
    joined = " ".join(" ".join(part).split())
    while "(" in joined:
        joined = re.sub(r"\s*\([^()]*\)", "", joined)
    return joined


# -- the scripts and lib.lua's constants --------------------------------------

def test_every_script_file_is_loaded_and_has_a_header() -> None:
    files = {path.name[:-4] for path in LUA.iterdir() if path.name.endswith(".lua")}
    assert files - {"lib", "waiting"} == set(SCRIPT_NAMES)
    for name in SCRIPT_NAMES:
        text = source(name)
        assert text.startswith(f"-- {name}.lua: "), name
        assert header(text, "KEYS").startswith("the job-state keys"), name
        assert header(text, "ARGV").startswith("the common four"), name


def test_lib_lists_the_job_state_keys_in_the_order_python_passes_them() -> None:
    listed = re.findall(r"^--\s+KEYS\[(\d+)\]\s+(\w+)", LIB, re.MULTILINE)
    assert [int(n) for n, _ in listed] == list(range(1, len(listed) + 1))
    assert tuple(name for _, name in listed) == records.JOB_STATE
    assert lua_constant("K") == str(len(records.JOB_STATE)) and lua_constant("A") == "4"
    keys = Keys("p")
    assert keys.job_state() == [getattr(keys, name) for name, _ in zip(records.JOB_STATE, listed)]
    # lib.lua binds KEYS[1..20] to the names the header lists, in the same order
    bound = re.findall(r"^L\.(\w+) = KEYS\[(\d+)\]$", LIB, re.MULTILINE)
    assert [(name.lower(), int(n)) for name, n in bound] == [(name, i + 1) for i, name in enumerate(records.JOB_STATE)]


def test_lib_constants_match_python() -> None:
    assert int(lua_constant("WAKE_BATCH")) == keys_module.WAKE_BATCH
    assert int(lua_constant("MAX_AMOUNT")) == MAX_AMOUNT
    assert lua_constant("CLEAR_NEEDS") == records.CLEAR_NEEDS
    assert int(lua_constant("MAX_CAPACITY")) == MAX_CAPACITY
    assert lua_constant("LOCAL_PREFIX") == LOCAL_PREFIX
    assert int(lua_constant("AMOUNT_DIGITS")) == parking.AMOUNT_DIGITS == len(str(MAX_AMOUNT))
    assert lua_constant("NEW_JOB") == encode_job(JobRecord())
    assert lua_constant("ENDED") == states.ENDED.script_arg
    # the three patterns of the job record read its twelve fields (records.JobRecord)
    fields = len(dataclasses.fields(JobRecord))
    for name in ("RECORD", "RECORD_CLAIMED", "RECORD_COUNT"):
        assert re.sub(r"\[[^]]*\]", "", lua_constant(name)).count("|") == fields - 1, name  # separators, not classes


def test_the_duration_buckets_and_outcomes_match_python() -> None:
    bounds = re.search(r"local bounds = \{([^}]*)\}", LIB)
    assert bounds, "lib.lua's count_run() names no bounds"
    assert tuple(float(b) for b in bounds.group(1).split(",")) == stats.BUCKETS[:-1]
    assert "'|expired|'" in LIB  # the reaper's count; the slots' tallies count the other outcomes


def test_a_tally_reaches_the_totals_as_python_reads_them(client: redis.Redis, prefix: str) -> None:
    tally = stats.Tally()
    tally.add("A", "done", 0.004)
    tally.add("A", "done", 3.0)
    tally.add("A", "retried", 0.3)
    tally.add("B", "expired", 12.0)
    text = tally.take(NOW)
    assert tally.take(NOW + 10) == ""  # sent: nothing left
    keys = Keys(prefix)
    scripts = Scripts(client, keys)
    assert scripts.run("tally", NOW, [], [text]) == 5
    totals = stats.totals(client, keys)
    assert (totals["A"].done, totals["A"].retried, totals["A"].runs) == (2, 1, 3)
    assert totals["A"].seconds == pytest.approx(3.304) and totals["B"].expired == 1 and totals["B"].seconds == 0
    assert dict(totals["A"].buckets)[0.005] == 1 and dict(totals["A"].buckets)[0.5] == 2
    with pytest.raises(redis.ResponseError, match="BADARG"):
        scripts.run("tally", NOW, [], ["A|done|3|x"])


def test_statuses_and_placement_kinds_match_python() -> None:
    python_statuses = {value for name, value in vars(states).items() if re.fullmatch(r"[A-Z]{3}", name)}
    lua = LIB + "".join(source(name) for name in SCRIPT_NAMES)
    stamped = set(re.findall(r"stamp\('(\w+)'\)", lua)) | set(re.findall(r"== '(\w+):'", lua))
    assert stamped and stamped <= python_statuses
    lua_kinds = set(re.findall(r"kind == '(\w)'", LIB))
    assert lua_kinds == set("QTSXD")
    python_kinds = set(re.findall(r'Placement\("(\w)"', (resources.files("redbike") / "states.py").read_text()))
    assert python_kinds == lua_kinds


# -- the arguments Python passes, against each script's header -----------------

def own_arguments(name: str) -> tuple[int, str]:
    """How many fixed arguments script ``name`` takes after the common four,
    and the header's words on what follows them."""
    text = text_of(name).removeprefix("the common four")
    fixed, _, rest = text.removeprefix(", then ").partition(", then ")
    if fixed.startswith(("triples", "pairs")):
        return 0, rest or fixed
    words = fixed.rstrip(".").split(", ")
    return len(words), rest or fixed


GROUPS = {"per job 5 values": 5, "per job 3 values": 3, "pairs": 2, "triples": 3, "per lease 6 values": 6, "per job 4 values": 4, "per run 5 values": 5}


def text_of(name: str) -> str:
    return header(source(name), "ARGV")


def check_call(name: str, keys: list[str], args: list[Any]) -> None:
    fixed, rest = own_arguments(name)
    if name == "finish":  # then the claim's arguments, when it claims
        if len(keys) == 1:
            assert len(args) == fixed
            return
        check_call("claim", keys[1:], args[fixed:])
        return
    if rest.startswith("per queue"):
        assert len(args) == fixed + 3 * len(keys), (name, args)
        return
    if "the n queue channels" in text_of(name):
        n = int(args[text_of(name).removeprefix("the common four, then ").split(", ").index("queue count n")])
        assert n == len(keys)
        fixed += n - 1  # the header counted "the n queue channels" as one
    group = next((size for word, size in GROUPS.items() if word in text_of(name)), 0)
    if group:
        assert (len(args) - fixed) % group == 0 and len(args) > fixed, (name, args)
    else:
        assert len(args) == fixed, (name, args)


def test_python_passes_what_each_header_says(client: redis.Redis, prefix: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str], list[Any]]] = []
    run = Scripts.run

    def recording(self: Scripts, name: str, now: float, keys: list[str], args: list[Any], client: Any = None) -> Any:
        calls.append((name, keys, args))
        return run(self, name, now, keys, args, client)

    monkeypatch.setattr(Scripts, "run", recording)
    env = Env(client, prefix)
    env.bike.set_capacity("r", 1)
    env.bike.set("a:A", "NOW", needs="r")
    env.bike.set("b:A", "NOW", needs="r")
    env.bike.set("t:A", "AT:2023-11-14T22:13:30Z")
    env.bike.set("gone:A", "NOW")
    env.bike.unset("gone:A")
    pool = env.pool()
    rotation = Rotation(pool.queue_names)
    job = pool.claim(rotation, "w1")
    assert job is not None
    pool.finish(job, Outcome("ok"), "", rotation, "w1")  # claims b:A
    pool.finish(job, Outcome("ok"), "", None, "w1")  # stale: claims nothing
    dispatcher = env.dispatcher()
    env.at(NOW + 100)
    dispatcher.step(NOW + 100)  # moves t:A, reaps b:A
    assert dispatcher.moved == 1 and dispatcher.reaped == 1
    env.bike.scripts.run("renew", NOW, [], ["a:A", "tok", repr(NOW + 30)])
    env.bike.scripts.run("tally", NOW, [], ["A|done|1|1"])
    env.bike.set("orphan:B", "NOW")
    orphan = env.pool("B").claim(Rotation(["B"]), "w1")
    assert orphan is not None and orphan.lease.jobid == "orphan:B"
    Reconciler(env.bike, node_config(tmp_path)).end_runs({"orphan:B": (client.hget(env.keys.leases, "orphan:B"), 40.0)},
                                                         NOW)
    assert not client.hexists(env.keys.leases, "orphan:B")
    dispatcher.lead(NOW, milliseconds=0)
    Feeder(env.bike, Source("m:f", lambda last: iter(()), [], {}), "f").poll()
    assert {name for name, _, _ in calls} == set(SCRIPT_NAMES)
    for name, keys, args in calls:
        check_call(name, keys, args)


def supports_functions(client: redis.Redis) -> bool:
    """Whether the server has Redis Functions (Redis 7+; Valkey says 7.2)."""
    return int(str(client.info("server")["redis_version"]).split(".")[0]) >= 7


def test_a_slot_connection_sends_the_command_a_client_would(client: redis.Redis, prefix: str) -> None:
    """A slot's EVALSHA or FCALL (Scripts._run_on) is packed in two parts,
    its head once per script and key count: the bytes must be those of the
    whole command packed at once, for each key count, and Redis must run
    it: the hot path's scripts as FCALLs where the server has functions."""
    keys = Keys(prefix)
    common = [keys.dispatcher_channel, keys.queue_channel(""), "6"]
    one, two = [keys.queue("A")], [keys.queue("A"), keys.queue("B")]
    scripts = Scripts(client, keys)
    for fcall in (False, True, False):  # one Scripts: each command's heads cached apart
        scripts.fcall = fcall
        for name, own, args in [("claim", one, ["t", "w", "", "", "A", 10.0, 12.0]),
                                ("claim", two, ["t", "w", "", "", "A", 10.0, 12.0, "B", 600.0, 17.0]),
                                ("tally", [], ["A|done|1|1"]), ("claim", one, ["u", "w", "", "", "A", 10.0, 12.0])]:
            called = ("FCALL", function_library().functions[name]) if fcall and name in FUNCTION_SCRIPTS \
                else ("EVALSHA", client.script_load(sources()[name]))
            for now in (NOW, NOW + 0.1236):
                whole = (*called, len(records.JOB_STATE) + len(own), *keys.job_state(), *own, encode_time(now), *common,
                         *args)
                assert scripts._packed(name, now, own, args) == hiredis.pack_command(whole)
    scripts = Scripts(client, keys)
    before = client.info("commandstats").get("cmdstat_fcall", {}).get("calls", 0)
    connection = client.connection_pool.get_connection()
    try:
        assert scripts.run("tally", NOW, [], ["A|done|1|1\nA|ms|7"], client=connection) == 2
        assert scripts.run("claim", NOW, one, ["t", "w", "", "", "A", 10.0, 12.0], client=connection) == [records.NONE]
        assert scripts.fcall is supports_functions(client)
        if scripts.fcall:  # a server restarted without its functions, or FUNCTION FLUSH: loaded again
            client.function_flush()
        assert scripts.run("claim", NOW, one, ["t", "w", "", "", "A", 10.0, 12.0], client=connection) == [records.NONE]
    finally:
        client.connection_pool.release(connection)
    fcalls = client.info("commandstats").get("cmdstat_fcall", {}).get("calls", 0) - before
    assert fcalls == (3 if scripts.fcall else 0)  # the one the flush failed, sent again
    assert stats.totals(client, keys)["A"].done == 1


def test_each_function_call_starts_with_a_scripts_fresh_state(client: redis.Redis, prefix: str) -> None:
    """A function library's L outlives the call (a script's is made anew at
    each): what a claim caches while it runs (the current second, no queue
    paused, no job woken) must not reach the next call. Here one claim on a
    slot's connection finds no queue paused; queue A is paused; the next
    claim, a minute later, must leave A's job alone; the claim after it
    stamps the job's status with its own time."""
    env = Env(client, prefix)
    scripts = Scripts(client, env.keys)
    for jobid in ("one:A", "two:A"):
        env.bike.set(jobid, "NOW")
    queues = [env.keys.queue("A")]
    connection = client.connection_pool.get_connection()
    try:
        claimed = decode_claim(scripts.run("claim", NOW, queues, ["t1", "w", "", "", "A", "10", "12"], client=connection))
        assert isinstance(claimed, Claimed) and claimed.jobid == "one:A"
        env.bike.pause("A")
        assert decode_claim(scripts.run("claim", NOW + 60, queues, ["t2", "w", "", "", "A", "10", "12"],
                                        client=connection)) == records.NONE
        env.bike.resume("A")
        claimed = decode_claim(scripts.run("claim", NOW + 60, queues, ["t3", "w", "", "", "A", "10", "12"],
                                           client=connection))
        assert isinstance(claimed, Claimed) and claimed.jobid == "two:A"
        assert client.hget(env.keys.statuses, "two:A") == f"WRK:{NOW + 60:.0f}"
    finally:
        client.connection_pool.release(connection)
    assert scripts.fcall is supports_functions(client)


def test_a_claim_reads_the_control_value_only_when_a_key_it_looks_at_exists(client: redis.Redis, prefix: str) -> None:
    """A claim starts with one EXISTS of the control key, READY and PAUSED:
    when none exists (most claims) it reads nothing more of them; when one
    does, it reads the control value, and what the count leaves over still
    tells whether a queue may be paused."""
    env = Env(client, prefix)
    scripts = Scripts(client, env.keys)
    for jobid in ("one:A", "two:A", "three:A", "four:A"):
        env.bike.set(jobid, "NOW")
    queues = [env.keys.queue("A")]

    def claim(token: str, control_seen: str = "") -> tuple[object, dict[str, int]]:
        before = client.info("commandstats")
        reply = decode_claim(scripts.run("claim", NOW, queues, [token, "w", control_seen, "", "A", "10", "12"]))
        after = client.info("commandstats")
        ran = {name: after.get(f"cmdstat_{name}", {}).get("calls", 0) - before.get(f"cmdstat_{name}", {}).get("calls", 0)
               for name in ("exists", "get", "smembers")}
        return reply, ran

    reply, ran = claim("t1")
    assert isinstance(reply, Claimed) and reply.jobid == "one:A"
    assert ran == {"exists": 1, "get": 0, "smembers": 0}
    env.bike.pause("B")  # another queue: A's jobs are still claimed, after a look at the paused set
    reply, ran = claim("t2")
    assert isinstance(reply, Claimed) and reply.jobid == "two:A"
    assert ran == {"exists": 1, "get": 1, "smembers": 1}
    env.bike.resume("B")
    control = env.bike.control("HALT")
    assert claim("t3") == (Halt(control), {"exists": 1, "get": 1, "smembers": 0})
    reply, ran = claim("t4", control_seen=control)  # a HALT this pool has seen, nothing else: no paused set read
    assert isinstance(reply, Claimed) and reply.jobid == "three:A"
    assert ran == {"exists": 1, "get": 1, "smembers": 0}


def test_the_function_library_runs_each_scripts_body_after_lib_checks() -> None:
    """The library (Redis 7+) defines, once, the functions its two scripts
    call, directly or not, and each registered function starts with lib.lua's
    per-call checks and resets the fields its functions set while they run."""
    library = function_library()
    assert library.source.startswith(f"#!lua name={library.name}\nlocal KEYS, ARGV\n")
    defined = set(re.findall(r"^function L\.(\w+)\(", library.source, re.MULTILINE))
    for name in FUNCTION_SCRIPTS:
        eval_source = sources()[name]
        assert set(re.findall(r"^function L\.(\w+)\(", eval_source, re.MULTILINE)) <= defined
        body = library.source.split(f"redis.register_function('{library.functions[name]}', function(keys, args)\n")[1]
        assert body.startswith("KEYS, ARGV = keys, args\n")
        reset = re.match(r"(L\.\w+(?:, L\.\w+)*) = false(?:, false)*\n", body.split("\n", 1)[1])
        assert reset is not None
        # Every field of L that is not a function, or set by lib.lua's per-call part, starts each call false.
        constructor = re.search(r"^local L = \{([^}]*)\}", library.source, re.MULTILINE)
        assert constructor is not None
        fields = set(re.findall(r"(\w+) = false", constructor.group(1)))
        per_call = {"NOW", "NOW_N", "DISPATCH_CHANNEL", "QUEUE_CHANNEL_PREFIX", "TRAIL_LENGTH"}
        assert set(re.findall(r"L\.(\w+)", reset.group(1))) == fields - defined - per_call
        assert {"now_second", "ready_or_paused", "paused_names"} <= fields - defined - per_call
        assert body.index("return L.bad('now', L.NOW)") < body.index(f"-- {name}.lua:")
    assert "setmetatable" not in library.source  # not in a function library's environment: nothing is lazy


# -- records written by one side, read by the other, on the real server ---------

def lua(client: redis.Redis, body: str, *args: str) -> Any:
    """Run ``body`` after lib.lua and waiting.lua, loaded as they are (as a
    client in another language may), with ``args`` after the common four;
    the library's functions are in scope by their own names."""
    keys = Keys("contract").job_state()
    names = re.findall(r"^function L\.(\w+)\(", LIB + WAITING, re.MULTILINE)
    aliases = f"local {', '.join(names)} = {', '.join('L.' + name for name in names)}\n"
    return client.eval(LIB + "\n" + WAITING + "\n" + aliases + body, len(keys), *keys, encode_time(NOW), "d", "q:", "10", *args)


def test_lua_reads_what_python_writes(client: redis.Redis) -> None:
    lease = encode_lease(LeaseRecord("tok", "A|b", "host:1:0", NOW, 10.0, NOW - 5, 3, "db:x=2,host:a=1"))
    assert lua(client, "return {lease_token_matches(ARGV[5], 'tok') and 1 or 0, "
               "lease_token_matches(ARGV[5], 'to') and 1 or 0, lease_needs(ARGV[5])}", lease) \
        == [1, 0, "db:x=2,host:a=1"]
    assert lua(client, "return {lease_parts(ARGV[5])}", lease) \
        == ["tok", "A|b", "host:1:0", encode_time(NOW), "10.0", encode_time(NOW - 5), "3", "db:x=2,host:a=1"]
    for placement in (Placement("T", "RTY", NOW, due=NOW - 60, attempt=2, coalesced=3, skipped=4), FORGET):
        values = list(placement.values)
        assert lua(client, "local p = placement_of(ARGV[5]) "
                   "return {p.kind, p.at, p.status, p.due, p.attempt, p.coalesced, p.skipped}",
                   placement.script_arg) == values
        assert decode_placement(placement.script_arg) == values == decode_placement(encode_placement(values))
    events = [TrailEvent(NOW - 5, "set", {"by": "me@h", "status": "TML", "needs": "", "misfire": "once",
                                          "retries": "0", "schedule": "DTSTART:x|RRULE:y"}),
              TrailEvent(NOW, "woken", {"resource": "db:1"})]
    record = JobRecord(NOW - 60, 2, "skip:30", 5, 7, 8, 9, 10, NOW - 120, 2)
    value = encode_job(record, events)
    assert decode_job(value) == record and [decode_trail_event(e) for e in trail_of(value)] == events
    assert lua(client, "redis.call('HSET', L.JOBS, 'j', ARGV[5]) local r = job_of('j') return {r.trail, unpack(r)}",
               value) == ["".join("\n" + encode_trail_event(event) for event in events), *value.split("\n")[0].split("|")]
    assert decode_job(lua(client, "redis.call('DEL', L.JOBS) return table.concat(job_of('new'), '|')")) == JobRecord()
    # note() writes what decode_trail_event reads (a line break becomes a space), and trims to the trail length
    value = lua(client, "local r = job_of('new') for i = 1, 14 do note(r, 'woken', 'r' .. i) end "
                "note(r, 'set', 'me', 'TML', '', 'once', '0', 'a\\nb') save_job('new', r) "
                "return redis.call('HGET', L.JOBS, 'new')")
    assert decode_job(value).events == len(trail_of(value)) == 10
    assert [decode_trail_event(e).fields.get("resource") for e in trail_of(value)][:-1] == \
        [f"r{i}" for i in range(6, 15)]
    assert decode_trail_event(trail_of(value)[-1]).fields["schedule"] == "a b"
    for policy in ("once", "all", "all:3", "skip:0", "skip:30", "skip", "all:", "twice", "all:x"):
        valid = lua(client, "return is_misfire(ARGV[5]) and 1 or 0", policy) == 1
        try:
            records.check_misfire(policy)
            assert valid, policy
        except ValueError:
            assert not valid, policy
    needs = {"db:x": 2, "host:a": 1, f"{LOCAL_PREFIX}cpu": MAX_AMOUNT}
    parsed = lua(client, "local out = {} for _, n in ipairs(parse_needs(ARGV[5])) do "
                 "table.insert(out, n[1]) table.insert(out, int(n[2])) end return out", encode_needs(needs))
    assert dict(zip(parsed[0::2], map(int, parsed[1::2]))) == needs
    parked = Parked("host:a", "0000000000000042", "A", "job:with|bar:A")
    assert lua(client, "return {parked_parts(ARGV[5])}", encode_parked(parked)) == list(vars(parked).values())
    ready = Ready("A", "0000000000000042", "job|x:A")
    assert lua(client, "return {ready_parts(ARGV[5])}", encode_ready(ready)) == list(vars(ready).values())
    woken = encode_parking(Woken("host:a", MAX_AMOUNT, ready))
    assert lua(client, "local r, a, m = woken_parts(ARGV[5]) return {r, int(a), m}", woken) \
        == ["host:a", str(MAX_AMOUNT), encode_ready(ready)]
    assert lua(client, "return {woken_parts(ARGV[5])}", encode_parking(parked)) == []
    aside = Aside("worker:slots", MAX_AMOUNT, "0000000000000042", "A", "job|x:A")
    assert lua(client, "local r, a, s, q, j = aside_parts(ARGV[5]) return {r, int(a), s, q, j}", encode_aside(aside)) \
        == ["worker:slots", str(MAX_AMOUNT), aside.seq, "A", "job|x:A"]
    assert lua(client, "local c, m = set_aside_parts(ARGV[5]) return {int(c), m}",
               encode_parking(SetAside(MAX_AMOUNT - 1, aside))) == [str(MAX_AMOUNT - 1), encode_aside(aside)]
    assert lua(client, "return {woken_parts(ARGV[5])}", encode_parking(SetAside(2, aside))) == []
    room = encode_local_room({"worker:b": 0, "worker:a": 3}, {"worker:a": 4, "worker:b": MAX_AMOUNT})
    assert lua(client, "local r = parse_local_room(ARGV[5]) return {is_local_room(ARGV[5]) and 1 or 0, "
               "r['worker:a'][1], r['worker:a'][2], r['worker:b'][1], r['worker:b'][2]}", room) \
        == [1, 3, 4, 0, MAX_AMOUNT]
    assert lua(client, "return is_local_room(ARGV[5]) and 1 or 0", encode_local_room({}, {})) == 1


def test_python_reads_what_lua_writes(client: redis.Redis, prefix: str) -> None:
    env = Env(client, prefix)
    assert decode_status(lua(client, "return stamp('ENQ')")) == ("ENQ", NOW)
    env.bike.set_capacity("r", 0)
    env.bike.set("parked:A", "NOW", needs="r=3,worker:cpu=2")
    env.bike.set("run:A", "NOW", needs="s=1")
    assert env.claim() is not None  # parks parked:A, claims run:A
    member = client.zrange(env.keys.parked, 0, -1)[0]
    assert decode_parked(member) == Parked("r", decode_parked(member).seq, "A", "parked:A")
    assert decode_parking(client.hget(env.keys.parking, "parked:A")) == decode_parked(member)
    env.bike.set_capacity("r", 5)
    woken = decode_parking(client.hget(env.keys.parking, "parked:A"))
    assert isinstance(woken, Woken) and woken.resource == "r" and woken.amount == 3
    assert woken.ready == decode_ready(client.zrange(env.keys.ready, 0, -1)[0]) == Ready("A", woken.ready.seq, "parked:A")
    lease = decode_lease(client.hget(env.keys.leases, "run:A"))
    assert (lease.queue, lease.worker, lease.since, lease.timeout, lease.due, lease.attempt, lease.needs) \
        == ("A", "w1", NOW, 10.0, NOW, 1, "s=1")
    assert decode_job(client.hget(env.keys.jobs, "run:A")) == JobRecord(NOW, 1, "once", 0, 1, 0, 0, 0, NOW)
    assert decode_needs(decode_job(client.hget(env.keys.jobs, "parked:A")).needs) == {"r": 3, "worker:cpu": 2}
    env.bike.set_capacity("small", 2)
    env.bike.set("big:A", "NOW", needs="small=3")
    assert env.claim().lease.jobid == "parked:A"  # woken above
    assert env.claim() is None  # sets big:A aside
    member = client.zrange(env.keys.aside, 0, -1)[0]
    assert decode_aside(member) == Aside("small", 3, decode_aside(member).seq, "A", "big:A")
    assert decode_parking(client.hget(env.keys.parking, "big:A")) == SetAside(2, decode_aside(member))
    local = env.pool("A", resources={"slots": 2})
    slot = local.claims.slot(0, "w")
    assert decode_local_room(slot._claim_part(Rotation(local.queue_names), "t", {})[1][3]) \
        == {"worker:slots": (2, 2)}
    env.bike.set("run:A", "AT:2030-01-01T00:00:00Z")  # while it runs: a pending placement
    assert decode_placement(decode_job(client.hget(env.keys.jobs, "run:A")).pending) \
        == list(Placement("T", "TML", 1893456000.0, 1893456000.0, 1).values)
    env.bike.unset("run:A")
    trail = [decode_trail_event(event) for event in trail_of(client.hget(env.keys.jobs, "run:A"))]
    # set's own event says it was enqueued; the unset drops the placement set while it ran
    assert [event.event for event in trail] == ["set", "set", "cancelled", "unset"]
    assert trail[0] == TrailEvent(NOW, "set", {"by": who(), "status": "ENQ", "needs": "s=1", "misfire": "once",
                                               "retries": "0", "schedule": "NOW"})
    assert trail[1].fields["schedule"] == "AT:2030-01-01T00:00:00Z" and trail[1].fields["status"] == "TML"
    env.at(NOW + 0.25)
    env.bike.set("due:A", "AT:2023-11-14T22:13:20Z")  # due now: set enqueues it
    env.bike.set("later:A", HOURLY)
    dispatcher = env.dispatcher()
    dispatcher.step(NEXT_HOUR)
    enqueued = decode_trail_event(trail_of(client.hget(env.keys.jobs, "later:A"))[-1])
    assert enqueued == TrailEvent(NEXT_HOUR, "enqueued", {"due": f"{NEXT_HOUR:.0f}", "attempt": "1"})
    assert [records.decode_finished(entry) for entry in client.lrange(env.keys.finished, 0, -1)] == [(NOW, "run:A")]
    assert lua(client, "finished('a|b:A') return redis.call('LRANGE', L.FINISHED, 0, -1)") \
        == [records.encode_finished(NOW, "a|b:A")]
    assert records.encode_finished(NOW + 0.5, "x") == "1700000000.5|x"

def test_alternative_needs_and_lines_are_read_as_written(client: redis.Redis, prefix: str) -> None:
    """Replicas: the needs of a job with alternative paths (records.encode_alternatives)
    as paths_of() and set.lua read them, and a job in several lines (park_lines) as
    parking.parked_lines reads it."""
    assert lua_constant("ALTERNATIVES_SEP") == records.ALTERNATIVES_SEP
    assert lua_constant("LINES_SEP") == "\\n" and parking.LINES_SEP == "\n"
    assert int(lua_constant("MAX_PATHS")) == records.MAX_PATHS
    paths = [{"dl@d1": 1, "hc@h1": 2}, {"dl@d1": 1, "hc@h2": 2}, {"dl@d1": 1, "hc@h3": MAX_AMOUNT}]
    text = records.encode_alternatives(paths)
    read = lua(client, "local out = {} for _, path in ipairs(paths_of(ARGV[5])) do local one = {} "
               "for _, n in ipairs(parse_needs(path)) do table.insert(one, n[1] .. '=' .. int(n[2])) end "
               "table.insert(out, table.concat(one, ',')) end return out", text)
    assert [decode_needs(path) for path in read] == paths == records.decode_alternatives(text)
    env = Env(client, prefix)
    env.bike.set("alt:A", "STOP", needs=paths)
    assert decode_job(client.hget(env.keys.jobs, "alt:A")).needs == text
    for bad in (" ".join(["a=1"] * (records.MAX_PATHS + 1)), "a=1  b=1", "a=1 b=x"):
        with pytest.raises(redis.ResponseError, match="bad needs"):
            env.bike.scripts.run("set", NOW, [env.keys.queue("A")],
                                 ["STOP", FORGET.script_arg, env.keys.queue_channel("A"), "0",
                                  "", "once", "", "0", "me", "alt:A", bad, "", "0", ""])
    client.delete(Keys("contract").parked)
    value = lua(client, "park_lines('j|x:A', {'hc@h1', 'hc@h2'}, 'A', nil) return redis.call('HGET', L.PARKING, 'j|x:A')")
    lines = parking.parked_lines(value)
    assert [(p.resource, p.queue, p.jobid) for p in lines] == [("hc@h1", "A", "j|x:A"), ("hc@h2", "A", "j|x:A")]
    assert lines[0].seq == lines[1].seq and decode_parking(value) == lines[0]
    assert parking.encode_parked_lines(lines) == value
    assert sorted(client.zrange(Keys("contract").parked, 0, -1)) == sorted(map(encode_parked, lines))


def test_the_claim_and_finish_replies_decode(client: redis.Redis, prefix: str) -> None:
    env = Env(client, prefix)
    env.bike.set("a:B", "NOW", needs="r=2")
    claim = ["tok", "w1", "", "", "A", "10", "10", "B", "10", "10"]
    queues = [env.keys.queue("A"), env.keys.queue("B")]
    reply = env.bike.scripts.run("claim", NOW, queues, claim)
    claimed = decode_claim(reply)
    assert isinstance(claimed, Claimed) and "\n" not in claimed.record  # the record without its trail
    assert claimed == Claimed("a:B", 1, "NOW", claimed.record, {"r": 2})
    assert decode_job(claimed.record) == JobRecord(NOW, 1, "once", 0, 1, 0, 0, 0, NOW)
    assert decode_claim(env.bike.scripts.run("claim", NOW, queues, claim)) == records.NONE
    finish = ["a:B", "tok", Placement("S", "END").script_arg, "", env.keys.queue_channel("B"), "0", ""]
    done = env.bike.scripts.run("finish", NOW, [env.keys.queue("B"), *queues], finish + claim)
    assert decode_finish(done) == ("DONE", records.NONE)
    assert decode_finish(env.bike.scripts.run("finish", NOW, [env.keys.queue("B")], finish)) == ("STALE", "NONE")
    env.bike.control()
    assert decode_claim(env.bike.scripts.run("claim", NOW, queues, claim)) == Halt(client.get(env.keys.control))


def test_a_finish_that_claims_replies_with_one_flat_array(client: redis.Redis, prefix: str) -> None:
    """Redis 6.2 writes a nested array reply of a script in two system calls
    (and the slot then often reads it in two): finish.lua's reply holds
    the claim's values after the finish's own, not in an array of theirs."""
    env = Env(client, prefix)
    env.bike.set("one:B", "NOW")
    env.bike.set("two:B", "NOW")
    queues = [env.keys.queue("B")]
    assert isinstance(decode_claim(env.bike.scripts.run("claim", NOW, queues, ["tok1", "w1", "", "", "B", "10", "10"])),
                      Claimed)
    finish = ["one:B", "tok1", Placement("S", "END").script_arg, "", env.keys.queue_channel("B"), "0", ""]
    reply = env.bike.scripts.run("finish", NOW, [env.keys.queue("B"), *queues],
                                 finish + ["tok2", "w1", "", "", "B", "10", "10"])
    assert not any(isinstance(value, list) for value in reply), reply
    done, claimed = decode_finish(reply)
    assert done == "DONE" and isinstance(claimed, Claimed) and claimed.jobid == "two:B"


@pytest.mark.parametrize(("events", "needs", "outcome"), [
    (0, "", Outcome("ok")),
    (3, "db=1,cpu=2 db2=1", Outcome("ok")),
    (4, "", Outcome("error", error="ValueError: a | b")),
    (TRAIL_LENGTH + TRAIL_LENGTH // 2 - 1, "", Outcome("ok")),  # its run's event reaches the cut
])
def test_a_run_that_ends_its_job_adds_one_event_and_changes_nothing_else(
        client: redis.Redis, prefix: str, events: int, needs: str, outcome: Outcome) -> None:
    """A finish whose placement changes nothing in the job record but its
    trail (a one-off done or dead) writes the record back without taking it
    apart (append_event in lib.lua): the ledger, the needs and the older
    events stay as they were, the events count and the trail gain the run,
    and a trail that reaches half as many again as its length is cut back."""
    env = Env(client, prefix)
    env.bike.set("a:A", "NOW")
    pool = env.pool()
    job = env.claim(pool)
    assert job is not None
    older = [TrailEvent(NOW - 60 + i, "woken", {"resource": f"r{i}"}) for i in range(events)]
    record = JobRecord(NOW, 1, "skip:30", 0, 7, 2, 1, 3, NOW, needs=needs)
    client.hset(env.keys.jobs, "a:A", encode_job(record, older))
    env.at(NOW + 2)
    assert pool.finish(job, outcome, "", None, "w1")[0] == "DONE"
    value = client.hget(env.keys.jobs, "a:A")
    trail = [decode_trail_event(event) for event in trail_of(value)]
    kept = (older + trail[-1:])[-TRAIL_LENGTH:] if events + 1 >= TRAIL_LENGTH * 3 // 2 else older + trail[-1:]
    assert trail == kept and decode_job(value) == record
    assert (decode_job(value).events, decode_job(value).needs, decode_job(value).pending) == (len(kept), needs, "")
    status = "END" if outcome.kind == "ok" else "DIE"
    assert trail[-1] == TrailEvent(NOW + 2, "run", {
        "due": encode_time(NOW), "attempt": "1", "token": job.lease.token, "worker": "w1",
        "since": encode_time(NOW), "status": status, "next_at": "", "error": outcome.error or ""})
    assert (env.status("a:A") or "").startswith(status + ":")


def test_a_run_that_ends_a_job_with_a_record_not_of_twelve_fields_leaves_a_new_record(
        client: redis.Redis, prefix: str) -> None:
    """A record another writer mangled (here one field short, its count and
    needs still where the finish reads them) is made a new one with the
    run's event, as note() does, not kept with the event appended."""
    env = Env(client, prefix)
    env.bike.set("a:A", "NOW")
    pool = env.pool()
    job = env.claim(pool)
    assert job is not None
    client.hset(env.keys.jobs, "a:A", "1|once|0|0|0|0|0||3||")
    assert pool.finish(job, Outcome("ok"), "", None, "w1")[0] == "DONE"
    value = client.hget(env.keys.jobs, "a:A")
    assert decode_job(value) == JobRecord() and decode_job(value).events == 1
    assert [decode_trail_event(event).event for event in trail_of(value)] == ["run"]


class TimedWorker(RoundRobin):
    """Every queue's jobs may run ``seconds``."""

    seconds = 1.0

    def timeout(self, queue_name: str) -> float | None:
        return self.seconds


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(seconds=st.one_of(st.floats(min_value=MIN_TIMEOUT, max_value=MAX_TIMEOUT),
                         st.sampled_from([MIN_TIMEOUT, 0.0015, 1e-3 + 1e-12, 86400.5, MAX_TIMEOUT])))
def test_every_timeout_a_pool_takes_is_one_its_claims_pass(client: redis.Redis, prefix: str, seconds: float) -> None:
    """A claim checks its queues' timeouts by one pattern (is_seconds in
    lib.lua: digits, no exponent, no tonumber): every timeout a pool
    accepts reaches it in that form, and the claim goes through."""
    worker = TimedWorker("A")
    worker.seconds = seconds
    pool = ClaimingPool(client, Keys(prefix), worker)
    assert pool.claim(Rotation(pool.queue_names), "w1") is None  # not a BADARG: nothing to claim


@pytest.mark.parametrize("seconds", [MIN_TIMEOUT / 2, 1e-5, -1.0, MAX_TIMEOUT * 2, float("nan")])
def test_a_timeout_out_of_bounds_is_refused_where_the_pool_is_made(client: redis.Redis, prefix: str,
                                                                   seconds: float) -> None:
    worker = TimedWorker("A")
    worker.seconds = seconds
    with pytest.raises(ValueError, match=re.escape(f"for queue A: seconds from {MIN_TIMEOUT:g} to {MAX_TIMEOUT:.0f}")):
        ClaimingPool(client, Keys(prefix), worker)


def test_each_script_loads_every_library_function_it_calls_and_no_other() -> None:
    everything = set(re.findall(r"^function L\.(\w+)\(", LIB + WAITING, re.MULTILINE))
    for name, text in sources().items():
        defined = set(re.findall(r"^function L\.(\w+)\(", text, re.MULTILINE))
        called = set(re.findall(r"\bL\.(\w+)\(", text)) & everything
        assert called <= defined, (name, called - defined)
        assert defined == called, (name, defined - called)  # nothing loaded that no one calls
    assert len(set(re.findall(r"^function L\.(\w+)\(", sources()["move_due"], re.MULTILINE))) < len(everything) / 2


def test_functions_off_the_hot_path_are_defined_on_first_use_only() -> None:
    """Only HOT_PATH's functions are made at once (and presized in L's
    constructor); the others are left out of the constructor and defined
    inside the __index handler, set before the library's own checks, so a
    call that never looks one up never makes them."""
    text = sources()["finish"]
    handler = "setmetatable(L, {__index = function(lib, name)"
    eager, _, lazy = text.partition(handler)
    assert lazy, "finish may call functions off the hot path, so it needs the handler"
    constructor = re.search(r"local L = \{([^}]*)\}", eager)
    assert constructor is not None and eager.endswith(constructor.group(0) + "\n")  # the handler follows it
    presized = set(re.findall(r"(\w+) = false", constructor.group(1)))
    cold = set(re.findall(r"^function L\.(\w+)\(", LIB + WAITING, re.MULTILINE)) - HOT_PATH
    assert presized and not presized & cold
    defined_later = set(re.findall(r"^function L\.(\w+)\(", lazy.split("\nend})", 1)[0], re.MULTILINE))
    assert {"park", "wake_if_room", "claim_aside", "bad", "count_expired"} <= defined_later
    assert not defined_later & HOT_PATH
    assert text.index(handler) < text.index("return L.bad('now', L.NOW)")  # L.bad is found


def test_hot_path_is_what_a_plain_finish_and_claim_call(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """HOT_PATH is exactly the functions that a plain run's finish, with the
    claim in the same call, calls: one missing would make each such call
    define the whole rest of the library; one too many is made for nothing."""
    def counting(name: str, text: str) -> str:
        return re.sub(r"(?m)^function L\.(\w+)\(.*\)\n",
                      lambda match: f"{match.group(0)}  redis.call('HINCRBY', 'calls:{name}', '{match.group(1)}', 1)\n",
                      text)

    counted = {name: counting(name, text) for name, text in sources().items()}
    monkeypatch.setattr(scripts_module, "sources", lambda: counted)
    env = Env(client, "hot")
    for i in range(3):
        env.bike.set(f"j{i}:A", "NOW")
    pool = env.pool()
    rotation = Rotation(pool.queue_names)
    job = pool.claim(rotation, "w1")
    assert job is not None and client.hkeys("calls:claim")
    client.delete("calls:finish")
    job = pool.finish(job, Outcome("ok"), "", rotation, "w1")[1]
    assert job is not None and job.lease.jobid == "j1:A"
    assert set(client.hkeys("calls:finish")) == HOT_PATH
    pool.finish(job, Outcome("error", error="ValueError: x"), "", None, "w1")  # off the hot path: still works
    assert "bad" not in client.hkeys("calls:finish") and (env.status("j1:A") or "").startswith("DIE:")


def test_lib_constants_are_written_where_they_are_used() -> None:
    """Each "L.NAME = value" line of lib.lua is left out of the loaded
    scripts, and every use of it is replaced by its value (scripts.inlined)."""
    constants = dict(re.findall(r"^L\.([A-Z][A-Z0-9_]*) = (KEYS\[\d+\]|\d[\d.e]*|'[^']*')", LIB, re.MULTILINE))
    assert {"K", "A", "SCHEDULES", "DATA", "MAX_TIME", "LAST", "PENDING", "RECORD"} <= set(constants)
    for name, text in sources().items():
        assert not set(re.findall(r"\bL\.([A-Z][A-Z0-9_]*)\b", text)) & set(constants), name
    assert "ARGV[4 + 8]" in sources()["finish"] and "KEYS[20 + 1]" in sources()["finish"]
