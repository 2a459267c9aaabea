"""A program the executor tests run (redbike.executors), standing for any
binary: ``execprog.py ACTION [ARG]``.

item           takes ACTION and ARG from the work item ("exit3-job:Q": exit 3)
copy DIR       copies WORK_ITEM_FILE to DIR/<token>.item and writes its
               environment and the item file's mode to DIR/<token>.json
exit N         writes 300 lines to stderr (the last "last words of <item>") and exits N
flood N        writes 300 KiB to stdout and to stderr, turn about, then
               "last words of <item>" to stderr, and exits N
selfkill       kills itself with SIGKILL
spawn          starts `sleep 1000`, then sleeps an hour
stubborn       ignores SIGTERM (so does the `sleep 1000` it starts), sleeps an hour
append TAG     writes WORK_INPUT_FILE's content, then TAG, to WORK_OUTPUT_FILE
publish DIR    copies WORK_INPUT_FILE to DIR/<token>.out

Every process it starts has the run's REDBIKE_JOBID in its environment:
the tests find them by it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path


def main(action: str, arg: str = "") -> int:
    item = Path(os.environ["WORK_ITEM_FILE"])
    token = os.environ.get("REDBIKE_TOKEN", "none")
    if action == "item":
        word = item.read_text().split("-", 1)[0]
        action, arg = word.rstrip("0123456789"), word.lstrip("abcdefghijklmnopqrstuvwxyz")
    if action == "copy":
        shutil.copy(item, Path(arg) / f"{token}.item")
        seen = {name: value for name, value in os.environ.items() if name.startswith(("WORK_", "REDBIKE_"))}
        seen["mode"] = oct(stat.S_IMODE(item.stat().st_mode))
        (Path(arg) / f"{token}.json").write_text(json.dumps(seen))
        print(f"copied {item.read_text()}")
        return 0
    if action == "exit":
        for number in range(300):
            print(f"stderr line {number} of a program about to fail", file=sys.stderr)
        print(f"last words of {item.read_text()}", file=sys.stderr)
        return int(arg)
    if action == "flood":
        for number in range(300):  # far more than a pipe holds: the reader must take both as they come
            sys.stdout.write(f"{number:04d} {'o' * 1018}\n")
            sys.stdout.flush()
            sys.stderr.write(f"{number:04d} {'e' * 1018}\n")
            sys.stderr.flush()
        print(f"last words of {item.read_text()}", file=sys.stderr)
        return int(arg)
    if action == "selfkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action in ("spawn", "stubborn"):
        if action == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the sleep
        subprocess.Popen(["sleep", "1000"])
        print("spawned", flush=True)
        time.sleep(3600)
    if action == "append":
        data = Path(os.environ["WORK_INPUT_FILE"]).read_text() + arg
        Path(os.environ["WORK_OUTPUT_FILE"]).write_text(data)
        return 0
    if action == "publish":
        shutil.copy(os.environ["WORK_INPUT_FILE"], Path(arg) / f"{token}.out")
        return 0
    print(f"unknown action {action!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
