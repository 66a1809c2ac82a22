"""``python -m kizuna.controlplane [--state-dir DIR] [--listen HOST:PORT]``: what ``kizuna controlplane``
runs."""

from __future__ import annotations

import argparse
import os
import sys

from kizuna.controlplane.main import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kizuna controlplane", description=__doc__)
    parser.add_argument("--state-dir", default=os.environ.get("KIZUNA_STATE_DIR", ".kizuna"),
                        help="the mesh's state dir (default: $KIZUNA_STATE_DIR or ./.kizuna)")
    parser.add_argument("--listen", default="127.0.0.1:0",
                        help="API and discovery address (default: %(default)s)")
    args = parser.parse_args(argv)
    return run(args.state_dir, args.listen)


if __name__ == "__main__":
    sys.exit(main())
