"""A multi-host harness on one machine: each host is a network namespace on a private bridge.

Every host gets a veth pair into the bridge and its own address in 10.231.0.0/24; the machine itself is
10.231.0.1 on the bridge. Per host: a bandwidth limit on what it sends (tbf), latency, and jitter and
loss (`tc netem`, when the kernel has sch_netem). Links can be cut and restored. All traffic stays on
these addresses. Needs root and iproute2 (`ip`, `tc`). Everything is torn down by close(), at exit,
and on failure.

Latency does not need sch_netem: a host with `delay_ms` runs its peers on 127.0.0.1 behind a
`delay_relay` on its own address, which they announce. Every connection to that host then sees
`delay_ms` each way (a round trip is 2 x delay_ms), whoever dialed it.

A NAT'ed host (`add_nat_host`) sits behind a router host of its own: the router is on the bridge, the host
on a private link 10.232.N.0/24 behind it, and the router's nftables table masquerades what the host sends
and drops every connection opened towards it (a home router without port forwarding). Needs `nft`
(Debian's nftables). The machine routes 10.232.0.0/16 to the routers, which drop it, so a dial towards a
NAT'ed address never leaves the harness.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from swarm.local.processes import LocalSwarm, ManagedProcess

SUBNET_PREFIX = "10.231.0"
BRIDGE_ADDRESS = f"{SUBNET_PREFIX}.1"
NAT_PREFIX = "10.232"  # 10.232.N.0/24: the private link behind NAT'ed host N's router
CLONE_NEWNET = 0x40000000  # setns(2): join a network namespace
RELAYED_PORT_BASE = 41000  # each namespace has its own ports, so fixed ones can't clash with the machine's


class NetnsUnavailable(RuntimeError):
    """This machine cannot run the harness (not root, or iproute2 missing)."""


def unavailable_reason() -> str | None:
    """Why the harness cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


def nat_unavailable_reason() -> str | None:
    """Why NAT'ed hosts cannot run here (the harness's own reasons, or no nftables), or None if they can."""
    return unavailable_reason() or (None if shutil.which("nft") else "`nft` (nftables) is not installed")


def netem_available() -> bool:
    """Whether the kernel can emulate delay/jitter/loss (sch_netem); probed on a throwaway veth pair."""
    name = f"swp{uuid.uuid4().hex[:6]}"
    if _run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p"], check=False).returncode:
        return False
    try:
        probe = _run(["tc", "qdisc", "add", "dev", name, "root", "netem", "delay", "1ms"], check=False)
        return probe.returncode == 0
    finally:
        _run(["ip", "link", "del", name], check=False)


def _run(args: list[str], check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, input=input)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _nat_rules(inside: str) -> str:
    """A home router's nftables table: what the inside device sends goes out masqueraded, replies come
    back, and every connection opened from outside (to the router or through it) is dropped."""
    return f"""
table ip swarm_nat {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{inside}" accept
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname "lo" accept
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat;
        iifname "{inside}" masquerade
    }}
}}
"""


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    veth: str  # the bridge-side end, which cut()/restore() toggle
    delay_ms: float = 0.0
    processes: list[ManagedProcess] = field(default_factory=list)
    next_port: int = RELAYED_PORT_BASE
    router: str | None = None  # a NAT'ed host's router namespace (its public side is `veth`)


class NetnsHarness:
    """Hosts in network namespaces on one bridge, and swarm processes running inside them."""

    def __init__(self, workdir: str | os.PathLike | None = None):
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = f"swb{self.tag}"
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="swarm-netns-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts: dict[str, Host] = {}
        self._closed = False
        atexit.register(self.close)
        try:
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
        except BaseException:
            self.close()
            raise

    def add_host(
        self,
        name: str,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss_percent: float = 0.0,
        rate_mbit: float | None = None,
    ) -> Host:
        """A new namespace with its own address.

        `delay_ms` is added each way to every connection to the host's peers (a relay; see the module
        docstring); jitter and loss (netem) and `rate_mbit` (tbf) apply to what the host sends.
        """
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        index = len(self.hosts) + 2
        if index > 250:
            raise ValueError("at most 249 hosts")
        namespace, veth = f"sw{self.tag}{index}", f"swv{self.tag}{index}"
        host = Host(name, namespace, f"{SUBNET_PREFIX}.{index}", veth, delay_ms)
        self.hosts[name] = host
        peer = f"{veth}p"
        _run(["ip", "netns", "add", namespace])
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
        _run(["ip", "link", "set", peer, "netns", namespace])
        _run(["ip", "link", "set", veth, "master", self.bridge])
        _run(["ip", "link", "set", veth, "up"])
        _run(["ip", "-n", namespace, "addr", "add", f"{host.address}/24", "dev", peer])
        _run(["ip", "-n", namespace, "link", "set", peer, "up"])
        _run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        self._shape(namespace, peer, jitter_ms, loss_percent, rate_mbit)
        return host

    def add_nat_host(self, name: str, rate_mbit: float | None = None) -> Host:
        """A host behind a home router: it can dial out (masqueraded as its router's bridge address), and
        nothing can open a connection to it. Its peers listen on its private address 10.232.N.2."""
        router = self.add_host(f"{name}-router")
        index = router.address.rsplit(".", 1)[1]
        inside, inner = f"sw{self.tag}{index}n", f"swn{self.tag}{index}"
        host = Host(name, inside, f"{NAT_PREFIX}.{index}.2", router.veth, router=router.namespace)
        self.hosts[name] = host
        gateway = f"{NAT_PREFIX}.{index}.1"
        _run(["ip", "netns", "add", inside])
        _run(
            ["ip", "-n", router.namespace, "link", "add", inner, "type", "veth", "peer", "name", f"{inner}p"]
        )
        _run(["ip", "-n", router.namespace, "link", "set", f"{inner}p", "netns", inside])
        _run(["ip", "-n", router.namespace, "addr", "add", f"{gateway}/24", "dev", inner])
        _run(["ip", "-n", router.namespace, "link", "set", inner, "up"])
        _run(["ip", "-n", inside, "addr", "add", f"{host.address}/24", "dev", f"{inner}p"])
        _run(["ip", "-n", inside, "link", "set", f"{inner}p", "up"])
        _run(["ip", "-n", inside, "link", "set", "lo", "up"])
        _run(["ip", "-n", inside, "route", "add", "default", "via", gateway])
        _run(["ip", "netns", "exec", router.namespace, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        _run(["ip", "netns", "exec", router.namespace, "nft", "-f", "-"], input=_nat_rules(inner))
        # the machine sends a dial towards the private link to the router, which drops it, instead of
        # out through its own default route
        _run(["ip", "route", "add", f"{NAT_PREFIX}.{index}.0/24", "via", router.address])
        self._shape(inside, f"{inner}p", 0.0, 0.0, rate_mbit)
        return host

    @staticmethod
    def _shape(namespace, device, jitter_ms, loss_percent, rate_mbit) -> None:
        tc = ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root"]
        if jitter_ms or loss_percent:
            netem = ["netem", "delay", "0ms"]
            if jitter_ms:
                netem += [f"{jitter_ms}ms"]
            if loss_percent:
                netem += ["loss", f"{loss_percent}%"]
            if rate_mbit:
                netem += ["rate", f"{rate_mbit}mbit"]
            result = _run(tc + netem, check=False)
            if result.returncode:
                raise RuntimeError(
                    f"tc netem failed (does the kernel have sch_netem?): {result.stderr.strip()}"
                )
        elif rate_mbit:
            _run(tc + ["tbf", "rate", f"{rate_mbit}mbit", "burst", "64kb", "latency", "100ms"])

    def cut(self, name: str) -> None:
        """Take a host off the network (its processes keep running)."""
        _run(["ip", "link", "set", self.hosts[name].veth, "down"])

    def restore(self, name: str) -> None:
        _run(["ip", "link", "set", self.hosts[name].veth, "up"])

    def spawn(self, name: str, label: str, cli_args: list[str], module: str = "swarm.cli.main"):
        """Run `python -m <module> <cli_args>` (by default the `swarm` CLI) inside host `name`."""
        host = self.hosts[name]
        args = ["ip", "netns", "exec", host.namespace, sys.executable, "-m", module, *cli_args]
        process = ManagedProcess(f"{name}-{label}", args, self.workdir / f"{name}-{label}.log")
        host.processes.append(process)
        return process

    def _listen_args(self, name: str, timeout: float = 30.0) -> list[str]:
        """Where a new peer on host `name` listens: its address, or 127.0.0.1 behind a delay relay."""
        host = self.hosts[name]
        if not host.delay_ms:
            return ["--host", host.address, "--port", "0"]
        port, host.next_port = host.next_port, host.next_port + 1
        relay = self.spawn(
            name,
            f"relay{port}",
            [
                "--listen",
                f"{host.address}:{port}",
                "--target",
                f"127.0.0.1:{port}",
                "--delay-ms",
                str(host.delay_ms),
            ],
            module="swarm.testing.delay_relay",
        )
        relay.wait_for(r"relaying ", timeout)
        return [
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--announce-maddrs",
            f"/ip4/{host.address}/tcp/{port}",
        ]

    @contextlib.contextmanager
    def entered(self, name: str) -> Iterator[Host]:
        """Run the calling thread inside host `name` for the block: the processes it starts there (hivemind's
        DHT and averager processes and their p2p daemons, which fork from it) live on that host's network.
        Only this thread moves (setns(2) applies to the calling thread); it moves back on exit."""
        host = self.hosts[name]
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/var/run/netns/{host.namespace}", os.O_RDONLY)
            try:
                if libc.setns(target, CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns into {host.namespace}: {os.strerror(error)}")
            finally:
                os.close(target)
            try:
                yield host
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:  # a thread stranded in the namespace is a bug
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns back to this machine's network: {os.strerror(error)}")
        finally:
            os.close(own)

    def start_bootstrap(self, name: str, timeout: float = 60.0) -> list[str]:
        """A bootstrap peer inside host `name`; returns its multiaddrs."""
        maddr_file = self.workdir / f"{name}-bootstrap.maddrs"
        process = self.spawn(
            name, "bootstrap", ["dht", *self._listen_args(name), "--maddr-file", str(maddr_file)]
        )
        process.wait_for(r"bootstrap peer \S+ is up", timeout)
        return maddr_file.read_text().split()

    def start_node(self, name: str, model: str, blocks: str, initial_peers: list[str], *extra: str):
        args = ["node", "--model", model, "--blocks", blocks, *self._listen_args(name)]
        label = f"node{len(self.hosts[name].processes)}"
        return self.spawn(name, label, [*args, "--initial-peers", *initial_peers, *extra])

    wait_ready = staticmethod(LocalSwarm.wait_ready)

    def close(self) -> None:
        """Stop every process and delete every namespace, veth and the bridge (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            for process in host.processes:
                process.kill()
        for host in self.hosts.values():
            _run(["ip", "netns", "del", host.namespace], check=False)  # with its nftables table, if a router
            _run(
                ["ip", "link", "del", host.veth], check=False
            )  # the machine's route to a NAT'ed link goes too
        _run(["ip", "link", "del", self.bridge], check=False)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> NetnsHarness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
