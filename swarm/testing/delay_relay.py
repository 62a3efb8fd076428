"""A TCP relay that adds a fixed one-way delay in both directions: latency emulation without sch_netem.

`python -m swarm.testing.delay_relay --listen HOST:PORT --target HOST:PORT --delay-ms 25` accepts
connections on LISTEN, opens one to TARGET for each, and forwards bytes both ways, each chunk held back
until `delay` after it arrived. Order and throughput are kept (chunks queue, the delay does not add up);
a request/response over it takes 2 x delay more. TCP's own handshakes and ACKs are not delayed, so
window-limited bulk throughput over a long fat pipe is not emulated, only the latency a message sees.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

CHUNK_BYTES = 1 << 16


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward reader -> writer, each chunk `delay` seconds after it was read; EOF is passed on in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                queue.put_nowait((loop.time() + delay, chunk))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((loop.time() + delay, b""))

    reading = asyncio.create_task(read())
    try:
        while True:
            due, chunk = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()


async def _serve_connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: float,
) -> None:
    try:
        target_reader, target_writer = await asyncio.wait_for(asyncio.open_connection(*target), 10)
    except (TimeoutError, OSError):
        client_writer.close()
        return
    try:
        await asyncio.gather(
            _pump(client_reader, target_writer, delay), _pump(target_reader, client_writer, delay)
        )
    finally:
        for writer in (client_writer, target_writer):
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    """Relay until cancelled (SIGTERM/SIGINT when run as a program)."""
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(r, w, target, delay), *listen, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        host, port = server.sockets[0].getsockname()[:2]
        print(
            f"relaying {host}:{port} -> {target[0]}:{target[1]} with {delay * 1000:g} ms each way", flush=True
        )
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay, each direction")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    asyncio.run(serve(args.listen, args.target, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
