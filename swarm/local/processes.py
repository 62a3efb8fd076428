"""Start `swarm dht` / `swarm node` as child processes, wait until they are ready, and always reap them.

Each child gets its own process group (so its DHT process and libp2p daemon go down with it) and a
parent-death signal (so a killed parent doesn't leave it running).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from swarm.local.forkserver import ForkedProcess, close_fork_servers, fork_server_for

_PR_SET_PDEATHSIG = 1
CLI_PREFIX = [sys.executable, "-m", "swarm.cli.main"]
_LIVE: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()
_READY_RE = re.compile(r"node (\S+) serving blocks \[(\d+), (\d+)\)")
_GATEWAY_RE = re.compile(r"swarm gateway: serving (\S+) on (\S+):(\d+)")
_API_RE = re.compile(r"swarm api: serving .* at (http://\S+:\d+/v1)")


def _shared_machine_env() -> dict[str, str]:
    """Children share this machine's cores: OpenMP threads that spin-wait after each parallel region
    (the default) steal the cores the next node in the chain needs. Measured on 2 cores, 3 tiny-model
    nodes: 30.1 -> 15.7 ms per token. An explicit OMP_WAIT_POLICY in the environment wins."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    """A child's environment: ours, the shared-machine settings, then what the caller asks for."""
    return {**os.environ, **_shared_machine_env(), **(env or {})}


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: process groups and atexit still clean up


class ManagedProcess:
    """A child process with a log file, readiness checks and group-wide termination."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.name, self.args, self.log_path = name, args, log_path
        self._log = open(log_path, "wb")
        full_env = _child_env(env)
        self.popen = self._fork(args, full_env) or subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.peer_id: str | None = None
        self.span: tuple[int, int] | None = None  # a node's blocks, once it serves
        self.address: str | None = None  # a gateway's host:port, once it serves
        _LIVE.add(self)

    def _fork(self, args: list[str], env: dict[str, str]) -> ForkedProcess | None:
        """`swarm ...` forked from the fork server (no 3.5 s of imports), or None to start it afresh."""
        if args[:3] != CLI_PREFIX:
            return None
        server = fork_server_for(env)
        if server is None:
            return None
        try:
            return server.spawn(args[3:], self.log_path, env, os.getcwd())
        except (OSError, RuntimeError):
            return None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: re.Pattern | str, timeout: float) -> re.Match:
        """Wait until the log matches `pattern`; raise with the log tail if the process dies or times out."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match:
                return match
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a clean shutdown), then SIGKILL to the whole group if it lingers."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the process and everything in its group (DHT process, libp2p daemon)."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def run_cli(
    args: list[str], timeout: float = 120.0, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess:
    """`swarm *args` to completion, as `subprocess.run(capture_output=True, text=True)` would run it, but
    forked from the fork server when there is one (no 3.5 s of imports); TimeoutExpired after `timeout`."""
    full_env = _child_env(env)
    server = fork_server_for(full_env)
    with tempfile.TemporaryDirectory(prefix="swarm-cli-") as tmp:
        out, err, stdin = Path(tmp, "stdout"), Path(tmp, "stderr"), Path(tmp, "stdin")
        stdin.write_text(input or "")
        try:
            child = server and server.spawn(args, out, full_env, os.getcwd(), err, stdin)
        except (OSError, RuntimeError):  # as ManagedProcess: start it afresh
            child = None
        if child is None:
            command = [*CLI_PREFIX, *args]
            return subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, env=full_env, input=input
            )
        try:
            returncode = child.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait(10)
            raise
        return subprocess.CompletedProcess(
            [*CLI_PREFIX, *args], returncode, out.read_text(errors="replace"), err.read_text(errors="replace")
        )


def _reap_all() -> None:
    for process in list(_LIVE):
        process.kill()
    close_fork_servers()


atexit.register(_reap_all)


class LocalSwarm:
    """A bootstrap peer and nodes on 127.0.0.1, torn down on close() (also at interpreter exit)."""

    def __init__(self, workdir: str | os.PathLike | None = None, env: dict[str, str] | None = None):
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="swarm-local-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = env or {}
        self.processes: list[ManagedProcess] = []
        self.initial_peers: list[str] = []

    def _spawn(self, name: str, cli_args: list[str]) -> ManagedProcess:
        args = [*CLI_PREFIX, *cli_args]
        process = ManagedProcess(name, args, self.workdir / f"{name}.log", self.env)
        self.processes.append(process)
        return process

    def start_bootstrap(self, timeout: float = 60.0) -> list[str]:
        """Start `swarm dht` and return its multiaddrs."""
        maddr_file = self.workdir / "bootstrap.maddrs"
        process = self._spawn(
            "bootstrap", ["dht", "--host", "127.0.0.1", "--port", "0", "--maddr-file", str(maddr_file)]
        )
        deadline = time.monotonic() + timeout
        while not maddr_file.exists():
            if not process.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"bootstrap peer failed to start:\n{process.log()[-3000:]}")
            time.sleep(0.1)
        self.initial_peers = maddr_file.read_text().split()
        process.peer_id = self.initial_peers[0].rsplit("/p2p/", 1)[-1]
        return self.initial_peers

    def start_node(
        self,
        model: str | None,
        blocks: str | None,
        *extra: str,
        wait: bool = True,
        timeout: float = 120.0,
        name: str | None = None,
    ) -> ManagedProcess:
        """Start `swarm node` on `blocks` ("A:B"; None: --num-blocks or --config in `extra`) with `model`
        (None: in --config); wait until it serves."""
        name = name or f"node{len([p for p in self.processes if p.name.startswith('node')])}"
        where = ["--blocks", blocks] if blocks is not None else []
        which = ["--model", model] if model is not None else []
        args = ["node", *which, *where, "--initial-peers", *self.initial_peers, *extra]
        process = self._spawn(name, args)
        if wait:
            self.wait_ready(process, timeout)
        return process

    def start_training_node(
        self,
        run_file: str | os.PathLike,
        stage: int | None,
        *extra: str,
        wait: bool = True,
        timeout: float = 120.0,
    ) -> ManagedProcess:
        """Start `swarm node --train RUN_FILE [--stage I]`; wait until it serves its stage."""
        name = f"stage{stage if stage is not None else 'X'}-{len(self.processes)}"
        run = str(run_file)
        where = ["--stage", str(stage)] if stage is not None else []
        args = ["node", "--train", run, *where, "--initial-peers", *self.initial_peers, *extra]
        process = self._spawn(name, args)
        if wait:
            self.wait_ready(process, timeout)
        return process

    def start_gateway(self, model: str, *extra: str, timeout: float = 120.0) -> ManagedProcess:
        """Start `swarm gateway` on a free port of 127.0.0.1; wait until it serves. Its address
        ("127.0.0.1:PORT") is in the returned process's `address`."""
        name = f"gateway{len([p for p in self.processes if p.name.startswith('gateway')])}"
        args = ["gateway", "--model", model, "--port", "0", "--initial-peers", *self.initial_peers, *extra]
        process = self._spawn(name, args)
        match = process.wait_for(_GATEWAY_RE, timeout)
        process.address = f"{match.group(2)}:{match.group(3)}"
        return process

    def start_api(self, models: list[str], *extra: str, timeout: float = 120.0) -> ManagedProcess:
        """Start `swarm api` for `models` on a free port of 127.0.0.1; wait until it serves. Its base URL
        ("http://127.0.0.1:PORT/v1") is in the returned process's `address`."""
        name = f"api{len([p for p in self.processes if p.name.startswith('api')])}"
        model_args = [arg for model in models for arg in ("--model", model)]
        args = ["api", *model_args, "--port", "0", "--initial-peers", *self.initial_peers, *extra]
        process = self._spawn(name, args)
        process.address = process.wait_for(_API_RE, timeout).group(1)
        return process

    def start_nodes(self, model: str, spans: list[str], *extra: str, timeout: float = 300.0):
        """Start several nodes at once (they load in parallel), then wait for each."""
        processes = [self.start_node(model, span, *extra, wait=False) for span in spans]
        for process in processes:
            self.wait_ready(process, timeout)
        return processes

    @staticmethod
    def wait_ready(process: ManagedProcess, timeout: float = 120.0) -> ManagedProcess:
        match = process.wait_for(_READY_RE, timeout)
        process.peer_id = match.group(1)
        process.span = (int(match.group(2)), int(match.group(3)))
        return process

    def close(self) -> None:
        for process in self.processes:  # all at once: each node spends a moment announcing OFFLINE
            if process.alive():
                process.popen.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            process.terminate()
        self.processes.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def split_blocks(num_blocks: int, num_nodes: int) -> list[str]:
    """Contiguous "A:B" spans that split `num_blocks` as evenly as possible between `num_nodes`."""
    if not 0 < num_nodes <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks between {num_nodes} nodes")
    bounds = [round(i * num_blocks / num_nodes) for i in range(num_nodes + 1)]
    return [f"{start}:{end}" for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
