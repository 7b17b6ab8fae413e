"""The models the benchmarks serve: exported on first use into the work folder and reused."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

_logger = logging.getLogger(__name__)

EXPORT_TIMEOUT_S = 1800


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
    if (folder / "config.json").is_file():
        _logger.info("reusing the export in %s", folder)
        return folder, " ".join(command)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _logger.info("exporting %s with random weights to %s", model, folder)
    done = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"cdul-export exited {done.returncode}: {done.stderr[-1500:]}")
    return folder, " ".join(command)


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
