"""Regenerate service/hasp_authz/proto from proto/ with grpcio-tools.

``make proto`` runs this. The test suite calls ``generate`` into a temporary
folder and compares, so committed code that no longer matches its .proto fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO_ROOT / "proto"
PACKAGE_ROOT = REPO_ROOT / "service"
PROTO_PACKAGE = "hasp_authz/proto"
# Only this file declares a service, so only it gets a _pb2_grpc module.
SERVICE_PROTO = "envoy_service_auth_v3.proto"


def generate(output_root: Path) -> list[Path]:
    """Write the _pb2, .pyi and _pb2_grpc modules under ``output_root``."""
    include = str(Path(protoc.__file__).parent / "_proto")
    sources = sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))
    for source in sources:
        relative = source.relative_to(PROTO_ROOT).as_posix()
        arguments = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={output_root}",
            f"--pyi_out={output_root}",
        ]
        if source.name == SERVICE_PROTO:
            arguments.append(f"--grpc_python_out={output_root}")
        if protoc.main([*arguments, relative]) != 0:
            raise RuntimeError(f"protoc failed on {relative}")
    return sorted((output_root / PROTO_PACKAGE).glob("*_pb2*"))


def main() -> int:
    written = generate(PACKAGE_ROOT)
    for path in written:
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
