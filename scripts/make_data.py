"""Regenerate the project's own fictitious name-description set in `data/`.

    python scripts/make_data.py                    # data/ with seed 0 (the committed set)
    python scripts/make_data.py --out_dir /tmp/d --seed 1

The set is deterministic: the same seed writes byte-identical files. See data/README.md.
"""

import argparse
from pathlib import Path

from bico.data import DEFAULT_DATA_DIR
from bico.synthetic import write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_DATA_DIR, help="output directory (default: data/)")
    parser.add_argument("--seed", type=int, default=0, help="picks names, descriptions and groups (default: 0)")
    args = parser.parse_args()
    for path in write_dataset(args.out_dir, seed=args.seed):
        rows = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{path}  {rows} rows")


if __name__ == "__main__":
    main()
