"""`swarm dht`: run a bootstrap peer that others join through (and, by default, a relay for NAT'ed peers)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from swarm.cli.common import add_announce_maddrs, add_relay_service, relay_limits
from swarm.utils.files import write_lines_atomically

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("dht", help="run a DHT bootstrap peer")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free port)")
    parser.add_argument(
        "--initial-peers", nargs="*", default=[], metavar="MADDR", help="other bootstrap peers"
    )
    add_announce_maddrs(parser)
    parser.add_argument("--maddr-file", default=None, help="write the full multiaddrs here, one per line")
    parser.add_argument(
        "--identity", default=None, help="file with this peer's identity (created if missing)"
    )
    add_relay_service(parser, default=True)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from swarm.utils.aio import run as run_event_loop

    try:
        limits = relay_limits(args)
    except ValueError as e:
        print(f"swarm dht: error: {e}", file=sys.stderr)
        return 2
    return run_event_loop(_serve(args, limits))


async def _serve(args: argparse.Namespace, limits) -> int:
    from swarm.dht.factory import create_dht
    from swarm.dht.reachability import DialBackServicer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    dht, _ = create_dht(
        args.initial_peers,
        host=args.host,
        port=args.port,
        identity_path=args.identity,
        announce_maddrs=args.announce_maddrs,
        relay_service=limits,
    )
    p2p = dial_back = None
    try:
        # joining peers ask a bootstrap peer whether it can dial them back (swarm.dht.reachability)
        p2p = await dht.replicate_p2p()
        dial_back = DialBackServicer(p2p, relay_service=limits is not None)
        await dial_back.add_p2p_handlers(p2p)
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        if args.maddr_file:  # before printing: whoever reads stdout may look for the file next
            write_lines_atomically(args.maddr_file, maddrs)
        for maddr in maddrs:
            print(maddr, flush=True)
        relaying = "relaying for peers behind NAT" if limits is not None else "no relay service"
        logger.info(
            "bootstrap peer %s is up (%s); join with --initial-peers %s",
            dht.peer_id,
            relaying,
            " ".join(maddrs),
        )
        await stop.wait()
    finally:
        if dial_back is not None:
            await dial_back.remove_p2p_handlers(p2p)
        if p2p is not None:
            await p2p.shutdown()
        dht.shutdown()
    return 0
