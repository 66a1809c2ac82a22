"""``kizuna``: the command line. Parses arguments and maps errors to exit codes; commands live elsewhere.

Exit codes: 0 success; 1 a problem the user can fix, reported on stderr as ``kizuna: <message>`` (one line per
problem, e.g. one per validation error); 2 a usage error (argparse's message); 130 interrupted.

Imports are deferred to the command that needs them: ``kizuna proxy`` (one per sidecar) must not load the
control plane, pydantic or YAML, and every command should start fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kizuna import __version__
from kizuna.cli.options import add_settings
from kizuna.runtime.errors import UserError
from kizuna.runtime.settings import (
    ControlPlaneSettings,
    DownSettings,
    ProxySettings,
    ScaleSettings,
    StateSettings,
    UpSettings,
)

Command = Callable[[argparse.Namespace], int]


def _files_options(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("-f", "--filename", action="append", required=True, metavar="PATH",
                        help=f"file or directory of manifests to {verb} (repeatable)")
    parser.add_argument("-R", "--recursive", action="store_true",
                        help="also read the directories' subdirectories")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subcommand per verb, each with ``--help``."""
    parser = argparse.ArgumentParser(
        prog="kizuna", description="A service mesh in Python: run, route and observe services locally.")
    parser.add_argument("--version", action="version", version=f"kizuna {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, state: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if state:
            add_settings(p, StateSettings)
        return p

    p = command("up", "start a mesh: control plane, then every Deployment's instances, each with a sidecar")
    add_settings(p, UpSettings)
    p = command("down", "stop every process of the mesh in the state directory (exit 0 also when none runs)")
    add_settings(p, DownSettings)

    p = command("scale", "run more or fewer instances of a Deployment in the running mesh (removed ones drain)")
    add_settings(p, ScaleSettings)

    p = command("apply", "create or update resources in the running mesh (all or nothing)")
    _files_options(p, "apply")
    p.add_argument("-n", "--namespace", metavar="NS",
                   help="namespace for documents that name none (a document naming another is an error)")
    p.add_argument("--dry-run", action="store_true", help="validate on the control plane, change nothing")
    p = command("delete", "delete resources from the running mesh")
    _files_options(p, "delete")
    p.add_argument("-n", "--namespace", metavar="NS",
                   help="namespace for documents that name none (a document naming another is an error)")
    p = command("get", "show resources stored in the running mesh")
    p.add_argument("kind", metavar="KIND", help="resource kind, e.g. vs, dr, svc, deployments")
    p.add_argument("name", metavar="NAME", nargs="?", help="only this resource")
    p.add_argument("-n", "--namespace", metavar="NS", help="only this namespace (default: all)")
    p.add_argument("-o", "--output", choices=("yaml", "json"), help="print whole resources in this format")
    p = command("validate", "check manifests offline (no mesh needed); prints every problem with its field",
                state=False)
    _files_options(p, "validate")
    command("status", "show the control plane and every sidecar: connected, ready, config version")
    command("dashboard", "print the URL of the mesh's dashboard: service graph, golden signals, config")
    p = command("exec", "run a command with a workload instance's environment (its sidecar as HTTP proxy)")
    p.add_argument("-n", "--namespace", metavar="NS", help="namespace of the workload (default: any)")
    p.add_argument("workload", metavar="WORKLOAD", help="a Deployment (its first instance) or an instance")
    p.add_argument("argv", metavar="-- CMD", nargs=argparse.REMAINDER, help="the command and its arguments")

    p = command("logs", "print a workload's app log, its sidecar's log (--proxy) or access log (--access)")
    from kizuna.cli.logs import add_arguments as logs_arguments

    logs_arguments(p)

    p = command("explain", "show how a workload's sidecar routes a request, and why (from the config it runs)")
    p.add_argument("--from", dest="source", required=True, metavar="WORKLOAD",
                   help="the client: a Deployment (its first instance), an instance, or istio-ingressgateway")
    p.add_argument("url", metavar="URL", help="the request, e.g. http://httpbin:8000/status/200")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="a request header (repeatable)")
    p.add_argument("-X", "--request", default="GET", metavar="METHOD", help="the request method (GET)")
    p.add_argument("-n", "--namespace", metavar="NS", help="namespace of the workload (default: any)")
    p.add_argument("-o", "--output", choices=("json",), help="print the explanation as JSON")

    p = command("traces", "list recent traces, or show one trace's spans as a waterfall")
    p.add_argument("trace_id", metavar="TRACE_ID", nargs="?", help="the trace to show")
    p.add_argument("-o", "--output", choices=("json",), help="print JSON")
    p = command("rotate-root", "replace the mesh CA's root without failing a connection: the new root is "
                               "trusted at once and signs once every workload has renewed")
    p.add_argument("--grace", type=float, metavar="SECONDS",
                   help="when the new root starts signing (default: the workload certificate lifetime)")
    p = command("controlplane", "run the control plane process (kizuna up starts it; run it to restart one)")
    add_settings(p, ControlPlaneSettings)
    p = command("proxy", "run one sidecar process (kizuna up starts these)", state=False)
    add_settings(p, ProxySettings)
    return parser


def _handlers() -> dict[str, Command]:
    from kizuna.cli import commands

    return {"up": commands.up, "down": commands.down, "apply": commands.apply, "delete": commands.delete,
            "get": commands.get, "validate": commands.validate, "status": commands.status,
            "exec": commands.exec_, "explain": commands.explain, "controlplane": commands.controlplane,
            "dashboard": commands.dashboard, "rotate-root": commands.rotate_root,
            "traces": commands.traces, "scale": commands.scale,
            "proxy": commands.proxy, "logs": _logs}


def _logs(args: argparse.Namespace) -> int:
    from kizuna.cli.commands import _state
    from kizuna.cli.logs import run

    return run(_state(args), args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kizuna`` command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "exec":
        args.argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not args.argv:
            sys.stderr.write("usage: kizuna exec [-n NS] WORKLOAD -- CMD...\n"
                             "kizuna exec: error: the command to run is missing\n")
            return 2
    try:
        return _handlers()[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        lines = user_error_lines(exc)
        if lines is None:
            raise
        for line in lines:
            sys.stderr.write(f"kizuna: {line}\n")
        return 1


def user_error_lines(exc: BaseException) -> list[str] | None:
    """The lines to show for an error the user can fix, or None for a bug (which keeps its traceback).

    The api and client modules are consulted only if already loaded, so a sidecar never imports them.
    """
    if isinstance(exc, UserError):
        return list(exc.lines) or [str(exc)]
    api_errors = sys.modules.get("kizuna.api.errors")
    if api_errors is not None and isinstance(exc, api_errors.ValidationError):
        return list(exc.errors)
    client = sys.modules.get("kizuna.controlplane.client")
    if client is not None and isinstance(exc, client.NoMeshError):
        return [str(exc)]
    if client is not None and isinstance(exc, client.ApiError):
        return str(exc).splitlines() or [type(exc).__name__]
    return None


if __name__ == "__main__":
    sys.exit(main())
