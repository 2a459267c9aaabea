"""The web UI over shards in a real browser (test_web_ui.py's headless
Chromium): a real `redbike serve` and `redbike dispatch` with shards = 4."""

from __future__ import annotations

import json

from conftest import wait_for
from selenium.webdriver.remote.webdriver import WebDriver
from test_processes import cli_ok
from test_shard_views import shard_keys
from test_shards import COUNT, ids_on_every_shard, sharded  # noqa: F401 - sharded: a fixture
from test_web_ui import TOKEN, Site, browser, serve  # noqa: F401 - browser: a fixture

from redbike.keys import Keys


def test_the_overview_page_shows_every_shard(browser: WebDriver, sharded, daemons, process_env,  # noqa: F811
                                             testlog) -> None:
    folder, prefix, reader = sharded
    keys = shard_keys(prefix)
    base = serve(daemons, folder, TOKEN)
    daemons.start("dispatch", cwd=folder)
    wait_for(lambda: all(reader.get(k.dispatcher) for k in keys), timeout=30, what="a leader on every shard")
    jobids = ids_on_every_shard(2)
    for jobid in jobids:
        cli_ok(folder, process_env, "set", jobid, "NOW")
    wait_for(lambda: json.loads(cli_ok(folder, process_env, "info", "--json"))["statuses"] == {"ENQ": len(jobids)},
             timeout=20, what="every job waiting")
    site = Site(browser, base, reader, Keys(prefix), testlog)
    site.open("/")
    site.wait(site.shows(f"ENQ {len(jobids)}", "#statuses"), "the jobs of every shard counted")
    assert f"{COUNT} shards" in site.text("h1")
    site.wait(site.shows(f"Dispatchers: {COUNT}"), "a dispatcher on every shard")
    table = site.text("table.dispatchers")
    assert table.count("leader") == COUNT and "No leading dispatcher" not in site.text()
    site.screenshot("shards-overview")
    site.open("/queues")
    site.wait(site.shows(str(len(jobids)), "table"), "queue A's jobs of every shard")
    site.screenshot("shards-queues")
