"""The comparison behind ``make demo-model-check`` (``model_export.demo.reproduce``): it finds a
one-byte change in any file of a package, names the ONNX initializer a change falls in, and
reports missing and extra files. The rebuild itself takes minutes and runs in the make target."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest

from tests.torch_required import require_torch

require_torch()

from model_export.demo.reproduce import compare_packages, main  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


@pytest.fixture
def two_copies(tmp_path: Path) -> tuple[Path, Path]:
    """Two copies of the committed demo's card and slide head (small real files)."""
    copies = []
    for name in ("a", "b"):
        root = tmp_path / name
        (root / "heads").mkdir(parents=True)
        shutil.copyfile(DEMO / "model.json", root / "model.json")
        shutil.copyfile(DEMO / "heads" / "modality.onnx", root / "heads" / "modality.onnx")
        copies.append(root)
    return copies[0], copies[1]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_identical_folders_have_no_difference_and_the_check_exits_zero(
    two_copies: tuple[Path, Path],
) -> None:
    a, b = two_copies
    assert compare_packages(a, b) == []
    assert main(["--package", str(a), "--against", str(b)]) == 0


def test_a_one_byte_change_in_a_json_file_is_found_and_fails_the_check(
    two_copies: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = two_copies
    _flip_byte(b / "model.json", 100)
    diffs = compare_packages(a, b)
    assert [(d.path, d.kind) for d in diffs] == [("model.json", "differs")]
    assert main(["--package", str(a), "--against", str(b)]) == 1
    assert "differs  model.json" in capsys.readouterr().out


def test_a_one_byte_change_in_an_onnx_weight_names_that_initializer(
    two_copies: tuple[Path, Path],
) -> None:
    a, b = two_copies
    head = b / "heads" / "modality.onnx"
    init = max(onnx.load(str(head)).graph.initializer, key=lambda t: len(t.raw_data))
    offset = head.read_bytes().find(init.raw_data)
    assert offset >= 0
    _flip_byte(head, offset + 2)  # inside the first float of that weight
    (diff,) = compare_packages(a, b)
    assert (diff.path, diff.kind) == ("heads/modality.onnx", "differs")
    assert len(diff.details) == 1
    assert diff.details[0].startswith(f"initializer {init.name}: values differ in 1 of")


def test_missing_and_extra_files_are_reported(two_copies: tuple[Path, Path]) -> None:
    a, b = two_copies
    (b / "heads" / "modality.onnx").unlink()
    (b / "training").mkdir()
    (b / "training" / "report.json").write_text("{}\n")
    diffs = {(d.path, d.kind) for d in compare_packages(a, b)}
    assert diffs == {("heads/modality.onnx", "missing"), ("training/report.json", "extra")}
