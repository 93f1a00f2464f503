"""`python -m ldm.watermark detect FILE...`: whether each image carries the invisible watermark
(ldm/pipelines/watermark.py)."""

from __future__ import annotations

import argparse
import sys

from ldm.pipelines.watermark import MATCH_THRESHOLD, MESSAGE, detect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.watermark",
                                     description="Read the invisible watermark of generated images.")
    commands = parser.add_subparsers(dest="command", required=True)
    detect_command = commands.add_parser(
        "detect", help=f"say for each image file whether it carries the watermark (at least {MATCH_THRESHOLD} "
                       f"of {len(MESSAGE)} bits match)")
    detect_command.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            print(detect(path))
        except OSError as error:
            print(f"{parser.prog}: error: cannot read {path}: {error.strerror or error}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
