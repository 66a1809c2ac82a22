"""``SO_ORIGINAL_DST``: parsing ``struct sockaddr_in``, and reading it off a connection that a real iptables
REDIRECT sent to a capture listener (in a throwaway network namespace; needs root)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from kizuna.proxy.original_dst import original_dst, parse_sockaddr_in


def sockaddr_in(address: str, port: int, family: int = socket.AF_INET) -> bytes:
    return struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_aton(address) + bytes(8)


@pytest.mark.parametrize(("address", "port"), [("10.96.0.7", 6379), ("127.0.0.1", 1), ("255.1.2.3", 65535)])
def test_parse_sockaddr_in(address: str, port: int) -> None:
    assert parse_sockaddr_in(sockaddr_in(address, port)) == (address, port)


def test_parse_sockaddr_in_refuses_other_families_and_short_input() -> None:
    with pytest.raises(ValueError, match="not an AF_INET"):
        parse_sockaddr_in(sockaddr_in("10.0.0.1", 80, family=socket.AF_INET6))
    with pytest.raises(ValueError, match="8 bytes"):
        parse_sockaddr_in(b"\x02\x00\x00")


def test_a_socket_without_the_option_gives_none() -> None:
    # A UDP socket has no connection tracking entry to ask about: the kernel answers ENOENT (or similar).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert original_dst(sock) is None


PROBE = r"""
import socket, sys
from kizuna.proxy.original_dst import original_dst
listener = socket.socket()
listener.bind(("0.0.0.0", 15001))
listener.listen()
client = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
accepted, _ = listener.accept()
print(original_dst(accepted))
"""


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace and iptables")
@pytest.mark.skipif(shutil.which("ip") is None or shutil.which("iptables") is None,
                    reason="needs ip and iptables")
def test_original_destination_of_a_redirected_connection() -> None:
    ns = f"kzt-od{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    try:
        for cmd in (["ip", "netns", "add", ns], ["ip", "-n", ns, "link", "set", "lo", "up"],
                    ["ip", "-n", ns, "route", "add", "10.231.250.0/24", "dev", "lo"],
                    ["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d",
                     "10.231.250.9", "-j", "REDIRECT", "--to-ports", "15001"]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)
        result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, "10.231.250.9",
                                 "6379"], capture_output=True, text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "('10.231.250.9', 6379)"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
