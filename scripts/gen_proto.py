"""Compile proto/*.proto into swarm/proto/*_pb2.py (the generated files are committed)."""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "swarm" / "proto"


def hivemind_proto_dir() -> Path:
    import importlib.util

    # hivemind.proto is a namespace package (no __init__), so locate it through one of its modules
    return Path(importlib.util.find_spec("hivemind.proto.runtime_pb2").origin).parent


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over proto/ into out_dir; point imports of hivemind's messages at hivemind.proto."""
    from grpc_tools import protoc

    sources = sorted(PROTO_DIR.glob("*.proto"))
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{hivemind_proto_dir()}", f"--python_out={out_dir}"]
    args += [str(p) for p in sources]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    # gRPC stubs for the files that declare a service (the gateway); the P2P protocol uses hivemind's RPC
    services = [p for p in sources if re.search(r"^service ", p.read_text(), flags=re.M)]
    grpc_args = ["protoc", f"-I{PROTO_DIR}", f"-I{hivemind_proto_dir()}", f"--grpc_python_out={out_dir}"]
    if services and protoc.main(grpc_args + [str(p) for p in services]) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(grpc_args)}")
    outputs = []
    for generated in [out_dir / f"{p.stem}_pb2.py" for p in sources] + [
        out_dir / f"{p.stem}_pb2_grpc.py" for p in services
    ]:
        text = generated.read_text()
        # protoc writes `import runtime_pb2`; hivemind's module lives in the hivemind.proto package
        text = re.sub(
            r"^import runtime_pb2 as", "from hivemind.proto import runtime_pb2 as", text, flags=re.M
        )
        # and `import gateway_pb2` in the stubs: ours live in the swarm.proto package
        text = re.sub(r"^import (\w+_pb2) as", r"from swarm.proto import \1 as", text, flags=re.M)
        generated.write_text(text)
        outputs.append(generated)
    return outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed files are stale")
    args = parser.parse_args()
    if not args.check:
        for path in generate(OUT_DIR):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [p.name for p in generate(Path(tmp)) if p.read_text() != (OUT_DIR / p.name).read_text()]
    if stale:
        print(f"stale generated files: {stale}; run `make proto`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
