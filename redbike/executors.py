"""Executors: any program as a worker.

``Command('A:B', '/usr/local/bin/thumbnail --size 256')`` runs the program
once per job; ``Chain('A', 'step1 ...', 'step2 ...')`` runs several in order
on the same work item. Both are ``RoundRobin`` workers, so the worker spec
syntax names them (``redbike work "redbike.executors:Command('A', 'prog')"``).

Per run the work item (``work_item(jobid)``: the payload, or the job id) is written to a
private file and each program runs with it in ``WORK_ITEM_FILE`` (see
``environment`` for the rest). Its exit code says how the run ended: 0
success, ``stop_code`` (64) StopWork, ``unset_code`` (65) UnsetJob, anything
else or a signal a failure whose message holds the tail of its stderr.

Where the program runs, and why: in a pool, the slot's child leads a process
group that the zygote SIGKILLs whenever the child is killed or dies (the
pool's timeout, a forced stop, a lost lease, the supervisor's death: see
zygote.py). The program joins that group, and so does whatever it starts: a
killed run takes all of it down, even when this process gets no chance to
act. A group of its own would survive those kills (the zygote knows nothing
of it). Only the executor's own ``timeout`` is enforced here: the other
members of the slot's group get SIGTERM, then SIGKILL after ``grace``
seconds. Outside a pool's slot (work() called directly) the program leads a
session of its own instead, so that this never signals its caller's group.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any
from urllib.parse import quote

from .programs import CannotStart, Ended, Output, run, signal_name
from .records import encode_data
from .roundrobin import RoundRobin, StopWork, UnsetJob

log = logging.getLogger(__name__)

STOP_CODE = 64  # exit code meaning StopWork: the job's schedule becomes STOP
UNSET_CODE = 65  # exit code meaning UnsetJob: the job is unset
DEFAULT_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when the executor's timeout hits
NAME_CHARACTERS = 80  # a command line longer than this is shortened in errors
# A failure's message, with as much of the end of stderr as fits: so that all
# of it, after the traceback's frames, is in the 4000 characters of the
# traceback that a slot keeps for tell (slot.run_work).
MESSAGE_CHARACTERS = 3072
MAX_SECONDS = 366 * 86400  # the longest timeout or grace: a year
TIMEOUT_MARGIN = 2.0  # the pool's timeout: the executor's, its grace and this, so the executor acts first


class ExecutorError(Exception):
    """A program could not run, failed, or timed out; the first line says
    which step and how, the rest is the tail of its stderr."""


def _file_stem(jobid: str) -> str:
    """A file name part for ``jobid`` (quoted; a long one shortened, with a hash)."""
    name = quote(jobid, safe="")
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha256(jobid.encode()).hexdigest()[:16]}"
    return name


def _write_private(path: str, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(descriptor, "wb") as file:
        file.write(data)


def _seconds(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number of seconds from {low:g} to {high:.0f}, not {value!r}")
    return float(value)


def _exit_code(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 255:
        raise ValueError(f"{name} must be an exit code from 1 to 255, not {value!r}")
    return value


class Chain(RoundRobin):
    """Runs programs in order on each job's work item; the run fails at the
    first step that fails (named by its number and program).

    Step N runs with ``WORK_ITEM_FILE`` (the work item), ``WORK_INPUT_FILE``
    (step N-1's ``WORK_OUTPUT_FILE``; for step 1 the work item) and
    ``WORK_OUTPUT_FILE`` (an empty file of its own to write). Options:
    ``output_dir`` (each step's stdout and stderr in files there instead of
    the log), ``timeout`` (seconds the whole run may take: then SIGTERM, and
    SIGKILL ``grace`` seconds later; also sets the pool's timeout to
    timeout + grace + 2), ``stop_code`` and ``unset_code``.
    """

    def __init__(self, queues: str, *commands: str, output_dir: str | None = None,
                 timeout: float | None = None, grace: float = DEFAULT_GRACE,
                 stop_code: int = STOP_CODE, unset_code: int = UNSET_CODE) -> None:
        super().__init__(queues)
        if not commands:
            raise ValueError("no command given")
        self.steps: list[list[str]] = []
        for command in commands:
            argv = shlex.split(command) if isinstance(command, str) else []
            if not argv:
                raise ValueError(f"bad command {command!r}: expected a program and its arguments")
            self.steps.append(argv)
        self.run_timeout = None if timeout is None else _seconds("timeout", timeout, 0.001, MAX_SECONDS)
        self.grace = _seconds("grace", grace, 0, MAX_SECONDS)
        self.stop_code = _exit_code("stop_code", stop_code)
        self.unset_code = _exit_code("unset_code", unset_code)
        if self.stop_code == self.unset_code:
            raise ValueError("stop_code and unset_code must differ")
        if output_dir is not None and not isinstance(output_dir, str):
            raise ValueError(f"output_dir must be a folder name, not {output_dir!r}")
        self.output_dir = output_dir
        if output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
        for argv in self.steps:
            if shutil.which(argv[0]) is None:  # it may be installed later: runs fail until then
                log.warning("program %r is not found or not executable (yet)", argv[0])

    def timeout(self, queue_name: str) -> float | None:
        """With a ``timeout`` option, the pool's timeout leaves the executor
        time to stop the program gracefully first; else the default."""
        if self.run_timeout is None:
            return None
        return self.run_timeout + self.grace + TIMEOUT_MARGIN

    def work_item(self, jobid: str) -> bytes:
        """The bytes written to WORK_ITEM_FILE: the job's payload (JSON, as
        ``set --data`` stored it; a JSON string as its text, unquoted), or
        the job id when it has none (UTF-8, no newline)."""
        if self.data is None:
            return jobid.encode()
        return (self.data if isinstance(self.data, str) else encode_data(self.data, sys.maxsize)).encode()

    def environment(self, jobid: str) -> dict[str, str]:
        """The programs' environment: this process's, and the run's
        REDBIKE_JOBID, REDBIKE_TOKEN, REDBIKE_QUEUE, REDBIKE_ATTEMPT and
        REDBIKE_DUE (the occurrence's nominal time, epoch seconds)."""
        env = dict(os.environ, REDBIKE_JOBID=jobid)
        lease = self.lease
        if lease is not None:
            env.update(REDBIKE_TOKEN=lease.token, REDBIKE_QUEUE=lease.queue, REDBIKE_ATTEMPT=str(lease.attempt))
            if lease.due is not None:
                env["REDBIKE_DUE"] = f"{lease.due:.3f}"
        return env

    def _name(self, number: int) -> str:
        """How errors name step ``number``: its command line (shortened), and
        in a chain its number."""
        line = shlex.join(self.steps[number - 1])
        if len(line) > NAME_CHARACTERS:
            line = line[:NAME_CHARACTERS - 3] + "..."
        return f"`{line}`" if len(self.steps) == 1 else f"step {number} of {len(self.steps)} `{line}`"

    def _output_path(self, jobid: str, number: int) -> str | None:
        if self.output_dir is None:
            return None
        run = self.lease.token if self.lease is not None else f"{time.time():.6f}"
        step = "" if len(self.steps) == 1 else f".step{number}"
        return os.path.join(self.output_dir, f"{_file_stem(jobid)}.{run}{step}")

    def work(self, jobid: str) -> int | None:
        deadline = None if self.run_timeout is None else time.monotonic() + self.run_timeout
        with tempfile.TemporaryDirectory(prefix="redbike-run-", ignore_cleanup_errors=True) as folder:
            item = os.path.join(folder, "item")  # mkdtemp's folder is private (0700), the files 0600
            _write_private(item, self.work_item(jobid))
            previous = item
            for number, argv in enumerate(self.steps, 1):
                produced = os.path.join(folder, f"output-{number}")
                _write_private(produced, b"")
                env = self.environment(jobid)
                env.update(WORK_ITEM_FILE=item, WORK_INPUT_FILE=previous, WORK_OUTPUT_FILE=produced,
                           REDBIKE_STEP=str(number))
                label = "" if len(self.steps) == 1 else f"step {number}"
                output = Output(jobid, label, self._output_path(jobid, number))
                self._check(jobid, number, output, self._run(number, argv, env, output, deadline))
                previous = produced
        return None

    def _run(self, number: int, argv: list[str], env: dict[str, str], output: Output,
             deadline: float | None) -> Ended:
        try:
            return run(argv, env, output, deadline, self.grace, self.still_set if self.job_probe else None)
        except CannotStart as exc:
            raise ExecutorError(f"cannot run {self._name(number)}: {exc}") from None

    def _check(self, jobid: str, number: int, output: Output, ended: Ended) -> None:
        """Raise what the step's end means (nothing for success)."""
        name = self._name(number)
        if ended.unset:  # what it did no longer matters: the job is gone
            how = f"SIGTERM, then SIGKILL {self.grace:g}s later" if ended.killed else "ended by SIGTERM"
            log.info("job %s: unset while %s ran: %s", jobid, name, how)
            raise UnsetJob(f"unset while {name} ran: {how}")
        if not ended.timed_out:
            if ended.code == 0:
                return
            if ended.code == self.stop_code:
                log.info("job %s: %s exited with code %d: stopping the job", jobid, name, ended.code)
                raise StopWork(f"{name} exited with code {ended.code}")
            if ended.code == self.unset_code:
                log.info("job %s: %s exited with code %d: unsetting the job", jobid, name, ended.code)
                raise UnsetJob(f"{name} exited with code {ended.code}")
        if ended.timed_out:
            how = f"timed out after {self.run_timeout:g}s: " + (
                f"SIGTERM, then SIGKILL {self.grace:g}s later" if ended.killed else "ended by SIGTERM")
        elif ended.code < 0:
            how = f"was killed by signal {signal_name(-ended.code)}"
        else:
            how = f"exited with code {ended.code}"
        last, tail = output.stderr_tail()
        message = f"{name} {how}" + (f": {last}" if last else "")
        if output.path is not None:
            message += f"\noutput in {output.path}.stdout and {output.path}.stderr"
        header = "\n--- the end of its stderr ---\n"
        room = max(0, MESSAGE_CHARACTERS - len(message) - len(header))
        if len(tail) > room:  # whole lines, as many as fit
            tail = tail[len(tail) - room:].partition("\n")[2]
        if tail:
            message += header + tail
        raise ExecutorError(message)


class Command(Chain):
    """Runs one program per job: ``Command('A:B', '/usr/local/bin/thumbnail
    --size 256', timeout=60)``; the options are Chain's."""

    def __init__(self, queues: str, command_line: str, **options: Any) -> None:
        super().__init__(queues, command_line, **options)
