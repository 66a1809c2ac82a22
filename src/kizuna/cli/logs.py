"""``kizuna logs WORKLOAD [--proxy | --access] [-f]``: a workload instance's app log (default), its sidecar's
log, or its sidecar's JSON access log, from the state directory; ``-f`` keeps printing what is appended (and
follows the file across rotation)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import BinaryIO

from kizuna.runtime.errors import UserError
from kizuna.runtime.state import StateDir

POLL = 0.2


def log_path(state: StateDir, instance_id: str, kind: str) -> Path:
    """Where ``kind`` (``app``, ``proxy`` or ``access``) of an instance is written."""
    if kind == "proxy":
        return state.log(f"{instance_id}.proxy")
    if kind == "access":
        return state.logs / f"{instance_id}.access.log"
    return state.log(instance_id)


def resolve(state: StateDir, workload: str, namespace: str | None) -> str:
    """The instance id ``workload`` names (as ``kizuna exec`` resolves it); when no mesh runs, a log file
    left behind under that instance id or a ``<workload>-...`` instance name."""
    from kizuna.runtime.exec import find_instance

    try:
        return find_instance(state, workload, namespace).id
    except UserError:
        left = sorted(p.name[:-len(".proxy.log")] for p in state.logs.glob(f"{workload}*.proxy.log"))
        if left:
            return left[0]
        raise


def run(state: StateDir, args: argparse.Namespace, out: BinaryIO | None = None) -> int:
    """Print the chosen log; with ``args.follow`` keep going until interrupted."""
    kind = "access" if args.access else "proxy" if args.proxy else "app"
    path = log_path(state, resolve(state, args.workload, args.namespace), kind)
    sink = out or sys.stdout.buffer
    if not path.exists() and not args.follow:
        raise UserError(f"no {kind} log yet at {path}")
    offset, inode = 0, None
    while True:
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None
        if stat is not None:
            if inode is not None and (stat.st_ino != inode or stat.st_size < offset):
                offset = 0  # rotated or truncated: the new file from its start
            inode = stat.st_ino
            if stat.st_size > offset:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                offset += len(data)
                sink.write(data)
                sink.flush()
        if not args.follow:
            return 0
        time.sleep(POLL)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workload", metavar="WORKLOAD", help="a Deployment (its first instance) or an instance")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--proxy", action="store_true", help="the sidecar's log instead of the app's")
    which.add_argument("--access", action="store_true", help="the sidecar's access log (JSON lines)")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    parser.add_argument("-n", "--namespace", metavar="NS", help="namespace of the workload (default: any)")

