"""`swarm node`: serve a span of a model's blocks."""

from __future__ import annotations

import argparse
import sys

from swarm.cli.common import (
    add_announce_maddrs,
    add_cache_dir,
    add_initial_peers,
    add_metrics,
    add_relay_service,
    relay_limits,
)
from swarm.cli.config_file import add_config_arguments, print_config
from swarm.dht.records import QUANT_NAMES
from swarm.node.config import (
    AUTO,
    DTYPE_NAMES,
    MAX_MEMORY_FRACTION,
    NodeConfig,
    parse_blocks,
    parse_memory,
    parse_num_blocks,
)
from swarm.node.limits import NodeLimits
from swarm.testing.faults import SERVING_NODE, TRAINING_NODE, FaultError, add_fault_argument, fault_for

_DEFAULTS = NodeConfig(model="")
_LIMITS = NodeLimits()


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("node", help="serve a span of a model's transformer blocks")
    configure(parser)
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="built-in name, HF checkpoint folder or .gguf file (with --train: the run file's model)",
    )
    parser.add_argument(
        "--model-name", default=None, help="name in the DHT (default: built-in name or folder name)"
    )
    add_initial_peers(parser, required=False)
    # one of them is required, on the command line or in --config (checked in run)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--blocks", type=_blocks, help="span of blocks to serve, START:END")
    where.add_argument(
        "--train",
        metavar="RUN_FILE",
        help="train a stage of the run described by this file (from `swarm run init`) instead of serving",
    )
    where.add_argument(
        "--num-blocks",
        type=_num_blocks,
        help="serve this many blocks where the swarm needs them most (and rebalance); 'auto': as many as "
        "fit in --max-memory, counting each block as loaded (with --quant) plus its KV cache",
    )
    parser.add_argument(
        "--stage",
        type=int,
        default=None,
        help="with --train: the stage to serve (default: the stage with the least throughput)",
    )
    parser.add_argument(
        "--balance-period",
        type=float,
        default=_DEFAULTS.balance_period,
        help="seconds between rebalancing checks, randomized by +-50%% (with --num-blocks; with --train, a "
        "peer of the strongest stage moves to the weakest)",
    )
    parser.add_argument(
        "--balance-quality",
        type=float,
        default=_DEFAULTS.balance_quality,
        help="move when bottleneck now / bottleneck after moving is below this (0 disables)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="with --train: save this node's stage state into this folder every --checkpoint-every steps, "
        "and restore a lost stage from it (instead of rebuilding it from the neighbouring stages)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="with --checkpoint-dir: steps between checkpoints (default: 50)",
    )
    parser.add_argument("--device", default=_DEFAULTS.device, help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=_DEFAULTS.dtype, choices=DTYPE_NAMES)
    parser.add_argument(
        "--quant",
        default=_DEFAULTS.quant,
        choices=QUANT_NAMES,
        help="weights of the blocks' linear layers: none (the --dtype's), int8 (LLM.int8(), about 0.3x of "
        "float32) or nf4 (4-bit NormalFloat); int8 and nf4 need bitsandbytes (pip install 'swarm[quant]')",
    )
    parser.add_argument(
        "--max-memory",
        type=_memory,
        default=_DEFAULTS.max_memory,
        help="with --num-blocks auto: memory the blocks may take, e.g. 2GB or 512MB (default: "
        f"{int(MAX_MEMORY_FRACTION * 100)}%% of the free RAM, or of the free GPU memory with --device cuda)",
    )
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.deterministic,
        help="pin bit-reproducible kernels (1 CPU thread, deterministic algorithms, no TF32, sdpa attention) "
        "and announce the profile, so refereed verification can compare this node's outputs bit for bit "
        "(default: on for float32 on CPU, off otherwise)",
    )
    parser.add_argument(
        "--num-threads",
        type=_positive_int,
        default=_DEFAULTS.num_threads,
        help="torch intra-op threads for this node's compute (default: 1 with --deterministic, else one per "
        "core); on a machine shared by several nodes, give each a share of the cores",
    )
    parser.add_argument("--host", default=_DEFAULTS.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=_DEFAULTS.port, help="TCP port (0: any free port)")
    add_announce_maddrs(parser)
    parser.add_argument(
        "--use-relay",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.use_relay,
        help="when no one can dial this node (behind NAT), reserve a slot on a bootstrap peer and be reached "
        "through it (default: %(default)s)",
    )
    add_relay_service(parser, default=_DEFAULTS.relay_service is not None)
    parser.add_argument(
        "--identity", default=None, help="file with this node's identity (created if missing)"
    )
    parser.add_argument(
        "--update-period",
        type=float,
        default=_DEFAULTS.update_period,
        help="seconds between DHT announcements; records expire after twice that",
    )
    parser.add_argument(
        "--throughput", type=float, default=None, help="announce this throughput, don't measure"
    )
    parser.add_argument("--max-batch-size", type=int, default=_LIMITS.max_batch_size)
    parser.add_argument("--max-sequence-length", type=int, default=_LIMITS.max_sequence_length)
    parser.add_argument("--max-request-mb", type=float, default=_LIMITS.max_request_bytes / 2**20)
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=_LIMITS.request_timeout,
        help="seconds a single request may take",
    )
    parser.add_argument(
        "--cache-tokens",
        type=int,
        default=_LIMITS.cache_tokens,
        help="KV-cache budget: this many tokens over the whole span, counted in the bytes sessions "
        "preallocate (batch x max_length x the bytes a token takes in the layers each one uses)",
    )
    parser.add_argument(
        "--batch-decode",
        type=int,
        nargs="?",
        const=8,
        default=_LIMITS.decode_batch,
        metavar="SESSIONS",
        help="run waiting one-token steps of up to SESSIONS inference sessions (8 if not given) as one "
        "call: more tokens/s with many clients; outputs may differ from a step alone in the last bits "
        "(the matmuls' batch size), so it is off (1) by default",
    )
    parser.add_argument(
        "--session-timeout",
        type=float,
        default=_LIMITS.session_timeout,
        help="seconds an inference session may stay idle before its cache is freed",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=_LIMITS.max_sessions,
        help="open inference sessions, all peers together",
    )
    parser.add_argument("--max-sessions-per-peer", type=int, default=_LIMITS.max_sessions_per_peer)
    parser.add_argument(
        "--max-streams",
        type=int,
        default=_LIMITS.max_streams,
        help="streamed forward/backward calls in progress, all peers together",
    )
    parser.add_argument("--max-streams-per-peer", type=int, default=_LIMITS.max_streams_per_peer)
    parser.add_argument(
        "--max-buffered-mb",
        type=float,
        default=_LIMITS.max_buffered_bytes / 2**20,
        help="request bytes held across all streams at once",
    )
    parser.add_argument(
        "--stream-message-timeout",
        type=float,
        default=_LIMITS.stream_message_timeout,
        help="seconds a request stream may go without a complete message before it is dropped",
    )
    add_metrics(parser, _DEFAULTS.metrics_port, _DEFAULTS.metrics_host)
    add_cache_dir(parser)
    add_config_arguments(parser)
    add_fault_argument(parser)
    parser.set_defaults(func=run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _blocks(text: str) -> tuple[int, int]:
    try:
        return parse_blocks(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _num_blocks(text: str) -> int | str:
    try:
        return parse_num_blocks(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _memory(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    limits = NodeLimits(
        max_batch_size=args.max_batch_size,
        max_sequence_length=args.max_sequence_length,
        max_request_bytes=int(args.max_request_mb * 2**20),
        request_timeout=args.request_timeout,
        cache_tokens=args.cache_tokens,
        session_timeout=args.session_timeout,
        max_sessions=args.max_sessions,
        max_sessions_per_peer=args.max_sessions_per_peer,
        max_streams=args.max_streams,
        max_streams_per_peer=args.max_streams_per_peer,
        max_buffered_bytes=int(args.max_buffered_mb * 2**20),
        stream_message_timeout=args.stream_message_timeout,
        decode_batch=args.batch_decode,
    )
    return NodeConfig(
        model=args.model,
        blocks=args.blocks,
        initial_peers=args.initial_peers,
        model_name=args.model_name,
        device=args.device,
        dtype=args.dtype,
        host=args.host,
        port=args.port,
        announce_maddrs=args.announce_maddrs,
        identity_path=args.identity,
        update_period=args.update_period,
        cache_dir=args.cache_dir,
        throughput=args.throughput,
        num_blocks=args.num_blocks,
        quant=args.quant,
        max_memory=args.max_memory,
        balance_period=args.balance_period,
        balance_quality=args.balance_quality,
        limits=limits,
        deterministic=args.deterministic,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        num_threads=args.num_threads,
        use_relay=args.use_relay,
        relay_service=relay_limits(args),
    )


def _usage_error(message: str) -> None:
    print(f"swarm node: error: {message}", file=sys.stderr)
    raise SystemExit(2)  # as argparse exits on a usage error


def _fault(args: argparse.Namespace):
    """The --fault, if any, refused unless this kind of node calls the hooks it uses."""
    if args.fault is None:
        return None
    try:
        return fault_for(args.fault, TRAINING_NODE if args.train is not None else SERVING_NODE)
    except FaultError as e:
        _usage_error(str(e))


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        print_config(args._config_parser, args)
        return 0
    if args.blocks is None and args.train is None and args.num_blocks is None:
        _usage_error("one of --blocks, --train or --num-blocks is required (as a flag or in --config)")
    if args.stage is not None and args.train is None:
        _usage_error("--stage needs --train RUN_FILE")
    if args.checkpoint_dir is not None and args.train is None:
        _usage_error("--checkpoint-dir needs --train RUN_FILE")
    if args.checkpoint_every is not None and args.checkpoint_dir is None:
        _usage_error("--checkpoint-every needs --checkpoint-dir")
    if args.quant != "none" and args.train is not None:
        _usage_error("--quant is for serving; --train trains the blocks in --dtype")
    if args.max_memory is not None and args.num_blocks != AUTO:
        _usage_error("--max-memory needs --num-blocks auto")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        _usage_error(f"--checkpoint-every must be positive, got {args.checkpoint_every}")
    fault = _fault(args)
    if args.train is not None:
        from swarm.training.node import DEFAULT_CHECKPOINT_EVERY, TrainingNode
        from swarm.training.run import load_run

        run = load_run(args.train)
        args.model = args.model or run.config.model.source
        every = args.checkpoint_every or DEFAULT_CHECKPOINT_EVERY
        TrainingNode(config_from_args(args), run, args.stage, fault, args.checkpoint_dir, every).run()
        return 0
    if args.model is None:
        _usage_error("--model is required (unless --train gives the run's model)")
    from swarm.node.server import Node

    try:
        Node(config_from_args(args), fault).run()
    except FaultError as e:  # e.g. a perturbed block outside the span: say so, without a traceback
        print(f"swarm node: error: {e}", file=sys.stderr)
        return 1
    return 0
