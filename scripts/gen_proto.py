"""Regenerate the protobuf modules from proto/ (one command: ``./dev proto``).

The output is committed. ``tests/test_generated_proto.py`` runs this script into a
temporary directory and fails when the committed files differ, so edit the .proto
files and rerun this script; never edit the generated files by hand.

Outputs (paths relative to ``--out``, default the repository root):
  trio_jobs/v1/jobs_pb2.py(i)      from proto/trio_jobs/v1/jobs.proto
  trio_jobs/rpc/health_pb2.py(i)   from proto/grpc/health/v1/health.proto
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"

# (source relative to proto/, generated stem relative to the protoc output, destination stem)
TARGETS = [
    ("trio_jobs/v1/jobs.proto", "trio_jobs/v1/jobs_pb2", "trio_jobs/v1/jobs_pb2"),
    ("grpc/health/v1/health.proto", "grpc/health/v1/health_pb2", "trio_jobs/rpc/health_pb2"),
]


def generate(out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # development dependency

    include = Path(grpc_tools.__file__).parent / "_proto"
    mypy_plugin = Path(sys.executable).parent / "protoc-gen-mypy"  # from mypy-protobuf
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for source, _, _ in TARGETS:
            rc = protoc.main(
                [
                    "grpc_tools.protoc",
                    f"-I{PROTO}",
                    f"-I{include}",
                    f"--python_out={tmp}",
                    f"--plugin=protoc-gen-mypy={mypy_plugin}",
                    f"--mypy_out={tmp}",
                    str(PROTO / source),
                ]
            )
            if rc != 0:
                raise SystemExit(f"protoc failed on {source} (exit {rc})")
        for _, generated, dest in TARGETS:
            for suffix in (".py", ".pyi"):
                target = out / (dest + suffix)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(tmp) / (generated + suffix), target)
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
