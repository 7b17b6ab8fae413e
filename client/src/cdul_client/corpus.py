"""Find the images of a corpus: folders (recursive), text files of paths, webdataset tar shards."""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".lst", ".list")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class CorpusError(ValueError):
    """An input that cannot be used as a corpus; the message names it and the fix."""


@dataclass(frozen=True)
class CorpusImage:
    """One image of a corpus.

    Attributes:
        id: unique id in the corpus: the path relative to the input folder, the path as
            listed in a text file, the file name of a single image, or the member name inside
            a tar shard.
        path: the image file, or the tar shard that contains it.
        member: the member name inside the tar shard; None for plain files.
    """

    id: str
    path: Path
    member: str | None = None


def discover(
    inputs: Sequence[str | Path], extensions: Sequence[str] = DEFAULT_EXTENSIONS
) -> list[CorpusImage]:
    """List the images of the inputs in a stable order, with unique ids.

    Args:
        inputs: folders (searched recursively for `extensions`), text files with one path per
            line (`.txt`, `.lst`, `.list`; relative paths are relative to the text file's
            folder; blank lines and lines starting with "#" are skipped), webdataset tar
            shards (`.tar`, `.tar.gz`, `.tgz`; members with an image extension), or single
            image files.
        extensions: image file name suffixes, compared without case.

    Raises:
        CorpusError: an input does not exist or is of an unknown kind, or two images get the
            same id.
    """
    suffixes = tuple(
        ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions
    )
    images: list[CorpusImage] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            images.extend(_folder_images(path, suffixes))
        elif not path.is_file():
            raise CorpusError(f"input {raw} does not exist: pass folders, path lists or tar shards")
        elif path.name.lower().endswith(TAR_SUFFIXES):
            images.extend(_tar_images(path, suffixes))
        elif path.name.lower().endswith(LIST_SUFFIXES):
            images.extend(_listed_images(path))
        elif path.name.lower().endswith(suffixes):
            images.append(CorpusImage(id=path.name, path=path))
        else:
            raise CorpusError(
                f"input {raw} is neither a folder, an image ({', '.join(suffixes)}), a path list "
                f"({', '.join(LIST_SUFFIXES)}) nor a tar shard ({', '.join(TAR_SUFFIXES)})"
            )
    _check_unique(images)
    return images


def _folder_images(root: Path, suffixes: tuple[str, ...]) -> Iterable[CorpusImage]:
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(suffixes) and not name.startswith("."):
                path = Path(folder, name)
                found.append(CorpusImage(id=path.relative_to(root).as_posix(), path=path))
    if not found:
        _logger.warning("folder %s contains no image with suffix %s", root, ", ".join(suffixes))
    return found


def _listed_images(list_path: Path) -> Iterable[CorpusImage]:
    found = []
    text = list_path.read_text(encoding="utf-8")
    for line_number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry)
        resolved = path if path.is_absolute() else list_path.parent / path
        if not resolved.is_file():
            raise CorpusError(
                f"{list_path}:{line_number}: listed image {entry} does not exist (relative "
                "paths are relative to the list file's folder)"
            )
        found.append(CorpusImage(id=entry, path=resolved))
    return found


def _tar_images(shard: Path, suffixes: tuple[str, ...]) -> Iterable[CorpusImage]:
    try:
        with tarfile.open(shard) as archive:
            names = [
                member.name
                for member in archive.getmembers()
                if member.isfile() and member.name.lower().endswith(suffixes)
            ]
    except (tarfile.TarError, OSError) as err:
        raise CorpusError(f"cannot read tar shard {shard}: {err}") from err
    return [CorpusImage(id=name, path=shard, member=name) for name in names]


def _check_unique(images: Sequence[CorpusImage]) -> None:
    seen: dict[str, CorpusImage] = {}
    for image in images:
        other = seen.get(image.id)
        if other is not None:
            raise CorpusError(
                f"two images have the id {image.id!r} ({_where(other)} and {_where(image)}): "
                "label them into separate output files, or pass their common parent folder"
            )
        seen[image.id] = image


def _where(image: CorpusImage) -> str:
    return f"{image.path}:{image.member}" if image.member else str(image.path)


class ImageReader:
    """Read the bytes of corpus images, keeping tar shards open between reads."""

    def __init__(self) -> None:
        self._shards: dict[Path, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}

    def read(self, image: CorpusImage) -> bytes:
        """Return the encoded bytes of one image.

        Raises:
            OSError: the file or member cannot be read.
        """
        if image.member is None:
            return image.path.read_bytes()
        archive, members = self._open(image.path)
        info = members.get(image.member)
        if info is None:
            raise OSError(f"member {image.member} not found in {image.path}")
        try:
            stream = archive.extractfile(info)
        except tarfile.TarError as err:
            raise OSError(f"cannot read member {image.member} of {image.path}: {err}") from err
        if stream is None:
            raise OSError(f"member {image.member} of {image.path} is not a file")
        with stream:
            return stream.read()

    def _open(self, shard: Path) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
        entry = self._shards.get(shard)
        if entry is None:
            try:
                # Kept open across reads and closed in close(), so no context manager.
                archive = tarfile.open(shard)  # noqa: SIM115
                members = {member.name: member for member in archive.getmembers()}
            except tarfile.TarError as err:
                raise OSError(f"cannot open tar shard {shard}: {err}") from err
            entry = self._shards[shard] = (archive, members)
        return entry

    def close(self) -> None:
        """Close the open tar shards."""
        for archive, _ in self._shards.values():
            archive.close()
        self._shards.clear()
