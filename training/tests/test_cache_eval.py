"""Tests of `cdul-train evaluate-cache` on the VOC 2012 RN50x64 score cache and on bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cdul_training import cli

# The public CDUL reproduction's pseudo-label mAP on this cache, in percent.
EXPECTED = {
    ("global", None): 85.91,
    ("aggregate", "0"): 86.01,
    ("final", "0"): 89.31,
    ("final", "0.1"): 83.88,
}
TOLERANCE = 0.01


@pytest.fixture(scope="module")
def voc_cache(shared_data: Path) -> Path:
    return shared_data / "voc2012-rn50x64-cache" / "cache.npz"


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    status = cli.main(["evaluate-cache", *argv, "--json"])
    out = capsys.readouterr().out
    assert status == 0
    report: dict[str, Any] = json.loads(out)
    return report


def _check_expected(report: dict[str, Any]) -> None:
    for (name, key), expected in EXPECTED.items():
        value = report[name] if key is None else report[name][key]
        assert value == pytest.approx(expected, abs=TOLERANCE), (name, key)


def test_evaluate_cache_reproduces_voc(capsys: pytest.CaptureFixture[str], voc_cache: Path) -> None:
    report = _run_json(capsys, "--cache", str(voc_cache))
    assert report["n_images"] == 5717
    _check_expected(report)
    thresholds = ["0", "0.05", "0.1", "0.2", "0.3", "0.4", "0.5"]
    assert list(report["aggregate"]) == thresholds
    assert list(report["final"]) == thresholds
    assert list(report["final_lambda"]) == ["0", "0.5", "1"]
    assert report["final_lambda"]["0"] == report["final"]["0"]
    assert report["skipped_classes"] == []


def test_evaluate_cache_thresholds_select_beta(
    capsys: pytest.CaptureFixture[str], voc_cache: Path
) -> None:
    # The cached rows are nearly uniform (every alpha is below 0.052), so threshold 0 takes
    # alpha everywhere and every threshold from 0.1 on takes beta everywhere.
    report = _run_json(capsys, "--cache", str(voc_cache))
    fractions = report["alpha_fraction"]
    assert fractions["0"] == 1.0
    assert 0.0 < fractions["0.05"] < 1.0
    for key in ("0.1", "0.2", "0.3", "0.4", "0.5"):
        assert fractions[key] == 0.0, key
        assert report["aggregate"][key] == report["aggregate"]["0.1"], key


def test_evaluate_cache_per_class(capsys: pytest.CaptureFixture[str], voc_cache: Path) -> None:
    report = _run_json(capsys, "--cache", str(voc_cache), "--per-class")
    per_class = report["per_class"]
    assert len(per_class["global"]) == 20
    assert next(iter(per_class["global"])) == "aeroplane"
    assert np.mean(list(per_class["global"].values())) == pytest.approx(report["global"])
    assert np.mean(list(per_class["final"]["0.1"].values())) == pytest.approx(
        report["final"]["0.1"]
    )
    assert set(per_class["final_lambda"]) == {"0", "0.5", "1"}


def test_evaluate_cache_table_output(capsys: pytest.CaptureFixture[str], voc_cache: Path) -> None:
    status = cli.main(["evaluate-cache", "--cache", str(voc_cache), "--per-class"])
    out = capsys.readouterr().out
    assert status == 0
    assert "5717 images, 20 classes" in out
    assert "global scores mAP: 85.91" in out
    assert "pottedplant" in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("threshold")) + 1
    end = lines.index("", start)
    rows = {line.split()[0]: line.split()[1:] for line in lines[start:end]}
    assert list(rows) == ["0", "0.05", "0.1", "0.2", "0.3", "0.4", "0.5"]
    assert rows["0"] == ["1.000", "86.01", "89.31"]
    assert rows["0.1"] == ["0.000", "43.72", "83.88"]


def test_evaluate_cache_temperature_factor(
    capsys: pytest.CaptureFixture[str], voc_cache: Path
) -> None:
    plain = _run_json(capsys, "--cache", str(voc_cache))
    same = _run_json(capsys, "--cache", str(voc_cache), "--temperature-factor", "1")
    assert same["final"] == plain["final"]
    rescaled = _run_json(capsys, "--cache", str(voc_cache), "--temperature-factor", "460.5")
    assert rescaled["temperature_factor"] == 460.5
    assert rescaled["tile_normalizer"] == "alpha"
    assert rescaled["global"] != pytest.approx(plain["global"], abs=0.1)
    fractions = list(rescaled["alpha_fraction"].values())
    assert fractions == sorted(fractions, reverse=True)
    # At CLIP's temperature some alpha values reach every threshold up to 0.5.
    assert rescaled["alpha_fraction"]["0.5"] > 0.0


def test_evaluate_cache_console_script(voc_cache: Path) -> None:
    script = Path(sys.executable).with_name("cdul-train")
    result = subprocess.run(
        [str(script), "evaluate-cache", "--cache", str(voc_cache), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    _check_expected(json.loads(result.stdout))


# --- bad input -----------------------------------------------------------------------------


def _write_cache(path: Path, **overrides: Any) -> Path:
    rng = np.random.default_rng(0)
    tiles = rng.dirichlet(np.ones(3), size=(6, 9)).astype(np.float32)
    arrays: dict[str, Any] = {
        "global_scores": rng.dirichlet(np.ones(3), size=6).astype(np.float32),
        "alpha": tiles.max(axis=1),
        "beta": tiles.min(axis=1),
        "labels": np.eye(6, 3, dtype=np.uint8),
        "classes": np.array(["cat", "dog", "bird"]),
        "ids": np.array([f"image_{i}" for i in range(6)]),
    }
    for name, value in overrides.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    np.savez(path, **arrays)
    return path


def _nan_scores() -> np.ndarray:
    scores = np.full((6, 3), 1 / 3, dtype=np.float32)
    scores[4, 1] = np.nan
    return scores


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"beta": None}, "missing the array(s) beta"),
        ({"alpha": None, "labels": None}, "missing the array(s) alpha, labels"),
        ({"alpha": np.full((6, 4), 0.5)}, "array alpha"),
        ({"labels": np.ones((5, 3), dtype=np.uint8)}, "array labels"),
        ({"global_scores": np.full(6, 0.5)}, "array global_scores"),
        ({"global_scores": _nan_scores()}, "array global_scores"),
        ({"labels": np.zeros((6, 3), dtype=np.uint8)}, "array labels"),
        ({"labels": np.full((6, 3), 2, dtype=np.uint8)}, "array labels"),
        ({"beta": np.ones((6, 3), dtype=np.float32)}, "array beta"),
        ({"classes": np.array(["cat", "dog"])}, "array classes"),
    ],
)
def test_evaluate_cache_rejects_bad_cache(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, overrides: dict[str, Any], expected: str
) -> None:
    path = _write_cache(tmp_path / "cache.npz", **overrides)
    status = cli.main(["evaluate-cache", "--cache", str(path)])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cdul-train evaluate-cache: error: ")
    assert expected in lines[0]


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("nan", "NaN"),
        ("no-positive", "no positive"),
        ("shape", "has shape (6, 4) but global_scores has (6, 3)"),
    ],
)
def test_evaluate_cache_names_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, problem: str, expected: str
) -> None:
    overrides: dict[str, Any] = {
        "nan": {"global_scores": _nan_scores()},
        "no-positive": {"labels": np.zeros((6, 3), dtype=np.uint8)},
        "shape": {"beta": np.full((6, 4), 0.1, dtype=np.float32)},
    }[problem]
    path = _write_cache(tmp_path / "cache.npz", **overrides)
    assert cli.main(["evaluate-cache", "--cache", str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_evaluate_cache_synthetic_runs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _write_cache(tmp_path / "cache.npz", ids=None)
    report = _run_json(capsys, "--cache", str(path), "--per-class")
    assert report["n_images"] == 6
    assert set(report["per_class"]["global"]) == {"cat", "dog", "bird"}


def test_evaluate_cache_reports_class_without_positive(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    labels = np.eye(6, 3, dtype=np.uint8)
    labels[:, 2] = 0
    path = _write_cache(tmp_path / "cache.npz", labels=labels)
    report = _run_json(capsys, "--cache", str(path), "--per-class")
    assert report["skipped_classes"] == ["bird"]
    assert report["per_class"]["global"]["bird"] is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--thresholds", "0,abc"], "--thresholds must be comma-separated numbers"),
        (["--thresholds", "0,1.5"], "--thresholds values must be from 0 to 1"),
        (["--lambdas", "0,0"], "--lambdas has a repeated value"),
        (["--temperature-factor", "0"], "--temperature-factor must be a finite positive"),
        (["--temperature-factor", "nan"], "--temperature-factor must be a finite positive"),
    ],
)
def test_evaluate_cache_rejects_bad_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], expected: str
) -> None:
    path = _write_cache(tmp_path / "cache.npz")
    assert cli.main(["evaluate-cache", "--cache", str(path), *argv]) == 2
    assert expected in capsys.readouterr().err


def test_evaluate_cache_rejects_unreadable_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert cli.main(["evaluate-cache", "--cache", str(tmp_path / "absent.npz")]) == 2
    assert "not found" in capsys.readouterr().err

    text_file = tmp_path / "cache.txt"
    text_file.write_text("not a cache\n")
    assert cli.main(["evaluate-cache", "--cache", str(text_file)]) == 2
    assert "cannot read cache file" in capsys.readouterr().err

    single = tmp_path / "single.npy"
    np.save(single, np.zeros((2, 2)))
    assert cli.main(["evaluate-cache", "--cache", str(single)]) == 2
    assert "single .npy array" in capsys.readouterr().err

    zero_scores = np.zeros((6, 3), dtype=np.float32)
    path = _write_cache(tmp_path / "zeros.npz", global_scores=zero_scores)
    assert cli.main(["evaluate-cache", "--cache", str(path), "--temperature-factor", "2"]) == 2
    assert "finite and positive" in capsys.readouterr().err
