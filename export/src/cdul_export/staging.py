"""Writing a model folder so that it appears complete or not at all."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cdul_server.model_repository import ClassifierModel, ClipModel, SessionConfig, load_model

_logger = logging.getLogger(__name__)


class ExportError(ValueError):
    """Invalid export input: the message names the value and the fix."""


def check_output_folder(out: Path, overwrite: bool) -> Path:
    """Return ``out`` as an absolute path after checking that it may be written.

    Raises:
        ExportError: ``out`` exists and ``overwrite`` is false, or it is not a folder.
    """
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ExportError(f"output path {out} exists and is not a folder: choose another --out")
        if not overwrite:
            raise ExportError(
                f"output folder {out} already exists: pass --overwrite to replace it, "
                "or choose another --out"
            )
    return out


@contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out`` and rename it to ``out`` on success.

    On any exception the temporary folder and the parent folders that this call created are
    deleted, and ``out`` is left as it was. With ``overwrite``, an existing ``out`` is replaced
    only after the new folder is complete.
    """
    out = check_output_folder(out, overwrite)
    created = [folder for folder in out.parents if not folder.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        os.chmod(stage, 0o755)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty_folders(created)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)
    _logger.info("wrote %s", out)


def _remove_empty_folders(folders: list[Path]) -> None:
    # Deepest first; a folder that something else wrote into meanwhile stays.
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def load_staged(folder: Path, session: SessionConfig) -> ClipModel | ClassifierModel:
    """Load a staged folder with the server's loader, without its load-time warnings.

    The server warns about random weights when it loads such a model; during an export that
    warning would name the temporary folder and repeat what the export already logged.
    """
    loader_logger = logging.getLogger("cdul_server.model_repository")
    previous = loader_logger.level
    loader_logger.setLevel(logging.ERROR)
    try:
        return load_model(folder, session)
    finally:
        loader_logger.setLevel(previous)
