"""Bearer tokens, TLS, and file:// URIs confined to --allow-root folders."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdul_proto.v1 import labeler_pb2 as pb
from cdul_proto.v1 import labeler_pb2_grpc as pb_grpc

CLASSES = ["dog", "cat"]


def test_bearer_token_required_except_health(
    server_factory, srv: SimpleNamespace, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n", encoding="utf-8")
    server = server_factory(auth_token_file=token_file)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.LabelerStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListModels(pb.ListModelsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", "Bearer wrong")])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    models = stub.ListModels(
        pb.ListModelsRequest(), metadata=[("authorization", "Bearer s3cret-token")]
    )
    assert len(models.models) == 2
    health = health_pb2_grpc.HealthStub(channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest()).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    metrics = srv.scrape(server)
    assert (
        srv.metric_value(
            metrics, "cdul_requests_total", method="ListModels", code="UNAUTHENTICATED"
        )
        == 2
    )


def _self_signed(folder: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls(server_factory, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = server_factory(tls_cert=cert, tls_key=key)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    channel = grpc.secure_channel(f"localhost:{server.port}", credentials)
    assert (
        len(pb_grpc.LabelerStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models) == 2
    )
    plaintext = pb_grpc.LabelerStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    with pytest.raises(grpc.RpcError) as caught:
        plaintext.ListModels(pb.ListModelsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_file_uris_off_by_default(server_factory, srv: SimpleNamespace, shared_data: Path) -> None:
    server = server_factory()
    stub = srv.stub_for(server)
    path = shared_data / "odd-images" / "hopper.jpg"
    response = stub.PseudoLabel(
        pb.PseudoLabelRequest(
            images=[pb.Image(id="a", uri=path.resolve().as_uri())],
            vocabulary=pb.Vocabulary(class_names=CLASSES),
        )
    )
    status = response.results[0].status
    assert status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "--allow-root" in status.message


def test_allow_root_confines_file_uris(
    server_factory, srv: SimpleNamespace, shared_data: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    photo = (shared_data / "odd-images" / "hopper.jpg").read_bytes()
    (root / "sub" / "in.jpg").write_bytes(photo)
    (outside / "secret.jpg").write_bytes(photo)
    os.symlink(outside / "secret.jpg", root / "link-out.jpg")
    os.symlink(outside, root / "dir-link")
    os.symlink(root / "sub" / "in.jpg", root / "link-in.jpg")
    server = server_factory(allow_roots=(root,))
    stub = srv.stub_for(server)
    uris = {
        "inside": (root / "sub" / "in.jpg").as_uri(),
        "link_inside": (root / "link-in.jpg").as_uri(),
        "dotdot": f"file://{root}/sub/../../outside/secret.jpg",
        "encoded_dotdot": f"file://{root}/sub/%2e%2e/%2e%2e/outside/secret.jpg",
        "symlink_out": (root / "link-out.jpg").as_uri(),
        "dir_symlink_out": f"file://{root}/dir-link/secret.jpg",
        "outside": (outside / "secret.jpg").as_uri(),
        "missing": (root / "nope.jpg").as_uri(),
        "http": "http://127.0.0.1/x.jpg",
        "relative": "file:sub/in.jpg",
    }
    response = stub.PseudoLabel(
        pb.PseudoLabelRequest(
            images=[pb.Image(id=name, uri=uri) for name, uri in uris.items()],
            vocabulary=pb.Vocabulary(class_names=CLASSES),
        )
    )
    status = {r.id: r.status for r in response.results}
    denied = grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert status["inside"].code == 0
    assert status["link_inside"].code == 0
    for name in ("dotdot", "encoded_dotdot", "symlink_out", "dir_symlink_out", "outside"):
        assert status[name].code == denied, name
        assert status[name].reason == "uri_not_allowed"
    assert status["missing"].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert status["http"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status["relative"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    by_uri = {r.id: r for r in response.results}
    assert by_uri["inside"].content_key == by_uri["link_inside"].content_key
