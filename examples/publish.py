"""The last step of a Chain: copy the previous step's output
(WORK_INPUT_FILE) to a folder, under the name the work item gives, as the
work-queue pattern's executor copies its result back to storage.

    redbike work "redbike.executors:Chain('thumbs', \\
        'python3 examples/thumbnail.py --size 64 --media media', \\
        'python3 examples/publish.py --suffix .thumb.ppm published')"

The work item is the job id; the part before its last ':' (its last path
part) names the copy, with --suffix added. The copy is atomic: a reader of
the folder never sees half a file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where the copy goes")
    parser.add_argument("--suffix", default="", help="added to the name")
    args = parser.parse_args()
    name = Path(Path(os.environ["WORK_ITEM_FILE"]).read_text().rsplit(":", 1)[0]).name + args.suffix
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{name}.partial"
    shutil.copyfile(os.environ["WORK_INPUT_FILE"], partial)
    os.replace(partial, folder / name)
    print(f"published {folder / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
