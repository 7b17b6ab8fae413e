"""The Labeler RPCs on a real server over the tiny exported repository."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cdul_proto.v1 import labeler_pb2 as pb
from cdul_server.app import LabelerServer
from cdul_server.sources import content_key

CLASSES = ["person", "dog", "car", "pizza", "traffic light"]


def _scores(response: pb.PseudoLabelResponse) -> dict[str, np.ndarray]:
    return {
        r.id: np.array([*r.global_scores, *r.aggregate_scores, *r.final_scores], dtype=np.float64)
        for r in response.results
    }


def test_scores_same_alone_batched_shuffled_concurrent(
    server_factory, srv: SimpleNamespace, coco_images
) -> None:
    # No image cache, so every call runs the encoder; a long delay lets requests share batches.
    server: LabelerServer = server_factory(
        cache_max_embeddings=0, max_batch_size=64, max_queue_delay_ms=30
    )
    stub = srv.stub_for(server)
    images = coco_images[:8]

    batched = _scores(stub.PseudoLabel(srv.pseudo_request(images, CLASSES)))
    alone: dict[str, np.ndarray] = {}
    for image in images:
        alone.update(_scores(stub.PseudoLabel(srv.pseudo_request([image], CLASSES))))
    shuffled_images = list(images)
    random.Random(7).shuffle(shuffled_images)
    shuffled = _scores(stub.PseudoLabel(srv.pseudo_request(shuffled_images, CLASSES)))

    barrier = threading.Barrier(8)

    def one_client(index: int) -> dict[str, np.ndarray]:
        client_stub = srv.stub_for(server)
        barrier.wait(timeout=30)
        subset = [images[index], images[(index + 3) % len(images)]]
        return _scores(client_stub.PseudoLabel(srv.pseudo_request(subset, CLASSES), timeout=60))

    with ThreadPoolExecutor(8) as clients:
        concurrent = list(clients.map(one_client, range(8)))

    assert set(batched) == {name for name, _ in images}
    for name in batched:
        np.testing.assert_allclose(alone[name], batched[name], atol=1e-5, rtol=0)
        np.testing.assert_allclose(shuffled[name], batched[name], atol=1e-5, rtol=0)
    for result in concurrent:
        for name, scores in result.items():
            np.testing.assert_allclose(scores, batched[name], atol=1e-5, rtol=0)
    metrics = srv.scrape(server)
    views_per_image = 1 + 3 * 3
    runs = 8 + 8 + 8 + 16
    assert srv.metric_value(metrics, "cdul_views_encoded_total", model="tiny-clip") == (
        runs * views_per_image
    )
    # Some encoder call held views of more than one request: batching across requests.
    batches = srv.metric_value(metrics, "cdul_encoder_batch_size_count", model="tiny-clip")
    small = srv.metric_value(
        metrics, "cdul_encoder_batch_size_bucket", model="tiny-clip", le="16.0"
    )
    assert batches > small


def test_response_fields(shared_server: LabelerServer, srv: SimpleNamespace, coco_images) -> None:
    stub = srv.stub_for(shared_server)
    name, data = coco_images[0]
    request = srv.pseudo_request(
        [(name, data)], CLASSES, grid_size=2, return_tile_scores=True, return_embeddings=True
    )
    request.request_id = "req-1"
    response = stub.PseudoLabel(request)
    assert response.model == "tiny-clip"
    assert list(response.class_names) == CLASSES
    assert response.request_id == "req-1"
    (result,) = response.results
    assert result.id == name
    assert result.content_key == content_key(data)
    assert result.status.code == 0
    assert len(result.global_scores) == len(CLASSES)
    assert sum(result.global_scores) == pytest.approx(1.0, abs=1e-4)
    assert (result.tile_scores.rows, result.tile_scores.cols) == (4, len(CLASSES))
    assert len(result.embedding) == 32
    assert (result.tile_embeddings.rows, result.tile_embeddings.cols) == (4, 32)
    tiles = np.array(result.tile_scores.values).reshape(4, -1)
    np.testing.assert_allclose(result.aggregate_scores, tiles.max(axis=0), atol=1e-6)
    final = (np.array(result.global_scores) + np.array(result.aggregate_scores)) / 2
    np.testing.assert_allclose(result.final_scores, final, atol=1e-6)
    assert result.width > 0
    assert result.height > 0


def test_odd_images_labeled_or_rejected(
    shared_server: LabelerServer, srv: SimpleNamespace, shared_data: Path
) -> None:
    stub = srv.stub_for(shared_server)
    files = sorted(p for p in (shared_data / "odd-images").iterdir() if p.suffix != ".md")
    images = [(p.name, p.read_bytes()) for p in files]
    response = stub.PseudoLabel(srv.pseudo_request(images, CLASSES), timeout=60)
    by_id = {r.id: r for r in response.results}
    assert set(by_id) == {name for name, _ in images}
    rejected = {name: r.status.reason for name, r in by_id.items() if r.status.code != 0}
    assert rejected == {
        "broken.png": "unidentified",
        "decompression_bomb.gif": "too_many_pixels",
        "truncated_jpeg.jpg": "truncated",
    }
    for name, result in by_id.items():
        if name in rejected:
            assert result.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert result.status.message
            assert not result.final_scores
        else:
            assert len(result.final_scores) == len(CLASSES)
            assert np.isfinite(result.final_scores).all()
    # The server keeps serving.
    assert stub.ListModels(pb.ListModelsRequest()).models


def test_content_key_relabel_skips_encoder(
    server_factory, srv: SimpleNamespace, coco_images
) -> None:
    server = server_factory()
    stub = srv.stub_for(server)
    images = coco_images[:4]
    first = stub.PseudoLabel(srv.pseudo_request(images, CLASSES))
    assert not any(r.cache_hit for r in first.results)
    before = srv.scrape(server)
    new_vocabulary = ["cat", "bicycle", "boat"]
    relabel = pb.PseudoLabelRequest(
        images=[pb.Image(id=r.id, content_key=r.content_key) for r in first.results],
        vocabulary=pb.Vocabulary(class_names=new_vocabulary),
    )
    second = stub.PseudoLabel(relabel)
    after = srv.scrape(server)
    assert [r.status.code for r in second.results] == [0] * 4
    assert all(r.cache_hit for r in second.results)
    assert [r.width for r in second.results] == [r.width for r in first.results]
    views = "cdul_views_encoded_total"
    assert srv.metric_value(after, views, model="tiny-clip") == srv.metric_value(
        before, views, model="tiny-clip"
    )
    hits = srv.metric_value(after, "cdul_cache_hits_total", kind="image_view")
    assert hits - srv.metric_value(before, "cdul_cache_hits_total", kind="image_view") == 8
    # The same bytes again are served from the cache too, with the first call's scores.
    third = stub.PseudoLabel(srv.pseudo_request(images, CLASSES))
    assert all(r.cache_hit for r in third.results)
    for a, b in zip(first.results, third.results, strict=True):
        np.testing.assert_allclose(a.final_scores, b.final_scores, atol=1e-6)


def test_unknown_content_key_not_found_per_image(
    shared_server: LabelerServer, srv: SimpleNamespace, coco_images
) -> None:
    stub = srv.stub_for(shared_server)
    request = srv.pseudo_request(coco_images[:1], CLASSES)
    request.images.append(pb.Image(id="gone", content_key="0" * 64))
    request.images.append(pb.Image(id="bad", content_key="xyz"))
    request.images.append(pb.Image(id="empty"))
    response = stub.PseudoLabel(request)
    codes = {r.id: (r.status.code, r.status.reason) for r in response.results}
    assert codes[coco_images[0][0]] == (0, "")
    assert codes["gone"] == (grpc.StatusCode.NOT_FOUND.value[0], "content_key_not_found")
    assert codes["bad"] == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "invalid_content_key")
    assert codes["empty"] == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "no_source")


@pytest.mark.parametrize(
    ("classes", "fragment"),
    [([], "no class names"), (["dog", " "], "empty"), (["dog", "cat", "dog "], "unique")],
)
def test_bad_vocabulary_invalid_argument(
    shared_server: LabelerServer, srv: SimpleNamespace, coco_images, classes, fragment
) -> None:
    stub = srv.stub_for(shared_server)
    with pytest.raises(grpc.RpcError) as caught:
        stub.PseudoLabel(srv.pseudo_request(coco_images[:1], classes))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()


def test_bad_options_invalid_argument(
    shared_server: LabelerServer, srv: SimpleNamespace, coco_images
) -> None:
    stub = srv.stub_for(shared_server)
    for options, fragment in (
        ({"lambda_weight": 2.0}, "lambda_weight"),
        ({"temperature": -1.0}, "temperature"),
        ({"threshold": float("nan")}, "threshold"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.PseudoLabel(srv.pseudo_request(coco_images[:1], CLASSES, **options))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in caught.value.details()
    request = srv.pseudo_request(coco_images[:1], CLASSES)
    request.vocabulary.templates.append("no placeholder")
    with pytest.raises(grpc.RpcError) as caught:
        stub.PseudoLabel(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_model_not_found(
    shared_server: LabelerServer, srv: SimpleNamespace, coco_images
) -> None:
    stub = srv.stub_for(shared_server)
    request = srv.pseudo_request(coco_images[:1], CLASSES)
    request.model = "no-such-model"
    with pytest.raises(grpc.RpcError) as caught:
        stub.PseudoLabel(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "tiny-clip" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModelInfo(pb.GetModelInfoRequest(name="no-such-model"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(pb.PredictRequest(model="tiny-clip", images=[pb.Image(id="a", data=b"x")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tiny_image_fails_that_image_only(
    shared_server: LabelerServer, srv: SimpleNamespace, coco_images
) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (9, 9, 9)).save(buffer, format="PNG")
    stub = srv.stub_for(shared_server)
    response = stub.PseudoLabel(
        srv.pseudo_request([("tiny", buffer.getvalue()), coco_images[1]], CLASSES)
    )
    assert response.results[0].status.reason == "too_small"
    assert response.results[1].status.code == 0


def test_stream_pseudo_label_in_order(
    shared_server: LabelerServer, srv: SimpleNamespace, coco_images
) -> None:
    stub = srv.stub_for(shared_server)
    requests = []
    for index in range(5):
        request = srv.pseudo_request(coco_images[index : index + 2], CLASSES)
        request.request_id = f"r{index}"
        requests.append(request)
    responses = list(stub.StreamPseudoLabel(iter(requests), timeout=60))
    assert [r.request_id for r in responses] == [f"r{i}" for i in range(5)]
    unary = stub.PseudoLabel(requests[2])
    np.testing.assert_allclose(
        responses[2].results[0].final_scores, unary.results[0].final_scores, atol=1e-6
    )


def test_predict_and_stream_predict(
    shared_server: LabelerServer, srv: SimpleNamespace, coco_images, coco_classes
) -> None:
    stub = srv.stub_for(shared_server)
    images = [pb.Image(id=name, data=data) for name, data in coco_images[:3]]
    response = stub.Predict(
        pb.PredictRequest(images=images, options=pb.PredictOptions(top_k=3, threshold=0.99))
    )
    assert response.model == "tiny-classifier"
    assert list(response.class_names) == coco_classes
    for result in response.results:
        assert result.status.code == 0
        assert len(result.scores) == 80
        scores = np.array(result.scores)
        assert ((scores > 0) & (scores < 1)).all()
        top = [label.index for label in result.labels[:3]]
        assert top == list(np.argsort(-scores, kind="stable")[:3])
        assert all(label.name == coco_classes[label.index] for label in result.labels)
    by_key = stub.Predict(
        pb.PredictRequest(images=[pb.Image(id="k", content_key=response.results[0].content_key)])
    )
    np.testing.assert_allclose(by_key.results[0].scores, response.results[0].scores, atol=1e-7)
    streamed = list(
        stub.StreamPredict(iter([pb.PredictRequest(images=images[:1], request_id="s")]))
    )
    assert streamed[0].request_id == "s"
    np.testing.assert_allclose(streamed[0].results[0].scores, response.results[0].scores, atol=1e-6)


def test_search_crops_finds_the_tile(server_factory, srv: SimpleNamespace, coco_images) -> None:
    server = server_factory()
    stub = srv.stub_for(server)
    response = stub.PseudoLabel(
        srv.pseudo_request(coco_images[:3], CLASSES, grid_size=2, return_embeddings=True)
    )
    hits = stub.SearchCrops(pb.SearchCropsRequest(text="a photo of a dog.", k=5)).hits
    assert len(hits) == 5
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    by_key = {r.content_key: r for r in response.results}
    for hit in hits:
        assert hit.content_key in by_key
        assert hit.image_id == by_key[hit.content_key].id
        assert 0 <= hit.tile_index < 4
        assert hit.tile_index == hit.row * 2 + hit.col
        assert hit.box.x1 > hit.box.x0
        assert hit.box.y1 > hit.box.y0
    # The cache still returns the tile embeddings of the best hit's image by content key.
    best = hits[0]
    tiles = np.array(by_key[best.content_key].tile_embeddings.values).reshape(4, -1)
    query_scores = stub.PseudoLabel(
        pb.PseudoLabelRequest(
            images=[pb.Image(id="q", content_key=best.content_key)],
            vocabulary=pb.Vocabulary(class_names=["dog", "zebra"], templates=["a photo of a {}."]),
            options=pb.PseudoLabelOptions(grid_size=2, return_embeddings=True),
        )
    )
    np.testing.assert_allclose(
        np.array(query_scores.results[0].tile_embeddings.values).reshape(4, -1), tiles, atol=1e-6
    )
    with_whole = stub.SearchCrops(
        pb.SearchCropsRequest(text="a dog", k=50, include_whole_images=True)
    ).hits
    assert any(h.tile_index == -1 for h in with_whole)
    with pytest.raises(grpc.RpcError) as caught:
        stub.SearchCrops(pb.SearchCropsRequest(text="  "))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_and_describe_models(shared_server: LabelerServer, srv: SimpleNamespace) -> None:
    stub = srv.stub_for(shared_server)
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"tiny-clip", "tiny-classifier"}
    clip = stub.GetModelInfo(pb.GetModelInfoRequest(name="tiny-clip"))
    assert clip.kind == "clip"
    assert clip.embedding_dim == 32
    assert clip.is_default
    assert clip.preprocess.size == 32
    assert clip.precision == "fp32"
    assert list(clip.default_templates) == ["a photo of a {}."]
    assert models["tiny-classifier"].kind == "classifier"
    assert len(models["tiny-classifier"].class_names) == 80


def test_health_and_reflection(shared_server: LabelerServer) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{shared_server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "cdul.v1.Labeler"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"cdul.v1.Labeler", "grpc.health.v1.Health"} <= names


def test_int8_precision_serves(server_factory, srv: SimpleNamespace, coco_images) -> None:
    server = server_factory(precision="int8")
    stub = srv.stub_for(server)
    assert stub.GetModelInfo(pb.GetModelInfoRequest(name="tiny-clip")).precision == "int8"
    response = stub.PseudoLabel(srv.pseudo_request(coco_images[:2], CLASSES))
    assert [r.status.code for r in response.results] == [0, 0]
    assert all(np.isfinite(r.final_scores).all() for r in response.results)
