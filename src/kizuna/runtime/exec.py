"""``kizuna exec WORKLOAD -- CMD``: run a command as if inside a workload instance.

The command gets the instance's environment (its container ``env``, Downward API values, and the proxy-mode
settings that send HTTP through the instance's sidecar), on top of the caller's environment, with the
runtime's ``bin`` first on ``PATH``. It runs in the caller's working directory, not the container's
``workingDir``: what the user types should see the user's files. The kizuna process is replaced by the command
(exec), so its exit status and signals are the command's own.
"""

from __future__ import annotations

import os
import sys

from kizuna.runtime.down import running_processes
from kizuna.runtime.errors import UserError
from kizuna.runtime.state import StateDir
from kizuna.runtime.workloads import Instance, process_env


def find_instance(state: StateDir, workload: str, namespace: str | None = None) -> Instance:
    """The instance ``workload`` names: a Deployment (its first instance), an instance name, a node id, or,
    as Istio's docs name workloads (``productpage`` for Deployment ``productpage-v1``), an ``app`` label."""
    record = state.read_runtime()
    if record is None or not running_processes(state):
        raise UserError(f"no mesh is running in {state.root} (start one with kizuna up)")
    instances = [Instance.from_json(i) for i in record.get("instances", [])]
    if namespace is not None:
        instances = [i for i in instances if i.namespace == namespace]
    for matches in ([i for i in instances if i.deployment == workload],
                    [i for i in instances if workload in (i.name, i.id)],
                    sorted((i for i in instances if dict(i.labels).get("app") == workload), key=lambda i: i.id)):
        if matches:
            return matches[0]
    known = ", ".join(sorted({i.deployment for i in instances})) or "none"
    where = f" in namespace {namespace}" if namespace else ""
    raise UserError(f"no workload {workload!r}{where} in the mesh in {state.root} (workloads: {known})")


def exec_in(state: StateDir, workload: str, argv: list[str], namespace: str | None = None) -> int:
    """Replace this process with ``argv`` run in ``workload``'s environment; returns only on failure."""
    instance = find_instance(state, workload, namespace)
    env = process_env(instance)
    from kizuna.runtime.transparent import app_argv, namespace_of

    ns = namespace_of(state, instance)
    if ns is not None:
        # Transparent mode: inside the instance's network namespace, where its capture rules apply.
        argv = app_argv(ns, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        raise UserError(f"{argv[0]}: command not found") from None
    except PermissionError:
        raise UserError(f"{argv[0]}: permission denied") from None
    return 127  # not reached: execvpe either replaces the process or raises
