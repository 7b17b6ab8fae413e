"""Fixtures of the server tests: real servers on port 0 over the tiny exported repository."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from cdul_proto.v1 import labeler_pb2 as pb
from cdul_proto.v1 import labeler_pb2_grpc as pb_grpc
from cdul_server.app import LabelerServer, ServerConfig, create_server

# One ONNX Runtime thread per operator: the test machines are small and shared.
TEST_DEFAULTS: dict[str, Any] = {
    "port": 0,
    "metrics_port": 0,
    "threads": 1,
    "inter_op_threads": 1,
    "decode_workers": 2,
    "grace_s": 5.0,
}

ServerFactory = Callable[..., LabelerServer]


@pytest.fixture(scope="session")
def coco_images(shared_data: Path) -> list[tuple[str, bytes]]:
    """The first 12 coco128 photos as (file name, bytes)."""
    paths = sorted((shared_data / "coco128" / "images").glob("*.jpg"))[:12]
    return [(path.name, path.read_bytes()) for path in paths]


@pytest.fixture(scope="session")
def coco_classes(shared_data: Path) -> list[str]:
    return list(json.loads((shared_data / "coco128" / "classes.json").read_text(encoding="utf-8")))


@pytest.fixture
def server_factory(tiny_model_repository: Path) -> Iterator[ServerFactory]:
    """Start servers with settings over TEST_DEFAULTS; every one is stopped after the test."""
    servers: list[LabelerServer] = []

    def start(**overrides: Any) -> LabelerServer:
        settings = {"models": tiny_model_repository, **TEST_DEFAULTS, **overrides}
        server = create_server(ServerConfig(**settings))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(0.0)


@pytest.fixture(scope="module")
def shared_server(tiny_model_repository: Path) -> Iterator[LabelerServer]:
    """One server with default limits for the tests of a module that do not change settings."""
    server = create_server(ServerConfig(models=tiny_model_repository, **TEST_DEFAULTS))
    yield server
    server.stop(0.0)


def stub_for(server: LabelerServer) -> pb_grpc.LabelerStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return pb_grpc.LabelerStub(channel)


def scrape(server: LabelerServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return str(r.read().decode("utf-8"))


def metric_value(text: str, name: str, **labels: str) -> float:
    """Return the value of one series of a Prometheus text exposition, 0 when absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(3))
    return 0.0


def series_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def pseudo_request(
    images: list[tuple[str, bytes]], classes: list[str], **options: Any
) -> pb.PseudoLabelRequest:
    return pb.PseudoLabelRequest(
        images=[pb.Image(id=name, data=data) for name, data in images],
        vocabulary=pb.Vocabulary(class_names=classes),
        options=pb.PseudoLabelOptions(**options),
    )


@pytest.fixture(scope="session")
def srv() -> SimpleNamespace:
    """Helper functions of the server tests (test modules cannot import conftest)."""
    return SimpleNamespace(
        stub_for=stub_for,
        scrape=scrape,
        metric_value=metric_value,
        series_count=series_count,
        pseudo_request=pseudo_request,
        test_defaults=dict(TEST_DEFAULTS),
    )
