"""Embedding cache: lookups, eviction, search, atomic save and reload, thread safety."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from cdul_server.cache import EmbeddingCache, ImageInfo, VectorLru


def _unit(rng: np.random.Generator, rows: int, dim: int = 8) -> np.ndarray:
    vectors = rng.normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


INFO = ImageInfo(width=90, height=60, image_id="a.jpg")


def test_put_get_roundtrip() -> None:
    rng = np.random.default_rng(0)
    cache = EmbeddingCache(100)
    whole, tiles = _unit(rng, 1)[0], _unit(rng, 4)
    cache.put_whole("m@1", "k1", "center_crop", whole, INFO)
    cache.put_tiles("m@1", "k1", 2, tiles, INFO)
    np.testing.assert_array_equal(cache.get_whole("m@1", "k1", "center_crop"), whole)
    np.testing.assert_array_equal(cache.get_tiles("m@1", "k1", 2), tiles)
    assert cache.get_whole("m@1", "k1", "squash") is None
    assert cache.get_tiles("m@1", "k1", 3) is None
    assert cache.get_tiles("m@2", "k1", 2) is None
    assert cache.size == 5
    assert cache.image_info("k1") == INFO


def test_eviction_keeps_bound_and_recent_entries() -> None:
    rng = np.random.default_rng(1)
    cache = EmbeddingCache(40)
    for i in range(30):
        cache.put_tiles("m", f"k{i}", 2, _unit(rng, 4), INFO)
        cache.get_tiles("m", "k0", 2)  # k0 stays the most recently used
        assert cache.size <= 40
    assert cache.get_tiles("m", "k0", 2) is not None
    assert cache.get_tiles("m", "k29", 2) is not None
    assert cache.get_tiles("m", "k1", 2) is None
    assert cache.evictions > 0
    assert cache.image_info("k1") is None


def test_search_names_image_and_tile() -> None:
    rng = np.random.default_rng(2)
    cache = EmbeddingCache(1000)
    for i in range(5):
        cache.put_tiles("m", f"k{i}", 3, _unit(rng, 9), ImageInfo(90, 60, f"img{i}"))
        cache.put_whole("m", f"k{i}", "center_crop", _unit(rng, 1)[0], ImageInfo(90, 60, f"img{i}"))
    target = cache.get_tiles("m", "k3", 3)
    assert target is not None
    hits = cache.search("m", target[5], k=3, include_whole_images=False)
    assert hits[0].content_key == "k3"
    assert hits[0].image_id == "img3"
    assert hits[0].tile_index == 5
    assert hits[0].grid_size == 3
    assert hits[0].box == (60, 20, 90, 40)  # row 1, col 2 of 30 x 20 tiles
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    whole = cache.get_whole("m", "k1", "center_crop")
    with_whole = cache.search("m", whole, k=1, include_whole_images=True)
    assert with_whole[0].tile_index == -1
    assert with_whole[0].content_key == "k1"
    assert all(
        h.tile_index >= 0 for h in cache.search("m", whole, k=50, include_whole_images=False)
    )


def test_save_is_atomic_and_reload_restores(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    path = tmp_path / "cache" / "embeddings.npz"
    cache = EmbeddingCache(100, path)
    tiles = _unit(rng, 4)
    cache.put_tiles("m@1", "k1", 2, tiles, INFO)
    cache.put_whole("other@9", "k2", "pad", _unit(rng, 1)[0], INFO)
    assert cache.save() == path
    assert [p.name for p in path.parent.iterdir()] == ["embeddings.npz"]
    first_inode = path.stat().st_ino
    cache.save()
    # os.replace puts a new file in place instead of rewriting the old one.
    assert path.stat().st_ino != first_inode

    reloaded = EmbeddingCache(100, path)
    assert reloaded.load({"m@1"}) == 4
    np.testing.assert_array_equal(reloaded.get_tiles("m@1", "k1", 2), tiles)
    assert reloaded.get_whole("other@9", "k2", "pad") is None
    assert reloaded.image_info("k2") is None
    hits = reloaded.search("m@1", tiles[1], k=1, include_whole_images=True)
    assert hits[0].tile_index == 1
    reloaded.put_tiles("m@1", "k3", 2, _unit(rng, 4), INFO)
    assert reloaded.size == 8


def test_damaged_file_ignored(tmp_path: Path) -> None:
    path = tmp_path / "embeddings.npz"
    path.write_bytes(b"not a cache")
    cache = EmbeddingCache(10, path)
    assert cache.load() == 0
    assert cache.size == 0


def test_concurrent_inserts_lookups_and_searches() -> None:
    cache = EmbeddingCache(500)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        rng = np.random.default_rng(worker)
        try:
            for i in range(60):
                key = f"w{worker}-{i % 25}"
                vectors = _unit(rng, 4)
                cache.put_tiles("m", key, 2, vectors, INFO)
                found = cache.get_tiles("m", key, 2)
                assert found is None or found.shape == (4, 8)
                cache.search("m", vectors[0], k=5, include_whole_images=True)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cache.size <= 500


def test_zero_bound_turns_cache_off() -> None:
    cache = EmbeddingCache(0)
    cache.put_tiles("m", "k", 1, _unit(np.random.default_rng(4), 1), INFO)
    assert cache.get_tiles("m", "k", 1) is None
    assert cache.size == 0


def test_vector_lru_bounded() -> None:
    lru = VectorLru(2)
    lru.put_many("m", ["a", "b"], np.eye(2, dtype=np.float32))
    assert lru.get_many("m", ["a"])[0] is not None
    lru.put_many("m", ["c"], np.ones((1, 2), dtype=np.float32))
    assert len(lru) == 2
    assert lru.get_many("m", ["a", "b", "c"])[1] is None
