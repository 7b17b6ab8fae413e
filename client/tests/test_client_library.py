"""LabelerClient and AsyncLabelerClient against the fake servicer on a loopback server."""

from __future__ import annotations

import asyncio
import hashlib
import io
import pickle
import shutil
import socket
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import PIL.Image
import pytest

from cdul_client import (
    AsyncLabelerClient,
    ChannelConfig,
    ContentKey,
    LabelerClient,
    LabelerError,
    PseudoLabelOptions,
    RetryConfig,
    TlsConfig,
)

CLASSES = ["cat", "dog", "car", "tree"]
FAST_RETRY = RetryConfig(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (16, 12), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pseudo_label_accepts_every_input_kind(fake_server, tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    path.write_bytes(_png((255, 0, 0)))
    data = _png((0, 255, 0))
    pil_image = PIL.Image.new("RGB", (8, 8), (0, 0, 255))
    array = np.full((8, 8, 3), 7, dtype=np.uint8)
    with LabelerClient(fake_server.target) as client:
        response = client.pseudo_label([path, ("green", data), pil_image, ("gray", array)], CLASSES)
    ids = [result.id for result in response.results]
    assert ids == [str(path), "green", "2", "gray"]
    assert response.class_names == tuple(CLASSES)
    for result in response.results:
        assert result.ok
        assert result.class_names == tuple(CLASSES)
        assert result.global_scores.shape == (4,)
        assert result.final_scores.dtype == np.float32
        assert result.tile_scores is None
    assert response.results[1].content_key == hashlib.sha256(data).hexdigest()
    assert response.results[0].content_key == hashlib.sha256(path.read_bytes()).hexdigest()
    decoded = PIL.Image.open(io.BytesIO(_sent_bytes_of(fake_server, "gray")))
    assert np.array_equal(np.asarray(decoded), array)


def _sent_bytes_of(fake_server, image_id: str) -> bytes:
    # The fake keeps the content key of every decodable image; re-encode the array the same way
    # the client does and look it up, so the check fails if the client altered the pixels.
    for key, seen_id in fake_server.servicer.seen.items():
        if seen_id == image_id:
            buffer = io.BytesIO()
            PIL.Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(
                buffer, format="PNG", compress_level=1
            )
            assert hashlib.sha256(buffer.getvalue()).hexdigest() == key
            return buffer.getvalue()
    raise AssertionError(f"image {image_id!r} never reached the server")


def test_pseudo_label_returns_requested_extras(fake_server) -> None:
    options = PseudoLabelOptions(grid_size=2, return_tile_scores=True, return_embeddings=True)
    with LabelerClient(fake_server.target) as client:
        result = client.pseudo_label([_png((1, 2, 3))], CLASSES, options=options).results[0]
    assert result.tile_scores is not None
    assert result.tile_scores.shape == (4, 4)
    assert result.embedding is not None
    assert result.embedding.shape == (4,)
    assert result.tile_embeddings is not None
    assert result.tile_embeddings.shape == (4, 4)
    assert (result.width, result.height) == (64, 48)


def test_failed_image_carries_id_and_reason(fake_server) -> None:
    with LabelerClient(fake_server.target) as client:
        response = client.pseudo_label([("good", _png((9, 9, 9))), ("bad", b"BAD bytes")], CLASSES)
    good, bad = response.results
    assert good.ok
    assert not bad.ok
    assert bad.global_scores.size == 0
    with pytest.raises(LabelerError) as caught:
        bad.raise_for_status()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.image_id == "bad"
    assert caught.value.reason == "decode_failed"
    assert "bad" in str(caught.value)


@pytest.mark.parametrize(
    "failures",
    [
        [grpc.StatusCode.UNAVAILABLE],
        [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE],
    ],
)
def test_retryable_codes_are_retried(fake_server, failures) -> None:
    fake_server.servicer.fail_next = list(failures)
    with LabelerClient(fake_server.target, retry=FAST_RETRY) as client:
        response = client.pseudo_label([_png((1, 1, 1))], CLASSES)
    assert response.results[0].ok
    assert fake_server.servicer.calls == len(failures) + 1


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
    ],
)
def test_other_codes_fail_without_retry(fake_server, code) -> None:
    fake_server.servicer.fail_next = [code]
    with (
        LabelerClient(fake_server.target, retry=FAST_RETRY) as client,
        pytest.raises(LabelerError) as caught,
    ):
        client.pseudo_label([_png((1, 1, 1))], CLASSES)
    assert caught.value.code == code
    assert caught.value.image_id is None
    assert fake_server.servicer.calls == 1


def test_retries_stop_after_max_attempts(fake_server) -> None:
    fake_server.servicer.fail_next = [grpc.StatusCode.UNAVAILABLE] * 10
    retry = RetryConfig(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01)
    with (
        LabelerClient(fake_server.target, retry=retry) as client,
        pytest.raises(LabelerError) as caught,
    ):
        client.list_models()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert fake_server.servicer.calls == 3


def test_backoff_grows_and_jitters() -> None:
    retry = RetryConfig(initial_backoff_s=1.0, max_backoff_s=5.0, multiplier=2.0, jitter=0.5)
    import random

    rng = random.Random(0)
    delays = [[retry.backoff_s(n, rng) for _ in range(200)] for n in (1, 2, 3, 4)]
    for n, ceiling in zip((1, 2, 3, 4), (1.0, 2.0, 4.0, 5.0), strict=True):
        assert max(delays[n - 1]) <= ceiling
        assert min(delays[n - 1]) >= ceiling * 0.5
        assert max(delays[n - 1]) - min(delays[n - 1]) > ceiling * 0.3


def test_deadline_applies_to_every_call(fake_server) -> None:
    fake_server.servicer.delay_s = 2.0
    with LabelerClient(fake_server.target, timeout_s=0.3) as client:
        start = time.monotonic()
        with pytest.raises(LabelerError) as caught:
            client.list_models()
        elapsed = time.monotonic() - start
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert elapsed < 1.5
        start = time.monotonic()
        with pytest.raises(LabelerError):
            client.pseudo_label([_png((1, 1, 1))], CLASSES, timeout_s=0.1)
        assert time.monotonic() - start < 1.5


def test_bearer_token_sent_as_metadata(fake_server) -> None:
    fake_server.servicer.required_token = "s3cret"
    with LabelerClient(fake_server.target, token="s3cret") as client:
        client.list_models()
        client.health()
    assert fake_server.servicer.metadata[0]["authorization"] == "Bearer s3cret"
    with (
        LabelerClient(fake_server.target, token="wrong", retry=FAST_RETRY) as client,
        pytest.raises(LabelerError) as caught,
    ):
        client.list_models()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_unreachable_server_raises_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    retry = RetryConfig(max_attempts=2, initial_backoff_s=0.01)
    with LabelerClient(f"127.0.0.1:{port}", timeout_s=5, retry=retry) as client:
        start = time.monotonic()
        with pytest.raises(LabelerError) as caught:
            client.health()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 5


def test_batches_bound_calls_in_flight(fake_server) -> None:
    fake_server.servicer.delay_s = 0.05
    batches = [[(f"{b}-{i}", _png((b, i, 0))) for i in range(2)] for b in range(12)]
    with LabelerClient(fake_server.target) as client:
        responses = list(client.pseudo_label_batches(batches, CLASSES, max_in_flight=3))
    assert [r.results[0].id for r in responses] == [f"{b}-0" for b in range(12)]
    assert fake_server.servicer.max_in_flight_seen <= 3
    assert fake_server.servicer.max_in_flight_seen >= 2


def test_batches_return_exceptions_in_place(fake_server) -> None:
    fake_server.servicer.fail_next = [None, grpc.StatusCode.INVALID_ARGUMENT]
    batches = [[(f"b{b}", _png((b, 0, 0)))] for b in range(3)]
    with LabelerClient(fake_server.target) as client:
        outcomes = list(
            client.pseudo_label_batches(batches, CLASSES, max_in_flight=1, return_exceptions=True)
        )
        assert not isinstance(outcomes[0], LabelerError)
        assert isinstance(outcomes[1], LabelerError)
        assert outcomes[1].code == grpc.StatusCode.INVALID_ARGUMENT
        assert not isinstance(outcomes[2], LabelerError)
        fake_server.servicer.fail_next = [grpc.StatusCode.INVALID_ARGUMENT]
        with pytest.raises(LabelerError):
            list(client.pseudo_label_batches(batches, CLASSES, max_in_flight=1))


def test_batches_retry_the_failed_batch_only(fake_server) -> None:
    fake_server.servicer.fail_next = [grpc.StatusCode.UNAVAILABLE]
    images = [(f"img{i}", _png((i, 0, 0))) for i in range(5)]
    with LabelerClient(fake_server.target, retry=FAST_RETRY) as client:
        results = list(client.pseudo_label_iter(images, CLASSES, batch_size=2, max_in_flight=2))
    assert [r.id for r in results] == [f"img{i}" for i in range(5)]
    assert fake_server.servicer.calls == 4


def test_iter_numbers_images_across_batches(fake_server) -> None:
    images = [_png((i, 1, 1)) for i in range(5)]
    with LabelerClient(fake_server.target) as client:
        results = list(client.pseudo_label_iter(images, CLASSES, batch_size=2))
    assert [r.id for r in results] == ["0", "1", "2", "3", "4"]


def test_content_key_relabels_without_bytes(fake_server) -> None:
    data = _png((5, 6, 7))
    key = hashlib.sha256(data).hexdigest()
    with LabelerClient(fake_server.target) as client:
        first = client.pseudo_label([("a", data)], CLASSES).results[0]
        again = client.pseudo_label([("a", ContentKey(key))], ["bird", "fish"]).results[0]
        fake_server.servicer.forget_content_keys = True
        missing = client.pseudo_label([("a", ContentKey(key))], ["bird"]).results[0]
    assert first.content_key == key
    assert again.ok
    assert again.cache_hit
    assert again.class_names == ("bird", "fish")
    assert missing.status.code == grpc.StatusCode.NOT_FOUND
    assert missing.status.reason == "content_key_not_found"


def test_predict_search_and_model_calls(fake_server) -> None:
    with LabelerClient(fake_server.target) as client:
        predictions = client.predict([("x", _png((1, 2, 3)))], top_k=2, threshold=0.99)
        hits = client.search_crops("a cat", k=1)
        models = client.list_models()
        info = client.model_info("fake-classifier")
        status = client.health()
        with pytest.raises(LabelerError) as caught:
            client.model_info("missing")
    prediction = predictions.results[0]
    assert prediction.class_names == ("cat", "dog", "car")
    assert prediction.scores.shape == (3,)
    assert len(prediction.labels) == 2
    assert prediction.labels[0].score >= prediction.labels[1].score
    assert prediction.labels[0].name == prediction.class_names[prediction.labels[0].index]
    assert len(hits) == 1
    assert hits[0].image_id == "x"
    assert hits[0].box == (21, 16, 42, 32)
    assert [m.name for m in models] == ["fake-clip", "fake-classifier"]
    assert models[0].preprocess.size == 32
    assert models[0].default_templates == ("a photo of a {}.",)
    assert info.class_names == ("cat", "dog", "car")
    assert status == "SERVING"
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_channel_limits_are_applied(fake_server) -> None:
    big = np.random.default_rng(0).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)
    config = ChannelConfig(max_send_message_bytes=1024)
    retry = RetryConfig(max_attempts=1)
    with (
        LabelerClient(fake_server.target, channel=config, retry=retry) as client,
        pytest.raises(LabelerError) as caught,
    ):
        client.pseudo_label([big], CLASSES)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fake_server.servicer.calls == 0


def test_oversized_response_is_not_retried(fake_server) -> None:
    config = ChannelConfig(max_receive_message_bytes=200)
    with (
        LabelerClient(fake_server.target, channel=config, retry=FAST_RETRY) as client,
        pytest.raises(LabelerError) as caught,
    ):
        client.pseudo_label([_png((3, 3, 3))], [f"class {i}" for i in range(100)])
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fake_server.servicer.calls == 1


@pytest.mark.parametrize(
    "options",
    [
        {"threshold": float("nan")},
        {"threshold": -0.1},
        {"lambda_weight": float("inf")},
        {"lambda_weight": 2.0},
        {"temperature": 0.0},
        {"temperature": float("nan")},
    ],
)
def test_out_of_range_options_are_rejected(options) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        PseudoLabelOptions(**options)


def test_oversized_request_is_rejected_unsent(fake_server) -> None:
    config = ChannelConfig(max_send_message_bytes=1024)
    with LabelerClient(fake_server.target, channel=config, retry=FAST_RETRY) as client:
        with pytest.raises(LabelerError) as caught:
            client.pseudo_label([bytes(4096)], CLASSES)
        outcomes = list(
            client.pseudo_label_batches(
                [[bytes(4096)], [_png((1, 2, 3))]], CLASSES, return_exceptions=True
            )
        )
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.reason == "message_too_large"
    assert "max_send_message_bytes 1024" in caught.value.message
    assert isinstance(outcomes[0], LabelerError)
    assert outcomes[0].reason == "message_too_large"
    assert not isinstance(outcomes[1], LabelerError)
    assert fake_server.servicer.calls == 1


def test_async_oversized_request_is_rejected_unsent(fake_server) -> None:
    async def run() -> LabelerError:
        config = ChannelConfig(max_send_message_bytes=1024)
        async with AsyncLabelerClient(
            fake_server.target, channel=config, retry=FAST_RETRY
        ) as client:
            with pytest.raises(LabelerError) as caught:
                await client.pseudo_label([bytes(4096)], CLASSES)
            return caught.value

    error = asyncio.run(run())
    assert error.reason == "message_too_large"
    assert fake_server.servicer.calls == 0


@pytest.mark.parametrize(
    "message",
    [
        "the request message is 9000 bytes, more than the limit of 4096 bytes "
        "(--max-receive-message-bytes): send fewer images per request",
        "the response would be 9000 bytes, more than the limit of 4096 bytes "
        "(--max-send-message-bytes): send fewer images per request",
        "Received message larger than max (9000 vs. 4096)",
    ],
)
def test_server_message_size_error_is_not_retried(fake_server, message) -> None:
    fake_server.servicer.fail_next = [grpc.StatusCode.RESOURCE_EXHAUSTED]
    fake_server.servicer.fail_message = message
    with (
        LabelerClient(fake_server.target, retry=FAST_RETRY) as client,
        pytest.raises(LabelerError) as caught,
    ):
        client.pseudo_label([_png((1, 1, 1))], CLASSES)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert fake_server.servicer.calls == 1


def test_queue_full_is_still_retried(fake_server) -> None:
    fake_server.servicer.fail_next = [grpc.StatusCode.RESOURCE_EXHAUSTED]
    fake_server.servicer.fail_message = "the queue of model 'tiny-clip' is full: retry later"
    with LabelerClient(fake_server.target, retry=FAST_RETRY) as client:
        response = client.pseudo_label([_png((1, 1, 1))], CLASSES)
    assert response.results[0].ok
    assert fake_server.servicer.calls == 2


@pytest.mark.parametrize(
    ("images", "error"),
    [
        ([np.zeros((4, 4), dtype=np.float32)], TypeError),
        ([np.zeros((4, 4, 2), dtype=np.uint8)], ValueError),
        ([12], TypeError),
        ([ContentKey], TypeError),
    ],
)
def test_bad_images_raise_before_sending(fake_server, images, error) -> None:
    with LabelerClient(fake_server.target) as client, pytest.raises(error):
        client.pseudo_label(images, CLASSES)
    assert fake_server.servicer.calls == 0


@pytest.mark.parametrize("classes", [[], ["cat", "cat"], ["cat", " "], "cat"])
def test_bad_class_names_raise(fake_server, classes) -> None:
    with LabelerClient(fake_server.target) as client, pytest.raises((ValueError, TypeError)):
        client.pseudo_label([_png((1, 1, 1))], classes)


@pytest.mark.parametrize("target", ["", "http://localhost:1"])
def test_bad_target_raises(target) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        LabelerClient(target)


def test_content_key_must_be_sha256() -> None:
    with pytest.raises(ValueError, match="SHA-256"):
        ContentKey("abc")


def test_labeler_error_pickles() -> None:
    error = LabelerError(grpc.StatusCode.NOT_FOUND, "gone", image_id="a", reason="x")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.message, copy.image_id, copy.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "gone",
        "a",
        "x",
    )


def test_async_client_matches_sync(fake_server) -> None:
    async def scenario() -> None:
        fake_server.servicer.fail_next = [grpc.StatusCode.UNAVAILABLE]
        async with AsyncLabelerClient(fake_server.target, token="t", retry=FAST_RETRY) as client:
            response = await client.pseudo_label([("a", _png((1, 1, 1)))], CLASSES)
            assert response.results[0].ok
            assert fake_server.servicer.calls == 2
            assert fake_server.servicer.metadata[-1]["authorization"] == "Bearer t"
            fake_server.servicer.delay_s = 0.05
            images = [(f"i{i}", _png((i, 2, 2))) for i in range(9)]
            ids = [
                r.id
                async for r in client.pseudo_label_iter(
                    images, CLASSES, batch_size=2, max_in_flight=2
                )
            ]
            assert ids == [f"i{i}" for i in range(9)]
            assert fake_server.servicer.max_in_flight_seen <= 2
            predictions = [p async for p in client.predict_iter(images[:3], top_k=1)]
            assert [len(p.labels) for p in predictions] == [1, 1, 1]
            assert (await client.health()) == "SERVING"
            assert len(await client.list_models()) == 2
            assert (await client.model_info("fake-clip")).kind == "clip"
            assert len(await client.search_crops("x", k=2)) == 2
            fake_server.servicer.delay_s = 1.0
            with pytest.raises(LabelerError) as caught:
                await client.list_models(timeout_s=0.1)
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            fake_server.servicer.delay_s = 0.0
            fake_server.servicer.fail_next = [grpc.StatusCode.PERMISSION_DENIED]
            with pytest.raises(LabelerError) as caught:
                await client.predict([_png((1, 1, 1))])
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(scenario())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_custom_root_certificate(fake_server_factory, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server = fake_server_factory(credentials)
    tls = TlsConfig(root_certificates=cert, server_name="localhost")
    with LabelerClient(server.target, tls=tls) as client:
        assert client.list_models()[0].name == "fake-clip"
    with (
        LabelerClient(server.target, retry=RetryConfig(max_attempts=1)) as client,
        pytest.raises(LabelerError),
    ):
        client.list_models(timeout_s=2)
    with pytest.raises(ValueError, match="cannot read root_certificates"):
        LabelerClient(server.target, tls=TlsConfig(root_certificates=tmp_path / "missing.pem"))


def test_record_path_relative_with_relative_out_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cdul_client.corpus import CorpusImage
    from cdul_client.labeling import record_path

    (tmp_path / "imgs").mkdir()
    image = tmp_path / "imgs" / "a.png"
    image.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    entry = CorpusImage(id="a.png", path=Path("imgs/a.png"))
    assert record_path(entry, Path(".")) == "imgs/a.png"
    assert record_path(entry, Path("other")) == image.as_posix()
