"""Stream text from `swarm gateway` over gRPC: what a client in any language does with proto/gateway.proto.

swarm gateway --model smollm2-135m-instruct --initial-peers MADDR --port 50051 &
python examples/gateway_client.py --address 127.0.0.1:50051 "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import sys

import grpc

from swarm.proto import gateway_pb2, gateway_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prompt")
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--health", action="store_true", help="print the swarm map first")
    args = parser.parse_args()

    with grpc.insecure_channel(args.address) as channel:
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        if args.health:
            health = gateway.Health(gateway_pb2.HealthRequest(), timeout=30)
            print(f"{health.model}: {len(health.nodes)} nodes, complete={health.complete}", file=sys.stderr)
        request = gateway_pb2.GenerateRequest(
            prompt=args.prompt, chat=True, max_new_tokens=args.max_new_tokens
        )
        try:
            for message in gateway.Generate(request, timeout=600):
                print(message.text, end="", flush=True)
                if message.finished:
                    print(f"\n[{message.finish_reason}]", file=sys.stderr)
        except grpc.RpcError as e:
            print(f"\ngateway: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
