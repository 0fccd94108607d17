"""The guide runner (``make guide-check``) reads the training guide's shell blocks as written.

Running them takes minutes (``make guide-check``); these checks only read the guide, so a guide
whose blocks or markers the runner would misread fails the suite.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guide_runner import GUIDE, GuideFormatError, Outcome, parse_guide, summary


def test_the_guide_s_blocks_are_the_whole_path_in_order() -> None:
    blocks = parse_guide(GUIDE.read_text(encoding="utf-8"))
    run = [b.code for b in blocks if b.skip is None]
    stages = [
        "-m training extract",
        "-m training distill --config",
        "torchrun --standalone --nproc-per-node 2 -m training distill",
        "--resume --extend-to",
        "-m model_export export runs/guide/distill/checkpoint.pt",
        "xmag embed",
        "-m training train-mil",
        "-m training finetune",
        "-m training evaluate",
        "-m model_export export runs/guide/finetune/checkpoint.pt",
    ]
    found = [next(i for i, code in enumerate(run) if stage in code) for stage in stages]
    assert found == sorted(found), "the guide's commands are out of order"
    # Every runnable block names its tools relative to the root (the runner links .venv there).
    for code in run:
        for word in code.split():
            if word.startswith("/"):
                pytest.fail(f"absolute path {word!r} in a guide command:\n{code}")


def test_blocks_that_cannot_run_in_ci_say_why() -> None:
    blocks = parse_guide(GUIDE.read_text(encoding="utf-8"))
    skipped = [b for b in blocks if b.skip is not None]
    assert skipped, "the guide's real-run example (UNI2-h, GPU) is marked to skip"
    for b in skipped:
        assert len(b.skip or "") > 10, f"line {b.line}: a skip needs a reason a reader can act on"
    assert any("uni2-h" in b.code for b in skipped)


GUIDE_TEXT = """# Title

```
a -> b diagram, not a command
```

## 1. Make

```bash
echo one \\
    two
```

<!-- guide-check: skip: needs a GPU -->
```bash
nvidia-smi
```

```json
{"not": "a command"}
```

## 2. Write

```sh
cat > x.json <<'EOF'
{"a": 1}
EOF
python -m x --config x.json
```
"""


def test_shell_blocks_are_picked_with_their_sections_and_skip_reasons() -> None:
    blocks = parse_guide(GUIDE_TEXT)
    assert [(b.section, b.skip) for b in blocks] == [
        ("1. Make", None),
        ("1. Make", "needs a GPU"),
        ("2. Write", None),
    ]
    assert blocks[0].code == "echo one \\\n    two\n"
    assert blocks[0].line == 9
    assert blocks[0].title == "echo one two"
    assert blocks[2].title == "python -m x --config x.json"  # the heredoc body is no command


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("```bash\necho never closed\n", "never closed"),
        ("<!-- guide-check: skipp: typo -->\n```bash\nx\n```\n", "unknown guide-check marker"),
        ("<!-- guide-check: skip: why -->\nprose\n```bash\nx\n```\n", "directly followed"),
        ("<!-- guide-check: skip: why -->\n```json\n{}\n```\n", "not a ```json one"),
        ("text\n<!-- guide-check: skip: why -->\n", "ends the guide"),
    ],
)
def test_a_malformed_block_or_marker_is_refused(text: str, message: str) -> None:
    with pytest.raises(GuideFormatError, match=message):
        parse_guide(text)


def test_the_summary_gives_each_block_its_seconds_and_exit_status(tmp_path: Path) -> None:
    blocks = parse_guide(GUIDE_TEXT)
    table = summary([Outcome(blocks[0], 0, 1.25), Outcome(blocks[2], 3, 2.0)], blocks)
    rows = table.splitlines()
    assert rows[1].split()[:4] == ["1", "9", "1.2", "0"]
    assert "skip" in rows[2] and "skipped: needs a GPU" in rows[3]
    assert rows[4].split()[2:4] == ["2.0", "3"]
    assert rows[-1] == "total 3.2 s for 2 block(s) run"
