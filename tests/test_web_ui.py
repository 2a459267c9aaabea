"""The web UI in a real browser: headless Chromium driven by Selenium (Debian's
chromium and chromium-driver; .ci/run installs them; a missing one is a
failure, never a skip), against a real `redbike serve` and real `redbike
work` / `redbike dispatch` processes on the test Redis. Every page visited is
saved as a screenshot in test-artifacts/screenshots/ (git-ignored)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ROOT, Daemons, free_port, redbike_command, wait_for
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from redbike import Redbike
from redbike.keys import Keys
from redbike.records import decode_lease

TOKEN = "s3cret-token-for-the-ui-tests"
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
WAIT = 20.0  # seconds a page has to show what a test waits for (CI's machine is shared and slow)
BROWSER_ZONE = "Asia/Kolkata"  # UTC+05:30 all year
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>:A"


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/bin")
        if found:
            return found
    pytest.fail(f"none of {', '.join(names)} found: install Debian's chromium and chromium-driver "
                "(apt-get install -y chromium chromium-driver; .ci/run does)")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = _binary("chromium", "chromium-browser")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000", "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: CSP violations, script errors
    # A zone other than the machine's UTC, so that the pages' local times differ from UTC.
    service = webdriver.ChromeService(executable_path=_binary("chromedriver"), env={"TZ": BROWSER_ZONE})
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as exc:
        pytest.fail(f"headless Chromium did not start: {exc.msg}")
    try:
        yield driver
    finally:
        driver.quit()


class Site:
    """A running `redbike serve` and the browser looking at it."""

    def __init__(self, driver: WebDriver, base: str, client: redis.Redis, keys: Keys, testlog: str) -> None:
        self.driver, self.base, self.client, self.keys, self.testlog = driver, base, client, keys, testlog

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)
        self.wait(lambda d: d.execute_script("return document.readyState") == "complete", f"{path} to load")

    def wait(self, condition: Callable[[WebDriver], Any], what: str, timeout: float = WAIT) -> Any:
        return WebDriverWait(self.driver, timeout, ignored_exceptions=[StaleElementReferenceException]).until(
            condition, f"timed out after {timeout}s waiting for {what}")

    def text(self, css: str = "main") -> str:
        """The text of the element matching ``css`` (found again if a refresh swapped it meanwhile)."""
        for _ in range(10):
            try:
                return str(self.driver.find_element(By.CSS_SELECTOR, css).text)
            except StaleElementReferenceException:
                continue
        raise AssertionError(f"{css} kept being swapped")

    def shows(self, words: str, css: str = "main") -> Callable[[WebDriver], bool]:
        return lambda d: words in d.find_element(By.CSS_SELECTOR, css).text

    def click(self, css: str, label: str) -> None:
        """Click the button matching ``css`` whose text is ``label`` (the live
        pages swap their content: found again until the click lands)."""
        def clicked(d: WebDriver) -> bool:
            for button in d.find_elements(By.CSS_SELECTOR, css):
                if button.text == label:
                    button.click()
                    return True
            return False
        self.wait(clicked, f"button {label!r}")

    def keep_token(self) -> None:
        self.driver.find_element(By.ID, "token").send_keys(TOKEN)
        self.driver.find_element(By.ID, "token-save").click()
        self.wait(self.shows("token kept", "#token-state"), "the token to be kept")

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), path
        return path

    def runs(self, jobid: str) -> int:
        return sum(1 for raw in self.client.lrange(self.testlog, 0, -1)
                   if (r := json.loads(raw))["job"] == jobid and r["event"] == "start")

    def status(self, jobid: str) -> str:
        return str(self.client.hget(self.keys.statuses, jobid) or "").partition(":")[0]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


def serve(daemons: Daemons, workdir: Path, token: str | None) -> str:
    port = free_port()
    daemons.start("serve", f"--bind=127.0.0.1:{port}", *([f"--token={token}"] if token else []), cwd=workdir)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(base + "/api/v1/overview"), timeout=30, what="redbike serve to answer")
    return base


@pytest.fixture
def site(browser: WebDriver, workdir: Path, daemons: Daemons, client: redis.Redis, prefix: str,
         testlog: str) -> Site:
    """serve (with a token), a dispatcher and a pool of two slots on queues A and B."""
    base = serve(daemons, workdir, TOKEN)
    daemons.start("dispatch", cwd=workdir)
    daemons.start("work", "--concurrency", "2", cwd=workdir)
    keys = Keys(prefix)
    wait_for(lambda: client.get(keys.dispatcher) and len(list(client.scan_iter(keys.process_pattern()))) == 2,
             timeout=30, what="the dispatcher and the pool to register")
    browser.delete_all_cookies()
    browser.get(base + "/static/ui.css")  # a page of this origin, so that its sessionStorage can be cleared
    browser.execute_script("sessionStorage.clear()")
    return Site(browser, base, client, keys, testlog)


def cli(workdir: Path, daemons: Daemons, *args: str) -> None:
    result = subprocess.run(redbike_command(*args), cwd=workdir, env=daemons.env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_overview_shows_the_processes_and_refreshes_itself(site, workdir, daemons):
    site.open("/")
    site.wait(site.shows("Workers: 1 pool(s), 2 slot(s)"), "the pool on the overview")
    assert "Dispatchers: 1" in site.text()
    assert "leader" in site.text("table.dispatchers")
    assert "read-only" not in site.text("header")
    # Set after the page loaded: the page shows it by refreshing itself.
    cli(workdir, daemons, "set", "sleep0-ov:B", "NOW")
    wait_for(lambda: site.runs("sleep0-ov:B"), what="sleep0-ov:B to run")
    site.wait(site.shows("END 1", "#statuses"), "the overview to refresh and count the ended job")
    site.screenshot("overview")


def test_a_running_job_appears_on_the_workers_page_and_goes_when_it_ends(site, workdir, daemons):
    site.open("/workers")
    assert "idle" in site.text("table.slots")
    cli(workdir, daemons, "set", "block-w1:A", "NOW")
    row = "table.slots tr.busy"
    site.wait(site.shows("block-w1:A", row), "the running job on the workers page")
    busy = site.driver.find_element(By.CSS_SELECTOR, row)
    cells = [cell.text for cell in busy.find_elements(By.TAG_NAME, "td")]
    lease = site.client.hget(site.keys.leases, "block-w1:A")
    assert lease and cells[2] == "A" and cells[5] == decode_lease(lease).token  # its queue and lease token
    assert "ago" in cells[3]
    # Shown in the browser's zone, UTC in its title (and the age beside it).
    since = busy.find_element(By.TAG_NAME, "time")
    started = datetime.fromtimestamp(decode_lease(lease).since, UTC).replace(microsecond=0)
    local = started.astimezone(timezone(timedelta(hours=5, minutes=30))).replace(tzinfo=None)
    assert since.text == f"{local:%Y-%m-%d %H:%M:%S}"
    title = since.get_attribute("title")
    assert title.startswith(f"UTC {started:%Y-%m-%d %H:%M:%S}Z; local {since.text} (Asia/"), title  # ICU: Calcutta
    site.screenshot("workers")
    site.driver.find_element(By.CSS_SELECTOR, f"{row} a.jobid").click()
    site.wait(site.shows("block-w1:A", "#jobid"), "the running job's page")
    assert "token" in site.text("#lease")
    site.client.rpush(f"{site.testlog}:release:block-w1:A", "go")
    site.wait(site.shows("Not running."), "the job's page to refresh itself once its run ended")
    assert site.text("#status").startswith("END since")
    site.open("/workers")
    site.wait(lambda d: not d.find_elements(By.CSS_SELECTOR, row), "the slot to be idle again")


def test_a_failed_job_is_retried_with_its_button_and_runs_again(site, workdir, daemons):
    cli(workdir, daemons, "set", "fail-r1:A", "NOW")
    wait_for(lambda: site.status("fail-r1:A") == "DIE", timeout=30, what="fail-r1:A to fail")
    site.open("/jobs?status=DIE")
    site.wait(site.shows("fail-r1:A", "table.jobs"), "the failed job in the list")
    site.screenshot("jobs")
    site.driver.find_element(By.LINK_TEXT, "fail-r1:A").click()
    site.wait(site.shows("fail-r1:A", "#jobid"), "the job page")
    traceback = site.text("pre#traceback")
    assert "Traceback" in traceback and "ValueError: fail-r1:A failed on purpose" in traceback
    assert site.text("#status").startswith("DIE since")
    site.screenshot("job")
    site.keep_token()
    site.click("button.action", "Retry")
    site.wait(site.shows("PLACED", "#flash"), "the API's answer")
    site.wait(site.shows("retry by", "table.trail"), "the retry in the trail")
    wait_for(lambda: site.runs("fail-r1:A") == 2, timeout=30, what="fail-r1:A to run again")
    site.screenshot("job-retried")


def test_the_buttons_need_the_token(site, workdir, daemons):
    cli(workdir, daemons, "set", "tok:B", "STOP")
    site.open("/jobs/tok:B")
    site.click("button.action", "Run now")  # no token kept yet: the page says so and calls nothing
    site.wait(site.shows("token", "#flash"), "the page to ask for the token")
    site.driver.find_element(By.ID, "token").send_keys("wrong")
    site.driver.find_element(By.ID, "token-save").click()
    site.click("button.action", "Run now")
    site.wait(site.shows("refused (401)", "#flash"), "the API to refuse a wrong token")
    assert site.status("tok:B") == "STP" and site.runs("tok:B") == 0
    site.driver.find_element(By.ID, "token-forget").click()
    site.keep_token()
    site.click("button.action", "Run now")
    wait_for(lambda: site.status("tok:B") == "END", timeout=30, what="tok:B to run once its button was pressed")
    assert site.runs("tok:B") == 1


def test_the_jobs_list_filters_and_pages_and_a_job_is_unset_with_its_button(site, workdir, daemons):
    bike = Redbike(client=site.client, prefix=site.keys.prefix)
    bike.set_many([(f"page-{n:03}:B", "STOP") for n in range(120)] + [("page-other:A", "STOP")])
    site.open("/jobs?queue=B&prefix=page-")
    seen: set[str] = set()
    while True:
        rows = site.driver.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")
        seen |= {row.get_attribute("data-jobid") for row in rows}
        assert len(rows) <= 50
        following = site.driver.find_elements(By.ID, "next-page")
        if not following:
            break
        following[0].click()
        site.wait(lambda d: d.execute_script("return document.readyState") == "complete", "the next page")
    assert seen == {f"page-{n:03}:B" for n in range(120)}  # every one, and none of queue A
    site.screenshot("jobs-filtered")
    site.open("/jobs?prefix=page-007")
    site.driver.find_element(By.LINK_TEXT, "page-007:B").click()
    site.wait(site.shows("page-007:B", "#jobid"), "the job page")
    site.keep_token()
    site.click("button.action", "Unset")
    site.wait(lambda d: d.switch_to.alert, "the confirmation").accept()
    site.wait(site.shows("unset by", "table.trail"), "the unset in the trail")
    assert site.client.hget(site.keys.schedules, "page-007:B") is None


def test_a_read_only_server_says_so_on_its_buttons(browser, workdir, daemons, client, prefix):
    base = serve(daemons, workdir, None)
    client.hset(Keys(prefix).statuses, "ro:A", "DIE:1")
    client.hset(Keys(prefix).schedules, "ro:A", "NOW")
    browser.get(base + "/jobs/ro:A")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "button.action"))
    assert "read-only" in browser.find_element(By.ID, "read-only").text
    buttons = browser.find_elements(By.CSS_SELECTOR, "button.action")
    assert [b.text for b in buttons] == ["Retry (read-only)", "Run now (read-only)", "Unset (read-only)"]
    assert all(not b.is_enabled() for b in buttons)
    assert not browser.find_elements(By.ID, "token")


def test_a_queue_is_paused_and_resumed_with_its_buttons(site, workdir, daemons):
    cli(workdir, daemons, "set", "sleep0-warm:A", "NOW")  # queue A exists, and the pool works it
    wait_for(lambda: site.runs("sleep0-warm:A"), what="a job of A to run")
    site.open("/queues")
    site.keep_token()
    site.wait(site.shows("active", "tr[data-queue='A']"), "queue A, active")
    site.click("tr[data-queue='A'] button.action", "Pause")
    site.wait(site.shows("paused", "tr[data-queue='A'] td.state"), "queue A shown paused")
    assert site.client.sismember(site.keys.paused, "A")
    site.screenshot("queues-paused")
    cli(workdir, daemons, "set", "sleep0-held:A", "NOW")
    cli(workdir, daemons, "set", "sleep0-free:B", "NOW")
    wait_for(lambda: site.runs("sleep0-free:B"), what="B's job to run: the pool works")
    wait_for(lambda: site.client.llen(site.keys.queue("A")) == 1, what="A's job to wait in its queue")
    assert site.runs("sleep0-held:A") == 0 and site.status("sleep0-held:A") == "ENQ"
    site.driver.find_element(By.CSS_SELECTOR, "tr[data-queue='A'] a.queue").click()
    site.wait(site.shows("sleep0-held:A", "table.waiting"), "A's page to list its waiting job")
    site.screenshot("queue-paused")
    site.click("tr[data-queue='A'] button.action", "Resume")
    site.wait(site.shows("active", "tr[data-queue='A'] td.state"), "queue A shown active again")
    wait_for(lambda: site.runs("sleep0-held:A"), timeout=30, what="A's job to run once A is resumed")


def test_a_job_id_with_html_in_it_is_shown_as_text(site, workdir, daemons):
    cli(workdir, daemons, "set", HOSTILE, "STOP")
    site.open("/jobs?prefix=%3Cscript")
    site.wait(site.shows(HOSTILE, "table.jobs"), "the hostile id in the list, as text")
    site.driver.find_element(By.PARTIAL_LINK_TEXT, "<script>").click()
    site.wait(site.shows(HOSTILE, "#jobid"), "the hostile id's own page")
    assert site.text("#schedule") == "STOP"
    with pytest.raises(NoAlertPresentException):
        site.driver.switch_to.alert.text  # noqa: B018 - raises when no alert() ran
    scripts = site.driver.find_elements(By.TAG_NAME, "script")
    assert [s.get_attribute("src") for s in scripts] == [site.base + "/static/ui.js"]
    assert not site.driver.find_elements(By.CSS_SELECTOR, "main img, main script")
    site.screenshot("hostile-job-id")
    # URL characters in an id: each link and button path encodes them.
    odd = "dir/sub?x=1#frag%41 b:B"
    cli(workdir, daemons, "set", odd, "STOP")
    site.open("/jobs?prefix=dir%2F")
    site.driver.find_element(By.LINK_TEXT, odd).click()
    site.wait(site.shows(odd, "#jobid"), "the page of an id with URL characters")
    site.keep_token()
    site.click("button.action", "Run now")
    wait_for(lambda: site.runs(odd), timeout=30, what="the odd id to run from its button")


def test_every_page_renders_and_is_saved(site, workdir, daemons):
    cli(workdir, daemons, "capacity", "db", "1")
    cli(workdir, daemons, "set", "block-res:A", "NOW", "--needs", "db=1")
    wait_for(lambda: site.client.hget(site.keys.leases, "block-res:A"), what="block-res:A to run")
    cli(workdir, daemons, "set", "block-res2:A", "NOW", "--needs", "db=1")  # waits for db
    wait_for(lambda: site.client.zcard(site.keys.parked), what="block-res2:A to wait for db")
    cli(workdir, daemons, "set", "sleep0-c1:B", "NOW")
    cli(workdir, daemons, "set", "fail-c2:B", "NOW")
    wait_for(lambda: site.status("fail-c2:B") == "DIE", timeout=30, what="fail-c2:B to fail")
    site.driver.get_log("browser")  # read: the log starts empty (the fixture's stylesheet visit asked for a favicon)
    for path, name, heading in [("/", "overview", "Overview"), ("/queues", "queues", "Queues"),
                                ("/jobs", "jobs", "Jobs"), ("/workers", "workers", "Workers"),
                                ("/resources", "resources", "Resources")]:
        site.open(path)
        site.wait(site.shows(heading, "h1"), f"the {name} page")
        site.screenshot(f"page-{name}")
        # Nothing refused by the Content-Security-Policy, no script error.
        assert [e["message"] for e in site.driver.get_log("browser") if e["level"] == "SEVERE"] == [], path
    held, waiting = (site.text(f"section.resource .cols > div:nth-child({n})") for n in (1, 2))
    assert "block-res:A (1)" in held and "block-res2:A (queue A)" in waiting
    assert "1 of 1 in use" in site.text("section.resource")
    for jobid in ("block-res:A", "block-res2:A"):
        site.client.rpush(f"{site.testlog}:release:{jobid}", "go")


def test_the_charts_show_the_runs_and_failures_of_the_last_minutes(site, workdir, daemons):
    for n in range(3):
        cli(workdir, daemons, "set", f"sleep0-ch{n}:B", "NOW")
    cli(workdir, daemons, "set", "fail-ch:B", "NOW")
    wait_for(lambda: site.status("fail-ch:B") == "DIE" and all(site.status(f"sleep0-ch{n}:B") == "END"
                                                                for n in range(3)), timeout=30, what="the runs")

    def counted(d: WebDriver) -> bool:
        site.open("/charts?queue=B")
        captions = [c.text for c in d.find_elements(By.CSS_SELECTOR, "figure.chart figcaption")]
        return len(captions) == 2 and "done 3," in captions[0] and "failed for good 1" in captions[1]
    site.wait(counted, "the charts to count 3 runs done and 1 failed in queue B")
    assert site.driver.find_elements(By.CSS_SELECTOR, "svg rect.done")
    assert site.driver.find_elements(By.CSS_SELECTOR, "svg rect.failed")
    site.screenshot("charts")
