"""Each limit returns its status code with a message that names the limit's flag."""

from __future__ import annotations

import time
from types import SimpleNamespace

import grpc
import pytest

from cdul_proto.v1 import labeler_pb2 as pb
from cdul_server.app import LabelerServer

CLASSES = ["dog", "cat"]


def _png(width: int, height: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_images() -> list[tuple[str, bytes]]:
    return [(f"small-{n}", _png(48, 40, n)) for n in range(3)]


@pytest.fixture(scope="module")
def strict_server(tiny_model_repository, srv: SimpleNamespace):
    from cdul_server.app import ServerConfig, create_server

    server = create_server(
        ServerConfig(
            models=tiny_model_repository,
            **srv.test_defaults,
            max_receive_message_bytes=200_000,
            max_send_message_bytes=2_000,
            max_images_per_request=3,
            max_classes=4,
            max_templates=2,
            max_prompt_chars=40,
            max_grid_size=4,
            max_pixels=100_000,
            max_search_k=7,
            max_queue_views=30,
        )
    )
    yield server
    server.stop(0.0)


def _expect(call, code: grpc.StatusCode, flag: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    assert flag in caught.value.details()


def test_request_limits(strict_server: LabelerServer, srv: SimpleNamespace, coco_images) -> None:
    stub = srv.stub_for(strict_server)
    small = [(f"i{n}", coco_images[0][1][:10]) for n in range(4)]
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    _expect(
        lambda: stub.PseudoLabel(srv.pseudo_request(small, CLASSES)),
        invalid,
        "--max-images-per-request",
    )
    _expect(
        lambda: stub.Predict(pb.PredictRequest(images=[pb.Image(id=n, data=d) for n, d in small])),
        invalid,
        "--max-images-per-request",
    )
    _expect(
        lambda: stub.PseudoLabel(srv.pseudo_request(small[:1], [f"c{n}" for n in range(5)])),
        invalid,
        "--max-classes",
    )
    _expect(
        lambda: stub.PseudoLabel(srv.pseudo_request(small[:1], ["x" * 41])),
        invalid,
        "--max-prompt-chars",
    )
    request = srv.pseudo_request(small[:1], CLASSES)
    request.vocabulary.templates.extend(["a {}.", "the {}.", "one {}."])
    _expect(lambda: stub.PseudoLabel(request), invalid, "--max-templates")
    _expect(
        lambda: stub.PseudoLabel(srv.pseudo_request(small[:1], CLASSES, grid_size=5)),
        invalid,
        "--max-grid-size",
    )
    _expect(
        lambda: stub.SearchCrops(pb.SearchCropsRequest(text="dog", k=8)), invalid, "--max-search-k"
    )


def test_message_size_limits(
    strict_server: LabelerServer, srv: SimpleNamespace, small_images
) -> None:
    stub = srv.stub_for(strict_server)
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    big = [("big", b"\0" * 250_000)]
    _expect(
        lambda: stub.PseudoLabel(srv.pseudo_request(big, CLASSES)),
        exhausted,
        "--max-receive-message-bytes",
    )
    _expect(
        lambda: list(stub.StreamPseudoLabel(iter([srv.pseudo_request(big, CLASSES)]))),
        exhausted,
        "--max-receive-message-bytes",
    )
    # Two images with embeddings (1 + 9 vectors of 32 floats each) make over 2,000 bytes.
    images = small_images[:2]
    _expect(
        lambda: stub.PseudoLabel(
            srv.pseudo_request(images, CLASSES, grid_size=3, return_embeddings=True)
        ),
        exhausted,
        "--max-send-message-bytes",
    )
    ok = stub.PseudoLabel(srv.pseudo_request(images[:1], CLASSES, grid_size=2))
    assert ok.results[0].status.code == 0


def test_queue_and_pixel_limits(
    strict_server: LabelerServer, srv: SimpleNamespace, small_images
) -> None:
    stub = srv.stub_for(strict_server)
    # 3 images x (1 + 4 x 4) views = 51 views, more than --max-queue-views 30.
    _expect(
        lambda: stub.PseudoLabel(srv.pseudo_request(small_images, CLASSES, grid_size=4)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "--max-queue-views",
    )
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (400, 300), (90, 20, 20)).save(buffer, format="PNG")
    # 400 x 300 = 120,000 pixels, over --max-pixels 100,000.
    response = stub.PseudoLabel(srv.pseudo_request([("wide", buffer.getvalue())], CLASSES))
    status = response.results[0].status
    assert status.reason == "too_many_pixels"
    assert "--max-pixels" in status.message


def test_full_queue_resource_exhausted(server_factory, srv: SimpleNamespace, small_images) -> None:
    # The first request's 20 views wait 2 s for a fuller batch, so the queue (25 views) is full.
    server = server_factory(max_queue_views=25, max_queue_delay_ms=2000, max_batch_size=1000)
    stub = srv.stub_for(server)
    first = stub.PseudoLabel.future(srv.pseudo_request(small_images[:2], CLASSES), timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        depth = srv.metric_value(srv.scrape(server), "cdul_queue_depth_views", model="tiny-clip")
        if depth == 20:
            break
        time.sleep(0.02)
    assert depth == 20
    with pytest.raises(grpc.RpcError) as caught:
        stub.PseudoLabel(srv.pseudo_request(small_images[2:3], CLASSES), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in caught.value.details()
    assert "--max-queue-views" in caught.value.details()
    assert [r.status.code for r in first.result().results] == [0, 0]
