"""Make a thumbnail of an image: the thumbnail executor of the work-queue
pattern (there `ffmpeg -i ${INPUT_FILE} -frames:v 100 thumb.png` on videos),
as a program redbike's Command executor runs once per job, with the standard
library only: images are PPM files (binary P6 or text P3), thumbnails
binary PPM.

    python3 examples/thumbnail.py --make-sample media/sunset.ppm
    redbike work "redbike.executors:Command('thumbs', \
        'python3 examples/thumbnail.py --size 64 --media media --out thumbs')"
    redbike set sunset.ppm:thumbs NOW        # -> thumbs/sunset.ppm.thumb.ppm

The work item (the file WORK_ITEM_FILE names) is the job id; the part
before its last ':' names the image in --media. The thumbnail (at most
--size pixels wide and high, each pixel the average of those it covers) is
written to --out, or without --out to WORK_OUTPUT_FILE, for the next step of
a Chain (see examples/publish.py). Exit codes: 0 done; 65 (the executor's
UnsetJob) when the image is gone, so its job is unset; 1 with a message on
stderr when the file is not a PPM image (the run fails; `redbike tell`
shows the message).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

UNSET = 65  # redbike.executors.UNSET_CODE: the job is unset


class NotAnImage(ValueError):
    pass


def read_ppm(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB bytes of a P6 or P3 image with 8-bit samples."""
    tokens: list[bytes] = []
    at = 0
    while len(tokens) < 4:  # magic, width, height, maxval; '#' starts a comment
        while at < len(data) and data[at:at + 1].isspace():
            at += 1
        if data[at:at + 1] == b"#":
            at = data.find(b"\n", at) + 1 or len(data)
            continue
        start = at
        while at < len(data) and not data[at:at + 1].isspace():
            at += 1
        if start == at:
            raise NotAnImage("truncated header")
        tokens.append(data[start:at])
    magic, width, height, maxval = tokens
    if magic not in (b"P6", b"P3") or not (width.isdigit() and height.isdigit() and maxval == b"255"):
        raise NotAnImage("not a PPM image with 8-bit samples (P6 or P3, maxval 255)")
    w, h = int(width), int(height)
    if magic == b"P6":
        pixels = data[at + 1:at + 1 + 3 * w * h]
    else:
        pixels = bytes(int(value) for value in data[at:].split())
    if len(pixels) != 3 * w * h or not w or not h:
        raise NotAnImage(f"{w}x{h} image with {len(pixels)} bytes of pixels")
    return w, h, pixels


def shrink(width: int, height: int, pixels: bytes, size: int) -> tuple[int, int, bytes]:
    """The image scaled down to at most ``size`` x ``size``, aspect kept:
    each pixel the average of the block of pixels it covers."""
    scale = max(width / size, height / size, 1.0)
    w, h = max(1, round(width / scale)), max(1, round(height / scale))
    out = bytearray()
    for y in range(h):
        top, bottom = y * height // h, max((y + 1) * height // h, y * height // h + 1)
        for x in range(w):
            left, right = x * width // w, max((x + 1) * width // w, x * width // w + 1)
            sums = [0, 0, 0]
            for row in range(top, bottom):
                base = 3 * (row * width)
                for column in range(left, right):
                    at = base + 3 * column
                    sums[0] += pixels[at]
                    sums[1] += pixels[at + 1]
                    sums[2] += pixels[at + 2]
            count = (bottom - top) * (right - left)
            out += bytes(round(total / count) for total in sums)
    return w, h, bytes(out)


def write_ppm(path: Path, width: int, height: int, pixels: bytes) -> None:
    """Write atomically: a reader never sees half a thumbnail."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(b"P6\n%d %d\n255\n" % (width, height) + pixels)
    os.replace(partial, path)


def make_sample(path: Path) -> None:
    """A 320x240 sunset gradient to try the example on."""
    pixels = bytearray()
    for y in range(240):
        for x in range(320):
            pixels += bytes((255 - y // 2, 64 + x // 3, 32 + y // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_ppm(path, 320, 240, bytes(pixels))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="largest width and height (default 128)")
    parser.add_argument("--media", default=".", help="the folder of the images")
    parser.add_argument("--out", help="the folder of the thumbnails (default: WORK_OUTPUT_FILE)")
    parser.add_argument("--make-sample", metavar="PATH", help="write a sample image and exit")
    args = parser.parse_args()
    if args.make_sample:
        make_sample(Path(args.make_sample))
        return 0
    jobid = Path(os.environ["WORK_ITEM_FILE"]).read_text()
    name = jobid.rsplit(":", 1)[0]
    if Path(name).is_absolute() or ".." in Path(name).parts:  # only what --media holds
        print(f"{name!r}: not an image name inside {args.media}; unsetting job {jobid}", file=sys.stderr)
        return UNSET
    source = Path(args.media) / name
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        print(f"{source}: no such image; unsetting job {jobid}", file=sys.stderr)
        return UNSET
    try:
        thumbnail = shrink(*read_ppm(data), args.size)
    except NotAnImage as exc:
        print(f"{source}: {exc}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        target = Path(args.out) / f"{Path(name).name}.thumb.ppm"
    else:
        target = Path(os.environ["WORK_OUTPUT_FILE"])
    write_ppm(target, *thumbnail)
    print(f"{source} ({len(data)} bytes) -> {target}: {thumbnail[0]}x{thumbnail[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
