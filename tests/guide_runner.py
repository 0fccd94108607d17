"""Run the shell commands of a guide (docs/training.md) as written, in order: ``make guide-check``.

Every ```` ```bash ```` block of the guide runs, in a fresh temporary folder that holds only what
the guide expects of a checkout (``.venv`` and ``tests/data``, linked to this repository's), with
the repository's ``.venv/bin`` first on PATH. Nothing is added to the commands. A block that needs
what a CI machine cannot have (gated weights, a GPU) is preceded by a marker saying why, and is
listed as skipped with that reason::

    <!-- guide-check: skip: needs the UNI2-h weights (gated) and a GPU -->
    ```bash
    ...
    ```

Each block runs under ``bash -e -o pipefail`` (its first failing command ends it); the first
failing block stops the check and its output is printed. At the end a summary gives, per block,
its command, seconds and exit status.

Usage: ``python tests/guide_runner.py [GUIDE] [--list] [--keep] [--workdir DIR --start N]``
(``--workdir``/``--start`` go on in the kept folder of a failed check, from block N).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "training.md"
#: What the guide's commands expect of the repository root, linked into the working folder.
LINKED = (".venv", "tests/data")
RUN_LANGS = frozenset({"bash", "sh", "shell"})
_FENCE = re.compile(r"^(```+)\s*([\w-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*guide-check:\s*(?P<body>.*?)\s*-->$")
_SKIP = re.compile(r"^skip:\s*(?P<reason>\S.*)$")
_TAIL_LINES = 150


class GuideFormatError(ValueError):
    """The guide's blocks or markers cannot be read (e.g. a marker not followed by a bash block)."""


@dataclass(frozen=True)
class GuideBlock:
    """One fenced shell block of the guide.

    Attributes:
        line: 1-based line of the opening fence in the guide.
        section: the nearest heading above the block.
        code: the block's text, as a reader copies it.
        skip: why the check does not run it, or None when it runs.
    """

    line: int
    section: str
    code: str
    skip: str | None = None

    @property
    def title(self) -> str:
        """The block's main command on one line: its last command (heredoc bodies left out)."""
        commands = _commands(self.code)
        return commands[-1] if commands else ""


def _commands(code: str) -> list[str]:
    """The commands of a block, continuation lines joined, heredoc bodies dropped."""
    out: list[str] = []
    lines = code.splitlines()
    i, pending = 0, ""
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if heredoc:
            end = heredoc.group(1)
            while i < len(lines) and lines[i].strip() != end:
                i += 1
            i += 1
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        text = (pending + line.strip()).strip()
        pending = ""
        if text and not text.startswith("#"):
            out.append(text)
    return out


def parse_guide(text: str) -> list[GuideBlock]:
    """The shell blocks of a guide, in order, with their skip markers.

    Blocks fenced as ``bash``, ``sh`` or ``shell`` are commands; other fences (diagrams, JSON)
    are not. A marker ``<!-- guide-check: skip: REASON -->`` on the last non-blank line before a
    shell block skips it.

    Raises:
        GuideFormatError: an unclosed fence, a marker that is not ``skip: REASON``, or a marker
            not directly followed by a shell block.
    """
    blocks: list[GuideBlock] = []
    lines = text.splitlines()
    section = ""
    marker: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            start, ticks, lang = i, fence.group(1), fence.group(2).lower()
            i += 1
            body: list[str] = []
            while i < len(lines) and lines[i].rstrip() != ticks:
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise GuideFormatError(f"line {start + 1}: the {ticks}{lang} fence is never closed")
            i += 1
            if lang in RUN_LANGS:
                blocks.append(
                    GuideBlock(start + 1, section, "\n".join(body) + "\n", marker and marker[1])
                )
            elif marker is not None:
                raise GuideFormatError(
                    f"line {marker[0]}: a guide-check marker must precede a ```bash block, not a "
                    f"```{lang} one (line {start + 1})"
                )
            marker = None
            continue
        stripped = line.strip()
        found = _MARKER.match(stripped)
        if found:
            skip = _SKIP.match(found.group("body"))
            if skip is None:
                raise GuideFormatError(
                    f"line {i + 1}: unknown guide-check marker {stripped!r}; write "
                    "`<!-- guide-check: skip: REASON -->` right before the block"
                )
            if marker is not None:
                raise GuideFormatError(f"line {i + 1}: two guide-check markers in a row")
            marker = (i + 1, skip.group("reason"))
        elif stripped:
            if marker is not None:
                raise GuideFormatError(
                    f"line {marker[0]}: a guide-check marker must be directly followed by a "
                    f"```bash block (found {stripped[:40]!r} at line {i + 1})"
                )
            if stripped.startswith("#"):
                section = stripped.lstrip("#").strip()
        i += 1
    if marker is not None:
        raise GuideFormatError(f"line {marker[0]}: a guide-check marker ends the guide")
    return blocks


@dataclass(frozen=True)
class Outcome:
    """What running one block gave: exit status (None: skipped), seconds and output."""

    block: GuideBlock
    returncode: int | None
    seconds: float
    output: str = ""


def prepare_workdir(root: Path, repo: Path = REPO) -> None:
    """Link what the guide expects of a checkout (``LINKED``) from ``repo`` into ``root``."""
    for rel in LINKED:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(repo / rel, target_is_directory=True)


def run_block(block: GuideBlock, cwd: Path, env: dict[str, str]) -> Outcome:
    """Run one block with ``bash -e -o pipefail`` in ``cwd``; output (stdout+stderr) kept."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.code],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    return Outcome(block, proc.returncode, time.perf_counter() - t0, proc.stdout)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def summary(outcomes: Sequence[Outcome], blocks: Sequence[GuideBlock]) -> str:
    """The summary table: one row per block (``not run`` after a failure)."""
    rows = ["  #  line  seconds  exit  command"]
    done = {o.block.line: o for o in outcomes}
    for n, block in enumerate(blocks, 1):
        o = done.get(block.line)
        if block.skip is not None:
            secs, status = "-", "skip"
        elif o is None:
            secs, status = "-", "-"
        else:
            secs, status = f"{o.seconds:.1f}", str(o.returncode)
        rows.append(f"{n:>3}  {block.line:>4}  {secs:>7}  {status:>4}  {_short(block.title, 90)}")
        if block.skip is not None:
            rows.append(f"{'':>26}skipped: {block.skip}")
        elif o is None:
            rows.append(f"{'':>26}not run")
    total = sum(o.seconds for o in outcomes)
    rows.append(f"total {total:.1f} s for {len(outcomes)} block(s) run")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the guide's blocks; 0 when every block that runs exits 0, else the failing status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("guide", nargs="?", type=Path, default=GUIDE)
    ap.add_argument("--list", action="store_true", help="list the blocks, run nothing")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument(
        "--workdir",
        type=Path,
        help="an existing working folder of an earlier (kept) check, to go on from --start",
    )
    ap.add_argument("--start", type=int, default=1, help="first block to run (1-based)")
    args = ap.parse_args(argv)
    blocks = parse_guide(args.guide.read_text(encoding="utf-8"))
    if args.list:
        for n, b in enumerate(blocks, 1):
            state = f"skip: {b.skip}" if b.skip else "run"
            print(f"{n:>3}  line {b.line:>4}  [{b.section}]  {state}\n{b.code}")
        return 0
    if args.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="xmag-guide-"))
        prepare_workdir(workdir)
    else:
        workdir = args.workdir.resolve()
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env["VIRTUAL_ENV"] = str(REPO / ".venv")
    print(f"guide-check: {args.guide} ({len(blocks)} shell blocks) in {workdir}", flush=True)
    outcomes: list[Outcome] = []
    failed: Outcome | None = None
    for n, block in enumerate(blocks, 1):
        head = f"[{n}/{len(blocks)}] line {block.line} ({block.section})"
        if block.skip is not None:
            print(f"{head}: skipped: {block.skip}", flush=True)
            continue
        if n < args.start:
            print(f"{head}: not run (--start {args.start})", flush=True)
            continue
        print(f"{head}: {_short(block.title, 100)}", flush=True)
        outcome = run_block(block, workdir, env)
        outcomes.append(outcome)
        print(f"    exit {outcome.returncode} in {outcome.seconds:.1f} s", flush=True)
        if outcome.returncode != 0:
            failed = outcome
            break
    if failed is not None:
        tail = failed.output.splitlines()[-_TAIL_LINES:]
        print(f"\nFAILED (exit {failed.returncode}), guide line {failed.block.line}:")
        print(failed.block.code)
        print(f"--- its output (last {len(tail)} lines) ---")
        print("\n".join(tail))
        print(f"--- working folder kept: {workdir}\n")
    print(summary(outcomes, blocks))
    if failed is None and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failed is None:
        print(f"working folder kept: {workdir}")
    return 0 if failed is None else (failed.returncode or 1)


if __name__ == "__main__":
    sys.exit(main())
