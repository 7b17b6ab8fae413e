"""The cdul-export command line: help, bad input, and a full run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cdul_export.cli import build_parser, main
from cdul_export.gpu import missing_for_fp16
from cdul_server.model_repository import load_model_repository

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS_CONFIG = (
    REPO_ROOT / "training" / "src" / "cdul_training" / "model_configs" / "digits-clip.json"
)


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()  # type: ignore[union-attr]


def test_clip_help_lists_every_option() -> None:
    text = _help("clip")
    for option in (
        "--model",
        "--pretrained",
        "--out",
        "--model-config",
        "--overwrite",
        "--opset",
        "--token-dtype",
        "--quantize",
        "--int8-min-cosine",
        "--fp16",
        "--tensorrt",
        "--parity-images",
        "--parity-count",
        "--parity-batch-sizes",
        "--min-cosine",
        "--template",
        "--image-mean",
        "--image-std",
        "--image-interpolation",
        "--image-resize-mode",
        "--threads",
    ):
        assert option in text
    assert "default: 17" in text
    assert "default: 0.9999" in text


def test_classifier_help_lists_every_option() -> None:
    text = _help("classifier")
    for option in (
        "--checkpoint",
        "--out",
        "--clip-model",
        "--max-abs-logit-diff",
        "--quantize",
        "--overwrite",
        "--parity-images",
    ):
        assert option in text


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_unknown_model_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["clip", "--model", "vit-b-32", "--pretrained", "none", "--out", str(tmp_path / "x")]
    )
    assert code == 2
    line = _one_line_error(capsys)
    assert "unknown open_clip model 'vit-b-32'" in line
    assert "ViT-B-32" in line


def test_existing_out_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["clip", "--model", "ViT-B-32", "--pretrained", "none", "--out", str(tmp_path)])
    assert code == 2
    assert "--overwrite" in _one_line_error(capsys)


def test_bad_batch_sizes_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(
            [
                "clip",
                "--model",
                "ViT-B-32",
                "--pretrained",
                "none",
                "--out",
                str(tmp_path / "x"),
                "--parity-batch-sizes",
                "1,zero",
            ]
        )
    assert info.value.code == 2
    assert "1,zero" in capsys.readouterr().err


@pytest.mark.skipif(not missing_for_fp16(), reason="this machine can export fp16")
def test_fp16_without_gpu_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "clip",
            "--model",
            "ViT-B-32",
            "--pretrained",
            "none",
            "--out",
            str(tmp_path / "x"),
            "--fp16",
        ]
    )
    assert code == 2
    line = _one_line_error(capsys)
    assert "--fp16 needs" in line
    assert "CUDA" in line


def test_missing_checkpoint_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["classifier", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")]
    )
    assert code == 2
    assert "not found" in _one_line_error(capsys)


def _clip_argv(out: Path, *extra: str) -> list[str]:
    return ["clip", "--model", "RN50", "--pretrained", "none", "--out", str(out), *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--template", "no braces"), "exactly one {}"),
        (("--template", "a {} and a {}"), "exactly one {}"),
        (("--template", "a photo of a {}.", "--template", "plain"), "'plain'"),
        (("--opset", "3"), "--opset 3"),
        (("--opset", "99"), "--opset 99"),
        (("--min-cosine", "2"), "--min-cosine 2.0"),
        (("--min-cosine", "0"), "--min-cosine 0.0"),
        (("--min-cosine", "nan"), "--min-cosine nan"),
        (("--int8-min-cosine", "1.5"), "--int8-min-cosine 1.5"),
        (("--threads", "-1"), "--threads"),
        (("--image-std", "0.5", "0", "0.5"), "--image-std"),
        (("--image-mean", "nan", "0.5", "0.5"), "--image-mean"),
    ],
)
def test_bad_option_is_rejected_before_export(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], extra: tuple[str, ...], message: str
) -> None:
    repository = tmp_path / "R"
    code = main(_clip_argv(repository / "m", *extra))
    captured = capfd.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert message in lines[0]
    assert captured.out == ""
    assert not repository.exists()


def test_classifier_bad_option_is_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repository = tmp_path / "R"
    code = main(
        ["classifier", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(repository / "c"),
         "--max-abs-logit-diff", "nan"]
    )  # fmt: skip
    assert code == 2
    assert "--max-abs-logit-diff" in _one_line_error(capsys)
    assert not repository.exists()


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        (["clip", "--model", "RN50"], "cdul-export clip"),
        (["clip", "--model", "RN50", "--pretrained", "none", "--out", "x", "--opset", "a"],
         "cdul-export clip"),
        (["classifier", "--out", "x"], "cdul-export classifier"),
        (["export"], "cdul-export"),
        ([], "cdul-export"),
    ],
)  # fmt: skip
def test_argument_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], prog: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"{prog}: error: ")
    assert err.strip().endswith(f"; see {prog} --help")


def test_cli_run_writes_loadable_repository(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "models" / "digits-clip"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cdul_export.cli",
            "clip",
            "--model",
            "digits-clip",
            "--model-config",
            str(DIGITS_CONFIG),
            "--pretrained",
            "none",
            "--out",
            str(out),
            "--parity-images",
            str(shared_data / "coco128" / "images"),
            "--parity-count",
            "4",
            "--parity-batch-sizes",
            "1,33",
            "--token-dtype",
            "int32",
            "--threads",
            "2",
            "--template",
            "a photo of the digit {}",
            "--image-mean",
            "0.5",
            "0.5",
            "0.5",
            "--image-std",
            "0.25",
            "0.25",
            "0.25",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    parity = json.loads(result.stdout.split("parity: ", 1)[1])
    assert parity["image_min_cosine"] >= 0.9999
    config = json.loads((out / "config.json").read_text())
    assert config["default_templates"] == ["a photo of the digit {}"]
    assert config["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert config["preprocess"]["std"] == [0.25, 0.25, 0.25]
    assert config["export"]["token_dtype"] == "int32"
    models = load_model_repository(out.parent)
    assert models["digits-clip"].encode_texts(["a photo of the digit seven"]).shape == (1, 64)


@pytest.mark.slow
def test_cli_vit_b_32_random_init(tmp_path: Path) -> None:
    out = tmp_path / "X"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cdul_export.cli",
            "clip",
            "--model",
            "ViT-B-32",
            "--pretrained",
            "none",
            "--out",
            str(out),
            "--quantize",
            "int8",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    models = load_model_repository(tmp_path)
    assert models["X"].random_init is True
