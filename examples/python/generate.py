#!/usr/bin/env python3
"""Generates the Python gRPC stubs of Tether from proto/ with grpcio-tools.

It runs `python3 -m grpc_tools.protoc` (grpcio-tools bundles protoc, so no
system protoc is needed) and writes `tether/v1/tether_pb2.py`,
`tether_pb2_grpc.py` and `tether_pb2.pyi` under the output directory. Put
that directory on `sys.path` and import `tether.v1.tether_pb2`;
`tether_client.py --stubs DIR` does this.

    python3 examples/python/generate.py                 # into examples/python/generated
    python3 examples/python/generate.py --out /tmp/stubs
"""

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_OUT = HERE / "generated"
DEFAULT_PROTO_ROOT = REPO / "proto"
PROTO = "tether/v1/tether.proto"
INSTALL_HINT = "python3 -m pip install -r examples/python/requirements.txt"


def generate(out: Path, proto_root: Path = DEFAULT_PROTO_ROOT) -> None:
    """Writes the stubs of proto_root/tether/v1/tether.proto under out."""
    try:
        import grpc_tools  # noqa: F401  (only checks that it is installed)
    except ImportError:
        raise SystemExit(f"generate.py: grpcio-tools is not installed; run `{INSTALL_HINT}`")
    if not (proto_root / PROTO).is_file():
        raise SystemExit(f"generate.py: {proto_root / PROTO} not found; pass --proto-root")
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        PROTO,
    ]
    # protoc resolves the proto path against -I, so the working directory
    # does not matter; protoc prints its own errors.
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SystemExit(f"generate.py: protoc failed (exit {result.returncode})")
    print(f"generated the Tether stubs in {out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"where to write the stubs (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--proto-root",
        type=Path,
        default=DEFAULT_PROTO_ROOT,
        help=f"the directory holding {PROTO} (default: {DEFAULT_PROTO_ROOT})",
    )
    args = parser.parse_args()
    generate(args.out.resolve(), args.proto_root.resolve())


if __name__ == "__main__":
    main()
