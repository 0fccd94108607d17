"""The layout is the architecture: imports run one way and the service never needs torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules it must never import
FORBIDDEN = {
    "xmag": {"service", "training", "model_export", "torch", "timm", "torchvision"},
    "service": {"training", "model_export", "torch", "timm", "torchvision"},
    # Export depends on training's model definitions, never the other way; the demo recipe,
    # which drives both, lives above them in model_export.demo.
    "training": {"model_export", "service"},
    "model_export": {"service"},
}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_forbidden_layers(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_top_levels(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_importing_every_core_and_service_module_loads_no_torch() -> None:
    modules = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for pkg in ("xmag", "service")
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if p.name != "__main__.py"
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"torch-side modules loaded: {out.stdout.strip()}"


def test_code_version_names_the_checked_out_commit() -> None:
    from xmag import __version__
    from xmag.version import code_version

    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.strip()
    assert code_version() == f"{__version__}+g{head[:12]}"


LIBRARY_PACKAGES = ("xmag", "service", "training", "model_export")
# A string naming content of this repository (a checkout's layout, gone once installed).
_REPO_PATH = re.compile(r"^(\./)?(tests|models|docs|benchmarks)/")


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant in ``path`` but docstrings."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


def test_library_code_points_at_no_repository_path() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {value!r}"
        for package in LIBRARY_PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, value in _code_strings(path)
        if _REPO_PATH.match(value)
    ]
    assert not offenders, "paths of the checkout in library code:\n" + "\n".join(offenders)


def test_the_repository_path_check_catches_one() -> None:
    assert _REPO_PATH.match("models/demo") and _REPO_PATH.match("tests/data/slides")
    assert not _REPO_PATH.match("features.h5") and not _REPO_PATH.match("models")


OPTION_FIELDS = {"mpp_override", "default_mpp", "tissue_threshold", "tissue_detector"}
# Stage outputs that record the value they applied (not options a caller sets).
RECORDS = {"xmag/grid.py:TileGrid"}


def test_slide_options_are_defined_once() -> None:
    """``xmag.params`` holds the one options model; the CLI, the API and the engine use it."""
    definitions = []
    for package in LIBRARY_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
                for stmt in cls.body:
                    if (
                        isinstance(stmt, ast.AnnAssign)
                        and isinstance(stmt.target, ast.Name)
                        and stmt.target.id in OPTION_FIELDS
                    ):
                        owner = f"{path.relative_to(ROOT)}:{cls.name}"
                        definitions.append(f"{owner}.{stmt.target.id}")
    outside = [
        d
        for d in definitions
        if not d.startswith("xmag/params.py:") and d.rsplit(".", 1)[0] not in RECORDS
    ]
    assert not outside, f"slide options defined outside xmag/params.py: {outside}"
    assert "xmag/params.py:SlideOptions.mpp_override" in definitions


def test_the_api_and_the_cli_take_the_core_options_model() -> None:
    from service.schemas import JobRequest
    from xmag.params import SlideOptions

    assert JobRequest.model_fields["options"].annotation is SlideOptions
