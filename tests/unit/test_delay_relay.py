"""The delay relay that emulates latency in the netns harness: bytes intact and in order, delay added."""

import re
import socket
import subprocess
import sys
import threading
import time

import pytest


@pytest.fixture
def echo_server():
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


@pytest.fixture
def relay(echo_server):
    def start(delay_ms: float) -> int:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "swarm.testing.delay_relay",
                "--listen",
                "127.0.0.1:0",
                "--target",
                f"127.0.0.1:{echo_server}",
                "--delay-ms",
                str(delay_ms),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        line = process.stdout.readline()
        return int(re.match(r"relaying 127\.0\.0\.1:(\d+) ", line).group(1))

    processes = []
    yield start
    for process in processes:
        process.terminate()
        assert process.wait(10) == 0  # SIGTERM is a clean stop


def round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        started = time.perf_counter()
        conn.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = conn.recv(1 << 16)
            assert chunk, "relay closed early"
            received += chunk
        return received, time.perf_counter() - started


def test_relay_adds_its_delay_each_way_and_keeps_bytes_in_order(relay):
    port = relay(delay_ms=100)
    payload = bytes(range(256)) * 4096  # 1 MiB: many chunks, which must not each add a delay
    received, elapsed = round_trip(port, payload)
    assert received == payload
    assert elapsed >= 0.2  # 100 ms there and 100 ms back
    small, elapsed = round_trip(port, b"ping")
    assert small == b"ping" and elapsed >= 0.2


def test_relay_with_no_delay_passes_eof(relay, echo_server):
    port = relay(delay_ms=0)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"last words")
        conn.shutdown(socket.SHUT_WR)  # the echo server sees EOF through the relay and closes
        received = b""
        while chunk := conn.recv(1024):
            received += chunk
    assert received == b"last words"


def test_relay_rejects_a_bad_address():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarm.testing.delay_relay",
            "--listen",
            "nowhere",
            "--target",
            "x:1",
            "--delay-ms",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "expected HOST:PORT" in result.stderr
