"""Real-process tests of how a worker pool reports and survives faults:
what its log says about each run, a lease lost while the pool was stopped,
a stop while Redis is down. Fixtures and helpers as in test_processes.py."""

from __future__ import annotations

from conftest import wait_for
from test_processes import bike, daemons, ends, env, halt, keys, starts, testlog  # noqa: F401 - fixtures


def test_each_failed_run_is_logged_and_with_v_every_start_and_end(workdir, client, bike, daemons, testlog, env):  # noqa: F811
    quiet = daemons.start("work", "testworker:Recorder('A')", cwd=workdir)
    verbose = daemons.start("-v", "work", "testworker:Recorder('V')", cwd=workdir)
    bike.set("fail-1:A", "NOW")
    bike.set("fine-1:A", "NOW")
    bike.set("fail-2:V", "NOW")
    bike.set("fine-2:V", "NOW")
    wait_for(lambda: len(ends(client, testlog)) == 4, what="the four runs")
    line = wait_for(lambda: [ln for ln in daemons.log(quiet).splitlines() if "fail-1:A" in ln], what="the failure line")
    assert len(line) == 1, line
    assert " WARNING job fail-1:A: failed after " in line[0]
    assert line[0].endswith("s: ValueError: fail-1:A failed on purpose")
    assert "fine-1:A" not in daemons.log(quiet)  # start and end lines are DEBUG
    wait_for(lambda: "job fine-2:V: ended (ok) after " in daemons.log(verbose), what="the end line")
    log = daemons.log(verbose)
    assert "DEBUG job fine-2:V: started (queue V, worker " in log
    assert "WARNING job fail-2:V: failed after " in log and "ValueError: fail-2:V failed on purpose" in log
    assert "Traceback" in log  # the failure's traceback too, at DEBUG
    halt(workdir, env, quiet, verbose)
