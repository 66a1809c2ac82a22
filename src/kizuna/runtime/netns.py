"""Host networking of transparent mode: one bridge per mesh, one network namespace and veth pair per instance.

Every object is named after the mesh (``kz<meshid>``, six hex digits of the state directory's hash), so
``kizuna down`` can find leftovers of its own mesh by name even when the record of them is lost, and never
touches anything else. Callers record an object in ``runtime.json`` *before* creating it (``NetworkRecord``),
so a ``kizuna up`` killed half-way leaves behind everything ``down`` needs.

Nothing here routes, forwards or NATs off the machine: the bridge has an address in the pod range only, IP
forwarding is left as it is, and the namespaces' default route points at the bridge.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kizuna.runtime.errors import UserError

POD_BLOCK = ipaddress.IPv4Network("10.210.0.0/16")
SERVICE_BLOCK = ipaddress.IPv4Network("10.211.0.0/16")
ETC_NETNS = Path("/etc/netns")
RUN_DIR = Path("/run/kizuna")
"""Files the sidecar (UID 1337) must read live here, not in the (private) state directory."""


def mesh_id(state_root: Path | str) -> str:
    """Six hex digits naming this mesh's host objects (interface names must stay within 15 characters)."""
    return hashlib.sha256(str(state_root).encode()).hexdigest()[:6]


@dataclass(frozen=True, slots=True)
class Names:
    """The host objects of one mesh."""

    mesh: str

    @property
    def bridge(self) -> str:
        return f"kz{self.mesh}"

    @property
    def forward_chain(self) -> str:
        """filter-table chain: the bridge's ports may talk to each other, nothing is routed in or out."""
        return f"KZ_FWD_{self.mesh}"

    @property
    def run_dir(self) -> Path:
        return RUN_DIR / self.bridge

    def netns(self, index: int) -> str:
        return f"kz{self.mesh}-{index}"

    def veth(self, index: int) -> str:
        """The host end of instance ``index``'s veth pair (on the bridge)."""
        return f"kz{self.mesh}h{index}"

    def peer(self, index: int) -> str:
        """The pod end's name until it is moved into the namespace and renamed ``eth0``."""
        return f"kz{self.mesh}p{index}"


def missing_tools() -> bool:
    """True when this host cannot have transparent-mode objects (no root, or no ``ip``/``iptables``)."""
    return os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None


def run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a networking command (``ip``, ``iptables``); UserError with its message when it fails."""
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, input=input)
    if check and result.returncode != 0:
        raise UserError(f"`{' '.join(argv)}` failed: {result.stderr.strip() or result.returncode}")
    return result


# --- address ranges --------------------------------------------------------------------------------------

def used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks this host already has addresses or routes in (any table)."""
    found: list[ipaddress.IPv4Network] = []
    out = run("ip", "-4", "-o", "addr", "show", check=False).stdout
    for match in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+/\d+)", out):
        found.append(ipaddress.IPv4Network(match.group(1), strict=False))
    for line in run("ip", "-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("broadcast", "local", "unreachable", "prohibit", "blackhole"):
            first = line.split()[1] if len(line.split()) > 1 else ""
        try:
            if first not in ("", "default"):
                found.append(ipaddress.IPv4Network(first, strict=False))
        except ValueError:
            continue
    return found


def choose_range(seed: str, block: ipaddress.IPv4Network, used: Iterable[ipaddress.IPv4Network],
                 prefix: int = 24) -> ipaddress.IPv4Network:
    """A /``prefix`` inside ``block`` overlapping nothing in ``used``, probed from a start derived from
    ``seed`` (so two meshes land apart and one mesh lands in the same place each time)."""
    candidates = list(block.subnets(new_prefix=prefix))
    start = zlib.crc32(seed.encode()) % len(candidates)
    busy = [n for n in used if n.prefixlen > 0]
    for offset in range(len(candidates)):
        candidate = candidates[(start + offset) % len(candidates)]
        if not any(candidate.overlaps(n) for n in busy):
            return candidate
    raise UserError(f"no free /{prefix} in {block}; pass a range explicitly")


def parse_range(text: str, flag: str) -> ipaddress.IPv4Network:
    """A user-given ``--pod-cidr``/``--service-cidr`` for transparent mode: private IPv4, /16 to /29."""
    try:
        network = ipaddress.IPv4Network(text, strict=False)
    except ValueError as exc:
        raise UserError(f"{flag} {text}: {exc}") from exc
    if not network.is_private or network.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")):
        raise UserError(f"{flag} {text}: must be a private, non-loopback range in transparent mode "
                        "(e.g. 10.210.7.0/24)")
    if not 16 <= network.prefixlen <= 29:
        raise UserError(f"{flag} {text}: use a /16 to /29")
    return network


# --- creating and removing --------------------------------------------------------------------------------

def create_bridge(names: Names, gateway: str, prefixlen: int) -> None:
    """The mesh's bridge with the pod range's gateway address (the control plane listens there)."""
    run("ip", "link", "add", names.bridge, "type", "bridge")
    run("ip", "addr", "add", f"{gateway}/{prefixlen}", "dev", names.bridge)
    run("ip", "link", "set", names.bridge, "up")


def isolate_forward(names: Names) -> None:
    """The bridge's own FORWARD rules: frames between its ports pass even when the host's FORWARD chain drops
    by default (br_netfilter sends bridged frames through it), and nothing is routed between the bridge and
    any other interface, even on a host with IP forwarding on."""
    chain, bridge = names.forward_chain, names.bridge
    run("iptables", "-w", "-N", chain)
    run("iptables", "-w", "-A", chain, "-i", bridge, "-o", bridge, "-j", "ACCEPT")
    run("iptables", "-w", "-A", chain, "-i", bridge, "-j", "DROP")
    run("iptables", "-w", "-A", chain, "-o", bridge, "-j", "DROP")
    run("iptables", "-w", "-I", "FORWARD", "1", "-j", chain)


def create_pod(names: Names, index: int, address: str, prefixlen: int, gateway: str) -> None:
    """Namespace ``index`` with ``eth0`` (its veth peer on the bridge) at ``address``, ``lo`` up, and a default
    route via the bridge."""
    ns, veth, peer = names.netns(index), names.veth(index), names.peer(index)
    run("ip", "netns", "add", ns)
    run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
    run("ip", "link", "set", veth, "master", names.bridge, "up")
    run("ip", "link", "set", peer, "netns", ns)
    inside = ("ip", "-n", ns)
    run(*inside, "link", "set", peer, "name", "eth0")
    run(*inside, "addr", "add", f"{address}/{prefixlen}", "dev", "eth0")
    run(*inside, "link", "set", "eth0", "up")
    run(*inside, "link", "set", "lo", "up")
    run(*inside, "route", "add", "default", "via", gateway)


def delete_pod(names: Names, index: int) -> None:
    """Remove namespace ``index`` (``kizuna scale`` down): its veth pair goes with it, then its /etc/netns
    files."""
    run("ip", "netns", "delete", names.netns(index), check=False)
    run("ip", "link", "delete", names.veth(index), check=False)  # gone already, unless the netns was not there
    shutil.rmtree(ETC_NETNS / names.netns(index), ignore_errors=True)


def existing(names: Names) -> dict[str, list[str]]:
    """This mesh's objects present on the host, found by name: netns, links, chains, /etc/netns dirs."""
    prefix = f"kz{names.mesh}"
    netns = [line.split()[0] for line in run("ip", "netns", "list", check=False).stdout.splitlines()
             if line.split() and line.split()[0].startswith(prefix + "-")]
    links = []
    for line in run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name == prefix or re.fullmatch(rf"{prefix}[hp]\d+", name):
                links.append(name)
    chains = [names.forward_chain] if _chain_exists(names.forward_chain) else []
    etc = sorted(str(p) for p in ETC_NETNS.glob(f"{prefix}-*")) if ETC_NETNS.is_dir() else []
    run_dir = [str(names.run_dir)] if names.run_dir.exists() else []
    return {k: v for k, v in {"netns": netns, "links": links, "chains": chains, "etc": etc,
                              "run": run_dir}.items() if v}


def _chain_exists(chain: str) -> bool:
    return run("iptables", "-w", "-S", chain, check=False).returncode == 0


def teardown(names: Names) -> list[str]:
    """Remove every host object of this mesh (by name, so also what a killed ``up`` never recorded).

    Returns what could not be removed (empty when all went).
    """
    found = existing(names)
    for ns in found.get("netns", []):
        # Deleting the namespace destroys its end of each veth pair, which takes the host end with it.
        run("ip", "netns", "delete", ns, check=False)
    for link in existing(names).get("links", []):
        run("ip", "link", "delete", link, check=False)
    if _chain_exists(names.forward_chain):
        while run("iptables", "-w", "-D", "FORWARD", "-j", names.forward_chain, check=False).returncode == 0:
            pass
        run("iptables", "-w", "-F", names.forward_chain, check=False)
        run("iptables", "-w", "-X", names.forward_chain, check=False)
    for path in found.get("etc", []):
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(names.run_dir, ignore_errors=True)
    try:
        RUN_DIR.rmdir()  # only when no other mesh uses it
    except OSError:
        pass
    left = existing(names)
    return [f"{kind} {name}" for kind, items in left.items() for name in items]


def write_private(path: Path, data: bytes, uid: int, gid: int) -> None:
    """Write ``data`` to ``path`` readable only by ``uid`` (a token copy for the sidecar)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def prepare_run_dir(names: Names) -> Path:
    """``/run/kizuna/kz<meshid>``: world-traversable, for the sidecars' bootstraps and token copies."""
    names.run_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(RUN_DIR, 0o711)
    os.chmod(names.run_dir, 0o711)
    return names.run_dir


def describe_leftovers(found: Mapping[str, Sequence[str]]) -> str:
    """One line naming leftovers, for error messages."""
    return "; ".join(f"{kind}: {', '.join(items)}" for kind, items in sorted(found.items()))
