"""`swarm dht`: run a bootstrap peer that others join through."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from swarm.cli.common import add_announce_maddrs
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
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from swarm.dht.factory import create_dht

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    dht, _ = create_dht(
        args.initial_peers,
        host=args.host,
        port=args.port,
        identity_path=args.identity,
        announce_maddrs=args.announce_maddrs,
    )
    try:
        maddrs = [str(m) for m in dht.get_visible_maddrs()]
        if args.maddr_file:  # before printing: whoever reads stdout may look for the file next
            write_lines_atomically(args.maddr_file, maddrs)
        for maddr in maddrs:
            print(maddr, flush=True)
        logger.info("bootstrap peer %s is up; join with --initial-peers %s", dht.peer_id, " ".join(maddrs))
        stop.wait()
    finally:
        dht.shutdown()
    return 0
