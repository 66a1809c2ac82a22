"""Loopback address plan: every workload instance gets a pod address and a mesh address from one pod range.

Linux routes all of 127.0.0.0/8 to ``lo``, so any address in it can be bound without configuration. In a pod
range (a /24 by default) the first host address is the control plane's, then instance *i* gets
``pod = base + 2 + 2i`` (its app binds there) and ``mesh = base + 3 + 2i`` (its sidecar binds there).

The default range is a /24 inside 127.10.0.0/16 in which no socket listens (read from ``/proc/net/tcp``),
probed from a starting point derived from the state directory, so two meshes with different state directories
land in different blocks and can run side by side.
"""

from __future__ import annotations

import ipaddress
import zlib
from dataclasses import dataclass
from pathlib import Path

from kizuna.runtime.errors import UserError

DEFAULT_BLOCK = ipaddress.IPv4Network("127.10.0.0/16")
DEFAULT_PREFIX = 24
LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_TCP_LISTEN = "0A"


@dataclass(frozen=True, slots=True)
class PodRange:
    """A block of loopback addresses for one mesh."""

    network: ipaddress.IPv4Network

    @property
    def control_plane_address(self) -> str:
        """Where the mesh's control plane listens."""
        return str(self.network[1])

    @property
    def capacity(self) -> int:
        """How many instances fit (two addresses each; the network, first and last addresses are kept out)."""
        return max(0, (self.network.num_addresses - 3) // 2)

    def instance_addresses(self, index: int) -> tuple[str, str]:
        """``(pod address, mesh address)`` of the instance numbered ``index`` (0-based)."""
        if not 0 <= index < self.capacity:
            raise UserError(f"pod range {self.network} has room for {self.capacity} instances, "
                            f"not {index + 1}; pass a larger --pod-cidr")
        return str(self.network[2 + 2 * index]), str(self.network[3 + 2 * index])

    def transparent_address(self, index: int) -> str:
        """The one address of instance ``index`` in transparent mode (its own network namespace): the range's
        first address is the bridge (gateway and control plane), instances follow."""
        if not 0 <= index < self.network.num_addresses - 3:
            raise UserError(f"pod range {self.network} has room for {self.network.num_addresses - 3} "
                            f"instances, not {index + 1}; pass a larger --pod-cidr")
        return str(self.network[2 + index])

    def __str__(self) -> str:
        return str(self.network)


def parse_pod_cidr(text: str) -> PodRange:
    """A user-given ``--pod-cidr``: an IPv4 block inside 127.0.0.0/8 with room for at least one instance."""
    try:
        network = ipaddress.IPv4Network(text, strict=False)
    except ValueError as exc:
        raise UserError(f"--pod-cidr {text}: {exc}") from exc
    if not network.subnet_of(LOOPBACK):
        raise UserError(f"--pod-cidr {text}: must be inside 127.0.0.0/8 (loopback)")
    if network.prefixlen > 29:
        raise UserError(f"--pod-cidr {text}: too small, use /29 or larger")
    return PodRange(network)


def listening_addresses(proc_net_tcp: Path = Path("/proc/net/tcp")) -> dict[ipaddress.IPv4Address, list[int]]:
    """Specific IPv4 addresses with a listening TCP socket, and their ports. Wildcard (0.0.0.0) listeners are
    left out: they listen everywhere and so say nothing about one block."""
    found: dict[ipaddress.IPv4Address, list[int]] = {}
    try:
        lines = proc_net_tcp.read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[3] != _TCP_LISTEN:
            continue
        hex_addr, hex_port = fields[1].split(":")
        # /proc prints the address as a host-order (little-endian on x86/arm) 32-bit word.
        address = ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(hex_addr), "little"))
        if int(address) != 0:
            found.setdefault(address, []).append(int(hex_port, 16))
    return found


def listeners_in(pod_range: PodRange, listening: dict[ipaddress.IPv4Address, list[int]] | None = None
                 ) -> list[str]:
    """``address:port`` of every socket listening inside ``pod_range``."""
    listening = listening_addresses() if listening is None else listening
    return sorted(f"{addr}:{port}" for addr, ports in listening.items() if addr in pod_range.network
                  for port in ports)


def choose_pod_range(seed: str, *, block: ipaddress.IPv4Network = DEFAULT_BLOCK, prefix: int = DEFAULT_PREFIX,
                     listening: dict[ipaddress.IPv4Address, list[int]] | None = None) -> PodRange:
    """A /``prefix`` inside ``block`` where nothing listens, probing from a start derived from ``seed``."""
    listening = listening_addresses() if listening is None else listening
    candidates = list(block.subnets(new_prefix=prefix))
    start = zlib.crc32(seed.encode()) % len(candidates)
    busy = {ipaddress.IPv4Network(f"{addr}/{prefix}", strict=False) for addr in listening if addr in block}
    for offset in range(len(candidates)):
        candidate = candidates[(start + offset) % len(candidates)]
        if candidate not in busy:
            return PodRange(candidate)
    raise UserError(f"no free /{prefix} in {block}: every block has listening sockets; pass --pod-cidr")
