"""Regressions: odd inputs, long echoed values, shutdown races, cancellation and CLI errors."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdul_proto.v1 import labeler_pb2 as pb
from cdul_server.app import ServerConfig, StartupError, create_server
from cdul_server.batcher import DynamicBatcher
from cdul_server.errors import MAX_MESSAGE_CHARS, ServiceError, echo
from cdul_server.sources import FileReader, ImageSourceError

CLASSES = ["dog", "cat"]


def test_shutdown_rejects_late_calls_unavailable(server_factory, srv: SimpleNamespace) -> None:
    server = server_factory()
    # An open health watch keeps gRPC's stop from finishing at once. Calls that arrive during
    # shutdown must still get UNAVAILABLE, not CANCELLED.
    watch_channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    watch = health_pb2_grpc.HealthStub(watch_channel).Watch(
        health_pb2.HealthCheckRequest(service="")
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stub = srv.stub_for(server)
    codes: list[grpc.StatusCode] = []
    done = threading.Event()

    def call_until_stopped() -> None:
        while not done.is_set():
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    return  # a well-behaved client goes to another replica

    clients = [threading.Thread(target=call_until_stopped) for _ in range(8)]
    for client in clients:
        client.start()
    time.sleep(0.3)
    server.stop(2.0)
    done.set()
    for client in clients:
        client.join(10)
    watch.cancel()
    watch_channel.close()
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.UNAVAILABLE in codes
    assert grpc.StatusCode.CANCELLED not in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}


def test_odd_file_uris_fail_per_image(
    server_factory, srv: SimpleNamespace, shared_data: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "hopper.jpg").write_bytes((shared_data / "odd-images" / "hopper.jpg").read_bytes())
    loop_link = root / "loop.jpg"
    loop_link.symlink_to(root / "loop.jpg")
    server = server_factory(allow_roots=(root,))
    stub = srv.stub_for(server)
    odd = {
        "nul": f"file://{root}/hopper.jpg%00.png",
        "raw_nul": f"file://{root}/hopper.jpg\x00.png",
        "long_name": f"file://{root}/{'a' * 5000}.jpg",
        "long_path": f"file://{root}/{'a/' * 3000}x.jpg",
        "file_as_folder": f"file://{root}/hopper.jpg/x.jpg",
        "symlink_loop": loop_link.as_uri(),
        "bad_ipv6_host": "file://[::1/x.jpg",
        "bad_percent": f"file://{root}/%zz%ff.jpg",
    }
    images = [pb.Image(id="good", uri=(root / "hopper.jpg").as_uri())]
    images += [pb.Image(id=name, uri=uri) for name, uri in odd.items()]
    response = stub.PseudoLabel(
        pb.PseudoLabelRequest(images=images, vocabulary=pb.Vocabulary(class_names=CLASSES))
    )
    status = {result.id: result.status for result in response.results}
    assert status["good"].code == 0
    for name in odd:
        assert status[name].code != 0, name
        assert status[name].reason in ("uri_not_allowed", "uri_unreadable"), name
        assert len(status[name].message) < 1000, name
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status["nul"].code == invalid
    assert status["nul"].reason == "uri_not_allowed"
    assert status["long_name"].code == invalid
    assert status["bad_ipv6_host"].code == invalid


def test_file_reader_raises_only_source_errors(tmp_path: Path) -> None:
    reader = FileReader([tmp_path], max_bytes=1000)
    for uri in (
        "file:///x%00y",
        "file:///" + "b" * 100_000,
        "file://[/x",
        "file:///%ff%fe",
        "file://localhost/" + "%2e%2e/" * 50,
        f"file://{tmp_path}/{'c' * 300}/d",
    ):
        with pytest.raises(ImageSourceError):
            reader.read(uri)


def test_echo_shortens_long_values() -> None:
    assert echo("dog") == "'dog'"
    shortened = echo("x" * 20_000)
    assert len(shortened) < 250
    assert "20000 chars" in shortened
    assert len(ServiceError(grpc.StatusCode.NOT_FOUND, "y" * 50_000).message) == MAX_MESSAGE_CHARS


def test_long_model_name_not_found_short_message(
    shared_server, srv: SimpleNamespace, coco_images
) -> None:
    stub = srv.stub_for(shared_server)
    name = "m" * 20_000
    request = srv.pseudo_request(coco_images[:1], CLASSES)
    request.model = name
    calls = {
        "PseudoLabel": lambda: stub.PseudoLabel(request, timeout=30),
        "GetModelInfo": lambda: stub.GetModelInfo(pb.GetModelInfoRequest(name=name), timeout=30),
        "Predict": lambda: stub.Predict(pb.PredictRequest(model=name), timeout=30),
    }
    for method, call in calls.items():
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, method
        assert len(caught.value.details()) < 1000, method
        assert "20000 chars" in caught.value.details(), method


def test_long_duplicate_class_names_short_message(
    shared_server, srv: SimpleNamespace, coco_images
) -> None:
    stub = srv.stub_for(shared_server)
    long_names = [f"{index}" + "z" * 5000 for index in range(5)]
    request = srv.pseudo_request(coco_images[:1], long_names + long_names)
    with pytest.raises(grpc.RpcError) as caught:
        stub.PseudoLabel(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unique" in caught.value.details()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"threshold": -1.0}, "threshold must be a number from 0 to 1"),
        ({"threshold": 1e30}, "threshold must be a number from 0 to 1"),
        ({"threshold": 1.5}, "threshold must be a number from 0 to 1"),
        ({"lambda_weight": -0.1}, "lambda_weight must be a number from 0 to 1"),
        ({"temperature": 0.0}, "temperature must be a finite number greater than 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
    ],
)
def test_option_ranges_invalid_argument(
    shared_server, srv: SimpleNamespace, coco_images, options: dict[str, float], fragment: str
) -> None:
    stub = srv.stub_for(shared_server)
    with pytest.raises(grpc.RpcError) as caught:
        stub.PseudoLabel(srv.pseudo_request(coco_images[:1], CLASSES, **options), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()


def test_predict_threshold_range(shared_server, srv: SimpleNamespace, coco_images) -> None:
    stub = srv.stub_for(shared_server)
    request = pb.PredictRequest(
        images=[pb.Image(id="a", data=coco_images[0][1])],
        options=pb.PredictOptions(threshold=2.0),
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "threshold must be a number from 0 to 1" in caught.value.details()
    request.options.threshold = 1.0
    assert stub.Predict(request, timeout=30).results[0].status.code == 0


def test_stream_cancel_logs_no_error(
    shared_server, srv: SimpleNamespace, coco_images, caplog: pytest.LogCaptureFixture
) -> None:
    stub = srv.stub_for(shared_server)
    stop = threading.Event()

    def requests() -> Iterator[pb.PseudoLabelRequest]:
        for index in range(5):
            yield srv.pseudo_request(coco_images[index : index + 1], CLASSES)
        stop.wait(10)  # the server now waits for the next request when the client cancels

    with caplog.at_level(logging.DEBUG, logger="cdul_server"):
        stream = stub.StreamPseudoLabel(requests(), timeout=60)
        for _ in range(5):
            assert next(stream).results[0].status.code == 0
        stream.cancel()
        stop.set()
        # The handler ends either by reading the cancellation (RpcError) or by the end of the
        # request stream, depending on timing. Either way it leaves the drain gate's count.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and shared_server.gate.in_flight:
            time.sleep(0.05)
        assert shared_server.gate.in_flight == 0
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []


def test_unwritable_cache_dir_startup_error(tiny_model_repository: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    config = ServerConfig(
        models=tiny_model_repository, port=0, metrics_port=0, cache_dir=blocker / "cache"
    )
    with pytest.raises(StartupError) as caught:
        create_server(config)
    assert "--cache-dir" in str(caught.value)
    created = tmp_path / "new" / "cache"
    server = create_server(
        ServerConfig(
            models=tiny_model_repository, port=0, metrics_port=0, warmup=False, cache_dir=created
        )
    )
    try:
        assert created.is_dir()
        assert list(created.iterdir()) == []
    finally:
        server.stop(0.0)


def test_cli_unwritable_cache_dir_exits_2(tiny_model_repository: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    command = [sys.executable, "-m", "cdul_server.cli", "--models", str(tiny_model_repository)]
    command += ["--port", "0", "--metrics-port", "0", "--cache-dir", str(blocker / "cache")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("cdul-server: error: --cache-dir")


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--max-batch-size", "abc"], "--max-batch-size must be a positive integer, got 'abc'"),
        (["--max-batch-size", "0"], "--max-batch-size must be a positive integer, got '0'"),
        (["--port", "x"], "--port must be an integer, got 'x'"),
        (["--grace-s", "nan"], "--grace-s must be a finite number of at least 0, got 'nan'"),
        (["--precision", "fp64"], "--precision: invalid choice: 'fp64'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_cli_argument_error_one_line(
    arguments: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from cdul_server.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(arguments)
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"cdul-server: error: {expected}")
    assert lines[0].endswith("; see cdul-server --help")


def test_fp16_precision_error_names_fp16_flag(tiny_model_repository: Path) -> None:
    config = ServerConfig(models=tiny_model_repository, port=0, metrics_port=0, precision="fp16")
    with pytest.raises(StartupError) as caught:
        create_server(config)
    assert "--fp16" in str(caught.value)
    assert "--quantize" not in str(caught.value)


def test_bomb_message_names_server_limit(shared_data: Path) -> None:
    from cdul_server.decode import DecodeError, decode_image

    data = (shared_data / "odd-images" / "decompression_bomb.gif").read_bytes()
    with pytest.raises(DecodeError) as caught:
        decode_image(data, 40_000_000)
    assert "40000000 (--max-pixels)" in str(caught.value)
    assert "178956970" not in str(caught.value)


def test_batcher_drops_cancelled_work() -> None:
    encoded: list[int] = []
    release = threading.Event()

    def encode(pixels: np.ndarray) -> np.ndarray:
        encoded.append(len(pixels))
        release.wait(5)
        return pixels.reshape(len(pixels), -1)[:, :1]

    batcher = DynamicBatcher(
        "test", encode, max_batch_size=4, max_queue_delay_s=0.0, max_queue_views=100
    )
    try:
        first = batcher.submit(np.zeros((4, 1), dtype=np.float32))
        while not encoded:
            time.sleep(0.01)
        cancelled = threading.Event()
        dropped = batcher.submit(np.ones((8, 1), dtype=np.float32), cancelled=cancelled)
        kept = batcher.submit(np.full((2, 1), 2.0, dtype=np.float32))
        cancelled.set()
        release.set()
        assert first.result(timeout=5).shape == (4, 1)
        np.testing.assert_array_equal(kept.result(timeout=5)[:, 0], [2.0, 2.0])
        with pytest.raises(CancelledError):
            dropped.result(timeout=5)
    finally:
        batcher.close()
    assert encoded == [4, 2]


def test_concurrent_new_vocabulary_encoded_once(
    server_factory, srv: SimpleNamespace, coco_images
) -> None:
    server = server_factory()
    stub = srv.stub_for(server)
    vocabulary = [f"object number {index}" for index in range(20)]
    barrier = threading.Barrier(4)
    statuses: list[int] = []

    def call(index: int) -> None:
        request = srv.pseudo_request([coco_images[index]], vocabulary)
        barrier.wait()
        response = stub.PseudoLabel(request, timeout=60)
        statuses.append(response.results[0].status.code)

    threads = [threading.Thread(target=call, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [0, 0, 0, 0]
    text = srv.scrape(server)
    encoder_calls = srv.metric_value(text, "cdul_text_encoder_seconds_count", model="tiny-clip")
    assert encoder_calls == 1


def test_expired_deadline_drops_queued_views(
    server_factory, srv: SimpleNamespace, coco_images
) -> None:
    # A 2 s queue delay and a large batch hold the views in the queue past the 0.3 s deadline.
    server = server_factory(max_queue_delay_ms=2000, max_batch_size=1000)
    stub = srv.stub_for(server)
    with pytest.raises(grpc.RpcError) as caught:
        stub.PseudoLabel(srv.pseudo_request(coco_images[:2], ["dog", "cat"]), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(2.5)  # past the queue delay: the batcher would have run the views by now
    text = srv.scrape(server)
    assert srv.metric_value(text, "cdul_views_encoded_total", model="tiny-clip") == 0
    response = stub.PseudoLabel(srv.pseudo_request(coco_images[:1], ["dog", "cat"]), timeout=30)
    assert response.results[0].status.code == 0
    text = srv.scrape(server)
    assert srv.metric_value(text, "cdul_views_encoded_total", model="tiny-clip") == 10


def test_prompt_longer_than_context_rejected(
    shared_server, srv: SimpleNamespace, coco_images
) -> None:
    stub = srv.stub_for(shared_server)
    long_name = " ".join(["x"] * 80)  # 80 tokens, more than the 75 between start and end
    with pytest.raises(grpc.RpcError) as caught:
        stub.PseudoLabel(srv.pseudo_request(coco_images[:1], ["dog", long_name]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert "tokens, more than the 75" in details
    assert "shorten the class name or the template" in details
    fitting = " ".join(["x"] * 60)
    response = stub.PseudoLabel(srv.pseudo_request(coco_images[:1], ["dog", fitting]), timeout=30)
    assert response.results[0].status.code == 0
