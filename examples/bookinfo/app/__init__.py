"""Bookinfo, written for kizuna in plain Python (standard library only) to the public API and behaviour of
Istio's Bookinfo sample: productpage, details, reviews (v1, v2, v3) and ratings.

Run one service with ``python -m app.<service> [--host ADDRESS] [--port 9080]`` from ``examples/bookinfo``.
Services call each other by name (``http://reviews:9080/...``); in kizuna's proxy mode ``HTTP_PROXY`` sends
those calls through the instance's sidecar, in transparent mode the names resolve inside the pod.
"""
