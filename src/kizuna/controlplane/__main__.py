"""``python -m kizuna.controlplane [--state-dir DIR] [--listen HOST:PORT] [--service-cidr CIDR]``: what
``kizuna controlplane`` runs."""

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
    parser.add_argument("--service-cidr", default=None,
                        help="allocate Service clusterIPs (VIPs) from this IPv4 range (transparent mode)")
    args = parser.parse_args(argv)
    return run(args.state_dir, args.listen, service_cidr=args.service_cidr)


if __name__ == "__main__":
    sys.exit(main())
