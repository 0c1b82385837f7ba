"""Regenerates cluster/api/m1serve_pb2.py, m1serve_pb2_grpc.py and m1serve_pb2.pyi from m1serve.proto.

    python -m cluster.api.gen_proto        (needs grpcio-tools; run it from anywhere)

The proto is compiled with the repository root as include path, so the generated _pb2_grpc module imports
`from cluster.api import m1serve_pb2` and works wherever the `cluster` package is importable (the Ray Serve gRPC
proxy actor included). Keep grpcio-tools <= the installed grpcio: the generated code checks GRPC_GENERATED_VERSION.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "cluster/api/m1serve.proto"


def main() -> int:
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{well_known}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", str(ROOT / PROTO)]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed ({rc})", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
