"""Startup, health, graceful shutdown on SIGTERM, cache persistence and the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdul_proto.v1 import labeler_pb2 as pb
from cdul_proto.v1 import labeler_pb2_grpc as pb_grpc
from cdul_server.app import CACHE_FILE_NAME, LabelerServer, ServerConfig, StartupError
from cdul_server.cache import EmbeddingCache
from cdul_server.interceptors import DrainGate

CLASSES = ["dog", "cat"]


def _health(port: int) -> int:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    return int(
        stub.Check(health_pb2.HealthCheckRequest(service="cdul.v1.Labeler"), timeout=5).status
    )


def test_not_serving_until_loaded(
    tiny_model_repository: Path, srv: SimpleNamespace, coco_images
) -> None:
    server = LabelerServer(ServerConfig(models=tiny_model_repository, **srv.test_defaults))
    try:
        server.start()
        assert _health(server.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = srv.stub_for(server)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "starting" in caught.value.details()
        server.load()
        assert _health(server.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        server.set_serving()
        assert _health(server.port) == health_pb2.HealthCheckResponse.SERVING
        assert (
            stub.PseudoLabel(srv.pseudo_request(coco_images[:1], CLASSES)).results[0].status.code
            == 0
        )
    finally:
        server.stop(0.0)


def test_cache_saved_on_stop_and_reloaded(
    server_factory, srv: SimpleNamespace, coco_images, tmp_path: Path
) -> None:
    first = server_factory(cache_dir=tmp_path)
    response = srv.stub_for(first).PseudoLabel(srv.pseudo_request(coco_images[:3], CLASSES))
    assert first.stop(5.0)
    assert (tmp_path / CACHE_FILE_NAME).is_file()
    second = server_factory(cache_dir=tmp_path)
    assert second.cache.size == 3 * 10
    relabel = srv.stub_for(second).PseudoLabel(
        pb.PseudoLabelRequest(
            images=[pb.Image(id=r.id, content_key=r.content_key) for r in response.results],
            vocabulary=pb.Vocabulary(class_names=["boat", "pizza"]),
        )
    )
    assert [r.status.code for r in relabel.results] == [0, 0, 0]
    assert all(r.cache_hit for r in relabel.results)
    assert srv.metric_value(srv.scrape(second), "cdul_views_encoded_total", model="tiny-clip") == 0


def test_cache_saved_on_interval(
    server_factory, srv: SimpleNamespace, coco_images, tmp_path: Path
) -> None:
    server = server_factory(cache_dir=tmp_path, cache_save_interval_s=0.2)
    srv.stub_for(server).PseudoLabel(srv.pseudo_request(coco_images[:1], CLASSES))
    path = tmp_path / CACHE_FILE_NAME
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists()
    reloaded = EmbeddingCache(100, path)
    assert reloaded.load() == 10


def _wait_for_file(path: Path, process: subprocess.Popen[str], timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return int(path.read_text().strip())
        if process.poll() is not None:
            raise AssertionError(
                f"server exited with {process.returncode}: {process.stderr.read()}"
            )
        time.sleep(0.1)
    raise AssertionError(f"{path} did not appear within {timeout_s} s")


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


class _Context:
    """Records the termination callbacks gRPC would run once the call's status is sent."""

    def __init__(self, terminated: bool = False) -> None:
        self.callbacks: list = []
        self.terminated = terminated

    def add_callback(self, callback) -> bool:
        if self.terminated:
            return False
        self.callbacks.append(callback)
        return True

    def abort(self, code, details) -> None:
        raise RuntimeError(f"{code}: {details}")


def test_gate_counts_call_until_terminated() -> None:
    gate = DrainGate()
    context = _Context()
    handler = gate._wrap_unary("/cdul.v1.Labeler/ListModels", lambda request, ctx: "reply")
    assert handler(None, context) == "reply"
    # The handler has returned but gRPC has not yet sent the reply: shutdown must still wait.
    assert gate.in_flight == 1
    assert not gate.wait_idle(0.05)
    context.callbacks[0]()
    context.callbacks[0]()  # gRPC runs it once; a second run must not count twice
    assert gate.in_flight == 0
    assert gate.wait_idle(0.0)
    # A call that terminated before its callback could be registered is released at once.
    assert handler(None, _Context(terminated=True)) == "reply"
    assert gate.in_flight == 0
    gate.start_draining()
    with pytest.raises(RuntimeError, match="shutting down"):
        handler(None, _Context())
    assert gate.in_flight == 0


def test_sigterm_drains_and_exits_zero(
    tiny_model_repository: Path, coco_images, tmp_path: Path
) -> None:
    port_file, metrics_file, cache_dir = tmp_path / "port", tmp_path / "metrics", tmp_path / "cache"
    # A 3 s queue delay and a large batch keep one request in flight while SIGTERM arrives.
    command = [
        sys.executable, "-m", "cdul_server.cli", "--models", str(tiny_model_repository),
        "--port", "0", "--port-file", str(port_file), "--metrics-port", "0",
        "--metrics-port-file", str(metrics_file), "--cache-dir", str(cache_dir),
        "--max-queue-delay-ms", "3000", "--max-batch-size", "1000", "--grace-s", "30",
        "--threads", "1", "--decode-workers", "1",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = _wait_for_file(port_file, process)
        metrics_port = _wait_for_file(metrics_file, process)
        assert _health(port) == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.LabelerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        outcome: dict[str, object] = {}

        def long_call() -> None:
            request = pb.PseudoLabelRequest(
                images=[pb.Image(id=coco_images[0][0], data=coco_images[0][1])],
                vocabulary=pb.Vocabulary(class_names=CLASSES),
            )
            try:
                outcome["response"] = stub.PseudoLabel(request, timeout=60)
            except grpc.RpcError as err:
                outcome["error"] = err

        caller = threading.Thread(target=long_call)
        caller.start()
        deadline = time.monotonic() + 30
        while _metric(metrics_port, "cdul_in_flight_requests") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metric(metrics_port, "cdul_in_flight_requests") >= 1
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        while _health(port) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() - started < 5, "health did not flip to NOT_SERVING"
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert process.poll() is None, "the server exited before its call in flight finished"
        caller.join(timeout=60)
        assert "error" not in outcome, outcome.get("error")
        response = outcome["response"]
        assert isinstance(response, pb.PseudoLabelResponse)
        assert response.results[0].status.code == 0
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = process.stderr.read() if process.stderr else ""
    assert "saved the embedding cache" in stderr
    cache = EmbeddingCache(100, cache_dir / CACHE_FILE_NAME)
    assert cache.load() == 10


def test_cli_help_lists_every_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cdul_server.cli", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0
    flags = {
        "--" + name.replace("_", "-")
        for name in ServerConfig.__dataclass_fields__
        if name not in ("allow_roots", "warmup")
    }
    missing = sorted(flag for flag in flags if flag not in result.stdout)
    assert missing == []
    assert "--allow-root" in result.stdout
    assert "--no-warmup" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--tls-cert", "x.pem"], "--tls-key"),
        (["--precision", "fp64"], "--precision"),
        (["--models", "/nonexistent/models"], "not found"),
        (["--clip", "no-such-model"], "--clip"),
    ],
)
def test_cli_bad_input_one_line_error(
    tiny_model_repository: Path, arguments: list[str], fragment: str
) -> None:
    command = [sys.executable, "-m", "cdul_server.cli", "--port", "0", "--metrics-port", "0"]
    if "--models" not in arguments:
        command += ["--models", str(tiny_model_repository)]
    result = subprocess.run(
        command + arguments, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert fragment in last_line


def test_empty_default_repository_is_a_startup_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import cdul_server.app as app

    monkeypatch.setattr(app, "DEFAULT_MODEL_REPOSITORY", tmp_path / "models")
    with pytest.raises(StartupError, match="--models"):
        app.create_server(ServerConfig(port=0, metrics_port=0))


def test_no_torch_imported() -> None:
    code = (
        "import sys, cdul_server.app, cdul_server.cli, cdul_server.service; "
        "bad = [m for m in ('torch', 'open_clip') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_failed_start_keeps_cache_file(tiny_model_repository: Path, tmp_path: Path) -> None:
    cache_file = tmp_path / CACHE_FILE_NAME
    cache_file.write_bytes(b"previous cache")
    with pytest.raises(StartupError):
        from cdul_server.app import create_server

        create_server(
            ServerConfig(
                models=tiny_model_repository, clip="no-such-model", port=0, metrics_port=0,
                cache_dir=tmp_path,
            )
        )  # fmt: skip
    assert cache_file.read_bytes() == b"previous cache"


def test_default_repository_serves_digits_clip(srv: SimpleNamespace) -> None:
    from cdul_server.app import create_server
    from cdul_server.model_repository import DEFAULT_MODEL_REPOSITORY, list_model_dirs

    if not DEFAULT_MODEL_REPOSITORY.is_dir() or not list_model_dirs(DEFAULT_MODEL_REPOSITORY):
        pytest.skip("the packaged model repository is empty in this checkout")
    server = create_server(ServerConfig(**srv.test_defaults))
    try:
        models = srv.stub_for(server).ListModels(pb.ListModelsRequest()).models
        defaults = [m.name for m in models if m.is_default and m.kind == "clip"]
        assert defaults == ["digits-clip"]
    finally:
        server.stop(0.0)
