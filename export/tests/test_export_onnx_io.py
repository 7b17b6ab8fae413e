"""ONNX export failures and staged folders: short errors, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cdul_export.checks import check_opset, supported_opsets
from cdul_export.onnx_io import export_onnx
from cdul_export.staging import ExportError, staged_folder


class _Unexportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft(x).real


def test_export_failure_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError) as info:
        export_onnx(
            _Unexportable(),
            torch.randn(2, 4),
            tmp_path / "x.onnx",
            input_name="x",
            output_name="y",
        )
    captured = capfd.readouterr()
    message = str(info.value)
    assert "aten::fft_fft" in message
    assert len(message.splitlines()) == 1
    assert "Torch IR graph" not in captured.out
    assert captured.out == ""


def test_supported_opsets_include_default() -> None:
    low, high = supported_opsets()
    assert low <= 17 <= high
    check_opset(17)
    with pytest.raises(ExportError, match=f"from {low} to {high}"):
        check_opset(low - 1)


def test_failed_stage_removes_created_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "model"
    with pytest.raises(KeyError), staged_folder(out, overwrite=False) as stage:
        (stage / "file").write_text("partial")
        raise KeyError("export failed")
    assert list(tmp_path.iterdir()) == []


def test_failed_stage_keeps_existing_parent(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(KeyError), staged_folder(out, overwrite=False):
        raise KeyError("export failed")
    assert tmp_path.is_dir()
    assert list(tmp_path.iterdir()) == []
