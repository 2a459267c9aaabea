"""The results: targets (met / missed), tables as text and Markdown, JSON, and a PNG of the scaling curves."""

from __future__ import annotations

import json
import math
from typing import Any

NA = "n/a"
ORIGINAL_BYTES_PER_JOB = 225  # the original redbike: a queued job id with its status and schedule


def _f(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NA
    if isinstance(value, str):
        return value
    if digits == 0:
        text = f"{value:,.0f}"
    else:
        text = f"{value:,.{digits}f}"
    return text + unit


def _mb(value: Any) -> str:
    return NA if not value else f"{value / 2**20:.1f} MiB"


def _pct(part: Any, whole: Any) -> str:
    if not part or not whole:
        return NA
    return f"{100 * part / whole:.0f}%"


def _status(ok: bool | None, note: str = "") -> str:
    if ok is None:
        return "not measured" + (f" ({note})" if note else "")
    return ("met" if ok else "MISSED") + (f" ({note})" if note else "")


def targets(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, met/missed) rows."""
    rows = []
    c1 = r.get("drain", {}).get("c1", {})
    rate = c1.get("jobs_per_s")
    if rate and c1.get("ping_per_s"):
        ping = c1["ping_per_s"]
        rows.append(("one worker drains no-op jobs at >= 50% of the same-run PING rate",
                     f"{_f(rate)}/s = {_pct(rate, ping)} of {_f(ping)} PING/s measured around it",
                     _status(rate >= 0.5 * ping)))
    peers = {name: p for name, p in r.get("peers", {}).items() if p.get("jobs_per_s")}
    if rate and peers:
        best_name, best = max(peers.items(), key=lambda kv: kv[1]["jobs_per_s"])
        ratio = rate / best["jobs_per_s"]
        rows.append(("... and >= 2x the fastest peer", f"{ratio:.2f}x {best_name} ({_f(best['jobs_per_s'])}/s)",
                     _status(ratio >= 2)))
    else:
        rows.append(("... and >= 2x the fastest peer", "no peer ran", _status(None)))
    if c1.get("round_trips_per_job") is not None:
        trips = c1["round_trips_per_job"]
        rows.append(("<= 1 round trip per job on the worker's hot path", f"{trips:.3f}", _status(trips <= 1.01)))
    beats = r.get("heartbeats")
    if beats:
        note = f"{beats['renew_calls_short']} renew calls for {beats['short_jobs']} jobs of {beats['short_seconds']:g} s"
        ok = beats["renew_calls_short"] == 0
        if beats.get("long_job_seconds"):
            note += f"; {beats['renew_calls']} for one {beats['long_job_seconds']:g} s job (lease: 12 s)"
            ok = ok and beats["renew_calls"] == 0
        rows.append(("no heartbeat traffic for jobs shorter than their lease", note, _status(ok)))
    idle = r.get("idle", {})
    if idle.get("worker"):
        value = idle["worker"]["commands_per_s"]
        rows.append(("idle worker <= 1 Redis command/s", f"{value:.2f}/s", _status(value <= 1)))
    if idle.get("dispatcher"):
        d = idle["dispatcher"]
        other = max(d["round_trips_per_s"] - d["script_calls_per_s"], 0.0)
        rows.append(("idle dispatcher <= 1/s plus lease renewals",
                     (f"{other:.2f} round trips/s besides {d['script_calls_per_s']:.2f} renewals/s "
                     f"({d['commands_per_s']:.1f} commands/s in all)"), _status(other <= 1)))
    pick = r.get("pickup")
    if pick:
        rows.append(("a NOW job set while workers idle starts within 10 ms (p50)", f"p50 {pick['p50_ms']:.1f} ms",
                     _status(pick["p50_ms"] <= 10)))
    scale = r.get("scale", [])
    if scale:
        top = max(scale, key=lambda s: s["jobs"])
        if top["jobs"] >= 1_000_000:
            rows.append(("1,000,000 jobs due at once reach their queues in < 10 s",
                         f"{top['dispatch_seconds']:.1f} s ({_f(top['dispatch_jobs_per_s'])}/s)",
                         _status(top["dispatch_seconds"] < 10)))
        else:
            guess = 1_000_000 / top["dispatch_jobs_per_s"]
            rows.append(("1,000,000 jobs due at once reach their queues in < 10 s",
                         (f"not run (--million); {_f(top['jobs'])} at {_f(top['dispatch_jobs_per_s'])}/s "
                         f"extrapolates to {guess:.1f} s"), _status(None, "extrapolated " + ("met" if guess < 10 else "missed"))))
    lat = r.get("latency")
    if lat:
        rows.append(("due-to-start p99 < 50 ms at 500 jobs/s",
                     f"p99 {lat['p99_ms']:.1f} ms, p50 {lat['p50_ms']:.1f} ms at {lat['rate']:g}/s",
                     _status(lat["p99_ms"] < 50, "" if lat["rate"] >= 500 else f"only {lat['rate']:g}/s")))
    if len(scale) >= 2:
        small, big = scale[0], scale[-1]
        for role, key in (("worker", "rss_supervisor"), ("worker child", "rss_child"), ("dispatcher", "rss_dispatcher")):
            if small.get(key) and big.get(key):
                growth = big[key] / small[key] - 1
                rows.append((f"{role} RSS within +10% from 10k to 1M jobs",
                             (f"{_mb(small[key])} at {_f(small['jobs'])}, {_mb(big[key])} at {_f(big['jobs'])} "
                             f"({growth:+.1%})"), _status(growth <= 0.10, "" if big["jobs"] >= 1_000_000 else
                                                          f"largest size run: {_f(big['jobs'])}")))
    if scale:
        per = scale[-1]["bytes_per_scheduled_job"]
        rows.append((f"Redis bytes per scheduled job <= the original's (~{ORIGINAL_BYTES_PER_JOB})",
                     f"{per:.0f} B scheduled, {scale[-1]['bytes_per_queued_job']:.0f} B queued",
                     _status(per <= ORIGINAL_BYTES_PER_JOB)))
    gating = r.get("gating")
    if gating:
        low, high = gating[0], gating[-1]
        growth = high["server_usec"] / low["server_usec"] - 1
        rows.append((f"claim cost flat from {_f(low['parked'])} to {_f(high['parked'])} parked jobs",
                     (f"{low['server_usec']:.1f} -> {high['server_usec']:.1f} us of Redis time per claim "
                      f"({growth:+.0%}), {high['commands_per_claim']:.0f} commands, "
                      f"{high['evalsha_per_claim']:.2f} round trips"), _status(growth <= 0.25)))
    return rows


def sections(r: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for each table."""
    out = []
    if r.get("limit"):
        lim = r["limit"]
        out.append(("1. The limit: one unpipelined client, round trips per second", ["client", "per second", "us each"], [
            ["redis-py PING, 2 s at the start", _f(lim["ping_per_s"]), _f(1e6 / lim["ping_per_s"], 1)],
            ["redis-py EVALSHA 'return 1'", _f(lim["evalsha_per_s"]), _f(1e6 / lim["evalsha_per_s"], 1)],
            ["raw socket PING (no client library)", _f(lim["raw_ping_per_s"]), _f(1e6 / lim["raw_ping_per_s"], 1)],
        ] + _probe_rows(r)))
    drain = r.get("drain", {})
    if drain:
        rows = []
        for d in drain.values():
            us = d["us_per_job"]
            rows.append([f"redbike work --concurrency {d['concurrency']}", _f(d["jobs"]), _f(d["jobs_per_s"]),
                         _pct(d["jobs_per_s"], d.get("ping_per_s")), f"{d['round_trips_per_job']:.3f}", f"{d['commands_per_job']:.2f}",
                         f"{us['wall']:.0f} / {us['redis_cpu']:.0f} / {us['supervisor_cpu']:.0f} / {us['children_cpu']:.0f}",
                         f"{d['bytes_per_queued_job']:.0f}"])
        out.append(("2. Worker drain (no-op jobs, queue filled by Redbike.set NOW)",
                    ["worker", "jobs", "jobs/s", "of PING (measured around it)", "round trips/job", "commands/job",
                     "us/job: wall / Redis CPU / supervisor CPU / child CPU", "Redis B/queued job"], rows))
        c1 = drain.get("c1")
        if c1:
            out.append(("2b. Redis commands per job, concurrency 1 (INFO commandstats)", ["command", "per job"],
                        [[name, f"{calls:.3f}"] for name, calls in c1["by_command"].items()]))
    scale = r.get("scale", [])
    if scale:
        out.append(("3/6. Dispatch and memory at scale (all jobs due at once)",
                    ["jobs", "dispatch jobs/s", "dispatch time", "commands/job", "round trips/1000 jobs",
                     "dispatcher RSS", "worker RSS (supervisor / child)", "worker jobs/s at this depth",
                     "Redis B/scheduled job", "Redis B/queued job"],
                    [[_f(s["jobs"]), _f(s["dispatch_jobs_per_s"]), f"{s['dispatch_seconds']:.2f} s",
                      f"{s['dispatch_commands_per_job']:.2f}", f"{s['dispatch_round_trips_per_1000']:.1f}",
                      _mb(s["rss_dispatcher"]), f"{_mb(s['rss_supervisor'])} / {_mb(s['rss_child'])}",
                      _f(s["worker_jobs_per_s"]), f"{s['bytes_per_scheduled_job']:.0f}",
                      f"{s['bytes_per_queued_job']:.0f}"] for s in scale]))
        top = scale[-1]
        rows = [[f"scheduled: {name}", f"{b:.0f}"] for name, b in top.get("key_bytes_per_scheduled_job", {}).items()]
        rows += [[f"queued: {name}", f"{b:.0f}"] for name, b in top.get("key_bytes_per_queued_job", {}).items()]
        if rows:
            out.append((f"6b. Redis bytes per job by key at {top['jobs']:,} jobs (MEMORY USAGE, all elements)",
                        ["key", "bytes/job"], rows))
    rows = []
    lat = r.get("latency")
    if lat:
        rows.append([f"due-to-start, {lat['rate']:g} jobs/s for {lat['seconds']:g} s, {lat['workers']} idle workers",
                     _f(lat["jobs"]), f"{lat['p50_ms']:.1f}", f"{lat['p99_ms']:.1f}", f"{lat['max_ms']:.1f}"])
    pick = r.get("pickup")
    if pick:
        rows.append(["pick-up: NOW job set, one idle worker", _f(pick["jobs"]), f"{pick['p50_ms']:.1f}",
                     f"{pick['p99_ms']:.1f}", f"{pick['max_ms']:.1f}"])
    if rows:
        out.append(("4. Latency (ms)", ["what", "jobs", "p50", "p99", "max"], rows))
    idle = r.get("idle", {})
    if idle.get("worker"):
        rows = [[role, f"{v['commands_per_s']:.2f}", f"{v['round_trips_per_s']:.2f}",
                 ", ".join(f"{k} {c:.2f}" for k, c in v["by_command_per_s"].items()) or "-"]
                for role, v in idle.items() if isinstance(v, dict)]
        out.append((f"5. Idle cost over {idle['seconds']:g} s", ["process", "commands/s", "round trips/s", "by command (/s)"],
                    rows))
    beats = r.get("heartbeats")
    if beats:
        out.append(("Heartbeats (script calls seen by MONITOR)", ["jobs", "script calls"], [
            [f"{beats['short_jobs']} x {beats['short_seconds']:g} s", ", ".join(f"{k} {v}" for k, v in beats["script_calls_while_short"].items())],
            *([[f"... then 1 x {beats['long_job_seconds']:g} s", ", ".join(f"{k} {v}" for k, v in beats["script_calls"].items())]]
              if beats.get("long_job_seconds") else []),
        ]))
    gating = r.get("gating", [])
    if gating:
        out.append(("7. Resource gating: claiming a free job while N jobs wait on a saturated resource",
                     ["parked jobs", "round trips/claim", "commands/claim", "Redis us/claim", "wall us/claim"],
                     [[_f(g["parked"]), f"{g['evalsha_per_claim']:.2f}", f"{g['commands_per_claim']:.1f}",
                       f"{g['server_usec']:.1f}", f"{g['wall_usec']:.0f}"] for g in gating]))
    peers = r.get("peers", {})
    if peers:
        c1 = drain.get("c1", {})
        idle_w = idle.get("worker", {})
        rows = [["redbike (work --concurrency 1)", "", _f(c1.get("jobs")), _f(c1.get("jobs_per_s")),
                 _pct(c1.get("jobs_per_s"), c1.get("ping_per_s")), _f(c1.get("round_trips_per_job"), 2), _f(c1.get("commands_per_job"), 2),
                 _f(idle_w.get("commands_per_s"), 2), _f(c1.get("bytes_per_queued_job")), "1.00 / 1.00 / 1.00 / 1.00"]]
        for name, p in peers.items():
            if "error" in p:
                rows.append([name, p.get("version", ""), "failed: " + p["error"].splitlines()[0][:120],
                             "", "", "", "", "", "", ""])
                continue
            jobs = _f(p["measured_jobs"]) + (" (partial)" if p.get("partial") else "")
            ratios = " / ".join([
                _ratio(c1.get("jobs_per_s"), p.get("jobs_per_s")),
                _ratio(c1.get("commands_per_job"), p.get("commands_per_job")),
                _ratio(idle_w.get("commands_per_s"), p.get("idle_commands_per_s")),
                _ratio(c1.get("bytes_per_queued_job"), p.get("bytes_per_queued_job")),
            ])
            rows.append([name, p.get("version", ""), jobs, _f(p["jobs_per_s"]), _pct(p["jobs_per_s"], p.get("ping_per_s")),
                         _f(p["round_trips_per_job"], 2), _f(p["commands_per_job"], 2),
                         _f(p.get("idle_commands_per_s"), 2), _f(p["bytes_per_queued_job"]), ratios])
        out.append(("8. Peers: one worker process each, same no-op jobs, same Redis",
                    ["system", "version", "jobs timed", "jobs/s", "of PING (around it)", "round trips/job", "commands/job",
                     "idle commands/s", "Redis B/queued job",
                     "redbike/peer: jobs/s / commands/job / idle cmds/s / B/job"], rows))
    return out


def _probe_rows(r: dict[str, Any]) -> list[list[str]]:
    """The PING rates measured around each throughput figure: how much the machine drifted."""
    probes = [d["ping_per_s"] for d in r.get("drain", {}).values() if d.get("ping_per_s")]
    probes += [p["ping_per_s"] for p in r.get("peers", {}).values() if p.get("ping_per_s")]
    if not probes:
        return []
    probes.sort()
    median = probes[len(probes) // 2]
    return [[f"redis-py PING around the {len(probes)} drains: median (min-max)",
             f"{_f(median)} ({_f(probes[0])}-{_f(probes[-1])})", _f(1e6 / median, 1)]]


def _ratio(a: Any, b: Any) -> str:
    if a is None or b is None:
        return NA
    if b == 0:
        return "inf" if a else "1.00"
    return f"{a / b:.2f}"


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|")
    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def machine_lines(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    return [(f"{m['date']}; {m['nproc']} x {m['cpu']}; Python {m['python']}; redis-py {m['redis_py']}"
            f" ({'hiredis' if m['hiredis'] else 'no hiredis'}); Redis {m['redis']} ({m['redis_malloc']});"
            f" redbike {m['redbike']}; options: {m['options']}"
            + "".join(f"; {name} {v}" for name, v in m.get("packages", {}).items()))]


def load_lines(r: dict[str, Any]) -> list[str]:
    noisy = {name: v for name, v in r.get("other_load", {}).items() if v["cores"] >= 0.1 or v.get("steal", 0) >= 0.1}
    if not noisy:
        return ["Other processes on the machine (and the hypervisor's steal) used < 0.1 core during every section."]
    return ["WARNING: other processes took CPU during some sections; their figures are low: "
            + "; ".join(f"{name}: {v['cores']:.2f} cores, steal {v.get('steal', 0):.2f} ({', '.join(v['top']) or 'short-lived processes'})"
                        for name, v in noisy.items())]


def as_text(r: dict[str, Any]) -> str:
    parts = machine_lines(r) + load_lines(r) + [""]
    parts += ["Targets", _text_table(["target", "measured", "met?"], [list(t) for t in targets(r)]), ""]
    for title, header, rows in sections(r):
        parts += [title, _text_table(header, rows), ""]
    return "\n".join(parts)


def as_markdown(r: dict[str, Any]) -> str:
    parts = ["Machine: " + machine_lines(r)[0], "", load_lines(r)[0], "", "### Targets", "",
             _md_table(["target", "measured", "met?"], [list(t) for t in targets(r)]), ""]
    for title, header, rows in sections(r):
        parts += [f"### {title}", "", _md_table(header, rows), ""]
    return "\n".join(parts)


def write_json(r: dict[str, Any], path: str) -> None:
    with open(path, "w") as handle:
        json.dump(r, handle, indent=1, default=str)


def plot(r: dict[str, Any], path: str) -> str | None:
    """The scaling curves (and the peers' drain rates) as a PNG; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scale = r.get("scale", [])
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    fig.suptitle("redbike benchmark — " + r["machine"]["date"], fontsize=11)
    ax = axes[0][0]
    if scale:
        n = [s["jobs"] for s in scale]
        ax.plot(n, [s["dispatch_jobs_per_s"] for s in scale], "o-", label="dispatch: due jobs moved/s")
        ax.plot(n, [s["worker_jobs_per_s"] for s in scale], "s-", label="one worker: jobs/s at this queue depth")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("jobs in Redis")
        ax.set_ylabel("jobs per second")
        limit = r.get("drain", {}).get("c1", {}).get("ping_per_s") or r.get("limit", {}).get("ping_per_s")
        if limit:
            ax.axhline(limit, color="grey", linestyle="--", label="PING limit (one client)")
        ax.legend(fontsize=8)
        ax.set_title("throughput vs jobs in Redis", fontsize=10)
    ax = axes[0][1]
    if scale:
        for key, label in (("rss_dispatcher", "dispatcher"), ("rss_supervisor", "worker supervisor"),
                           ("rss_child", "worker child")):
            ax.plot(n, [s[key] / 2**20 for s in scale], "o-", label=label)
        ax.set_xscale("log")
        ax.set_ylim(0, max(max(s[k] for s in scale) for k in ("rss_dispatcher", "rss_supervisor", "rss_child")) / 2**20 * 1.4)
        ax.set_xlabel("jobs in Redis")
        ax.set_ylabel("peak RSS (MiB)")
        ax.legend(fontsize=8)
        ax.set_title("process memory vs jobs (should stay flat)", fontsize=10)
    ax = axes[1][0]
    if scale:
        ax.plot(n, [s["bytes_per_scheduled_job"] for s in scale], "o-", label="scheduled (timeline)")
        ax.plot(n, [s["bytes_per_queued_job"] for s in scale], "s-", label="queued")
        ax.axhline(ORIGINAL_BYTES_PER_JOB, color="grey", linestyle="--", label="original redbike (~225)")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("jobs in Redis")
        ax.set_ylabel("Redis used_memory bytes per job")
        ax.legend(fontsize=8)
        ax.set_title("Redis memory per job", fontsize=10)
    ax = axes[1][1]
    names, rates = [], []
    for key, d in r.get("drain", {}).items():
        names.append(f"redbike c{d['concurrency']}")
        rates.append(d["jobs_per_s"])
    for name, p in r.get("peers", {}).items():
        if p.get("jobs_per_s"):
            names.append(name)
            rates.append(p["jobs_per_s"])
    if names:
        ax.barh(names, rates, color=["tab:red" if n.startswith("redbike") else "tab:blue" for n in names])
        limit = r.get("drain", {}).get("c1", {}).get("ping_per_s") or r.get("limit", {}).get("ping_per_s")
        if limit:
            ax.axvline(limit, color="grey", linestyle="--", label="PING limit")
            ax.axvline(limit / 2, color="grey", linestyle=":", label="50% of PING")
            ax.legend(fontsize=8)
        ax.set_xlabel("no-op jobs per second, one worker process")
        ax.set_title("drain rate: redbike and peers", fontsize=10)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
