"""Emulated home networks for tests and benches: two homes, each behind its own NAT, and a public
segment between them, built from Linux network namespaces (root, `ip`, `iptables`).

    home1 (192.168.11.2) -- nat1 [MASQUERADE] 10.77.1.2 --\\
                                                            pub 10.77.1.1 / 10.77.2.1
    home2 (192.168.12.2) -- nat2 [MASQUERADE] 10.77.2.2 --/

A home dials out (its NAT rewrites the source to the NAT's outer address); nothing can dial a
home: the NAT forwards inbound only for connections a home opened, and no namespace routes to
192.168/16. Every segment uses private ranges and no namespace has a route outside these
namespaces, so no test traffic can leave them. Because the ranges are private, libp2p never
tries AutoNAT or hole punching here: the homes reach each other only through the relay.

`Homes(...).up()` returns None with the reason a machine cannot build it (the caller skips).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

PUBLIC = {1: "10.77.1.1", 2: "10.77.2.1"}  # the public peer's address towards each NAT


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Homes:
    """The namespaces `{prefix}-pub`, `-nat1`, `-nat2`, `-home1`, `-home2`; delete with down()."""

    prefix: str = field(default_factory=lambda: f"st{os.getpid() % 100000}")
    rate: str = ""  # e.g. "100mbit": a tbf limit on each home's uplink and downlink
    nat: bool = True  # False: plain routers, the public segment routes to the homes (dialable)

    @property
    def pub(self) -> str:
        return f"{self.prefix}-pub"

    def home(self, i: int) -> str:
        return f"{self.prefix}-home{i}"

    def names(self) -> list[str]:
        return [f"{self.prefix}-{n}" for n in ("pub", "nat1", "nat2", "home1", "home2")]

    def up(self) -> str | None:
        """Build the namespaces; None when done, else why this machine cannot (nothing left)."""
        if os.geteuid() != 0:
            return "emulated networks need root (network namespaces, iptables)"
        for tool in ("ip", "iptables", "tc") if self.nat else ("ip", "tc"):
            if shutil.which(tool) is None:
                return (
                    f"emulated networks need `{tool}` (Debian: apt-get install iproute2 iptables)"
                )
        try:
            self._build()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            self.down()
            return f"cannot build network namespaces here: {detail.strip()[:200]}"
        return None

    def _build(self) -> None:
        p = self.prefix
        for name in self.names():
            _run("ip", "netns", "add", name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        for i in (1, 2):
            pub_if, out_if, in_if, home_if = f"{p}p{i}", f"{p}o{i}", f"{p}i{i}", f"{p}h{i}"
            nat, home = f"{p}-nat{i}", self.home(i)
            _run("ip", "link", "add", pub_if, "type", "veth", "peer", "name", out_if)
            _run("ip", "link", "set", pub_if, "netns", self.pub)
            _run("ip", "link", "set", out_if, "netns", nat)
            _run("ip", "-n", self.pub, "addr", "add", f"{PUBLIC[i]}/24", "dev", pub_if)
            _run("ip", "-n", nat, "addr", "add", f"10.77.{i}.2/24", "dev", out_if)
            _run("ip", "link", "add", in_if, "type", "veth", "peer", "name", home_if)
            _run("ip", "link", "set", in_if, "netns", nat)
            _run("ip", "link", "set", home_if, "netns", home)
            _run("ip", "-n", nat, "addr", "add", f"192.168.1{i}.1/24", "dev", in_if)
            _run("ip", "-n", home, "addr", "add", f"192.168.1{i}.2/24", "dev", home_if)
            for ns, dev in ((self.pub, pub_if), (nat, out_if), (nat, in_if), (home, home_if)):
                _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", home, "route", "add", "default", "via", f"192.168.1{i}.1")
            _run("ip", "-n", nat, "route", "add", "default", "via", PUBLIC[i])
            _run("ip", "netns", "exec", nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            nat_rules = [
                ("-t", "nat", "-A", "POSTROUTING", "-o", out_if, "-j", "MASQUERADE"),
                ("-A", "FORWARD", "-i", out_if, "-m", "conntrack", "--ctstate",
                 "ESTABLISHED,RELATED", "-j", "ACCEPT"),
                ("-A", "FORWARD", "-i", out_if, "-j", "DROP"),
            ]  # fmt: skip
            if self.nat:
                for rule in nat_rules:
                    _run("ip", "netns", "exec", nat, "iptables", *rule)
            else:
                _run(
                    "ip",
                    "-n",
                    self.pub,
                    "route",
                    "add",
                    f"192.168.1{i}.0/24",
                    "via",
                    f"10.77.{i}.2",
                )
            if self.rate:  # the home's link: tbf on both ends of its NAT's outer veth
                for ns, dev in ((nat, out_if), (self.pub, pub_if)):
                    _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                         "tbf", "rate", self.rate, "burst", "64kb", "latency", "50ms")  # fmt: skip
        _run("ip", "netns", "exec", self.pub, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def down(self) -> None:
        """Delete our namespaces (their veths go with them); ends nothing else."""
        for name in self.names():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)

    def pids(self) -> list[int]:
        """Processes still inside our namespaces."""
        found: list[int] = []
        for name in self.names():
            out = subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30
            ).stdout
            found += [int(x) for x in out.split()]
        return found
