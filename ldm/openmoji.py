"""`python -m ldm.openmoji --resolution 64`: build (or load from the cache) the built-in OpenMoji
dataset (ldm/data/openmoji.py) and say what it holds."""

from __future__ import annotations

import argparse
import time

from ldm.data.openmoji import load_openmoji


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (or load from cache) the built-in OpenMoji dataset.")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--cache_dir", default=None, help="default: $LDM_CACHE or ~/.cache/ldm")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    splits = load_openmoji(args.resolution, args.cache_dir)
    seconds = time.perf_counter() - start
    total = sum(len(split) for split in splits.values())
    print(f"OpenMoji {args.resolution}px: {total} images "
          f"({len(splits['train'])} train, {len(splits['validation'])} validation) in {seconds:.1f} s")
    print(splits["train"].info.description)
    print("examples:", "; ".join(splits["train"][:5]["text"]))
    print("Images: OpenMoji (https://openmoji.org), CC BY-SA 4.0.")


if __name__ == "__main__":
    main()
