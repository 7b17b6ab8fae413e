"""The smoke mode of benchmarks/run.py: every figure measured on tiny models, page written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS_DIR = Path(__file__).resolve().parents[1]
RUN = BENCHMARKS_DIR / "run.py"
SECTIONS = (
    "## Hardware and software",
    "## Targets",
    "## (f) Machine ceiling and FLOPs per view",
    "## (a) Encoder alone on ONNX Runtime",
    "## (b) cdul-server end to end through cdul_client",
    "## (c) The reproduction's way: open_clip in PyTorch, per image",
    "## (d) Relabeling from the cache with a new 20-class vocabulary",
    "## (e) Predict: a cdul-train classifier, ONNX Runtime against PyTorch eager",
    "## int8 against fp32 pseudo labels on digit-scenes",
    "## Profiles",
)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("bench")
    out = folder / "RESULTS.md"
    work = folder / "work"
    done = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--smoke",
            "--images",
            str(shared_data / "coco128"),
            "--out",
            str(out),
            "--work-dir",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=BENCHMARKS_DIR.parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {
        "page": out.read_text(),
        "results": json.loads((work / "results.json").read_text()),
        "stderr": done.stderr,
        "work": work,
    }


def _measurements(run: dict[str, Any], figure: str) -> list[dict[str, Any]]:
    return [m for m in run["results"]["measurements"] if m["figure"] == figure]


def test_smoke_misses_no_figure(smoke_run: dict[str, Any]) -> None:
    assert smoke_run["results"]["missing"] == [], smoke_run["stderr"][-4000:]


def test_smoke_measures_every_figure(smoke_run: dict[str, Any]) -> None:
    figures = {m["figure"] for m in smoke_run["results"]["measurements"]}
    assert figures == {"a", "b", "c", "d", "e", "f"}
    for m in smoke_run["results"]["measurements"]:
        assert len(m["values"]) == smoke_run["results"]["plan"]["repeats"], m["label"]
        assert all(math.isfinite(v) and v > 0 for v in m["values"]), m["label"]
        assert m["low"] <= m["median"] <= m["high"], m["label"]


def test_smoke_server_covers_concurrencies_and_precisions(smoke_run: dict[str, Any]) -> None:
    server = _measurements(smoke_run, "b")
    assert {m["params"]["concurrency"] for m in server} == {1, 4, 16}
    assert {m["params"]["precision"] for m in server} == {"fp32", "int8"}
    assert len({m["params"]["max batch size"] for m in server}) == 2
    for m in server:
        assert m["extra"]["p50_ms"] <= m["extra"]["p95_ms"] <= m["extra"]["p99_ms"]
        assert m["extra"]["cache_hits"] == 0


def test_smoke_relabel_served_from_cache(smoke_run: dict[str, Any]) -> None:
    relabel = _measurements(smoke_run, "d")
    assert {m["params"]["pass"] for m in relabel} == {"new vocabulary", "vocabulary cached"}
    for m in relabel:
        assert m["extra"]["cache_hits"] == m["params"]["images"] * len(m["values"])


def test_smoke_classifier_matches_eager(smoke_run: dict[str, Any]) -> None:
    onnx = [m for m in _measurements(smoke_run, "e") if "ONNX" in m["label"]]
    assert len(onnx) == 1
    assert onnx[0]["extra"]["max_abs_logit_diff"] < 1e-3
    assert any("Predict" in m["label"] for m in _measurements(smoke_run, "e"))


def test_smoke_counts_flops_and_quality(smoke_run: dict[str, Any]) -> None:
    flops = smoke_run["results"]["flops"]["tiny-clip"]
    assert flops["onnx"] > 0
    assert flops["onnx_uncounted"] == []
    quality = smoke_run["results"]["quality"]["tiny-clip"]
    for precision in ("fp32", "int8"):
        assert 0.0 <= quality[precision]["final"] <= 100.0


def test_smoke_profiles_server_or_says_why(smoke_run: dict[str, Any]) -> None:
    results = smoke_run["results"]
    profiled = [name for name in results["profiles"] if name.startswith("server ")]
    explained = [note for note in results["notes"] if "py-spy" in note]
    assert profiled or explained
    for name in profiled:
        assert results["profiles"][name]["samples"] > 0


def test_smoke_page_has_every_section(smoke_run: dict[str, Any]) -> None:
    page = smoke_run["page"]
    for section in SECTIONS:
        assert section in page, section
    assert "**Smoke run**" in page
    assert "None: every figure of the plan was measured." in page


def test_render_rewrites_page_from_json(smoke_run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "again.md"
    done = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--render",
            str(smoke_run["work"] / "results.json"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text() == smoke_run["page"]


def test_bad_threads_exit_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(RUN), "--threads", "0", "--out", str(tmp_path / "x.md")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "--threads 0" in done.stderr
