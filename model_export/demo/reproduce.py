"""Is the committed demo package what its sources build? Rebuild it and compare byte for byte.

``make demo-model-check`` runs ``python -m model_export.demo.reproduce``: the demo is rebuilt
from the committed sources into a temporary folder (``run_demo`` with the ``make demo-model``
settings) and every file of the new package is compared with the committed one. Each difference
is printed (missing, extra, or differing files; for ONNX files, the initializers whose values
differ, or that the graph around them differs), and the exit status is 1 when there is any.

The build is deterministic (fixed seeds, torch threads and deterministic kernels, ONNX metadata
stripped, dynamic int8 with no calibration, JSON without timestamps or absolute paths), so a
difference means the sources, the slides or the installed libraries changed since the package was
committed: rebuild it with ``make demo-model`` and commit the result.

``--against DIR`` compares two existing folders without building (e.g. two builds made in
different folders).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import numpy_helper

__all__ = ["FileDifference", "compare_packages", "main", "onnx_differences", "rebuild_demo"]


@dataclass(frozen=True)
class FileDifference:
    """One package-relative file that is not byte-identical in both folders.

    Attributes:
        path: the file, relative to the package root (POSIX separators).
        kind: ``missing`` (only in the expected folder), ``extra`` (only in the actual one)
            or ``differs`` (in both, other bytes).
        details: for ONNX files, one line per differing initializer or graph part.
    """

    path: str
    kind: str
    details: tuple[str, ...] = ()

    def describe(self, max_details: int = 12) -> str:
        """One line, plus one indented line per detail (the first ``max_details``)."""
        lines = [f"{self.kind:8s} {self.path}", *(f"    {d}" for d in self.details[:max_details])]
        if len(self.details) > max_details:
            lines.append(f"    ... and {len(self.details) - max_details} more")
        return "\n".join(lines)


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def compare_packages(expected: Path, actual: Path) -> list[FileDifference]:
    """Every file that differs between two package folders, by relative path (sorted).

    Args:
        expected: the reference folder (the committed package).
        actual: the folder to check (a rebuild).

    Returns:
        One ``FileDifference`` per missing, extra or differing file; empty when identical.

    Raises:
        FileNotFoundError: either folder does not exist.
    """
    for root in (expected, actual):
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{root} is not a folder; give two package folders.")
    want, got = _files(Path(expected)), _files(Path(actual))
    out: list[FileDifference] = []
    for rel in sorted(want.keys() | got.keys()):
        if rel not in got:
            out.append(FileDifference(rel, "missing"))
        elif rel not in want:
            out.append(FileDifference(rel, "extra"))
        elif want[rel].read_bytes() != got[rel].read_bytes():
            details = onnx_differences(want[rel], got[rel]) if rel.endswith(".onnx") else ()
            out.append(FileDifference(rel, "differs", tuple(details)))
    return out


def onnx_differences(expected: Path, actual: Path) -> list[str]:
    """What differs between two ONNX files: initializers by name, then the rest of the model.

    Returns:
        Lines such as ``initializer blocks.0.attn.qkv.weight: values differ (max |diff| 1e-3)``,
        ``initializer x: only in expected``, ``graph nodes differ`` or ``model metadata
        differs``; a file that does not parse gives one line saying so.
    """
    try:
        a, b = onnx.load(str(expected)), onnx.load(str(actual))
    except Exception as exc:  # any decode failure is reported as such; the bytes differ anyway
        return [f"not a readable ONNX file ({type(exc).__name__})"]
    ia = {t.name: t for t in a.graph.initializer}
    ib = {t.name: t for t in b.graph.initializer}
    lines = []
    for name in sorted(ia.keys() | ib.keys()):
        if name not in ib:
            lines.append(f"initializer {name}: only in expected")
        elif name not in ia:
            lines.append(f"initializer {name}: only in actual")
        elif ia[name].SerializeToString() != ib[name].SerializeToString():
            lines.append(f"initializer {name}: {_tensor_difference(ia[name], ib[name])}")
    for t in (a, b):
        del t.graph.initializer[:]
    if [n.SerializeToString() for n in a.graph.node] != [
        n.SerializeToString() for n in b.graph.node
    ]:
        lines.append("graph nodes differ")
    del a.graph.node[:]
    del b.graph.node[:]
    if a.SerializeToString() != b.SerializeToString():
        lines.append("model metadata, inputs/outputs or opsets differ")
    return lines


def _tensor_difference(a: onnx.TensorProto, b: onnx.TensorProto) -> str:
    x, y = numpy_helper.to_array(a), numpy_helper.to_array(b)
    if x.shape != y.shape or x.dtype != y.dtype:
        return f"shape/dtype {x.shape} {x.dtype} vs {y.shape} {y.dtype}"
    if x.size == 0 or x.tobytes() == y.tobytes():
        return "same values, other encoding"
    diff = abs(x.astype("float64") - y.astype("float64"))
    return f"values differ in {int((diff > 0).sum())} of {x.size} (max |diff| {diff.max():.3g})"


def rebuild_demo(dest: Path, slides_dir: Path) -> Path:
    """Build the demo (``make demo-model`` settings) into ``dest/run`` and ``dest/package``.

    Returns:
        The package folder.
    """
    from model_export.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=dest / "run", package=dest / "package", slides_dir=slides_dir)
    run_demo(cfg)
    return dest / "package"


def main(argv: list[str] | None = None) -> int:
    """``python -m model_export.demo.reproduce``: 0 when identical, 1 on any difference."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--package", type=Path, required=True, help="the committed package (make: models/demo)"
    )
    parser.add_argument(
        "--slides-dir",
        type=Path,
        default=None,
        help="the demo's slides, a path relative to the working folder as the committed build "
        "used (make: tests/data/slides); required unless --against",
    )
    parser.add_argument(
        "--against", type=Path, default=None, help="compare with this folder instead of building"
    )
    parser.add_argument("--keep", action="store_true", help="keep the rebuilt package")
    args = parser.parse_args(argv)
    if not args.package.is_dir():
        print(f"error: --package {args.package} is not a folder.", file=sys.stderr)
        return 2
    if args.against is not None:
        return _report(args.package, args.against)
    if args.slides_dir is None:
        parser.error("--slides-dir is required to rebuild (or give --against FOLDER)")
    tmp = Path(tempfile.mkdtemp(prefix="xmag-demo-check-"))
    print(f"rebuilding the demo into {tmp} (minutes) ...", flush=True)
    rebuilt = rebuild_demo(tmp, args.slides_dir)
    status = _report(args.package, rebuilt)
    if args.keep or status:
        print(f"rebuilt package kept in {rebuilt}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return status


def _report(expected: Path, actual: Path) -> int:
    diffs = compare_packages(expected, actual)
    n = len(_files(expected))
    if not diffs:
        print(f"{actual} matches {expected} byte for byte ({n} files).")
        return 0
    print(f"{len(diffs)} file(s) of {expected} differ from {actual}:")
    for d in diffs:
        print(d.describe())
    print("the package is not what its sources build: run `make demo-model` and commit it.")
    return 1


if __name__ == "__main__":
    sys.exit(main())
