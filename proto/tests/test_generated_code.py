"""The committed generated code must match what `make proto` generates from the .proto files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PROTO_ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["labeler_pb2.py", "labeler_pb2.pyi", "labeler_pb2_grpc.py"]


def load_generator():
    spec = importlib.util.spec_from_file_location("cdul_proto_generate", PROTO_ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", GENERATED)
def test_committed_code_is_fresh(tmp_path: Path, name: str) -> None:
    load_generator().generate(tmp_path)
    fresh = (tmp_path / "cdul_proto" / "v1" / name).read_text()
    committed = (PROTO_ROOT / "src" / "cdul_proto" / "v1" / name).read_text()
    assert committed == fresh, f"{name} is stale: run `make proto` and commit the result"


def test_service_has_every_rpc() -> None:
    from cdul_proto.v1 import labeler_pb2

    service = labeler_pb2.DESCRIPTOR.services_by_name["Labeler"]
    names = {method.name for method in service.methods}
    assert names == {
        "PseudoLabel",
        "StreamPseudoLabel",
        "Predict",
        "StreamPredict",
        "SearchCrops",
        "ListModels",
        "GetModelInfo",
    }
