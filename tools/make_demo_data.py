"""Render the demo world: scene images, ground truth (scene, reference caption, MCQs) and a URL list.

    python tools/make_demo_data.py --out demo_data --n 60 --base-url http://127.0.0.1:8765
"""

from __future__ import annotations

import argparse

from pipeline.demo import make_demo_data, write_url_list


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_data", help="output folder")
    ap.add_argument("--n", type=int, default=60, help="number of scenes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-url", default=None, help="also write urls.parquet with URLs under this base")
    args = ap.parse_args()
    out = make_demo_data(args.out, n_images=args.n, seed=args.seed)
    print(f"wrote {args.n} scenes to {out}")
    if args.base_url:
        print(f"wrote {write_url_list(out, args.base_url)}")


if __name__ == "__main__":
    main()
