"""Start `swarm ...` child processes by forking one that has already imported torch, transformers and
hivemind.

A local swarm starts many short-lived peers, and each fresh interpreter spends ~3.5 s of CPU importing the
same libraries before it does anything (most of the test suite's CPU, on 2 cores). The fork server pays that
once: it imports everything, then forks a child per request, which runs `swarm.cli.main.main(argv)` as a
fresh process would. The server reaps its children and passes each one's exit code through a pipe whose
read end it handed to the process that asked (over the Unix socket between them), so that process can wait
for the child, signal it and read its exit code as it would a child of its own.

Only settings read at import time must match between the server and the child (OpenMP's, hivemind's log
level...): a request whose environment changes one of them is refused, and the caller starts a fresh
interpreter instead.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
# what the libraries read once, when imported or loaded: a child that needs other values starts afresh
IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "HIVEMIND_", "PYTHON", "LD_", "CUDA", "TORCH", "HF_")
IMPORT_TIME_NAMES = ("TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "PATH")
PRELOAD = ("swarm.cli.main", "swarm.node.server", "swarm.training.node")
START_TIMEOUT = 120.0
REQUEST_TIMEOUT = 30.0


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    """The part of `env` that the preloaded libraries have already read in the server."""
    return {
        name: value
        for name, value in env.items()
        if name.startswith(IMPORT_TIME_PREFIXES) or name in IMPORT_TIME_NAMES
    }


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value) == 0
    except OSError:
        return False


def _send(sock: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def _receive(sock: socket.socket) -> dict | None:
    header = _read_exactly(sock, 4)
    if header is None:
        return None
    data = _read_exactly(sock, struct.unpack("!I", header)[0])
    return None if data is None else json.loads(data)


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class ForkedProcess:
    """A child started by the fork server: what `ManagedProcess` uses of `subprocess.Popen`. Its exit code
    arrives on `status_fd` (4 bytes, written by the server when it reaps the child)."""

    def __init__(self, pid: int, args: list[str], status_fd: int):
        self.pid, self.args, self._status_fd = pid, args, status_fd
        self.returncode: int | None = None

    def _read_status(self, timeout: float) -> None:
        if self.returncode is not None:
            return
        readable, _, _ = select.select([self._status_fd], [], [], timeout)
        if not readable:
            return
        data = os.read(self._status_fd, 4)
        # no status but end of file: the server died before it could reap the child (its own death took it)
        self.returncode = struct.unpack("!i", data)[0] if len(data) == 4 else -signal.SIGKILL
        os.close(self._status_fd)

    def poll(self) -> int | None:
        self._read_status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_status(min(left, 1.0))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def __del__(self) -> None:
        if self.returncode is None:
            try:
                os.close(self._status_fd)
            except OSError:
                pass


class ForkServer:
    """A process that has imported the heavy libraries once and forks `swarm` children on request."""

    def __init__(self, env: dict[str, str]):
        self.env = dict(env)
        parent_end, server_end = socket.socketpair()
        self._sock = parent_end
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from swarm.local.forkserver import serve; serve({server_end.fileno()})"],
            pass_fds=(server_end.fileno(),),
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        server_end.close()
        self._sock.settimeout(START_TIMEOUT)
        ready = _receive(self._sock)
        if ready != {"ready": True}:
            self.close()
            raise RuntimeError(f"the fork server did not start: {ready}")

    def serves(self, env: dict[str, str]) -> bool:
        return self.process.poll() is None and import_time_env(env) == import_time_env(self.env)

    def spawn(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str],
        cwd: str,
        stderr_path: Path | None = None,
        stdin_path: Path | None = None,
    ) -> ForkedProcess:
        """Fork `swarm *args` with stdout appended to `log_path`, stderr too unless `stderr_path` is given,
        and stdin read from `stdin_path` (default: empty)."""
        request = {
            "argv": args,
            "stdout": str(log_path),
            "stderr": str(stderr_path or log_path),
            "stdin": str(stdin_path or os.devnull),
            "env": env,
            "cwd": cwd,
        }
        with self._lock:
            try:
                self._sock.settimeout(REQUEST_TIMEOUT)
                _send(self._sock, request)
                message, fds, _, _ = socket.recv_fds(self._sock, 4096, 1)
            except OSError as e:  # timeouts included
                # it may still fork this child, and its next reply would answer the wrong request: stop it
                # (its children die with it) before the caller starts the child afresh
                self.close()
                raise RuntimeError(f"the fork server did not answer: {e!r}") from e
        if len(fds) != 1 or len(message) < 4 or len(message) != 4 + struct.unpack("!I", message[:4])[0]:
            for fd in fds:
                os.close(fd)
            raise RuntimeError(f"the fork server could not start {args}: {message!r}")
        return ForkedProcess(json.loads(message[4:])["pid"], args, fds[0])

    def close(self) -> None:
        self._sock.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


_servers: dict[str, ForkServer] = {}
_servers_lock = threading.Lock()


def fork_server_for(env: dict[str, str]) -> ForkServer | None:
    """The fork server for children with this environment (started on first use), or None where there
    can be none (not Linux, SWARM_LOCAL_FORK=0, or it failed to start: callers then start afresh)."""
    if os.environ.get("SWARM_LOCAL_FORK", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    key = json.dumps(import_time_env(env), sort_keys=True)
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and server.serves(env):
            return server
        try:
            server = _servers[key] = ForkServer(env)
        except (OSError, RuntimeError, TimeoutError):
            return None
        return server


def close_fork_servers() -> None:
    with _servers_lock:
        for server in _servers.values():
            server.close()
        _servers.clear()


# ---- the server process ---------------------------------------------------------------------------------


def _run_child(request: dict) -> None:
    """In the forked child: become a fresh `swarm` process, then exit the way the interpreter would."""
    os.setsid()
    for fd, path, flags in (
        (0, request["stdin"], os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT),
        (2, request["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT),
    ):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _reseed()
    _own_process_locks()
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["swarm", *request["argv"]]
    # its command line stays the server's; the name `ps -o comm` and psutil's name() show says what it is
    _set_name(" ".join(sys.argv[:2]))
    from swarm.cli.main import main

    sys.exit(main(request["argv"]))


def _set_name(name: str) -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except OSError:
        pass


def _own_process_locks() -> None:
    """Give the child its own copies of the cross-process locks hivemind creates at import. Inherited from
    the server, one semaphore would be every child's: a peer killed while it held one (the suite's churn
    tests kill peers) left every peer started after it blocked in MPFuture._send_update for good."""
    import multiprocessing

    from hivemind.utils.asyncio import _AsyncContextWrapper
    from hivemind.utils.mpfuture import MPFuture

    MPFuture.reset_backend()  # its update and initialization locks, and SharedBytes'
    _AsyncContextWrapper.EXECUTOR_LOCK = multiprocessing.Lock()


def _reseed() -> None:
    # forked children would otherwise draw the same numbers (Python's own `random` reseeds itself at fork)
    import numpy
    import torch

    seed = int.from_bytes(os.urandom(4), "little")
    numpy.random.seed(seed)
    torch.manual_seed(seed)


_status_pipes: dict[int, int] = {}  # in the server: child pid -> the write end of its status pipe


def _reap_children(*_) -> None:
    """SIGCHLD: reap every child that exited and write its exit code into its status pipe."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = _status_pipes.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, struct.pack("!i", os.waitstatus_to_exitcode(status)))
            finally:
                os.close(fd)


def _serve(sock: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, _reap_children)
    while True:
        request = _receive(sock)
        if request is None:
            return  # the parent is gone
        status_read, status_write = os.pipe()
        # until the pipe is registered: a child that exits at once must still find it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:
                sock.close()
                for fd in (status_read, status_write, *_status_pipes.values()):
                    os.close(fd)
                _status_pipes.clear()
                _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                _run_child(request)
            _status_pipes[pid] = status_write
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        reply = json.dumps({"pid": pid}).encode()
        socket.send_fds(sock, [struct.pack("!I", len(reply)) + reply], [status_read])
        os.close(status_read)


def serve(fd: int) -> None:
    """The fork server's main: import, say ready on socket `fd`, then fork a child per request."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent closes us
    sock = socket.socket(fileno=fd)
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    sock.settimeout(None)
    _send(sock, {"ready": True})
    _serve(sock)
