"""Fixtures shared by the tests of every part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's real test data, read in place next to the checkout."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA}: check out shared/ beside the project")
    return SHARED_DATA


@pytest.fixture(scope="session")
def coco_class_names(shared_data: Path) -> list[str]:
    """The 80 COCO class names of shared/data/coco128/classes.json, in COCO's order."""
    return list(json.loads((shared_data / "coco128" / "classes.json").read_text(encoding="utf-8")))


@pytest.fixture(scope="session")
def tiny_model_repository(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A model repository with "tiny-clip" and "tiny-classifier" (80 COCO classes), random weights.

    Exported by cdul_export.testing in a subprocess (about 20 s on 2 cores), so building it
    does not import torch into the test process.
    """
    root = tmp_path_factory.mktemp("models")
    classes = shared_data / "coco128" / "classes.json"
    result = subprocess.run(
        [sys.executable, "-m", "cdul_export.testing", str(root), str(classes)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"exporting the tiny model repository failed:\n{result.stderr[-4000:]}")
    return root
