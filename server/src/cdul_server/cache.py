"""Embedding cache: image and tile embeddings in FAISS indexes, text embeddings in an LRU.

An *entry* is the embeddings of one image for one model and one view setting: the whole-image
view (one vector per global view, such as ``center_crop``) or the n x n tiles of a grid size
(n * n vectors). Entries are keyed by ``(model key, content key, view setting)``. The model key
names the model and a fingerprint of its files, so a re-exported model never reuses stale
vectors.

Vectors live in one ``faiss.IndexIDMap2`` over ``IndexFlatIP`` per model key and kind (whole
images, tiles), so :meth:`EmbeddingCache.search` ranks them by cosine similarity (the vectors
are L2-normalized). The cache is bounded in vectors; past the bound it evicts the least recently
used entries down to 95% of the bound. Eviction rewrites the flat index, so the slack makes it
run rarely. One lock guards all state, so concurrent lookups, inserts and searches are safe.

:meth:`EmbeddingCache.save` writes one ``.npz`` file next to the target and renames it over the
target, so a crash never leaves a half-written cache; :meth:`EmbeddingCache.load` reads it back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np

from cdul_server.scoring import tile_boxes

_logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
WHOLE = "whole"
TILES = "tiles"
# Eviction frees room down to this fraction of the bound.
_EVICT_TO = 0.95


@dataclass(frozen=True)
class ImageInfo:
    """Size of a cached image and the id it had in the request that cached it."""

    width: int
    height: int
    image_id: str


@dataclass(frozen=True)
class CropHit:
    """One cached view ranked by :meth:`EmbeddingCache.search`.

    ``tile_index`` is -1 for a whole-image view; ``box`` is (x0, y0, x1, y1) in pixels.
    """

    content_key: str
    image_id: str
    tile_index: int
    grid_size: int
    box: tuple[int, int, int, int]
    score: float
    view: str


@dataclass
class _Entry:
    kind: str
    setting: str
    ids: np.ndarray


class EmbeddingCache:
    """Bounded, thread-safe, persistent store of image and tile embeddings.

    Args:
        max_embeddings: Most vectors kept over all models and views; 0 turns caching off.
        path: File that :meth:`save` writes and :meth:`load` reads; None keeps the cache in
            memory only.
    """

    def __init__(self, max_embeddings: int, path: Path | None = None) -> None:
        if max_embeddings < 0:
            raise ValueError(f"max_embeddings must be 0 (off) or more, got {max_embeddings}")
        self.max_embeddings = max_embeddings
        self.path = path
        self._lock = threading.RLock()
        self._indexes: dict[tuple[str, str], faiss.IndexIDMap2] = {}
        self._entries: OrderedDict[tuple[str, str, str, str], _Entry] = OrderedDict()
        # Vector id -> (entry key, position in the entry: -1 for whole-image views).
        self._vectors: dict[int, tuple[tuple[str, str, str, str], int]] = {}
        self._infos: dict[str, ImageInfo] = {}
        self._entry_counts: dict[str, int] = {}
        self._next_id = 0
        self._size = 0
        self.evictions = 0
        self._mutations = 0

    @property
    def size(self) -> int:
        """Vectors in the cache."""
        with self._lock:
            return self._size

    def __len__(self) -> int:
        return self.size

    @property
    def mutations(self) -> int:
        """Count of inserts and evictions, to tell whether a save is due."""
        with self._lock:
            return self._mutations

    def image_info(self, content_key: str) -> ImageInfo | None:
        with self._lock:
            return self._infos.get(content_key)

    def get_whole(self, model_key: str, content_key: str, view: str) -> np.ndarray | None:
        """Return the (D,) whole-image embedding, or None when it is not cached."""
        found = self._get((model_key, content_key, WHOLE, view))
        return None if found is None else found[0]

    def get_tiles(self, model_key: str, content_key: str, grid_size: int) -> np.ndarray | None:
        """Return the (n * n, D) tile embeddings, or None when they are not cached."""
        return self._get((model_key, content_key, TILES, str(grid_size)))

    def put_whole(
        self, model_key: str, content_key: str, view: str, vector: np.ndarray, info: ImageInfo
    ) -> None:
        self._put((model_key, content_key, WHOLE, view), np.asarray(vector)[None, :], info)

    def put_tiles(
        self,
        model_key: str,
        content_key: str,
        grid_size: int,
        vectors: np.ndarray,
        info: ImageInfo,
    ) -> None:
        if len(vectors) != grid_size * grid_size:
            raise ValueError(
                f"a {grid_size}x{grid_size} grid needs {grid_size * grid_size} tile embeddings, "
                f"got {len(vectors)}"
            )
        self._put((model_key, content_key, TILES, str(grid_size)), np.asarray(vectors), info)

    def _get(self, key: tuple[str, str, str, str]) -> np.ndarray | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            index = self._indexes[(key[0], entry.kind)]
            vectors: np.ndarray = index.reconstruct_batch(entry.ids)
            return vectors

    def _put(self, key: tuple[str, str, str, str], vectors: np.ndarray, info: ImageInfo) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"embeddings must be (N, D) with N >= 1, got shape {vectors.shape}")
        if len(vectors) > self.max_embeddings:
            _logger.debug("not caching %d vectors: more than the cache bound", len(vectors))
            return
        model_key, content_key, kind, _ = key
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            index = self._indexes.get((model_key, kind))
            if index is None:
                index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
                self._indexes[(model_key, kind)] = index
            elif index.d != vectors.shape[1]:
                raise ValueError(
                    f"embeddings of model {model_key} have size {vectors.shape[1]}, but the cache "
                    f"holds size {index.d}"
                )
            if self._size + len(vectors) > self.max_embeddings:
                target = min(
                    self.max_embeddings - len(vectors), int(self.max_embeddings * _EVICT_TO)
                )
                self._evict_locked(max(target, 0))
            ids = np.arange(self._next_id, self._next_id + len(vectors), dtype=np.int64)
            self._next_id += len(vectors)
            index.add_with_ids(vectors, ids)
            self._entries[key] = _Entry(kind=kind, setting=key[3], ids=ids)
            positions = [-1] if kind == WHOLE else range(len(vectors))
            for vector_id, position in zip(ids.tolist(), positions, strict=True):
                self._vectors[vector_id] = (key, position)
            self._size += len(vectors)
            self._mutations += 1
            self._entry_counts[content_key] = self._entry_counts.get(content_key, 0) + 1
            # The first request that brought an image keeps its id and size.
            self._infos.setdefault(content_key, info)

    def _evict_locked(self, target_size: int) -> None:
        doomed: dict[tuple[str, str], list[np.ndarray]] = {}
        while self._entries and self._size > target_size:
            key, entry = self._entries.popitem(last=False)
            doomed.setdefault((key[0], entry.kind), []).append(entry.ids)
            for vector_id in entry.ids.tolist():
                del self._vectors[vector_id]
            self._size -= len(entry.ids)
            self.evictions += 1
            self._mutations += 1
            content_key = key[1]
            self._entry_counts[content_key] -= 1
            if self._entry_counts[content_key] == 0:
                del self._entry_counts[content_key]
                del self._infos[content_key]
        for index_key, id_lists in doomed.items():
            # faiss's Python wrapper accepts an id array where the C++ signature takes a selector.
            self._indexes[index_key].remove_ids(np.concatenate(id_lists))  # type: ignore[arg-type]

    def search(
        self, model_key: str, query: np.ndarray, k: int, include_whole_images: bool
    ) -> list[CropHit]:
        """Rank the cached tiles (and whole images, if asked) of a model by cosine to a query.

        Args:
            model_key: The model whose embeddings to search.
            query: (D,) L2-normalized query embedding, such as a text embedding.
            k: Number of hits, best first.
            include_whole_images: Also rank whole-image views.
        """
        query = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
        kinds = (TILES, WHOLE) if include_whole_images else (TILES,)
        hits: list[CropHit] = []
        with self._lock:
            for kind in kinds:
                index = self._indexes.get((model_key, kind))
                if index is None or index.ntotal == 0:
                    continue
                scores, ids = index.search(query, min(k, index.ntotal))
                for score, vector_id in zip(scores[0].tolist(), ids[0].tolist(), strict=True):
                    if vector_id >= 0:
                        hits.append(self._hit_locked(int(vector_id), float(score)))
        hits.sort(key=lambda hit: hit.score, reverse=True)
        return hits[:k]

    def _hit_locked(self, vector_id: int, score: float) -> CropHit:
        key, position = self._vectors[vector_id]
        _, content_key, kind, setting = key
        info = self._infos[content_key]
        if kind == WHOLE:
            return CropHit(
                content_key=content_key,
                image_id=info.image_id,
                tile_index=-1,
                grid_size=0,
                box=(0, 0, info.width, info.height),
                score=score,
                view=setting,
            )
        grid_size = int(setting)
        box = tile_boxes(info.height, info.width, grid_size)[position]
        return CropHit(
            content_key=content_key,
            image_id=info.image_id,
            tile_index=position,
            grid_size=grid_size,
            box=box,
            score=score,
            view="tile",
        )

    def save(self) -> Path | None:
        """Write the cache to ``path`` atomically: write a temporary file, then rename it.

        Returns:
            The file written, or None when the cache has no path.
        """
        if self.path is None:
            return None
        with self._lock:
            entries = [
                {"key": list(key), "kind": entry.kind, "ids": entry.ids.tolist()}
                for key, entry in self._entries.items()
            ]
            meta = {
                "version": CACHE_FORMAT_VERSION,
                "next_id": self._next_id,
                "entries": entries,
                "infos": {ck: [i.width, i.height, i.image_id] for ck, i in self._infos.items()},
                "indexes": [list(index_key) for index_key in self._indexes],
            }
            arrays = {
                f"index_{number}": faiss.serialize_index(index)
                for number, index in enumerate(self._indexes.values())
            }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        with temporary.open("wb") as handle:
            cast(Any, np.savez)(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        _logger.info("saved the embedding cache: %d vectors to %s", len(entries), self.path)
        return self.path

    def load(self, model_keys: Collection[str] | None = None) -> int:
        """Read the cache from ``path``, keeping only entries of the given model keys.

        A missing file leaves the cache empty. An unreadable file is logged and ignored, so a
        damaged cache costs recomputation, not a failed start.

        Returns:
            The number of vectors loaded.
        """
        if self.path is None or not self.path.exists():
            return 0
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode("utf-8"))
                if meta.get("version") != CACHE_FORMAT_VERSION:
                    raise ValueError(f"cache format version {meta.get('version')!r} is not 1")
                indexes: dict[tuple[str, str], Any] = {
                    (str(k[0]), str(k[1])): faiss.deserialize_index(data[f"index_{n}"])
                    for n, k in enumerate(meta["indexes"])
                }
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            _logger.warning("ignoring the unreadable embedding cache %s: %s", self.path, err)
            return 0

        def keep(model_key: str) -> bool:
            return model_keys is None or model_key in model_keys

        with self._lock:
            self._indexes = {key: index for key, index in indexes.items() if keep(key[0])}
            self._entries.clear()
            self._vectors.clear()
            self._entry_counts.clear()
            self._next_id = int(meta["next_id"])
            self._size = 0
            for item in meta["entries"]:
                key = (
                    str(item["key"][0]),
                    str(item["key"][1]),
                    str(item["key"][2]),
                    str(item["key"][3]),
                )
                if not keep(key[0]):
                    continue
                ids = np.asarray(item["ids"], dtype=np.int64)
                self._entries[key] = _Entry(kind=str(item["kind"]), setting=key[3], ids=ids)
                positions: Sequence[int] = [-1] if item["kind"] == WHOLE else range(len(ids))
                for vector_id, position in zip(ids.tolist(), positions, strict=True):
                    self._vectors[vector_id] = (key, position)
                self._size += len(ids)
                self._entry_counts[key[1]] = self._entry_counts.get(key[1], 0) + 1
            self._infos = {
                ck: ImageInfo(int(w), int(h), str(image_id))
                for ck, (w, h, image_id) in meta["infos"].items()
                if ck in self._entry_counts
            }
            if self._size > self.max_embeddings:
                self._evict_locked(self.max_embeddings)
            self.evictions = 0
            loaded = self._size
        _logger.info("loaded the embedding cache: %d vectors from %s", loaded, self.path)
        return loaded


class VectorLru:
    """Thread-safe LRU of vectors keyed by (model key, text), such as prompt embeddings."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get_many(self, model_key: str, prompts: Sequence[str]) -> list[np.ndarray | None]:
        """Return the vector of each prompt, or None where it is not cached."""
        with self._lock:
            found: list[np.ndarray | None] = []
            for prompt in prompts:
                vector = self._items.get((model_key, prompt))
                if vector is not None:
                    self._items.move_to_end((model_key, prompt))
                found.append(vector)
            return found

    def put_many(self, model_key: str, prompts: Sequence[str], vectors: np.ndarray) -> None:
        with self._lock:
            for prompt, vector in zip(prompts, vectors, strict=True):
                self._items[(model_key, prompt)] = vector
                self._items.move_to_end((model_key, prompt))
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
