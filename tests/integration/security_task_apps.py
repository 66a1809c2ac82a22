"""The workloads of Istio's security tasks (authn-policy, mtls-migration): httpbin and sleep with sidecars in
the given namespaces, and a sleep without one in ``legacy`` (``sidecar.istio.io/inject: "false"``), as the
pages deploy them. httpbin is the PyPI one under gunicorn on 8080 behind Service port 8000."""

from __future__ import annotations

HTTPBIN = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: httpbin, namespace: @NS@}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: @NS@, labels: {app: httpbin}}
spec:
  ports: [{name: http, port: 8000, targetPort: 8080}]
  selector: {app: httpbin}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin, namespace: @NS@}
spec:
  selector: {matchLabels: {app: httpbin}}
  template:
    metadata: {labels: {app: httpbin, version: v1}}
    spec:
      serviceAccountName: httpbin
      containers:
      - name: httpbin
        image: docker.io/kong/httpbin
        command: ["python", "-m", "gunicorn", "-b", "$(POD_IP):8080", "-k", "gthread", "--threads", "4", "httpbin:app"]
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        ports: [{containerPort: 8080, name: http}]
        readinessProbe: {httpGet: {path: /status/200, port: 8080}, periodSeconds: 1}
"""

SLEEP = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: sleep, namespace: @NS@}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep, namespace: @NS@}
spec:
  selector: {matchLabels: {app: sleep}}
  template:
    metadata:
      labels: {app: sleep}
      annotations: {sidecar.istio.io/inject: "@INJECT@"}
    spec:
      serviceAccountName: sleep
      containers:
      - {name: sleep, image: docker.io/curlimages/curl, command: ["/bin/sleep", "infinity"]}
"""


def task_apps(namespaces: tuple[str, ...] = ("foo", "bar"), legacy: str = "legacy") -> str:
    """One manifest: httpbin and sleep in each of ``namespaces``, a sleep without a sidecar in ``legacy``."""
    docs = [HTTPBIN.replace("@NS@", ns) for ns in namespaces]
    docs += [SLEEP.replace("@NS@", ns).replace("@INJECT@", "true") for ns in namespaces]
    docs.append(SLEEP.replace("@NS@", legacy).replace("@INJECT@", "false"))
    return "\n---\n".join(d.strip() for d in docs) + "\n"
