"""Flags and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def setup_logging(verbose: bool = False) -> None:
    """Logs go to stderr so that stdout carries only a command's answer."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # hivemind is chatty at INFO; keep its warnings
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")


def add_initial_peers(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        default=[],
        required=required,
        metavar="MADDR",
        help="multiaddrs of peers already in the swarm (e.g. a bootstrap peer's /ip4/.../p2p/...)",
    )


def add_wait_for_blocks(parser: argparse.ArgumentParser) -> None:
    from swarm.client.config import ClientConfig

    parser.add_argument(
        "--wait-for-blocks",
        type=float,
        default=ClientConfig.wait_for_blocks,
        metavar="SECONDS",
        help="how long a request waits for blocks no node serves to appear before it fails as unavailable "
        "(default: %(default)s)",
    )


def check_wait_for_blocks(args: argparse.Namespace) -> None:
    if not args.wait_for_blocks >= 0:
        raise ValueError(f"--wait-for-blocks must be >= 0, got {args.wait_for_blocks}")


def add_announce_maddrs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--announce-maddrs",
        nargs="+",
        default=[],
        metavar="MADDR",
        help="addresses peers should dial instead of --host/--port (port forwarding, NAT, a relay), "
        "e.g. /ip4/203.0.113.7/tcp/31337",
    )


def add_swarm_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--swarm-key",
        default=None,
        metavar="FILE",
        help="the private swarm's key file (from `swarm keys init`; default: $SWARM_KEY_FILE): every peer, "
        "bootstrap peer and client of a private swarm needs it; without it the swarm is public",
    )


def apply_swarm_key(args: argparse.Namespace) -> None:
    """Check --swarm-key and hand it to every peer this process (and its children) create, via
    $SWARM_KEY_FILE, which swarm.dht.factory.create_dht reads."""
    from swarm.access import SWARM_KEY_ENV, load_keyring

    path = getattr(args, "swarm_key", None)
    if path is None:
        return
    path = os.path.abspath(path)
    load_keyring(path)  # a missing or malformed file fails here, with its name, before anything starts
    os.environ[SWARM_KEY_ENV] = path


def add_metrics(parser: argparse.ArgumentParser, port: int | None = None, host: str = "127.0.0.1") -> None:
    """--metrics-port and --metrics-host, with the caller's defaults (a node's come from NodeConfig)."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=port,
        help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (0: any free port; default: off)",
    )
    parser.add_argument("--metrics-host", default=host, help="address of the metrics page")


def add_prompts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts",
        default=None,
        metavar="PATH",
        help="trained prompts (a file from model.save_prompts) put in front of every generation's tokens",
    )


def add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where built-in models are converted (default: $SWARM_CACHE or ~/.cache/swarm)",
    )


def not_implemented(title: str):
    """A subcommand whose issue has not landed: fail loudly, never silently."""

    def run(args: argparse.Namespace) -> int:
        print(f"not implemented yet (issue: {title})", file=sys.stderr)
        return 2

    return run


def add_relay_service(parser: argparse.ArgumentParser, default: bool) -> None:
    """--relay-service and its caps: serve as a circuit relay for peers behind NAT (swarm.dht.relay)."""
    from swarm.dht.relay_limits import RelayLimits

    limits = RelayLimits()
    parser.add_argument(
        "--relay-service",
        action=argparse.BooleanOptionalAction,
        default=default,
        help="relay connections to peers behind NAT that reserve a slot here (declares this peer publicly "
        "reachable; default: %(default)s)",
    )
    parser.add_argument(
        "--relay-max-reservations", type=int, default=limits.max_reservations, help="relay slots held at once"
    )
    parser.add_argument(
        "--relay-max-circuits",
        type=int,
        default=limits.max_circuits,
        help="relayed connections open at once, per peer",
    )
    parser.add_argument(
        "--relay-data-limit-mb",
        type=float,
        default=limits.data_limit / 2**20,
        help="MiB one relayed connection may carry each way before it is closed (the client dials again)",
    )
    parser.add_argument(
        "--relay-time-limit",
        type=float,
        default=limits.time_limit,
        help="seconds one relayed connection may last before it is closed (the client dials again)",
    )


def relay_limits(args: argparse.Namespace):
    """The RelayLimits of --relay-service's flags (checked), or None without --relay-service."""
    from swarm.dht.relay_limits import RelayLimits

    if not args.relay_service:
        return None
    limits = RelayLimits(
        max_reservations=args.relay_max_reservations,
        max_circuits=args.relay_max_circuits,
        data_limit=int(args.relay_data_limit_mb * 2**20),
        time_limit=args.relay_time_limit,
    )
    limits.daemon_flags()  # raises ValueError on a cap that is not positive
    return limits
