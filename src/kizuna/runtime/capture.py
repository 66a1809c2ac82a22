"""istio-iptables for kizuna: the nat rules that send a pod's TCP traffic through its sidecar.

``capture_rules`` is pure: a ``CaptureSpec`` (Istio's ``istio-iptables`` flags, possibly overridden by the
pod's ``traffic.sidecar.istio.io/*`` annotations) in, ``iptables-restore`` text out, in the shape of Istio's
golden files (MESH-FACTS §4.2) with ``KZ_`` instead of ``ISTIO_`` chain names. ``apply_rules`` loads such text
into a network namespace's nat table.

The shape, and why each rule is there:

- inbound: every TCP connection arriving at the pod goes to the inbound capture port (15006), except the ports
  the sidecar itself serves (admin 15000, 15020, 15021, 15090) and HBONE (15008);
- outbound: connections from the sidecar's UID (1337) are not captured again (the loop guard), except when it
  dials its own pod's address, which must reach its inbound side (an app calling itself through its Service);
- the inbound passthrough source 127.0.0.6 is never captured: that is how the sidecar hands traffic to its app;
- an app talking to localhost is not captured; everything else goes to the outbound port (15001).
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kizuna.proxyconfig.bootstrap import ADMIN_PORT, INBOUND_CAPTURE_PORT, OUTBOUND_PORT
from kizuna.runtime.errors import UserError

PROXY_UID = 1337
PROXY_GID = 1337
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"
HBONE_PORT = 15008
DEFAULT_EXCLUDED_INBOUND = (ADMIN_PORT, 15020, 15021, 15090)
"""istio-init's ``-d 15090,15021,15020``, plus kizuna's admin port: it is reached on the pod address from the
host, so it must not be captured."""

ANNOTATION_PREFIX = "traffic.sidecar.istio.io/"
INCLUDE_OUTBOUND_IP_RANGES = ANNOTATION_PREFIX + "includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES = ANNOTATION_PREFIX + "excludeOutboundIPRanges"
INCLUDE_INBOUND_PORTS = ANNOTATION_PREFIX + "includeInboundPorts"
EXCLUDE_INBOUND_PORTS = ANNOTATION_PREFIX + "excludeInboundPorts"
EXCLUDE_OUTBOUND_PORTS = ANNOTATION_PREFIX + "excludeOutboundPorts"
INJECT = "sidecar.istio.io/inject"


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """The flags of ``istio-iptables`` kizuna honours."""

    outbound_port: int = OUTBOUND_PORT
    """``-p``: where outbound connections are redirected."""
    inbound_port: int = INBOUND_CAPTURE_PORT
    """``-z``: where inbound connections are redirected."""
    proxy_uid: int = PROXY_UID
    """``-u``: the sidecar's UID, whose own connections are not captured."""
    proxy_gid: int = PROXY_GID
    """``-g``: the sidecar's GID."""
    include_outbound: tuple[str, ...] = ("*",)
    """``-i``: CIDRs captured outbound; ``("*",)`` is everything, ``()`` nothing."""
    exclude_outbound: tuple[str, ...] = ()
    """``-x``: CIDRs never captured outbound."""
    include_inbound_ports: tuple[str, ...] = ("*",)
    """``-b``: inbound ports captured; ``("*",)`` is every port, ``()`` none."""
    exclude_inbound_ports: tuple[int, ...] = DEFAULT_EXCLUDED_INBOUND
    """``-d``: inbound ports never captured (with ``*`` inbound)."""
    exclude_outbound_ports: tuple[int, ...] = ()
    """``-o``: outbound destination ports never captured."""


def sidecar_injected(annotations: Mapping[str, str]) -> bool:
    """``sidecar.istio.io/inject: "false"`` turns the sidecar (and capture) off; anything else keeps it."""
    return annotations.get(INJECT, "true").strip().lower() != "false"


def spec_from_annotations(annotations: Mapping[str, str], *, always_excluded: Sequence[str] = ()
                          ) -> CaptureSpec:
    """Istio's defaults overridden by the pod's ``traffic.sidecar.istio.io/*`` annotations.

    ``always_excluded`` CIDRs are added to the excluded outbound ranges whatever the pod says (the control
    plane's address: sidecars dial it directly). Raises UserError naming the annotation on a bad value.
    """
    include = _cidrs(annotations, INCLUDE_OUTBOUND_IP_RANGES, ("*",))
    exclude = _cidrs(annotations, EXCLUDE_OUTBOUND_IP_RANGES, ())
    exclude = tuple(dict.fromkeys([*exclude, *(_cidr(c, "always excluded") for c in always_excluded)]))
    include_ports = _ports(annotations, INCLUDE_INBOUND_PORTS, ("*",), star=True)
    excluded_in = _ports(annotations, EXCLUDE_INBOUND_PORTS, (), star=False)
    exclude_in = tuple(dict.fromkeys([*DEFAULT_EXCLUDED_INBOUND, *(int(p) for p in excluded_in)]))
    exclude_out = tuple(int(p) for p in _ports(annotations, EXCLUDE_OUTBOUND_PORTS, (), star=False))
    return CaptureSpec(include_outbound=include, exclude_outbound=exclude, include_inbound_ports=include_ports,
                       exclude_inbound_ports=exclude_in, exclude_outbound_ports=exclude_out)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _cidr(text: str, where: str) -> str:
    try:
        return str(ipaddress.IPv4Network(text, strict=False))
    except ValueError as exc:
        raise UserError(f"{where}: {text!r} is not an IPv4 CIDR ({exc})") from exc


def _cidrs(annotations: Mapping[str, str], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if key not in annotations:
        return default
    parts = _split(annotations[key])
    if parts == ["*"]:
        return ("*",)
    return tuple(_cidr(p, f"annotation {key}") for p in parts)


def _ports(annotations: Mapping[str, str], key: str, default: tuple[str, ...], *, star: bool
           ) -> tuple[str, ...]:
    if key not in annotations:
        return default
    parts = _split(annotations[key])
    if star and parts == ["*"]:
        return ("*",)
    for p in parts:
        if not p.isdigit() or not 0 < int(p) < 65536:
            raise UserError(f"annotation {key}: {p!r} is not a port number")
    return tuple(str(int(p)) for p in parts)


def capture_rules(spec: CaptureSpec) -> str:
    """The ``iptables-restore`` text of the nat table for one sidecar'd pod (replaces the whole table).

    Rule order follows istio-iptables' golden files line for line (chains renamed ``ISTIO_`` → ``KZ_``).
    """
    uid, gid = spec.proxy_uid, spec.proxy_gid
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
             ":POSTROUTING ACCEPT [0:0]", ":KZ_INBOUND - [0:0]", ":KZ_REDIRECT - [0:0]",
             ":KZ_IN_REDIRECT - [0:0]", ":KZ_OUTPUT - [0:0]",
             f"-A KZ_INBOUND -p tcp --dport {HBONE_PORT} -j RETURN",
             f"-A KZ_REDIRECT -p tcp -j REDIRECT --to-ports {spec.outbound_port}",
             f"-A KZ_IN_REDIRECT -p tcp -j REDIRECT --to-ports {spec.inbound_port}"]
    # Inbound.
    if spec.include_inbound_ports:
        lines.append("-A PREROUTING -p tcp -j KZ_INBOUND")
        if spec.include_inbound_ports == ("*",):
            lines += [f"-A KZ_INBOUND -p tcp --dport {p} -j RETURN" for p in spec.exclude_inbound_ports]
            lines.append("-A KZ_INBOUND -p tcp -j KZ_IN_REDIRECT")
        else:
            lines += [f"-A KZ_INBOUND -p tcp --dport {p} -j KZ_IN_REDIRECT" for p in spec.include_inbound_ports]
    # Outbound.
    lines.append("-A OUTPUT -p tcp -j KZ_OUTPUT")
    if spec.exclude_outbound_ports:
        ports = ",".join(str(p) for p in spec.exclude_outbound_ports)
        lines.append(f"-A KZ_OUTPUT -p tcp -m multiport --dports {ports} -j RETURN")
    lines.append(f"-A KZ_OUTPUT -o lo -s {INBOUND_PASSTHROUGH_SOURCE}/32 -j RETURN")
    for owner in (f"--uid-owner {uid}", f"--gid-owner {gid}"):
        lines += [f"-A KZ_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport {HBONE_PORT} -m owner {owner} "
                  "-j KZ_IN_REDIRECT",
                  f"-A KZ_OUTPUT -o lo -m owner ! {owner} -j RETURN",
                  f"-A KZ_OUTPUT -m owner {owner} -j RETURN"]
    lines.append("-A KZ_OUTPUT -d 127.0.0.1/32 -j RETURN")
    lines += [f"-A KZ_OUTPUT -d {cidr} -j RETURN" for cidr in spec.exclude_outbound]
    if spec.include_outbound == ("*",):
        lines.append("-A KZ_OUTPUT -j KZ_REDIRECT")
    elif spec.include_outbound:
        lines += [f"-A KZ_OUTPUT -d {cidr} -j KZ_REDIRECT" for cidr in spec.include_outbound]
        lines.append("-A KZ_OUTPUT -j RETURN")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def apply_rules(netns: str, text: str) -> None:
    """Load ``iptables-restore`` text into ``netns`` (each table named in it is replaced atomically)."""
    result = subprocess.run(["ip", "netns", "exec", netns, "iptables-restore"], input=text, text=True,
                            capture_output=True, check=False)
    if result.returncode != 0:
        raise UserError(f"cannot install iptables rules in network namespace {netns}: "
                        f"{result.stderr.strip() or 'iptables-restore failed'}")
