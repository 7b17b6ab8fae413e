"""The client and `cdul-label` against a real `cdul-server` subprocess on the tiny models."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cdul_client import (
    AsyncLabelerClient,
    ChannelConfig,
    ContentKey,
    LabelerClient,
    LabelerError,
    PseudoLabelOptions,
    RetryConfig,
)

COCO_IMAGES = 128


def start_server(models: Path, folder: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start `cdul-server` on 127.0.0.1 port 0 and return the process and its target."""
    port_file = folder / "port"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "cdul_server.cli", "--models", str(models),
            "--port", "0", "--port-file", str(port_file), "--metrics-port", "0",
            "--threads", "1", "--decode-workers", "2", "--log-level", "WARNING", *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "server.log").open("wb"),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log = (folder / "server.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"cdul-server did not start:\n{log}")
        time.sleep(0.05)
    return process, f"127.0.0.1:{port_file.read_text().strip()}"


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Stop a server with SIGTERM, and kill it if it does not exit in time."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(tiny_model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The target of a real server with tiny-clip and tiny-classifier."""
    process, target = start_server(tiny_model_repository, tmp_path_factory.mktemp("server"))
    try:
        yield target
    finally:
        stop_server(process)


@pytest.fixture
def coco(shared_data: Path) -> tuple[Path, Path, list[str]]:
    """The coco128 image folder, its class file and class names."""
    classes = shared_data / "coco128" / "classes.json"
    return shared_data / "coco128" / "images", classes, json.loads(classes.read_text())


def _records(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["type"] == "header"
    return lines[1:]


def _label(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdul_client.cli", *argv, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_real_pseudo_label_scores(server, coco) -> None:
    images, _, names = coco
    paths = sorted(images.iterdir())[:3]
    options = PseudoLabelOptions(return_tile_scores=True, return_embeddings=True)
    with LabelerClient(server) as client:
        info = {model.name: model for model in client.list_models()}
        response = client.pseudo_label(paths, names, options=options)
        again = client.pseudo_label(
            [(r.id, ContentKey(r.content_key)) for r in response.results], names[:5]
        )
    assert info["tiny-clip"].kind == "clip"
    assert response.class_names == tuple(names)
    for path, result in zip(paths, response.results, strict=True):
        assert result.ok, result.status
        assert result.id == str(path)
        assert result.content_key == hashlib.sha256(path.read_bytes()).hexdigest()
        assert result.global_scores.shape == (80,)
        assert result.global_scores.sum() == pytest.approx(1.0, abs=1e-4)
        assert np.allclose(
            result.final_scores, (result.global_scores + result.aggregate_scores) / 2, atol=1e-6
        )
        assert result.tile_scores is not None
        assert result.tile_scores.shape == (9, 80)
        assert np.allclose(result.aggregate_scores, result.tile_scores.max(axis=0), atol=1e-6)
        assert result.embedding is not None
        assert result.embedding.shape == (info["tiny-clip"].embedding_dim,)
        assert np.linalg.norm(result.embedding) == pytest.approx(1.0, abs=1e-3)
    assert all(result.ok and result.cache_hit for result in again.results)
    assert again.class_names == tuple(names[:5])


def test_real_failed_image_and_errors(server, shared_data) -> None:
    broken = shared_data / "odd-images" / "broken.png"
    good = shared_data / "odd-images" / "hopper.jpg"
    with LabelerClient(server) as client:
        response = client.pseudo_label([good, broken], ["cat", "dog"])
        with pytest.raises(ValueError, match="twice"):
            client.pseudo_label([good], ["cat", "cat "])
        with pytest.raises(LabelerError) as bad_template:
            client.pseudo_label(
                [good], ["cat"], options=PseudoLabelOptions(templates=["{} " * 1 + "x" * 400])
            )
        with pytest.raises(LabelerError) as unknown:
            client.pseudo_label([good], ["cat"], model="no-such-model")
    assert response.results[0].ok
    failed = response.results[1]
    assert not failed.ok
    assert failed.status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.status.reason
    error = failed.error()
    assert error is not None
    assert error.image_id == str(broken)
    assert bad_template.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND


def test_real_predict_search_health(server, coco) -> None:
    images, _, names = coco
    paths = sorted(images.iterdir())[:4]
    with LabelerClient(server) as client:
        client.pseudo_label(paths, names)
        predictions = list(client.predict_iter(paths, top_k=3, batch_size=2))
        hits = client.search_crops("a photo of a dog", k=5, include_whole_images=True)
        status = client.health()
        info = client.model_info("tiny-classifier")
    assert status == "SERVING"
    assert info.class_names == tuple(names)
    assert [p.id for p in predictions] == [str(p) for p in paths]
    for prediction in predictions:
        assert prediction.scores.shape == (80,)
        assert len(prediction.labels) == 3
        assert prediction.labels[0].name == names[prediction.labels[0].index]
    assert 1 <= len(hits) <= 5
    assert all(-1.0 <= hit.score <= 1.0 for hit in hits)


def test_real_async_client_streams_batches(server, coco) -> None:
    images, _, names = coco
    paths = sorted(images.iterdir())[:10]

    async def scenario() -> list[str]:
        async with AsyncLabelerClient(server) as client:
            assert await client.health() == "SERVING"
            return [
                result.id
                async for result in client.pseudo_label_iter(
                    paths, names, batch_size=3, max_in_flight=2
                )
                if result.ok
            ]

    assert asyncio.run(scenario()) == [str(p) for p in paths]


def test_real_cli_pseudo_relabel_predict(server, coco, tmp_path) -> None:
    images, classes, _ = coco
    out = tmp_path / "labels.jsonl"
    done = _label("pseudo", str(images), "--classes", str(classes), "--server", server,
                  "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "labeled 128, failed 0, skipped 0" in done.stdout
    records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(p.name for p in images.iterdir())
    new = tmp_path / "new.txt"
    new.write_text("person\ndog\ncar\n")
    relabeled = tmp_path / "relabeled.jsonl"
    done = _label("relabel", "--from", str(out), "--classes", str(new), "--server", server,
                  "--out", str(relabeled))  # fmt: skip
    assert done.returncode == 0, done.stderr
    fresh = tmp_path / "fresh.jsonl"
    done = _label("pseudo", str(images), "--classes", str(new), "--server", server,
                  "--out", str(fresh))  # fmt: skip
    assert done.returncode == 0, done.stderr
    by_id = {r["id"]: r for r in _records(fresh)}
    relabeled_records = _records(relabeled)
    assert len(relabeled_records) == COCO_IMAGES
    for record in relabeled_records:
        assert np.allclose(record["final"], by_id[record["id"]]["final"], atol=1e-5)
    predictions = tmp_path / "predictions.jsonl"
    done = _label("predict", str(images), "--server", server, "--out", str(predictions),
                  "--top-k", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(_records(predictions)) == COCO_IMAGES


def _record_count(path: Path) -> int:
    if not path.exists():
        return 0
    return max(path.read_bytes().count(b"\n") - 1, 0)


def test_real_sigkill_resume_exactly_once(tiny_model_repository, coco, tmp_path) -> None:
    images, classes, _ = coco
    # A server of its own without the image cache, so that every run computes its embeddings
    # and none finishes before it is killed.
    process, target = start_server(
        tiny_model_repository, tmp_path, "--cache-max-embeddings", "0", "--max-batch-size", "8"
    )
    out = tmp_path / "labels.jsonl"
    argv = [
        sys.executable, "-m", "cdul_client.cli", "pseudo", str(images), "--classes",
        str(classes), "--server", target, "--out", str(out), "--batch-size", "2",
        "--concurrency", "1", "--no-progress", "--resume",
        "--template", "a photo of a {}.", "--template", "a blurry photo of a {}.",
    ]  # fmt: skip
    try:
        kills = []
        for _ in range(3):
            run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            before = _record_count(out)
            deadline = time.monotonic() + 60
            # Kill as soon as this run has appended a batch, so it dies mid-run.
            while run.poll() is None and time.monotonic() < deadline:
                if _record_count(out) > before:
                    break
                time.sleep(0.005)
            if run.poll() is None:
                run.send_signal(signal.SIGKILL)
                run.wait()
                kills.append(_record_count(out))
            else:
                run.wait()
        assert len(kills) == 3, f"a run finished before it was killed: {kills}"
        assert kills[-1] < COCO_IMAGES
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    finally:
        stop_server(process)
    assert done.returncode == 0, done.stderr
    assert f"skipped {kills[-1]}" in done.stdout
    assert out.read_bytes().endswith(b"\n")
    ids = [r["id"] for r in _records(out)]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(p.name for p in images.iterdir())


def test_real_oversized_request_not_retried(tiny_model_repository, tmp_path, caplog) -> None:
    limit = 1024 * 1024
    process, target = start_server(
        tiny_model_repository, tmp_path, "--max-receive-message-bytes", str(limit)
    )
    retry = RetryConfig(max_attempts=5, initial_backoff_s=0.01, max_backoff_s=0.02)
    big = os.urandom(limit + limit // 2)
    try:
        with caplog.at_level(logging.INFO, logger="cdul_client"):
            with (
                LabelerClient(
                    target, retry=retry, channel=ChannelConfig(max_send_message_bytes=4 * limit)
                ) as client,
                pytest.raises(LabelerError) as server_side,
            ):
                client.pseudo_label([big], ["cat", "dog"])
            with (
                LabelerClient(
                    target, retry=retry, channel=ChannelConfig(max_send_message_bytes=limit)
                ) as client,
                pytest.raises(LabelerError) as client_side,
            ):
                client.pseudo_label([big], ["cat", "dog"])
    finally:
        stop_server(process)
    assert server_side.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-receive-message-bytes" in server_side.value.message
    assert client_side.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client_side.value.reason == "message_too_large"
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_real_wrong_token_and_vocabulary(tiny_model_repository, coco, tmp_path) -> None:
    images, classes, _ = coco
    token_file = tmp_path / "token"
    token_file.write_text("right-token\n")
    process, target = start_server(
        tiny_model_repository, tmp_path, "--auth-token-file", str(token_file)
    )
    try:
        out = tmp_path / "labels.jsonl"
        first = sorted(images.iterdir())[0]
        done = _label("pseudo", str(first), "--classes", str(classes), "--server", target,
                      "--out", str(out), "--token", "wrong")  # fmt: skip
        assert done.returncode == 1
        assert "--token" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not out.exists()
        done = _label("pseudo", str(first), "--classes", str(classes), "--server", target,
                      "--out", str(out), "--token", "right-token")  # fmt: skip
        assert done.returncode == 0, done.stderr
        before = out.read_bytes()
        other = tmp_path / "other.txt"
        other.write_text("cat\ndog\n")
        done = _label("pseudo", str(images), "--classes", str(other), "--server", target,
                      "--out", str(out), "--token", "right-token", "--resume")  # fmt: skip
        assert done.returncode == 2
        assert "another vocabulary" in done.stderr
        assert out.read_bytes() == before
    finally:
        stop_server(process)
