"""The Lua scripts that change redbike's keys, and the worker's fast path to them.

Each script is lib.lua (shared helpers) followed by its own file in
redbike/lua; every script takes the job-state keys (Keys.job_state()) and
four common arguments first (now, two channel prefixes, the trail length).
A worker's slots run claim and finish, where the server has Redis
Functions (7+, Valkey), as the functions of one library made of the same
files (function_library), loaded once instead of made at every call.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import redis

from .keys import Keys
from .records import encode_time

log = logging.getLogger(__name__)

pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:  # a redbike dependency; without it, redis-py packs commands itself
    from hiredis import pack_command
except ImportError:  # pragma: no cover
    pack_command = None

SCRIPT_NAMES = ("set", "unset", "claim", "finish", "move_due", "reap", "renew", "lead", "capacity", "retire",
                "revoke", "feed_done", "tally")


@functools.cache
def sources() -> dict[str, str]:
    """Each script's source, as it is loaded: the library (lib.lua and
    waiting.lua: the functions it uses, see library_for), a newline, its own file."""
    return {name: source_of(lua_file(name)) for name in SCRIPT_NAMES}


def lua_file(name: str) -> str:
    """The text of redbike/lua/NAME.lua."""
    return (resources.files("redbike") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def source_of(script: str) -> str:
    """``script`` (Lua that calls the library's L.functions and uses its
    constants) as redbike loads its own: after the library, with the
    constants inlined (the benchmark's tools run theirs so)."""
    constants, lib, waiting = library_parts()
    script = inlined(constants, script)
    return library_for(lib, waiting, script) + "\n" + script


@functools.cache
def library_parts() -> tuple[dict[str, str], str, str]:
    """lib.lua's constants, and lib.lua (without them) and waiting.lua with them inlined."""
    lib, waiting = lua_file("lib"), lua_file("waiting")
    constants = {match.group(1): match.group(2) for match in _CONSTANT.finditer(lib)}
    return constants, inlined(constants, _CONSTANT.sub("", lib)), inlined(constants, waiting)


# A constant of lib.lua, alone on its line: "L.NAME = value", the value a
# number, a quoted string or one of the KEYS.
_CONSTANT = re.compile(r"^L\.([A-Z][A-Z0-9_]*) = (KEYS\[\d+\]|\d[\d.e]*|'(?:[^'\\\n]|\\.)*')(?:[ \t]+--[^\n]*)?\n",
                       re.MULTILINE)


def inlined(constants: dict[str, str], text: str) -> str:
    """``text`` with each use of lib.lua's ``constants`` (L.NAME) replaced by
    its value: as fields of L they cost each script call a slot in L's
    constructor, an assignment, and a table look-up per use (about a tenth
    of what a finish spends in its library). Only the speed differs: a
    client in another language may load lib.lua as it is."""
    use = re.compile(r"\bL\.(" + "|".join(constants) + r")\b")
    return use.sub(lambda match: constants[match.group(1)], text)


# A function of the library: the comment lines right above it, "function
# L.name(", its body, and the "end" that closes it at the start of a line.
LIB_FUNCTION = re.compile(r"(?ms)^(?:--[^\n]*\n)*function L\.(\w+)\(.*?^end\n")
LIB_USE = re.compile(r"\bL\.(\w+)")


def library_for(lib: str, waiting: str, script: str) -> str:
    """The library as ``script`` loads it: the functions of lib.lua and
    waiting.lua that the script calls, directly or through others; of
    those, the ones on the HOT_PATH defined at once, the others on the first
    call of one of them (on_first_use). Each script call defines every
    function of its library again, and each costs an allocation: a plain
    run's finish and claim call fewer than half of what they may call
    (a failure, a job that waits for a resource, a job set again while it
    ran: the rest). Only the speed differs: a client in another language may
    load lib.lua and waiting.lua as they are."""
    functions = {match.group(1): match.group(0) for match in LIB_FUNCTION.finditer(lib + waiting)}
    top_level = LIB_FUNCTION.sub("", lib)  # constants and the checks every script runs
    wanted = used_functions(functions, script + top_level)
    eager = LIB_FUNCTION.sub(lambda match: match.group(0) if match.group(1) in wanted & HOT_PATH else "", lib)
    later = [text for name, text in functions.items() if name in wanted and name not in HOT_PATH]
    return presized(eager, set(functions) - HOT_PATH, on_first_use(later))


def used_functions(functions: dict[str, str], text: str) -> set[str]:
    """The names of L that ``text`` uses, and of those that are ``functions``
    (name -> definition), the names their definitions use, and so on."""
    wanted = set(LIB_USE.findall(text))
    todo = list(wanted)
    while todo:
        for used in LIB_USE.findall(functions.get(todo.pop(), "")):
            if used not in wanted:
                wanted.add(used)
                todo.append(used)
    return wanted


# The library functions a plain run's finish and the claim in the same call
# make (a run that ended well, of a job without needs and not set again while
# it ran): defined at once by every script that calls them; the rest of a
# script's library on first use. tests/test_contract.py checks this list
# against the calls of a real finish.
HOT_PATH = frozenset({
    "append_event", "claim", "claim_error", "consider", "finish", "finish_error", "finished", "int", "int_of",
    "is_name", "is_seconds", "lease_parts", "next_candidate", "place", "placement_error", "run_event", "stamp", "time_of",
})


def presized(lib: str, later: set[str], handler: str = "") -> str:
    """lib.lua with its table L (every constant and function of the library
    but the ``later`` ones, which ``handler`` defines: on_first_use) made at
    its full size in one step, ``local L = {AMOUNT_DIGITS = false, ...}``,
    instead of grown field by field: each script call builds L anew, and its
    growth (a rehash at each power of two) costs about a fifth of the
    library's time per call. The handler follows at once, before the
    library's own checks (which may call a later function, such as bad).
    Only the speed differs: a client in another language may load lib.lua
    as it is."""
    fields = sorted(set(LIB_USE.findall(lib)) - later)
    return lib.replace("local L = {}", "local L = {" + ", ".join(f"{name} = false" for name in fields) + "}"
                       + handler, 1)


def on_first_use(functions: list[str]) -> str:
    """Lua that defines ``functions`` (of table L) when a script first looks
    one up: L's metatable catches the look-up of a field it lacks (these are
    the fields presized() leaves out), defines them all and lets go of L."""
    if not functions:
        return ""
    return ("\nsetmetatable(L, {__index = function(lib, name)\n  setmetatable(lib, nil)\n"
            + "".join(functions) + "  return rawget(lib, name)\nend})")


TRAIL_LENGTH = 6  # trail-length: events kept per job (up to half as many again before a trim)
KEEP_FINISHED = 7 * 86400.0  # keep-finished: seconds


@dataclass(frozen=True)
class Retention:
    """How long what a job leaves behind is kept: ``trail_length`` events of
    its trail (the scripts trim it back to that many when it reaches half
    as many again), and ``keep_finished`` seconds for what a job that ended
    for good (a one-off that ran or was skipped, an unset job) leaves: its
    status, record and trail."""

    trail_length: int = TRAIL_LENGTH
    keep_finished: float = KEEP_FINISHED


# -- The hot path's scripts as a Redis Functions library (Redis 7+, Valkey) --
#
# An EVALSHA runs its whole source each call, and so builds the library's
# table L and its functions anew each time (presized and pruned, see
# library_for: still about a tenth of a finish+claim's cost in Redis, its
# garbage collected afterwards). A function library is loaded once: its
# chunk defines L and the functions, and each FCALL runs only the function's
# body. The Lua is the same files: each script's body becomes a registered
# function's body, after lib.lua's per-call part (its checks of the common
# arguments). Two things differ from a script's run, made up for here:
# - KEYS and ARGV are not globals but the function's arguments: they are
#   the chunk's upvalues, set as each call starts (the inlined constants,
#   such as KEYS[20], read them there);
# - L outlives the call: every field of it but the functions (the caches the
#   functions fill while they run, such as now_second or ready_or_paused) is
#   reset to false as each call starts, as a script's presized L starts it.
# The library's and its functions' names carry a hash of its source, so that
# workers of two redbike versions on one server (an upgrade rolling through
# a pool) each call their own. A server without FUNCTION, or an ACL user
# denied it, gets EVALSHA (Scripts decides on its first call).

FUNCTION_SCRIPTS = ("claim", "finish")  # run by a slot on its own connection (Scripts._run_on)

# A field of L that lib.lua's per-call part sets, at the start of a line: "L.NOW = ARGV[1]".
_PER_CALL_FIELD = re.compile(r"^L\.(\w+) = ", re.MULTILINE)


@dataclass(frozen=True)
class Library:
    """A function library: its name, its source (for FUNCTION LOAD) and the
    name each script's function is registered under."""

    name: str
    source: str
    functions: dict[str, str]


@functools.cache
def function_library() -> Library:
    """The hot path's scripts as one library (see above), and their functions' names."""
    constants, lib, waiting = library_parts()
    bodies = {name: inlined(constants, lua_file(name)) for name in FUNCTION_SCRIPTS}
    definitions = {match.group(1): match.group(0) for match in LIB_FUNCTION.finditer(lib + waiting)}
    per_call = LIB_FUNCTION.sub("", lib).replace("local L = {}\n", "", 1)  # the checks of the common arguments
    wanted = used_functions(definitions, "\n".join([per_call, *bodies.values()]))
    chunk = "".join(definitions[name] for name in definitions if name in wanted)
    # Every field but the functions and what the per-call part sets: the
    # caches the functions fill while they run (now_second, ready_or_paused ...).
    state = sorted(wanted - set(definitions) - set(_PER_CALL_FIELD.findall(per_call)))
    reset = f"{', '.join('L.' + name for name in state)} = {', '.join('false' for _ in state)}\n" if state else ""
    head = "local L = {" + ", ".join(f"{name} = false" for name in sorted(wanted)) + "}\n"
    digest = hashlib.sha1((head + chunk + per_call + "".join(bodies.values())).encode()).hexdigest()[:16]
    name = f"redbike_{digest}"
    functions = {script: f"{name}_{script}" for script in FUNCTION_SCRIPTS}
    registered = "".join(
        f"\nredis.register_function('{functions[script]}', function(keys, args)\n"
        f"KEYS, ARGV = keys, args\n{reset}{per_call}\n{body}\nend)\n"
        for script, body in bodies.items())
    source = f"#!lua name={name}\nlocal KEYS, ARGV\n{head}{chunk}{registered}"
    return Library(name, source, functions)


class Scripts:
    """The Lua scripts (see sources()), registered on a client.

    Each script takes the job-state keys and four common arguments first.
    """

    def __init__(self, client: redis.Redis, keys: Keys, retention: Retention | None = None) -> None:
        retention = retention or Retention()
        self._scripts = {name: client.register_script(src) for name, src in sources().items()}
        self._keys = keys.job_state()
        self._common = [keys.dispatcher_channel, keys.queue_channel(""), str(retention.trail_length)]
        # _run_on's EVALSHA or FCALL up to its own keys, packed once per script, key count and command (_packed).
        self._heads: dict[tuple[str, int, bool], bytes] = {}
        # Whether the FUNCTION_SCRIPTS go as FCALLs of function_library(): None until _run_on first runs one.
        self.fcall: bool | None = None

    def run(self, name: str, now: float, keys: list[str], args: list[Any], client: Any = None) -> Any:
        """Run script ``name`` with its own ``keys`` and ``args`` after the common ones.
        ``client``: a client or pipeline (default: the one the scripts were
        made with), or one connection, used directly (see _run_on)."""
        if isinstance(client, redis.connection.AbstractConnection):
            return self._run_on(client, name, now, keys, args)
        return self._scripts[name](keys=self._keys + keys, args=[encode_time(now), *self._common, *args], client=client)

    def _run_on(self, connection: redis.connection.AbstractConnection, name: str, now: float,
                keys: list[str], args: list[Any]) -> Any:
        """EVALSHA (an FCALL of the FUNCTION_SCRIPTS where the server has
        functions) straight on a connection: a worker's hot path, where
        redis-py's command layer costs about as much as Redis running the script."""
        script = self._scripts[name]
        try:
            if self.fcall is None and name in FUNCTION_SCRIPTS:
                self.fcall = load_functions(connection)
            try:
                return self._send(connection, self._packed(name, now, keys, args))
            except redis.ResponseError as error:
                # A restarted or flushed server lacks the script or the library: load it, send again.
                missing_function = str(error).startswith(_NO_FUNCTION)
                if not (missing_function or isinstance(error, redis.exceptions.NoScriptError)):
                    raise  # a script's own error
                if missing_function:
                    self.fcall = load_functions(connection)  # False (EVALSHA) if it may not be loaded now
                if not self.fcall or name not in FUNCTION_SCRIPTS:
                    connection.send_command("SCRIPT", "LOAD", script.script)
                    connection.read_response()
                return self._send(connection, self._packed(name, now, keys, args))
        except (redis.ConnectionError, redis.TimeoutError):
            connection.disconnect()  # a reply may be half read: start afresh
            raise

    def _packed(self, name: str, now: float, keys: list[str], args: list[Any]) -> bytes | tuple[Any, ...]:
        """The EVALSHA (an FCALL: see self.fcall) of script ``name``, packed by
        hiredis (else a tuple for redis-py to pack). Its head, the command,
        the SHA or function, the key count and the job-state keys (half its
        arguments), is the same in every call with as many keys: packed
        once, the rest per call."""
        all_keys = len(self._keys) + len(keys)
        fcall = bool(self.fcall) and name in FUNCTION_SCRIPTS
        head = self._heads.get((name, all_keys, fcall))
        if head is None or pack_command is None:
            called = ("FCALL", function_library().functions[name]) if fcall else ("EVALSHA", self._scripts[name].sha)
            if pack_command is None:
                return (*called, all_keys, *self._keys, *keys, encode_time(now), *self._common, *args)
            head = self._heads[name, all_keys, fcall] = _arguments(pack_command((*called, all_keys, *self._keys)))
        tail = pack_command((*keys, encode_time(now), *self._common, *args))
        # A packed command is "*<arguments>\r\n" and then each argument.
        count = 3 + all_keys + 1 + len(self._common) + len(args)
        return b"*%d\r\n%b%b" % (count, head, _arguments(tail))

    @staticmethod
    def _send(connection: redis.connection.AbstractConnection, command: bytes | tuple[Any, ...]) -> Any:
        if isinstance(command, tuple):
            connection.send_command(*command)
        else:  # skips redis-py's check of every argument's type
            connection.send_packed_command([command], check_health=False)
        return connection.read_response()


_NO_FUNCTION = "Function not found"  # FCALL's error (redis-py drops the ERR) for a function the server lacks


def load_functions(connection: redis.connection.AbstractConnection) -> bool:
    """Load function_library() on the server behind ``connection``: whether
    FCALL can run its functions there. False, logged, where the server has
    no FUNCTION (Redis 6.2) or the user may not load one (ACL): EVALSHA
    then. Any other error (a replica, a server still loading) is raised, to
    be retried as any command's."""
    library = function_library()
    try:
        connection.send_command("FUNCTION", "LOAD", library.source)
        connection.read_response()
    except redis.ResponseError as error:
        if "already exists" in str(error):  # by its name, this very source: loaded by another process
            return True
        if not (isinstance(error, redis.exceptions.NoPermissionError) or "unknown command" in str(error).lower()):
            raise
        log.info("the worker's claims go as EVALSHA: Redis refused FUNCTION LOAD (%s)", str(error)[:200])
        return False
    return True


def _arguments(packed: bytes) -> bytes:
    """A packed command's arguments, without the count that leads it."""
    return packed[packed.index(b"\n") + 1 :]


def subscribe(client: redis.Redis, channels: list[str]) -> redis.client.PubSub:
    """Subscribe to ``channels`` and wait until Redis confirms, so that no
    message published after this returns can be missed."""
    pubsub = client.pubsub()
    pubsub.subscribe(*channels)
    confirmed = 0
    deadline = time.monotonic() + 10
    while confirmed < len(set(channels)):
        message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
        if message is None and time.monotonic() >= deadline:
            pubsub.close()
            raise redis.TimeoutError("Redis did not confirm the subscription")
        if message and message["type"] == "subscribe":
            confirmed += 1
    return cast("redis.client.PubSub", pubsub)
