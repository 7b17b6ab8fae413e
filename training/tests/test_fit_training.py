"""`cdul-train fit`: training on a tiny generated corpus, outputs, resume, bad input, DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cdul_training.cli import main
from cdul_training.fit import FitConfig, train
from cdul_training.records import read_pseudo_labels, write_pseudo_labels
from cdul_training.synthetic import SyntheticCorpus, make_corpus

torch.set_num_threads(1)

IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCorpus:
    return make_corpus(tmp_path_factory.mktemp("train"), 96, image_size=IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def val_corpus(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCorpus:
    return make_corpus(tmp_path_factory.mktemp("val"), 64, image_size=IMAGE_SIZE, seed=1)


def _argv(corpus: SyntheticCorpus, out: Path, *extra: str) -> list[str]:
    return [
        "--log-level",
        "WARNING",
        "fit",
        "--images",
        str(corpus.images),
        "--pseudo-labels",
        str(corpus.pseudo_labels),
        "--out",
        str(out),
        "--image-size",
        str(IMAGE_SIZE),
        "--batch-size",
        "16",
        "--lr",
        "0.003",
        "--threads",
        "1",
        *extra,
    ]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fit_map_rises_and_writes_outputs(
    corpus: SyntheticCorpus, val_corpus: SyntheticCorpus, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = _argv(corpus, out, "--epochs", "4", "--warmup", "1", "--label-lr", "0.3")
    argv += ["--val-images", str(val_corpus.images), "--val-labels", str(val_corpus.ground_truth)]
    argv += ["--train-labels", str(corpus.ground_truth)]
    assert main(argv) == 0

    history = _metrics(out)
    assert [entry["epoch"] for entry in history] == [0, 1, 2, 3, 4]
    assert history[-1]["val_map"] > history[0]["val_map"] + 10
    assert [entry["label_update"] for entry in history] == [False, False, True, True, True]
    assert history[1]["pseudo_label_map"] == pytest.approx(history[0]["pseudo_label_map"])
    assert history[-1]["label_mean_abs_change"] > 0
    for name in ("final.pt", "best.pt", "last.pt", "loss.png", "map.png", "settings.json"):
        assert (out / name).is_file(), name

    refined = read_pseudo_labels(out / "pseudo_labels.refined.jsonl")
    initial = read_pseudo_labels(corpus.pseudo_labels)
    assert refined.ids == initial.ids
    assert refined.header["refined_by"] == {"run": "run", "epoch": 4}
    np.testing.assert_allclose(refined.labels("initial"), initial.labels("final"))
    assert not np.allclose(refined.labels("final"), initial.labels("final"))
    np.testing.assert_allclose(refined.labels("global"), initial.labels("global"))

    checkpoint = torch.load(out / "final.pt", weights_only=True)
    assert checkpoint["format"] == "cdul-classifier-checkpoint"
    assert checkpoint["arch"] == "small-cnn"
    assert checkpoint["class_names"] == corpus.classes
    assert checkpoint["epoch"] == 4
    assert checkpoint["preprocess"]["size"] == IMAGE_SIZE
    assert checkpoint["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    np.testing.assert_allclose(
        checkpoint["pseudo_labels"]["labels"].numpy(), refined.labels("final"), atol=1e-6
    )
    best = torch.load(out / "best.pt", weights_only=True)
    best_epoch = max(history[1:], key=lambda e: e["val_map"])["epoch"]
    assert best["epoch"] == best_epoch


def test_fit_control_keeps_labels(corpus: SyntheticCorpus, tmp_path: Path) -> None:
    out = tmp_path / "control"
    assert main(_argv(corpus, out, "--epochs", "2", "--warmup", "0", "--update-every", "0")) == 0
    refined = read_pseudo_labels(out / "pseudo_labels.refined.jsonl")
    initial = read_pseudo_labels(corpus.pseudo_labels).labels("final")
    np.testing.assert_allclose(refined.labels("final"), np.clip(initial, 1e-4, 1 - 1e-4))
    assert not any(entry["label_update"] for entry in _metrics(out))


class _Interrupt(Exception):
    pass


def _stop_after_two(epoch: int) -> None:
    if epoch == 2:
        raise _Interrupt


def test_fit_resume_matches_uninterrupted(corpus: SyntheticCorpus, tmp_path: Path) -> None:
    def config(out: Path) -> FitConfig:
        return FitConfig(
            images=str(corpus.images),
            pseudo_labels=[str(corpus.pseudo_labels)],
            out=str(out),
            epochs=4,
            warmup=1,
            label_lr=0.3,
            image_size=IMAGE_SIZE,
            batch_size=16,
            lr=0.003,
            augment="crop-flip",
            threads=1,
            train_labels=str(corpus.ground_truth),
        )

    train(config(tmp_path / "whole"))
    with pytest.raises(_Interrupt):
        train(config(tmp_path / "resumed"), epoch_callback=_stop_after_two)
    assert not (tmp_path / "resumed" / "final.pt").exists()
    assert main(["--log-level", "WARNING", "fit", "--resume", str(tmp_path / "resumed")]) == 0

    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert resumed["epoch"] == 4
    for key, tensor in whole["model"].items():
        torch.testing.assert_close(resumed["model"][key], tensor, atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(
        resumed["pseudo_labels"]["latent"], whole["pseudo_labels"]["latent"], atol=1e-6, rtol=0
    )
    whole_history = [
        {k: v for k, v in e.items() if k != "time_s"} for e in _metrics(tmp_path / "whole")
    ]
    resumed_history = [
        {k: v for k, v in e.items() if k != "time_s"} for e in _metrics(tmp_path / "resumed")
    ]
    assert resumed_history == whole_history


def test_fit_resume_rejects_changed_setting(
    corpus: SyntheticCorpus, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    assert main(_argv(corpus, out, "--epochs", "1")) == 0
    capsys.readouterr()
    assert main(["fit", "--resume", str(out), "--label-lr", "5"]) == 2
    assert "--label-lr 5.0 differs from the run's" in capsys.readouterr().err


def _copy_corpus(corpus: SyntheticCorpus, root: Path) -> tuple[Path, Path]:
    images = root / "images"
    shutil.copytree(corpus.images, images)
    return images, corpus.pseudo_labels


def _rewrite_records(source: Path, target: Path, edit) -> Path:
    lines = source.read_text().splitlines()
    header, records = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    header, records = edit(header, records)
    target.write_text("\n".join(json.dumps(o) for o in [header, *records]) + "\n")
    return target


def _set_label(index: int, value: float):
    def edit(header, records):
        records[index]["final"][1] = value
        return header, records

    return edit


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_image", "record 'img0005.png' has no image in the corpus"),
        ("image_without_record", "image 'img0007.png' has no pseudo-label record"),
        ("label_above_one", "image 'img0003.png' has 'final'[1] = 1.2, outside [0, 1] or NaN"),
        ("label_nan", "image 'img0004.png' has 'final'[1] = nan"),
        ("class_order", "same class list and order"),
    ],
)
def test_fit_bad_input_exits_2(
    case: str, message: str, corpus: SyntheticCorpus, tmp_path: Path, capsys
) -> None:
    images, pseudo = _copy_corpus(corpus, tmp_path)
    extra_pseudo: list[str] = []
    if case == "missing_image":
        (images / "img0005.png").unlink()
        (images / "img0009.png").unlink()
    elif case == "image_without_record":

        def drop(header, records):
            return header, [r for r in records if r["id"] not in ("img0007.png", "img0011.png")]

        pseudo = _rewrite_records(pseudo, tmp_path / "p.jsonl", drop)
    elif case == "label_above_one":
        pseudo = _rewrite_records(pseudo, tmp_path / "p.jsonl", _set_label(3, 1.2))
    elif case == "label_nan":
        pseudo = _rewrite_records(pseudo, tmp_path / "p.jsonl", _set_label(4, float("nan")))
    elif case == "class_order":

        def split_first(header, records):
            return header, records[:10]

        def split_rest(header, records):
            return header | {"classes": list(reversed(header["classes"]))}, records[10:]

        pseudo = _rewrite_records(pseudo, tmp_path / "a.jsonl", split_first)
        extra_pseudo = [
            str(_rewrite_records(corpus.pseudo_labels, tmp_path / "b.jsonl", split_rest))
        ]
    argv = _argv(corpus, tmp_path / "run", "--epochs", "1")
    argv[argv.index("--images") + 1] = str(images)
    position = argv.index("--pseudo-labels") + 1
    argv[position : position + 1] = [str(pseudo), *extra_pseudo]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "last.pt").exists()


def test_fit_kl_loss_trains(corpus: SyntheticCorpus, val_corpus: SyntheticCorpus, tmp_path) -> None:
    out = tmp_path / "kl"
    argv = _argv(corpus, out, "--epochs", "3", "--warmup", "1", "--loss", "kl")
    argv += ["--val-images", str(val_corpus.images), "--val-labels", str(val_corpus.ground_truth)]
    assert main(argv) == 0
    history = _metrics(out)
    assert history[-1]["val_map"] > history[0]["val_map"]
    assert history[-1]["label_update"] is True
    assert torch.load(out / "final.pt", weights_only=True)["activation"] == "softmax"


def test_fit_clip_linear_from_embeddings(tmp_path: Path) -> None:
    train_set = make_corpus(tmp_path / "train", 80, seed=2, embedding_dim=16)
    val_set = make_corpus(tmp_path / "val", 40, seed=3, embedding_dim=16)
    # The linear head reads no images: remove them to prove it.
    shutil.rmtree(train_set.images)
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    preprocess = {"size": 32, "mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3]}
    preprocess |= {"interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    clip_config = {"kind": "clip", "source": {"model": "tiny"}, "preprocess": preprocess}
    (clip_dir / "config.json").write_text(json.dumps(clip_config))
    out = tmp_path / "run"
    argv = ["--log-level", "WARNING", "fit", "--arch", "clip-linear"]
    argv += ["--pseudo-labels", str(train_set.pseudo_labels), "--out", str(out)]
    argv += ["--val-pseudo-labels", str(val_set.pseudo_labels)]
    argv += ["--val-labels", str(val_set.ground_truth), "--clip-model", str(clip_dir)]
    argv += ["--epochs", "5", "--warmup", "2", "--lr", "0.3", "--threads", "1"]
    assert main(argv) == 0
    history = _metrics(out)
    assert history[-1]["val_map"] > history[0]["val_map"]
    checkpoint = torch.load(out / "final.pt", weights_only=True)
    assert checkpoint["arch"] == "clip-linear"
    assert checkpoint["embedding_dim"] == 16
    assert checkpoint["clip"]["model"] == "synthetic"
    assert checkpoint["clip"]["model_config"]["source"] == {"model": "tiny"}
    assert checkpoint["preprocess"] == preprocess


def test_fit_ddp_two_gloo_processes(corpus: SyntheticCorpus, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    argv = _argv(corpus, out, "--epochs", "2", "--warmup", "0", "--label-lr", "0.3")
    argv += ["--train-labels", str(corpus.ground_truth), "--device", "cpu"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "cdul_training.cli", *argv]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["world_size"] == 2
    history = _metrics(out)
    assert [entry["epoch"] for entry in history] == [0, 1, 2]
    refined = read_pseudo_labels(out / "pseudo_labels.refined.jsonl")
    initial = read_pseudo_labels(corpus.pseudo_labels)
    assert refined.ids == initial.ids
    # Each image sits in one of the two shards; every image's labels must have moved.
    moved = np.abs(refined.labels("final") - refined.labels("initial")).max(axis=1)
    assert (moved > 1e-6).all()


def test_fit_parquet_in_parquet_out(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    train_set = make_corpus(tmp_path / "train", 40, seed=6, embedding_dim=8)
    source = read_pseudo_labels(train_set.pseudo_labels)
    parquet = tmp_path / "labels.parquet"
    write_pseudo_labels(parquet, source.header, source.records)
    out = tmp_path / "run"
    argv = ["--log-level", "WARNING", "fit", "--arch", "clip-linear", "--threads", "1"]
    argv += ["--pseudo-labels", str(parquet), "--out", str(out), "--epochs", "2", "--warmup", "0"]
    assert main(argv) == 0
    refined = read_pseudo_labels(out / "pseudo_labels.refined.parquet")
    assert refined.ids == source.ids
    assert refined.header["refined_by"]["epoch"] == 2
    np.testing.assert_allclose(refined.labels("initial"), source.labels("final"))
    np.testing.assert_allclose(refined.embeddings(), source.embeddings(), atol=1e-6)


def test_fit_reads_image_list_file(corpus: SyntheticCorpus, tmp_path: Path) -> None:
    listing = corpus.images.parent / "train.txt"
    names = sorted(path.name for path in corpus.images.iterdir())
    listing.write_text("# training images\n" + "".join(f"images/{n}\n" for n in names))
    # The list ids are the lines as written, so the records need the same ids.
    source = read_pseudo_labels(corpus.pseudo_labels)
    records = [r | {"id": f"images/{r['id']}"} for r in source.records]
    pseudo = tmp_path / "listed.jsonl"
    write_pseudo_labels(pseudo, source.header, records)
    argv = _argv(corpus, tmp_path / "run", "--epochs", "1")
    argv[argv.index("--images") + 1] = str(listing)
    argv[argv.index("--pseudo-labels") + 1] = str(pseudo)
    assert main(argv) == 0
    assert read_pseudo_labels(tmp_path / "run" / "pseudo_labels.refined.jsonl").ids == [
        r["id"] for r in records
    ]


@pytest.mark.parametrize(
    ("option", "value"),
    [("--label-lr", "nan"), ("--lr", "inf"), ("--weight-decay", "nan"), ("--sigma", "inf")],
)
def test_fit_rejects_non_finite_steps(
    option: str, value: str, corpus: SyntheticCorpus, tmp_path: Path, capsys
) -> None:
    argv = _argv(corpus, tmp_path / "run", "--epochs", "1", option, value)
    if option == "--lr":
        index = argv.index("--lr")
        del argv[index : index + 2]
        argv += [option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{option} {value}: must be a finite number" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_fit_clip_model_config_without_preprocess(
    corpus: SyntheticCorpus, tmp_path: Path, capsys
) -> None:
    clip_dir = tmp_path / "notclip"
    clip_dir.mkdir()
    (clip_dir / "config.json").write_text("{}")
    argv = _argv(corpus, tmp_path / "run", "--epochs", "1", "--clip-model", str(clip_dir))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "missing preprocess size, mean, std" in err
    assert len(err.strip().splitlines()) == 1
    argv[argv.index("--clip-model") + 1] = str(clip_dir / "config.json")
    assert main(argv) == 2
    assert "not a folder" in capsys.readouterr().err
