"""Ctrl-C during distillation saves the last completed step; --resume says where it continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.torch_required import require_torch

torch = require_torch()

from tests.training_helpers import real_pairs, tiny_config  # noqa: E402
from training.config import DataConfig, OptimConfig  # noqa: E402
from training.models import load_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _crops(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "hi").mkdir()
    (root / "lo").mkdir()
    lines = []
    for i, pair in enumerate(real_pairs(2)):
        Image.fromarray(pair.hi).save(root / "hi" / f"{i}.png")
        Image.fromarray(pair.lo).save(root / "lo" / f"{i}.png")
        rec = {"slide": pair.slide, "view": pair.student_view, "hi": f"hi/{i}.png"}
        lines.append(json.dumps({**rec, "lo": f"lo/{i}.png", "level0_xy": [0, 0]}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _default_sigint() -> None:  # pragma: no cover - runs in the child before exec
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: the child must see Ctrl-C as a terminal would send it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _distill(config: Path, *flags: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "250", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "training", "distill", "--config", str(config), *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


@pytest.mark.timeout(600)  # two interpreters importing torch and timm
def test_sigint_saves_the_checkpoint_exits_130_and_resume_says_where_it_continues(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(
        data=DataConfig(crops_dir=_crops(tmp_path / "crops")),
        optim=OptimConfig(batch_size=1, steps=100_000, lr=1e-3),
        out_dir=tmp_path / "run",
        checkpoint_every=100_000,  # only the interrupt can have saved it
        log_every=1,
    )
    config = tmp_path / "run.json"
    config.write_text(cfg.model_dump_json())
    proc = _distill(config)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("step 2 loss"):
            proc.send_signal(signal.SIGINT)
            break
    try:
        _, rest = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, rest = proc.communicate()
        pytest.fail("distill did not stop within 120 s of SIGINT:\n" + "".join(seen) + rest[-2000:])
    assert proc.returncode == 130, "".join(seen) + rest
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    step = int(ckpt["step"])
    assert step >= 2
    assert {"event": "interrupt", "step": step} in ckpt["run_log"]
    assert f"saved at step {step}" in " ".join(rest.split())

    resumed = _distill(config, "--resume", "--extend-to", str(step + 1))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming {tmp_path / 'run' / 'checkpoint.pt'} at step {step} of {step + 1}" in (
        " ".join(err.split())
    )
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == step + 1
