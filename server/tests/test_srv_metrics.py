"""Metrics: scraped under load, and a bounded number of series whatever the request values."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from cdul_proto.v1 import labeler_pb2 as pb

CLASSES = ["dog", "cat", "car"]


def test_metrics_scraped_under_load(server_factory, srv: SimpleNamespace, coco_images) -> None:
    server = server_factory(cache_max_embeddings=0, max_queue_delay_ms=10)
    stop = threading.Event()
    errors: list[BaseException] = []
    sent = [0]

    def load() -> None:
        stub = srv.stub_for(server)
        try:
            while not stop.is_set() and sent[0] < 40:
                stub.PseudoLabel(
                    srv.pseudo_request(coco_images[:2], CLASSES, grid_size=2), timeout=30
                )
                sent[0] += 1
        except BaseException as err:
            errors.append(err)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    scrapes = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(scrapes) < 5:
        scrapes.append(srv.scrape(server))
        time.sleep(0.2)
    stop.set()
    for worker in workers:
        worker.join(timeout=60)
    assert errors == []
    final = srv.scrape(server)
    requests = srv.metric_value(final, "cdul_requests_total", method="PseudoLabel", code="OK")
    assert requests == sent[0]
    assert (
        srv.metric_value(final, "cdul_images_total", method="PseudoLabel", outcome="ok")
        == 2 * sent[0]
    )
    assert srv.metric_value(final, "cdul_views_encoded_total", model="tiny-clip") == 2 * 5 * sent[0]
    assert (
        srv.metric_value(final, "cdul_request_latency_seconds_count", method="PseudoLabel")
        == sent[0]
    )
    assert srv.metric_value(final, "cdul_encoder_seconds_count", model="tiny-clip") > 0
    assert srv.metric_value(final, "cdul_in_flight_requests") == 0
    assert srv.metric_value(final, "cdul_queue_depth_views", model="tiny-clip") == 0
    assert (
        srv.metric_value(
            final, "cdul_build_info", model="tiny-clip", provider="CPUExecutionProvider"
        )
        == 1
    )
    assert len(scrapes) == 5
    counts = [
        srv.metric_value(s, "cdul_requests_total", method="PseudoLabel", code="OK") for s in scrapes
    ]
    assert counts == sorted(counts)


def test_series_count_bounded(server_factory, srv: SimpleNamespace, coco_images) -> None:
    server = server_factory()
    stub = srv.stub_for(server)
    name, data = coco_images[0]
    key = stub.PseudoLabel(srv.pseudo_request([(name, data)], CLASSES)).results[0].content_key
    broken = b"\x89PNG\r\n\x1a\n" + b"garbage"

    def round_of_requests(offset: int, count: int) -> None:
        for start in range(offset, offset + count, 100):
            ids = range(start, start + 100)
            images = [pb.Image(id=f"image-{i}", content_key=key) for i in ids[:99]]
            images.append(pb.Image(id=f"broken-{start}", data=broken + str(start).encode()))
            stub.PseudoLabel(
                pb.PseudoLabelRequest(
                    images=images,
                    vocabulary=pb.Vocabulary(class_names=[f"class {i}" for i in ids]),
                ),
                timeout=60,
            )

    # 100 ids and class names for warm-up, so every series that exists at all exists now.
    round_of_requests(0, 100)
    before = srv.series_count(srv.scrape(server))
    round_of_requests(100, 10_000)
    after_text = srv.scrape(server)
    assert srv.series_count(after_text) == before
    assert "image-5000" not in after_text
    assert "class 5000" not in after_text
    assert (
        srv.metric_value(after_text, "cdul_images_total", method="PseudoLabel", outcome="ok")
        > 9_000
    )
