"""Regenerate the Python code of the cdul.v1 API from the .proto files under src/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent / "src"
PROTOS = sorted(SRC.glob("cdul_proto/**/*.proto"))


def generate(out_dir: Path) -> None:
    """Run protoc with the grpc plugin, writing *_pb2.py, *_pb2.pyi and *_pb2_grpc.py.

    The .proto files sit at their package path under src/, so the generated modules import
    each other as ``cdul_proto.v1...`` with no rewriting.
    """
    from grpc_tools import protoc  # imported here: grpcio-tools is a code-generation extra

    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{SRC}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(SRC)) for p in PROTOS),
    ]
    # protoc resolves the relative .proto names against the -I roots.
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with exit status {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=SRC,
        help="folder to write the generated package tree into (default: proto/src)",
    )
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
