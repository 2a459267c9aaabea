"""`redbike preview`: occurrences in the zone and in UTC, with DST shifts and
folds marked; the CLI's errors; --schedule without Redis, JOBID with it."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import free_port, redbike_command

from redbike.cli import main
from redbike.preview import MAX_COUNT, Preview, preview
from redbike.schedules import parse_schedule, parse_timestamp

NEW_YORK = "America/New_York"
# 2026 in New York: clocks go 02:00 EST -> 03:00 EDT on 2026-03-08 (07:00Z),
# and 02:00 EDT -> 01:00 EST on 2026-11-01 (06:00Z).
SPRING = "2026-03-06T12:00:00Z"
FALL = "2026-10-31T12:00:00Z"


def shown(schedule: str, after: str, count: int = 10) -> Preview:
    return preview(parse_schedule(schedule), parse_timestamp(after), count)


def kinds(p: Preview) -> list[tuple[str, list[str]]]:
    """(UTC time, mark kinds) of each occurrence."""
    return [(datetime.fromtimestamp(o.due, UTC).strftime("%Y-%m-%dT%H:%MZ"),
             [m.kind for m in o.marks]) for o in p.occurrences]


@pytest.mark.parametrize("schedule", [
    f"CRON_TZ={NEW_YORK} 30 2 * * *",
    f"DTSTART;TZID={NEW_YORK}:20260301T023000 RRULE:FREQ=DAILY",
])
def test_a_time_in_the_spring_gap_is_marked_shifted(schedule):
    p = shown(schedule, SPRING, count=4)
    assert kinds(p) == [("2026-03-07T07:30Z", []), ("2026-03-08T07:30Z", ["dst-shifted"]),
                        ("2026-03-09T06:30Z", []), ("2026-03-10T06:30Z", [])]
    line = p.occurrences[1].line()
    assert line.startswith("2026-03-08 03:30:00 EDT (-04:00)  2026-03-08 07:30:00 UTC")
    assert "DST-shifted (02:30 does not exist on that day; runs at 03:30)" in line


def test_a_time_that_exists_after_the_gap_is_not_marked():
    assert kinds(shown(f"CRON_TZ={NEW_YORK} 0 3 * * *", SPRING, count=3)) == [
        ("2026-03-07T08:00Z", []), ("2026-03-08T07:00Z", []), ("2026-03-09T07:00Z", [])]


def test_a_gap_time_shifted_onto_a_scheduled_time_runs_once_and_says_so():
    p = shown(f"CRON_TZ={NEW_YORK} 30 2,3 * * *", "2026-03-08T00:00:00Z", count=2)
    assert kinds(p) == [("2026-03-08T07:30Z", ["dst-shifted"]), ("2026-03-09T06:30Z", [])]
    assert "runs at 03:30, with the 03:30 run" in p.occurrences[0].marks[0].note


def test_a_time_at_the_fold_runs_at_its_first_occurrence_and_is_marked():
    p = shown(f"CRON_TZ={NEW_YORK} 30 1 * * *", FALL, count=3)
    # 01:30 EST on 2026-11-01 (06:30Z) does not run.
    assert kinds(p) == [("2026-11-01T05:30Z", ["fold"]), ("2026-11-02T06:30Z", []),
                        ("2026-11-03T06:30Z", [])]
    assert p.occurrences[0].marks[0].note == (
        "fold: 01:30 occurs twice, runs at the first (EDT) only, not at 01:30 EST")


def test_an_hourly_rule_skips_the_repeated_hour():
    p = shown(f"DTSTART;TZID={NEW_YORK}:20261031T000000 RRULE:FREQ=HOURLY", "2026-11-01T04:30:00Z", 3)
    assert kinds(p) == [("2026-11-01T05:00Z", ["fold"]), ("2026-11-01T07:00Z", []),
                        ("2026-11-01T08:00Z", [])]


def test_a_schedule_without_a_zone_is_shown_in_utc():
    p = shown("0 12 * * *", SPRING, count=2)
    assert p.schedule.zone.key == "UTC"
    assert next(p.lines()) == "0 12 * * *  (zone UTC)"
    assert p.occurrences[0].line() == "2026-03-07 12:00:00 UTC (+00:00)  2026-03-07 12:00:00 UTC"


@pytest.mark.parametrize("count", [1, 7, MAX_COUNT])
def test_count_occurrences_are_shown(count):
    p = shown("*/5 * * * *", SPRING, count=count)
    assert len(p.occurrences) == count and p.notes == []
    assert [o.due for o in p.occurrences] == [parse_timestamp(SPRING) + 300 * k for k in range(1, count + 1)]


def test_an_exhausted_count_shows_fewer_and_says_so():
    rule = f"DTSTART;TZID={NEW_YORK}:20260305T023000 RRULE:FREQ=DAILY;COUNT=5"
    p = shown(rule, "2026-03-06T12:00:00Z")
    assert len(p.occurrences) == 3 and kinds(p)[1] == ("2026-03-08T07:30Z", ["dst-shifted"])
    assert p.notes == ["no more occurrences: the rule ends (COUNT or UNTIL)"]
    ended = shown(rule, "2026-04-01T00:00:00Z")
    assert ended.occurrences == [] and "has ended" in ended.notes[0]


def test_a_one_off_is_one_line_and_a_past_one_says_it_still_runs():
    future = shown("AT:2026-12-24T18:00:00+01:00", SPRING)
    assert kinds(future) == [("2026-12-24T17:00Z", [])] and future.notes == []
    assert len(list(future.lines())) == 2  # the schedule, then its one occurrence
    assert kinds(shown("AT:2020-01-01", SPRING)) == [("2020-01-01T00:00Z", ["past"])]


@pytest.mark.parametrize("word", ["NOW", "CONTINUE", "STOP"])
def test_control_words_print_one_explanation(word):
    lines = list(shown(word, SPRING).lines())
    assert len(lines) == 1 and lines[0].startswith(f"{word}: ")


def test_a_rule_without_dtstart_counts_from_the_start_time():
    p = shown("FREQ=MINUTELY;INTERVAL=10", "2026-01-01T00:00:05Z", count=2)
    assert kinds(p) == [("2026-01-01T00:10Z", []), ("2026-01-01T00:20Z", [])]
    assert "counts from when the job is set or last ran" in p.notes[0]


def test_json_has_due_local_utc_and_marks(capsys):
    code = main(["preview", f"--schedule=CRON_TZ={NEW_YORK} 30 2 * * *", f"--after={SPRING}",
                 "--count=2", "--json"])
    out = capsys.readouterr()
    assert code == 0 and out.err == ""
    assert json.loads(out.out) == [
        {"due": 1772868600, "local": "2026-03-07T02:30:00-05:00", "zone": NEW_YORK,
         "abbreviation": "EST", "utc": "2026-03-07T07:30:00Z", "marks": []},
        {"due": 1772955000, "local": "2026-03-08T03:30:00-04:00", "zone": NEW_YORK,
         "abbreviation": "EDT", "utc": "2026-03-08T07:30:00Z",
         "marks": [{"kind": "dst-shifted",
                    "note": "DST-shifted (02:30 does not exist on that day; runs at 03:30)"}]},
    ]


def test_json_notes_go_to_stderr(capsys):
    assert main(["preview", "--schedule=STOP", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == [] and out.err.startswith("redbike: STOP: never runs")


def test_text_output(capsys):
    assert main(["preview", f"--schedule=CRON_TZ={NEW_YORK} 30 1 * * *", f"--after={FALL}",
                 "--count=2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"CRON_TZ={NEW_YORK} 30 1 * * *  (zone {NEW_YORK})",
        ("2026-11-01 01:30:00 EDT (-04:00)  2026-11-01 05:30:00 UTC  "
         "fold: 01:30 occurs twice, runs at the first (EDT) only, not at 01:30 EST"),
        "2026-11-02 01:30:00 EST (-05:00)  2026-11-02 06:30:00 UTC",
    ]


@pytest.mark.parametrize(("args", "message"), [
    (["--count=0"], "redbike: --count must be from 1 to 1000, not 0"),
    ([f"--count={MAX_COUNT + 1}"], "redbike: --count must be from 1 to 1000, not 1001"),
    (["--count=ten"], "redbike: --count must be a whole number from 1 to 1000, not 'ten'"),
    (["--after=soon"], "redbike: bad timestamp: expected epoch seconds"),
    (["--after=inf"], "redbike: bad timestamp: "),
])
def test_bad_options_are_one_line_and_exit_2(capsys, args, message):
    assert main(["preview", "--schedule=@daily", *args]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.splitlines()) == 1 and out.err.startswith(message)


@pytest.mark.parametrize("schedule", ["sometimes", "0 0 30 2 *", "CRON_TZ=Mars/Olympus 0 * * * *"])
def test_a_bad_schedule_is_one_line_and_exit_2(capsys, schedule):
    assert main(["preview", f"--schedule={schedule}"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"redbike: bad schedule {schedule!r}: ") and out.err.count("\n") == 1


# The real CLI as a subprocess: --schedule needs no Redis, JOBID reads it.

def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(redbike_command(*args), check=False, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    return result.stderr.strip()


def test_preview_schedule_contacts_no_redis(tmp_path):
    unreachable = tmp_path / "unreachable"
    unreachable.mkdir()
    (unreachable / ".redbike.conf").write_text(
        f"[redbike-redis]\nurl = redis://127.0.0.1:{free_port()}/0\nsocket_connect_timeout = 1\n")
    empty = tmp_path / "empty"  # no config: other commands would start an embedded server here
    empty.mkdir()
    for folder in (unreachable, empty):
        result = run(folder, "preview", "--schedule=@hourly", "--count=3")
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert len(result.stdout.splitlines()) == 4
    assert not (empty / ".redbike").exists()
    # A bad job id is refused before connecting too (1 would mean Redis was tried).
    assert one_line(run(unreachable, "preview", "a|b:A"), 2).startswith("redbike: bad job id")


def test_preview_jobid_reads_the_schedule_from_redis(workdir, client):
    assert run(workdir, "set", "nightly:A", f"CRON_TZ={NEW_YORK} 30 2 * * *").returncode == 0
    result = run(workdir, "preview", "nightly:A", "--after=2026-03-07T12:00:00Z", "--count=2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"CRON_TZ={NEW_YORK} 30 2 * * *  (zone {NEW_YORK})",
        ("2026-03-08 03:30:00 EDT (-04:00)  2026-03-08 07:30:00 UTC  "
         "DST-shifted (02:30 does not exist on that day; runs at 03:30)"),
        "2026-03-09 02:30:00 EDT (-04:00)  2026-03-09 06:30:00 UTC",
    ]
    listed = run(workdir, "preview", "nightly:A", "--json", "--count=5")  # from Redis' clock
    dues = [o["due"] for o in json.loads(listed.stdout)]
    now = float(client.time()[0])
    assert len(dues) == 5 and now < dues[0] <= now + 86400 + 3600 and dues == sorted(dues)
    assert one_line(run(workdir, "preview", "ghost:A"), 3) == "redbike: no such job: ghost:A"
    assert run(workdir, "set", "bad:A", "sometimes").returncode == 2  # recorded BAD, text kept
    assert one_line(run(workdir, "preview", "bad:A"), 2).startswith(
        "redbike: bad:A has a bad schedule 'sometimes': ")
