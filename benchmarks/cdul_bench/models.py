"""The models the benchmarks serve: exported on first use into the work folder and reused."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

_logger = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 1800
# Written beside an export: the digest of the code that made it (see exporter_stamp).
EXPORT_STAMP_FILE = "export-stamp.txt"


def export_command(model: str, out: Path, threads: int) -> list[str]:
    """Return the cdul-export command that writes a random-init CLIP folder with int8."""
    script = Path(sys.executable).with_name("cdul-export")
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "cdul_export.cli"]
    return [
        *base,
        "clip",
        "--model",
        model,
        "--pretrained",
        "none",
        "--out",
        str(out),
        "--quantize",
        "int8",
        "--threads",
        str(threads),
    ]


def export_random_clip(model: str, repositories: Path, threads: int) -> tuple[Path, str]:
    """Export ``model`` with random weights unless its folder exists; return (folder, command).

    The folder is ``repositories/<model>/<model>``, so ``repositories/<model>`` is a model
    repository that contains this model only.

    Raises:
        RuntimeError: cdul-export failed.
    """
    folder = repositories / model / model
    command = export_command(model, folder, threads)
    stamp_file = folder.parent / EXPORT_STAMP_FILE
    stamp = exporter_stamp(command)
    if (folder / "config.json").is_file():
        if stamp_file.is_file() and stamp_file.read_text() == stamp:
            _logger.info("reusing the export in %s", folder)
            return folder, " ".join(command)
        _logger.info("the export in %s is from other cdul-export code; exporting again", folder)
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _logger.info("exporting %s with random weights to %s", model, folder)
    done = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"cdul-export exited {done.returncode}: {done.stderr[-1500:]}")
    stamp_file.write_text(stamp)
    return folder, " ".join(command)


def exporter_stamp(command: list[str]) -> str:
    """Return a digest of the export command and the source of cdul_export and cdul_server.

    An export is reused only while this digest is unchanged, so a change to the exporter
    or to the server's loader that it checks against exports the model again.
    """
    import cdul_export
    import cdul_server

    digest = hashlib.sha256(" ".join(command[1:]).encode())
    for package in (cdul_export, cdul_server):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def export_tiny_clip_model(repositories: Path) -> tuple[Path, str]:
    """Export the tiny random CLIP of ``cdul_export.testing`` for the smoke mode."""
    from cdul_export.testing import export_tiny_clip

    root = repositories / "tiny-clip"
    folder = root / "tiny-clip"
    if not (folder / "config.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        export_tiny_clip(root, "tiny-clip")
    return folder, "cdul_export.testing.export_tiny_clip(root, 'tiny-clip')"


def ensure_int8(folder: Path) -> bool:
    """Add an int8 image graph to ``folder`` when its config lists none; return True if added.

    Uses the same dynamic quantization as ``cdul-export --quantize int8``.
    """
    import json

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if "image_int8" in config.get("files", {}):
        return False
    from cdul_export.quantize import quantize_int8

    quantize_int8(folder / config["files"]["image"], folder / "image.int8.onnx")
    config["files"]["image_int8"] = "image.int8.onnx"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return True
