"""The ``[redbike-nodes]`` section of the config file: levels, capacities per
level and per node, node sources and job families (issue #9).

::

    [redbike-nodes]
    # chains of levels, root first; "," starts another
    levels = host > db
    # every host node gets 2 (resource host_concurrency@NODE); the instance node 100
    capacity.host = host_concurrency=2
    capacity.instance = scans=100
    # one node overrides its level's
    override.db-host-17 = host_concurrency=0
    # a source, polled every 60 s (the default)
    source.fleet = file /etc/redbike/nodes.csv
    source.fleet.every = 60
    # a family runs on every node of a level
    family.scan = db
    family.scan.schedule = CRON_TZ=UTC 0 3 * * *
    family.scan.queue = batch
    family.scan.needs.host = host_concurrency=1
    # on the worker level: the pool's --resources
    family.scan.needs.worker = cpu_cores=2
    guard-fraction = 0.5
    # seconds, or never
    kill-orphans-after = 60

``file = PATH`` reads the keys of the ``[redbike-nodes]`` section of another
file instead (relative to this one). Every mistake gives one line (all of
them are reported at once, each naming its key).
"""

from __future__ import annotations

import configparser
import hashlib
import math
import os
from dataclasses import dataclass, field

from .config import ConfigError, read_parser
from .names import BadName, check_queue
from .nodes import AT, INSTANCE, WORKER, Node, NodeError, check_node_name, resource_at
from .occurrences import misfire_text
from .records import encode_alternatives
from .resources import (
    LOCAL_PREFIX,
    ResourceError,
    amounts_of,
    check_name,
    format_amounts,
    parse_capacity,
)
from .schedules import ScheduleError, parse_schedule
from .workerspec import WorkerSpecError, parse_spec

SECTION = "redbike-nodes"
SOURCE_TYPES = ("file", "script", "http", "python", "time")
DEFAULT_EVERY = 60.0
DEFAULT_GUARD = 0.5
DEFAULT_KILL_AFTER = 60.0
_KEYS = ("file, levels, capacity.LEVEL, override.NODE, source.NAME[.every], family.NAME[.schedule|.queue|"
         ".needs.LEVEL|.misfire|.retries], guard-fraction, kill-orphans-after")
_FAMILY_KEYS = ("schedule", "queue", "misfire", "retries")


@dataclass(frozen=True)
class SourceSpec:
    """A node source: its name, type, argument (path, command, URL, spec, or
    ``LEVEL PERIOD LIFETIME``) and poll interval in seconds."""

    name: str
    kind: str
    argument: str
    every: float = DEFAULT_EVERY


@dataclass(frozen=True)
class Family:
    """A job family: one task per node of ``level``."""

    name: str
    level: str
    schedule: str
    queue: str
    needs: dict[str, dict[str, int]] = field(default_factory=dict)  # level -> resource -> amount
    misfire: str | None = None
    retries: int | None = None


@dataclass
class NodeConfig:
    parent_level: dict[str, str] = field(default_factory=dict)  # level -> its parent level (instance: top)
    capacities: dict[str, dict[str, int | None]] = field(default_factory=dict)  # level -> resource -> capacity
    overrides: dict[str, dict[str, int | None]] = field(default_factory=dict)  # node -> resource -> capacity
    sources: list[SourceSpec] = field(default_factory=list)
    families: dict[str, Family] = field(default_factory=dict)
    guard_fraction: float = DEFAULT_GUARD
    kill_orphans_after: float | None = DEFAULT_KILL_AFTER  # None: never
    files: tuple[str, ...] = ()  # the files it was read from (watched by the loop)

    def levels_up(self, level: str) -> list[str]:
        """``level`` and its ancestors' levels, up to and with ``instance``."""
        levels = [level]
        while levels[-1] != INSTANCE:
            levels.append(self.parent_level[levels[-1]])
        return levels


class NodeConfigError(ConfigError):
    """The mistakes of a [redbike-nodes] section, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _levels(text: str, problem: list[str]) -> dict[str, str]:
    parents: dict[str, str] = {}
    for chain in text.split(","):
        names = [name.strip() for name in chain.split(">")]
        if names == [""]:
            continue
        if names[0] == INSTANCE:
            names = names[1:]
        for i, name in enumerate(names):
            if not name:
                problem.append(f"missing level name in {chain.strip()!r} (a parent level missing?)")
                break
            if name in (INSTANCE, WORKER):
                problem.append(f"level {name!r} is implicit: {INSTANCE} is the root, {WORKER} the worker pools")
                break
            try:
                check_node_name(name, "level name")
            except NodeError as exc:
                problem.append(str(exc))
                break
            parent = names[i - 1] if i else INSTANCE
            if parents.setdefault(name, parent) != parent:
                above = [parent]  # the new parent's ancestors: a cycle if they hold the level
                while above[-1] in parents and above[-1] != name:
                    above.append(parents[above[-1]])
                if above[-1] == name:
                    problem.append(f"levels form a cycle: {' > '.join(reversed([name, *above]))}")
                else:
                    problem.append(f"level {name!r} has two parent levels: {parents[name]!r} and {parent!r}")
                break
    return parents


def _capacities(text: str, problem: list[str]) -> dict[str, int | None]:
    amounts: dict[str, int | None] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, has_value, value = (s.strip() for s in part.partition("="))
        try:
            amounts[_resource(name)] = parse_capacity(value) if has_value else None
            if not has_value:
                raise ResourceError(f"bad capacity in {part!r}: expected NAME=CAPACITY (a whole number or none)")
        except ResourceError as exc:
            problem.append(str(exc))
    return amounts


def _resource(name: str) -> str:
    check_name(name)
    if AT in name or name.startswith(LOCAL_PREFIX):
        raise ResourceError(f"bad resource name {name!r}: a level's resource has no '{AT}' and no {LOCAL_PREFIX!r} prefix")
    return name


def _seconds(value: str, where: str, problem: list[str], zero: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and (number >= 0 if zero else number > 0)):
        problem.append(f"{where} must be a number of seconds {'from 0' if zero else 'above 0'}, got {value!r}")
    return number


def _source(name: str, value: str, problem: list[str]) -> SourceSpec | None:
    kind, _, argument = value.strip().partition(" ")
    argument = argument.strip()
    if kind not in SOURCE_TYPES:
        problem.append(f"unknown source type {kind!r} (known: {', '.join(SOURCE_TYPES)})")
        return None
    if not argument:
        problem.append(f"a {kind} source needs an argument (a path, command, URL, module:function or LEVEL PERIOD LIFETIME)")
        return None
    if kind == "http" and not argument.startswith(("http://", "https://")):
        problem.append(f"an http source needs an http:// or https:// URL, got {argument!r}")
    elif kind == "python":
        try:
            parse_spec(argument)
        except WorkerSpecError as exc:
            problem.append(str(exc).replace("worker spec", "python source spec"))
    elif kind == "time" and len(argument.split()) != 3:
        problem.append(f"a time source takes LEVEL PERIOD LIFETIME (seconds), got {argument!r}")
    return SourceSpec(name, kind, argument)


def _family(name: str, values: dict[str, str], parents: dict[str, str], problem: list[str]) -> Family | None:
    mistakes = len(problem)
    level = values.get("", "").strip()
    if level not in parents:
        problem.append(f"family {name!r} runs on unknown level {level!r} (levels: {', '.join(parents) or 'none'})")
        return None
    schedule = values.get("schedule", "").strip()
    try:
        schedule = parse_schedule(schedule).text
    except ScheduleError as exc:
        problem.append(f"family {name!r}: {exc}")
    queue = values.get("queue", "").strip()
    try:
        check_queue(queue)
        if ":" in queue:
            raise BadName(f"bad queue name {queue!r}: a task's queue has no ':'")
    except BadName as exc:
        problem.append(f"family {name!r}: {exc}")
    path = NodeConfig(parent_level=parents).levels_up(level)
    needs: dict[str, dict[str, int]] = {}
    for key, text in values.items():
        if not key.startswith("needs."):
            continue
        on = key[len("needs."):]
        if on != WORKER and on not in path:
            problem.append(f"family {name!r} needs resources on level {on!r}, which is not on its path "
                           f"({' > '.join(reversed(path))}, or {WORKER})")
            continue
        try:
            needs[on] = amounts_of(text)
            if on != WORKER:
                for resource in needs[on]:
                    _resource(resource)
        except ResourceError as exc:
            problem.append(f"family {name!r} needs.{on}: {exc}")
    misfire = values.get("misfire", "").strip().lower() or None
    retries = values.get("retries", "").strip()
    try:
        misfire = misfire_text(misfire, None) if misfire else None
    except ValueError as exc:
        problem.append(f"family {name!r}: {exc}")
    if retries and not (retries.isdigit() and int(retries) <= 1000):
        problem.append(f"family {name!r}: retries must be a whole number from 0 to 1000, got {retries!r}")
    if len(problem) > mistakes:
        return None
    return Family(name, level, schedule, queue, needs, misfire, int(retries) if retries else None)


def parse_section(section: configparser.SectionProxy, path: str) -> NodeConfig:
    """A NodeConfig from the section's keys; NodeConfigError lists every mistake."""
    config = NodeConfig()
    problems: list[str] = []
    items = {key.strip(): value.strip() for key, value in section.items()}
    lowered = {key.lower().replace("_", "-"): value for key, value in items.items()}

    def where(key: str) -> list[str]:
        """The list a key's problems go to: each line names the file, section and key."""
        collected: list[str] = []
        pending.append((key, collected))
        return collected

    pending: list[tuple[str, list[str]]] = []
    config.parent_level = _levels(lowered.get("levels", ""), where("levels"))
    known = set(config.parent_level) | {INSTANCE}
    families: dict[str, dict[str, str]] = {}
    sources: dict[str, dict[str, str]] = {}
    for key, value in items.items():
        kind, _, rest = key.partition(".")
        kind = kind.lower().replace("_", "-")
        if kind in ("levels", "file") and not rest:
            continue
        if kind == "capacity" and rest:
            if rest not in known:
                where(key).append(f"unknown level {rest!r} (levels: {', '.join(sorted(known))})")
            config.capacities[rest] = _capacities(value, where(key))
        elif kind == "override" and rest:
            try:
                config.overrides[check_node_name(rest)] = _capacities(value, where(key))
            except NodeError as exc:
                where(key).append(str(exc))
        elif kind == "source" and rest:
            name, _, option = rest.partition(".")
            sources.setdefault(name, {})[option.lower()] = value
        elif kind == "family" and rest:
            name, _, option = rest.partition(".")
            families.setdefault(name, {})[option if option.startswith("needs.") else option.lower()] = value
        elif kind == "guard-fraction" and not rest:
            try:
                config.guard_fraction = float(value)
            except ValueError:
                config.guard_fraction = math.nan
            if not 0 < config.guard_fraction <= 1:
                where(key).append(f"must be a fraction above 0 and at most 1 (1: no guard), got {value!r}")
        elif kind == "kill-orphans-after" and not rest:
            config.kill_orphans_after = None if value.lower() == "never" else _seconds(value, key, where(key), zero=True)
        else:
            where(key).append(f"unknown key (known: {_KEYS})")
    for name, options in sources.items():
        key = f"source.{name}"
        try:
            check_node_name(name, "source name")  # stored with each of its nodes, "|"-joined
        except NodeError as exc:
            where(key).append(str(exc))
            continue
        if "" not in options:
            where(key).append("no source type and argument")
            continue
        spec = _source(name, options.pop(""), where(key))
        every = options.pop("every", None)
        for option in options:
            where(f"{key}.{option}").append("unknown key (a source has only .every)")
        if spec is not None:
            seconds = DEFAULT_EVERY if every is None else _seconds(every, f"{key}.every", where(f"{key}.every"))
            config.sources.append(SourceSpec(spec.name, spec.kind, spec.argument, seconds))
            level = spec.argument.split()[0]
            if spec.kind == "time" and len(spec.argument.split()) == 3 and config.parent_level.get(level) != INSTANCE:
                where(key).append(f"a time source's level {level!r} is not a top level declared in levels")
    for name, options in families.items():
        key = f"family.{name}"
        unknown = [o for o in options if o not in ("", *_FAMILY_KEYS) and not o.startswith("needs.")]
        for option in unknown:
            where(f"{key}.{option}").append("unknown key (a family has .schedule, .queue, .needs.LEVEL, .misfire, .retries)")
        try:
            check_node_name(name, "family name")
        except NodeError as exc:
            where(key).append(str(exc))
            continue
        family = _family(name, options, config.parent_level, where(key))
        if family is not None:
            config.families[name] = family
    for key, collected in pending:
        problems.extend(f"{path}: [{SECTION}] {key}: {problem}" for problem in collected)
    if problems:
        raise NodeConfigError(problems)
    return config


def load_node_config(path: str) -> NodeConfig | None:
    """The [redbike-nodes] section of the config file at ``path`` (or of the
    file its ``file`` key names); None if it has none."""
    parser = read_parser(path, keep_case=True)
    if not parser.has_section(SECTION):
        return None
    section = parser[SECTION]
    files: tuple[str, ...] = (path,)
    pointed = next((value.strip() for key, value in section.items() if key.strip().lower() == "file"), None)
    if pointed:
        other = os.path.join(os.path.dirname(path), os.path.expanduser(pointed))
        parser = read_parser(other, keep_case=True)
        if not parser.has_section(SECTION):
            raise ConfigError(f"{path}: [{SECTION}] file: {other!r} has no [{SECTION}] section")
        section, path, files = parser[SECTION], other, (path, other)
    config = parse_section(section, path)
    config.files = files
    return config


def needs_of(family: Family, path: list[Node]) -> dict[str, int]:
    """A task's needs: its family's per-level amounts on its node and every
    ancestor (``path``, top first; the instance node implied), and on the worker."""
    needs: dict[str, int] = {}
    for node in [Node(INSTANCE, INSTANCE), *path]:
        for resource, amount in family.needs.get(node.level, {}).items():
            needs[resource_at(resource, node.name)] = amount
    for resource, amount in family.needs.get(WORKER, {}).items():
        needs[LOCAL_PREFIX + resource] = amount
    return needs


TaskNeeds = dict[str, int] | list[dict[str, int]]  # a list: one per path (replicas), the primary first


def needs_on_paths(family: Family, paths: list[list[Node]]) -> TaskNeeds:
    """A task's needs on each of its node's paths (Forest.paths): the
    needs of the one path, or a list of each path's if they differ (a
    family with needs on no level above the node needs the same on all)."""
    each = [needs_of(family, path) for path in paths]
    return each[0] if all(needs == each[0] for needs in each[1:]) else each


def digest(family: Family, needs: TaskNeeds) -> str:
    """What a task was set with, in short: a change re-sets it."""
    text = "|".join((family.schedule, encode_alternatives(needs) if isinstance(needs, list) else format_amounts(needs),
                     family.misfire or "", str(family.retries)))
    return hashlib.sha1(text.encode()).hexdigest()[:12]
