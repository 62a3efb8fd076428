"""`swarm keys init|rotate`: make and rotate the key of a private swarm."""

from __future__ import annotations

import argparse
import datetime

DEFAULT_GRACE = 3600.0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("keys", help="make or rotate a private swarm's key (swarm.key)")
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="make a new swarm key; start every peer of the swarm with --swarm-key")
    init.add_argument("--out", default="swarm.key", help="where to write it (must not exist)")
    init.set_defaults(func=run_init)
    rotate = sub.add_parser(
        "rotate",
        help="replace the key by a new one; members that get the new file switch at once (running peers "
        "re-read it), the old key stays accepted for --grace seconds, then whoever holds only it is out",
    )
    rotate.add_argument("--key", default="swarm.key", help="the swarm's key file, rewritten in place")
    rotate.add_argument("--out", default=None, help="write the rotated file here instead of over --key")
    rotate.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        help="seconds the old key stays accepted (longer than it takes to hand the new file to every member)",
    )
    rotate.set_defaults(func=run_rotate)
    return parser


def run_init(args: argparse.Namespace) -> int:
    from swarm.access import create_key_file

    create_key_file(args.out)
    print(f"wrote a new swarm key to {args.out}; start every peer of this swarm with --swarm-key {args.out}")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    from swarm.access import rotate_key_file

    keys = rotate_key_file(args.key, args.grace, out=args.out)
    until = datetime.datetime.fromtimestamp(keys.previous_until, datetime.UTC).isoformat(timespec="seconds")
    print(
        f"rotated the swarm key in {args.out or args.key}; the old key is accepted until {until} "
        "(hand the new file to every member before then)"
    )
    return 0
