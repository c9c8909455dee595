"""Cut the benchmark folders from ../shared/data/cifar10/train.zip (never into the repository).

    python benchmarks/cut_cifar10.py ../shared/data/cifar10/train.zip /work/runs/cifar

writes three disjoint ImageFolder folders, per class, drawn by a fixed seed (0):
`train40k` (4,000 a class), `val5k` (500 a class: every decision) and `test5k` (500 a class:
reported only). The JPEG bytes are copied as they are (no re-encoding). An existing cut with
the same counts is kept.
"""
from __future__ import annotations

import argparse
import random
import sys
import zipfile
from pathlib import Path

ROLES = (("train40k", 4000), ("val5k", 500), ("test5k", 500))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zip", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with zipfile.ZipFile(args.zip) as zf:
        by_class: dict[str, list[str]] = {}
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) == 3 and parts[2].lower().endswith((".jpg", ".jpeg", ".png")):
                by_class.setdefault(parts[1], []).append(name)
        need = sum(n for _, n in ROLES)
        for cls, names in sorted(by_class.items()):
            if len(names) < need:
                sys.exit(f"class {cls} has {len(names)} images, the cut needs {need}")
            random.Random(f"{args.seed}:{cls}").shuffle(names)
            start = 0
            for role, n in ROLES:
                folder = args.out / role / cls
                if folder.is_dir() and len(list(folder.iterdir())) == n:
                    start += n
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                for name in names[start:start + n]:
                    (folder / Path(name).name).write_bytes(zf.read(name))
                start += n
    for role, n in ROLES:
        print(f"{args.out / role}: {n * len(by_class)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
