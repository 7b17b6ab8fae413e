"""`cdul-train compare`: one figure and a table of final figures over several run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cdul_training.cli import main
from cdul_training.compare import read_run
from cdul_training.synthetic import make_corpus

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("compare")
    train_set = make_corpus(root / "train", 60, seed=4, embedding_dim=12)
    val_set = make_corpus(root / "val", 30, seed=5, embedding_dim=12)
    folders = []
    for name, update_every in (("control", "0"), ("aligned", "1")):
        out = root / name
        argv = ["--log-level", "WARNING", "fit", "--arch", "clip-linear"]
        argv += ["--pseudo-labels", str(train_set.pseudo_labels), "--out", str(out)]
        argv += ["--val-pseudo-labels", str(val_set.pseudo_labels)]
        argv += ["--val-labels", str(val_set.ground_truth)]
        argv += ["--train-labels", str(train_set.ground_truth)]
        argv += ["--epochs", "3", "--warmup", "1", "--update-every", update_every]
        argv += ["--label-lr", "1.0", "--threads", "1"]
        assert main(argv) == 0
        folders.append(out)
    return folders


def test_compare_prints_table_and_figure(runs: list[Path], tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    figure = tmp_path / "both.png"
    assert main(["compare", *map(str, runs), "--out", str(figure)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("| run | arch | loss |")
    control = next(line for line in lines if line.startswith("| control |"))
    aligned = next(line for line in lines if line.startswith("| aligned |"))
    assert "| clip-linear | bce | 3 | 1 | 0 |" in control
    assert "| clip-linear | bce | 3 | 1 | 1 |" in aligned
    assert figure.is_file()
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_figures_match_metrics(runs: list[Path]) -> None:
    summary = read_run(runs[1])
    history = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    figures = summary.figures()
    assert figures["epoch"] == 3
    assert figures["val_map"] == pytest.approx(history[-1]["val_map"])
    assert figures["best_val_map"] == pytest.approx(max(e["val_map"] for e in history))
    assert figures["pseudo_label_map_initial"] == pytest.approx(history[0]["pseudo_label_map"])
    assert figures["pseudo_label_map"] == pytest.approx(history[-1]["pseudo_label_map"])
    assert figures["pseudo_label_map"] != figures["pseudo_label_map_initial"]


def test_compare_rejects_folder_without_metrics(tmp_path: Path, capsys) -> None:
    assert main(["compare", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
