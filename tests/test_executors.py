"""Real-process tests of redbike.executors: programs (tests/execprog.py,
standing for any binary) run by Command and Chain workers in a pool
against the session's redis-server, and by `redbike work` from the command
line. The processes a run starts all have its REDBIKE_JOBID in their
environment: the tests find them, and make sure they are gone, by it."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from conftest import Daemons, alive, processes_with, wait_for
from test_processes import cli_ok

from redbike import Redbike, RoundRobin
from redbike.executors import Chain, Command, ExecutorError
from redbike.supervisor import WorkerPool
from redbike.workerspec import WorkerSpecError, load_worker

PROGRAM = Path(__file__).resolve().parent / "execprog.py"


def program(*args: str) -> str:
    """The command line of execprog.py with ``args``."""
    return shlex.join([sys.executable, str(PROGRAM), *args])


def processes_of(jobid: str) -> list[int]:
    """The live processes whose environment has REDBIKE_JOBID=``jobid``."""
    return processes_with("REDBIKE_JOBID", jobid)


def named(*args: str, step: str = "") -> str:
    """How an error names the command line of execprog.py with ``args`` (shortened)."""
    line = program(*args)
    return f"{step}`{line[:77]}...`" if len(line) > 80 else f"{step}`{line}`"


def kill_processes_of(jobid: str) -> None:
    """Leave nothing behind, whatever the test found."""
    for pid in processes_of(jobid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def told(bike: Redbike, jobid: str) -> dict[str, Any]:
    return bike.tell(jobid) or {}


def status(bike: Redbike, jobid: str) -> str:
    return (told(bike, jobid).get("status") or "").split(":")[0]


def ended(bike: Redbike, jobid: str, wanted: str, timeout: float = 15) -> dict[str, Any]:
    """Wait for the job's status to be ``wanted``; what tell says then."""
    wait_for(lambda: status(bike, jobid) == wanted, timeout=timeout, what=f"{jobid} to be {wanted}")
    return told(bike, jobid)


@contextlib.contextmanager
def pool_of(client: redis.Redis, prefix: str, worker: RoundRobin,
            **settings: Any) -> Iterator[tuple[Redbike, WorkerPool]]:
    """A pool of ``worker`` running in a thread, stopped (HALT) at the end."""
    bike = Redbike(worker, prefix=prefix, client=client)
    pool = WorkerPool(client, bike.keys, worker, **settings)
    thread = threading.Thread(target=pool.run)
    thread.start()
    try:
        yield bike, pool
    finally:
        bike.control()  # HALT
        thread.join(30)
        assert not thread.is_alive()


# ------------------------------------------------------------- work item, environment


def test_a_command_runs_with_its_work_item_file_and_the_runs_environment(client, prefix, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    jobid = f"copy-{prefix}:X"
    with pool_of(client, prefix, Command("X", program("copy", str(out)))) as (bike, _):
        bike.set(jobid, "NOW")
        assert ended(bike, jobid, "END")["status"].startswith("END")
    seen = json.loads(next(out.glob("*.json")).read_text())
    token = seen["REDBIKE_TOKEN"]
    assert (out / f"{token}.item").read_text() == jobid  # the work item: the job id
    assert seen["mode"] == "0o600"
    assert seen["REDBIKE_JOBID"] == jobid
    assert seen["REDBIKE_QUEUE"] == "X"
    assert seen["REDBIKE_ATTEMPT"] == "1"
    assert seen["WORK_INPUT_FILE"] == seen["WORK_ITEM_FILE"]
    assert len(token) >= 16
    assert not os.path.exists(seen["WORK_ITEM_FILE"])  # removed after the run
    assert not os.path.exists(os.path.dirname(seen["WORK_ITEM_FILE"]))


# -------------------------------------------------------------------- exit codes


def test_exit_codes_map_to_statuses(client, prefix):
    jobs = {code: f"exit{code}-{prefix}:X" for code in (0, 64, 65, 3)}
    with pool_of(client, prefix, Command("X", program("item"))) as (bike, pool):
        bike.set(jobs[0], "FREQ=HOURLY", after=time.time() - 3601)  # an occurrence due: enqueued at once
        for code in (64, 65, 3):
            bike.set(jobs[code], "NOW")
        # A run is counted before it is reported to Redis: wait for each job's state.
        ended(bike, jobs[0], "TML")  # success: placed by its schedule again
        ended(bike, jobs[64], "STP")
        assert bike.schedule_of(jobs[64]) == "STOP"
        wait_for(lambda: bike.tell(jobs[65]) is None, what="the job to be unset")
        failed = ended(bike, jobs[3], "DIE")["last_error"]
        assert pool.jobs_done == 4
        assert told(bike, jobs[0])["ledger"]["fired"] == 1  # it ran once: TML is its next occurrence
    assert failed["error"] == f"ExecutorError: {named('item')} exited with code 3: last words of {jobs[3]}"
    trace = failed["traceback"]
    assert trace.rstrip().endswith(f"last words of {jobs[3]}")
    assert "stderr line 299 of a program" in trace
    assert "stderr line 200 of a program" not in trace  # bounded: the last 3 KiB only
    assert trace.startswith("Traceback (most recent call last):")  # and all of it fits


def test_a_program_that_floods_stdout_and_stderr_is_read_without_blocking(client, prefix):
    jobid = f"flood3-{prefix}:X"
    with pool_of(client, prefix, Command("X", program("item"))) as (bike, _):
        bike.set(jobid, "NOW")
        error = ended(bike, jobid, "DIE")["last_error"]
    assert error["error"].endswith(f"exited with code 3: last words of {jobid}")
    assert f"0299 {'e' * 1018}" in error["traceback"]


def test_a_program_killed_by_a_signal_fails_the_run(client, prefix):
    jobid = f"selfkill-{prefix}:X"
    with pool_of(client, prefix, Command("X", program("item"))) as (bike, _):
        bike.set(jobid, "NOW")
        error = ended(bike, jobid, "DIE")["last_error"]["error"]
    assert error.endswith("was killed by signal 9 (SIGKILL)")


def test_a_missing_program_fails_its_runs_and_the_slot_goes_on(client, prefix, tmp_path):
    missing = "/nonexistent-redbike/thumbnail"
    jobs = [f"one-{prefix}:X", f"two-{prefix}:X"]
    with pool_of(client, prefix, Command("X", f"{missing} --size 256")) as (bike, pool):
        child = wait_for(lambda: pool.children.get(0), what="the slot's child").pid  # type: ignore[union-attr]
        for jobid in jobs:
            bike.set(jobid, "NOW")
            error = ended(bike, jobid, "DIE")["last_error"]["error"]
            assert error == f"ExecutorError: cannot run `{missing} --size 256`: no such program"
        assert pool.children[0].pid == child  # the same child ran both: it did not crash


def test_a_program_that_is_not_executable_fails_the_run(client, prefix, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")  # mode 0644
    jobid = f"noexec-{prefix}:X"
    with pool_of(client, prefix, Command("X", str(script))) as (bike, _):
        bike.set(jobid, "NOW")
        error = ended(bike, jobid, "DIE")["last_error"]["error"]
    assert error == f"ExecutorError: cannot run `{script}`: not executable (permission denied)"


# --------------------------------------------------------- timeouts, process groups


def test_a_program_killed_for_the_pools_timeout_leaves_no_process_behind(client, prefix):
    jobid = f"spawn-{prefix}:X"
    try:
        with pool_of(client, prefix, Command("X", program("spawn")), default_timeout=2) as (bike, _):
            bike.set(jobid, "NOW")
            started = wait_for(lambda: len(found := processes_of(jobid)) == 2 and found, what="the program and its sleep")
            error = ended(bike, jobid, "EXP")["last_error"]
            assert error["error"] == "killed: timed out after 2s"
            wait_for(lambda: not any(alive(pid) for pid in started), timeout=5, what="the program and its sleep to die")
    finally:
        kill_processes_of(jobid)


def test_a_forced_stop_leaves_no_process_behind(client, prefix):
    """A second signal to the pool kills the running programs, and what they started."""
    jobid = f"spawn-{prefix}:X"
    try:
        with pool_of(client, prefix, Command("X", program("spawn")), default_timeout=60) as (bike, pool):
            bike.set(jobid, "NOW")
            started = wait_for(lambda: len(found := processes_of(jobid)) == 2 and found, what="the program and its sleep")
            pool.stop()  # as the signal handler does: first, finish the running job...
            pool.stop()  # ...then kill it
            error = ended(bike, jobid, "EXP")["last_error"]
            assert error["error"] == "killed: stopped by force"
            wait_for(lambda: not any(alive(pid) for pid in started), timeout=5, what="the program and its sleep to die")
    finally:
        kill_processes_of(jobid)


def test_the_executors_timeout_ends_the_program_and_its_children_with_sigterm(client, prefix):
    jobid = f"spawn-{prefix}:X"
    worker = Command("X", program("spawn"), timeout=1, grace=20)
    assert worker.timeout("X") == 1 + 20 + 2  # the pool's own timeout comes after the executor's
    try:
        with pool_of(client, prefix, worker) as (bike, _):
            bike.set(jobid, "NOW")
            started = wait_for(lambda: len(found := processes_of(jobid)) == 2 and found, what="the program and its sleep")
            began = time.monotonic()
            error = ended(bike, jobid, "DIE")["last_error"]["error"]
            assert time.monotonic() - began < 10  # not the 20 s grace: SIGTERM was enough
            assert error.endswith("timed out after 1s: ended by SIGTERM")
            assert not any(alive(pid) for pid in started)
    finally:
        kill_processes_of(jobid)


def test_a_program_that_ignores_sigterm_gets_sigkill_after_the_grace(client, prefix):
    jobid = f"stubborn-{prefix}:X"
    try:
        with pool_of(client, prefix, Command("X", program("stubborn"), timeout=1, grace=1)) as (bike, _):
            bike.set(jobid, "NOW")
            started = wait_for(lambda: len(found := processes_of(jobid)) == 2 and found, what="the program and its sleep")
            error = ended(bike, jobid, "DIE")["last_error"]["error"]
            assert error.endswith("timed out after 1s: SIGTERM, then SIGKILL 1s later")
            assert not any(alive(pid) for pid in started)  # the sleep ignored SIGTERM too
    finally:
        kill_processes_of(jobid)


NO_TRAIL = SimpleNamespace(events=[])


def test_unsetting_a_running_job_stops_its_program_with_sigterm(client, prefix):
    jobid = f"unset-{prefix}:X"
    worker = Command("X", program("spawn"), grace=20)
    try:
        with pool_of(client, prefix, worker) as (bike, _):
            bike.set(jobid, "NOW")
            started = wait_for(lambda: len(found := processes_of(jobid)) == 2 and found, what="the program and its sleep")
            began = time.monotonic()
            bike.unset(jobid)
            wait_for(lambda: not any(alive(pid) for pid in started), timeout=10, what="the program to end")
            assert time.monotonic() - began < 10  # not the 20 s grace: SIGTERM was enough
            runs = wait_for(lambda: [event for event in (bike.explain(jobid) or NO_TRAIL).events
                                     if not isinstance(event, str) and event.event == "run"],
                            what="the run's end in the trail")
            assert runs[-1].fields["status"] == "GONE"  # the run ended as the unset job's
    finally:
        kill_processes_of(jobid)


def test_a_program_of_an_unset_job_that_ignores_sigterm_gets_sigkill_after_the_grace(client, prefix):
    jobid = f"unset-stubborn-{prefix}:X"
    try:
        with pool_of(client, prefix, Command("X", program("stubborn"), grace=1)) as (bike, _):
            bike.set(jobid, "NOW")
            started = wait_for(lambda: len(found := processes_of(jobid)) == 2 and found, what="the program and its sleep")
            bike.unset(jobid)
            wait_for(lambda: not any(alive(pid) for pid in started), timeout=15, what="SIGKILL after the grace")
    finally:
        kill_processes_of(jobid)


def test_a_job_set_again_while_its_program_runs_is_not_stopped(client, prefix):
    """Set again (not unset), the job is still set: its program runs on
    (looked up at least twice meanwhile, through HEXISTS)."""
    jobid = f"again-{prefix}:X"
    try:
        with pool_of(client, prefix, Command("X", program("spawn"), grace=20)) as (bike, _):
            bike.set(jobid, "NOW")
            started = wait_for(lambda: len(found := processes_of(jobid)) == 2 and found, what="the program and its sleep")
            bike.set(jobid, "NOW")
            looked = client.info("commandstats").get("cmdstat_hexists", {}).get("calls", 0)
            wait_for(lambda: client.info("commandstats").get("cmdstat_hexists", {}).get("calls", 0) >= looked + 2,
                     what="two more look-ups of the running job")
            assert all(alive(pid) for pid in started)
    finally:
        kill_processes_of(jobid)


def test_outside_a_pool_the_program_leads_a_session_of_its_own(prefix):
    """work() called directly: the executor's timeout kills the program's
    own group, never its caller's (this test process's)."""
    jobid = f"spawn-{prefix}:X"
    worker = Command("X", program("spawn"), timeout=0.5, grace=5)
    try:
        with pytest.raises(ExecutorError, match="timed out after 0.5s: ended by SIGTERM"):
            worker.work(jobid)
        assert not processes_of(jobid)
    finally:
        kill_processes_of(jobid)


# ------------------------------------------------------------------------- output


def test_output_dir_holds_each_runs_stdout_and_stderr(client, prefix, tmp_path):
    folder = tmp_path / "output"
    jobid = f"exit3-{prefix}/a b:X"
    with pool_of(client, prefix, Command("X", program("item"), output_dir=str(folder))) as (bike, _):
        bike.set(jobid, "NOW")
        error = ended(bike, jobid, "DIE")["last_error"]
    (stderr,) = folder.glob("*.stderr")
    assert stderr.name.startswith(f"exit3-{prefix}%2Fa%20b%3AX.")
    assert len(stderr.read_text().splitlines()) == 301
    assert stderr.with_suffix(".stdout").exists()
    assert f"output in {str(stderr)[:-7]}.stdout and {stderr}" in error["traceback"]
    assert error["traceback"].rstrip().endswith(f"last words of {jobid}")
    assert error["traceback"].startswith("Traceback (most recent call last):")


# ------------------------------------------------------------------------- chains


def test_a_chain_passes_each_steps_output_file_to_the_next(client, prefix, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    jobid = f"photo-{prefix}:X"
    chain = Chain("X", program("append", "+faces"), program("append", "+blurred"), program("publish", str(out)))
    with pool_of(client, prefix, chain) as (bike, _):
        bike.set(jobid, "NOW")
        ended(bike, jobid, "END")
    (published,) = out.glob("*.out")
    assert published.read_text() == f"{jobid}+faces+blurred"


def test_a_chain_fails_at_its_first_failing_step_and_names_it(client, prefix, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    jobid = f"exit7-{prefix}:X"
    chain = Chain("X", program("append", "+faces"), program("item"), program("publish", str(out)))
    with pool_of(client, prefix, chain) as (bike, _):
        bike.set(jobid, "NOW")
        error = ended(bike, jobid, "DIE")["last_error"]["error"]
    assert error == f"ExecutorError: {named('item', step='step 2 of 3 ')} exited with code 7: last words of {jobid}"
    assert not list(out.iterdir())  # step 3 did not run


# ------------------------------------------------------------- the command line


def test_redbike_work_runs_a_command_from_its_worker_spec(workdir, client, prefix, daemons: Daemons, process_env,
                                                          tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    spec = f"redbike.executors:Command('X', {program('item')!r}, output_dir=None)"
    worker = daemons.start("work", spec, cwd=workdir)
    bike = Redbike(RoundRobin(), prefix=prefix, client=client)
    good, bad = f"exit0-{prefix}:X", f"exit3-{prefix}:X"
    cli_ok(workdir, process_env, "set", good, "NOW")
    cli_ok(workdir, process_env, "set", bad, "NOW")
    ended(bike, good, "END")
    ended(bike, bad, "DIE")
    tell = json.loads(cli_ok(workdir, process_env, "tell", bad))
    assert tell["last_error"]["error"] == f"ExecutorError: {named('item')} exited with code 3: last words of {bad}"
    assert tell["last_error"]["traceback"].rstrip().endswith(f"last words of {bad}")
    explained = cli_ok(workdir, process_env, "explain", bad)
    assert f"exited with code 3: last words of {bad}; no retries left (DIE)" in explained
    log = wait_for(lambda: f"job {bad}: stderr: last words of {bad}" in (text := daemons.log(worker)) and text,
                   what="the program's stderr in the worker's log")
    assert f"job {bad}: stderr: stderr line 0 of a program about to fail" in log  # type: ignore[operator]
    assert f"job {good}: stderr: last words of {good}" in log  # type: ignore[operator]
    unset = f"spawn-{prefix}:X"  # its program runs an hour: unset, it is stopped, and the worker says so
    cli_ok(workdir, process_env, "set", unset, "NOW")
    started = wait_for(lambda: len(found := processes_of(unset)) == 2 and found, what="the program and its sleep")
    cli_ok(workdir, process_env, "unset", unset)
    wait_for(lambda: f"job {unset}: unset while {named('item')} ran: ended by SIGTERM" in daemons.log(worker),
             what="the unset run's line in the worker's log")
    assert not any(alive(pid) for pid in started)
    cli_ok(workdir, process_env, "control", "HALT")
    assert worker.wait(10) == 0


@pytest.mark.parametrize("spec, error", [
    ("Command('X', '')", "bad command ''"),
    ("Command('X', 'prog \"unclosed')", "No closing quotation"),
    ("Command('X', 'prog', timeout=-1)", "timeout must be a number of seconds from 0.001 to 31622400, not -1"),
    ("Command('X', 'prog', grace=1e999)", "grace must be a number of seconds from 0 to 31622400, not inf"),
    ("Command('X', 'prog', stop_code=0)", "stop_code must be an exit code from 1 to 255, not 0"),
    ("Command('X', 'prog', colour='red')", "unexpected keyword argument 'colour'"),
    ("Chain('X')", "no command given"),
])
def test_bad_executor_specs_are_refused_with_one_line(spec, error):
    with pytest.raises(WorkerSpecError, match=error) as raised:
        load_worker(f"redbike.executors:{spec}")
    assert "\n" not in str(raised.value)


def test_an_executor_spec_builds_the_worker():
    worker = load_worker("redbike.executors:Command('A:B', '/usr/local/bin/thumbnail --size 256', timeout=60)")
    assert isinstance(worker, Command)
    assert worker.queue_names() == ["A", "B"]
    assert worker.steps == [["/usr/local/bin/thumbnail", "--size", "256"]]
    assert worker.timeout("A") == 60 + 5 + 2
    assert Command("A", "prog").timeout("A") is None  # the pool's default-timeout


# ------------------------------------------------------- the thumbnail example


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def flag(width: int, height: int) -> bytes:
    """A text PPM (P3): its left half red, its right half blue."""
    pixels = [("255 0 0" if x < width // 2 else "0 0 255") for _ in range(height) for x in range(width)]
    return f"P3\n# a flag\n{width} {height}\n255\n".encode() + "\n".join(pixels).encode() + b"\n"


def test_the_thumbnail_example_run_by_a_command_and_by_a_chain(client, prefix, tmp_path):
    media, thumbs, published = tmp_path / "media", tmp_path / "thumbs", tmp_path / "published"
    media.mkdir()
    (media / "flag.ppm").write_bytes(flag(40, 20))
    (media / "text.ppm").write_text("not an image\n")
    thumbnail = shlex.join([sys.executable, str(EXAMPLES / "thumbnail.py"), "--size", "10", "--media", str(media)])
    command = Command("thumbs", f"{thumbnail} --out {shlex.quote(str(thumbs))}")
    with pool_of(client, prefix, command) as (bike, _):
        for name in ("flag", "gone", "text"):
            bike.set(f"{name}.ppm:thumbs", "NOW")
        ended(bike, "flag.ppm:thumbs", "END")
        wait_for(lambda: bike.tell("gone.ppm:thumbs") is None, what="the job of a missing image to be unset")
        error = ended(bike, "text.ppm:thumbs", "DIE")["last_error"]["error"]
    assert error.endswith(f"exited with code 1: {media / 'text.ppm'}: truncated header")
    made = (thumbs / "flag.ppm.thumb.ppm").read_bytes()
    header, pixels = made[:len(b"P6\n10 5\n255\n")], made[len(b"P6\n10 5\n255\n"):]
    assert header == b"P6\n10 5\n255\n"
    rows = [pixels[30 * y:30 * (y + 1)] for y in range(5)]
    assert all(row == bytes([255, 0, 0]) * 5 + bytes([0, 0, 255]) * 5 for row in rows)
    publish = shlex.join([sys.executable, str(EXAMPLES / "publish.py"), "--suffix", ".thumb.ppm", str(published)])
    with pool_of(client, f"{prefix}c", Chain("thumbs", thumbnail, publish)) as (bike, _):
        bike.set("flag.ppm:thumbs", "NOW")
        ended(bike, "flag.ppm:thumbs", "END")
    assert (published / "flag.ppm.thumb.ppm").read_bytes() == made
