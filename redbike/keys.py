"""Every Redis key and channel name redbike uses.

Nothing else in redbike formats a key name: a client in another language can
read this module (and the key table in the README) to speak the protocol.
All keys of one redbike installation start with its prefix; give the prefix a
Redis Cluster hash tag (``{myapp}``) to keep them on one slot.
"""

from __future__ import annotations

import re

from .records import JOB_STATE


class Keys:
    """Key and channel names for one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        p = prefix
        self.schedules = f"{p}:schedules"  # hash  jobid -> schedule text
        self.statuses = f"{p}:statuses"  # hash  jobid -> "EVENT:TIMESTAMP"
        self.timeline = f"{p}:timeline"  # zset  jobid scored by next run (epoch s)
        self.leases = f"{p}:leases"  # hash  jobid -> "token|queue|worker|since|timeout|due|attempt|needs"
        self.deadlines = f"{p}:deadlines"  # zset  jobid scored by lease deadline
        self.errors = f"{p}:errors"  # hash  jobid -> JSON of the last failure
        self.control = f"{p}:control"  # string "HALT:<ts>:<nonce>"; also a channel
        self.dispatcher = f"{p}:dispatcher"  # string leader token, expires (PX)
        self.dispatcher_epoch = f"{p}:dispatcher:epoch"  # counter: fencing tokens
        self.dispatcher_channel = f"{p}:wake-dispatcher"  # channel: timeline got earlier
        self.capacities = f"{p}:capacities"  # hash  resource -> capacity
        self.usage = f"{p}:usage"  # hash  resource -> amount held by running jobs
        self.parked = f"{p}:parked"  # zset  (lex) "resource|seq|queue|jobid"
        self.ready = f"{p}:ready"  # zset  (lex) "queue|seq|jobid"
        self.parking = f"{p}:parking"  # hash  jobid -> "P"/"R"/"A" + its parked/ready/aside member
        self.parkseq = f"{p}:parkseq"  # counter: order of parked jobs
        self.aside = f"{p}:aside"  # zset  (lex) "resource|amount|seq|queue|jobid": needs more than a capacity
        self.jobs = f"{p}:jobs"  # hash  jobid -> job record (occurrence, attempt, policy, ledger, needs, pending) and trail
        self.finished = f"{p}:finished"  # list  "time|jobid" of jobs that ended for good (END, SKP, unset)
        self.paused = f"{p}:paused"  # set   names of the queues workers do not claim from
        self.totals = f"{p}:totals"  # hash  "queue|outcome|bucket" -> runs, "queue|ms" -> run time, "queue|due" (stats.py)
        self.stats_prefix = f"{p}:stats:"
        self.data = f"{p}:data"  # hash  jobid -> the job's payload, JSON (records.encode_data)
        # The node model (issue #9; written by the reconciler, reconcile.py):
        self.nodes = f"{p}:nodes"  # hash  node name -> "level|parent|source|attributes-JSON" (nodes.Node)
        self.tasks = f"{p}:tasks"  # hash  task id -> "family|node|digest" of the tasks it set
        self.orphans = f"{p}:orphans"  # hash  task id -> time (epoch s) its node vanished while it ran
        self.reconciled = f"{p}:nodes:reconciled"  # string  digest of the config of the last pass without errors
        self.reconciler = f"{p}:nodes:reconciler"  # string token of the one reconciler, expires (PX)
        # Feeds (feed.py): the names of every feed, and its keys per feed (feed(), feed_jobs(), feed_lease(), feed_batch()).
        self.feeds = f"{p}:feeds"  # set  feed names
        # The registry of live processes (registry.py): one key per dispatcher and worker pool.
        self.process_prefix = f"{p}:process:"

    def stats_minute(self, minute: int) -> str:
        """The counts of ``totals`` without the duration buckets, as they were
        at the start of minute ``minute`` (epoch s // 60; hash, expires)."""
        return f"{self.stats_prefix}{minute}"

    def stats_buckets(self, minute: int) -> str:
        """The duration buckets of ``totals`` at the start of minute ``minute`` (hash, expires sooner)."""
        return f"{self.stats_prefix}{minute}:buckets"

    def process(self, identity: str) -> str:
        """A live process's registry entry (string, JSON, expires: EX)."""
        return f"{self.process_prefix}{identity}"

    def feed(self, name: str) -> str:
        """A feed's checkpoint and counters (hash: cursor, fed, done, failed, ...; feed.FEED_FIELDS)."""
        return f"{self.prefix}:feed:{name}"

    def feed_jobs(self, name: str) -> str:
        """A feed's outstanding jobs (zset: job id scored by when to look at it next)."""
        return f"{self.prefix}:feed:{name}:jobs"

    def feed_seen(self, name: str) -> str:
        """An HTTP source's items put in and still listed (hash: item name -> job id; httpsource.py)."""
        return f"{self.prefix}:feed:{name}:seen"

    def feed_lease(self, name: str) -> str:
        """The lease of a feed's one feeder (string: its token, expires: PX)."""
        return f"{self.prefix}:feed:{name}:lease"

    def feed_batch(self, name: str) -> str:
        """With shards, shard 0's record of a feed's last batch: its items on
        the other shards (string, JSON; feedshards.py), put in again on a
        shard its feeder was stopped before."""
        return f"{self.prefix}:feed:{name}:batch"

    def process_pattern(self) -> str:
        """SCAN MATCH pattern of every registry entry (the prefix's glob characters escaped)."""
        return re.sub(r"([\\*?\[\]])", r"\\\1", self.process_prefix) + "*"

    def queue_pattern(self) -> str:
        """SCAN MATCH pattern of every non-empty work queue."""
        return re.sub(r"([\\*?\[\]])", r"\\\1", f"{self.prefix}:queue:") + "*"

    def queue(self, name: str) -> str:
        """A work queue (list; LPUSH in, RPOP out)."""
        return f"{self.prefix}:queue:{name}"

    def queue_channel(self, name: str) -> str:
        """Channel published to when a job enters queue ``name``."""
        return f"{self.prefix}:wake-queue:{name}"

    def job_state(self) -> list[str]:
        """The keys every script takes first, in the order lib.lua expects."""
        return [getattr(self, name) for name in JOB_STATE]

    def parked_range(self, resource: str) -> tuple[bytes, bytes]:
        """ZRANGEBYLEX bounds of the jobs parked on ``resource``, or set aside
        for it (byte 0xFF sorts after every byte of a UTF-8 name)."""
        return f"[{resource}|".encode(), f"({resource}|".encode() + b"\xff"


def hash_tag(prefix: str) -> str | None:
    """The Redis Cluster hash tag of ``prefix`` as Redis reads it (the text
    between the first ``{`` and the first ``}`` after it, if not empty), or
    None: every key of an installation has it, so all are on one slot."""
    start = prefix.find("{")
    end = prefix.find("}", start + 1) if start >= 0 else -1
    return prefix[start + 1 : end] if end > start + 1 else None


def slot_key(prefix: str) -> str:
    """A key of ``prefix``'s installation, to find its slot with (ValueError,
    one line, if the prefix has no hash tag: its keys would be all over the cluster)."""
    if hash_tag(prefix) is None:
        raise ValueError(f"on Redis Cluster the prefix must hold a hash tag (e.g. {{{prefix}}}), "
                         f"so that all of its keys are on one slot; got {prefix!r}")
    return Keys(prefix).schedules


WAKE_BATCH = 1000  # lib.lua's WAKE_BATCH: jobs one script wakes for an unlimited resource
