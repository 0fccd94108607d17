"""DDP with two CPU processes (gloo): a step runs and the replicas stay identical; the real
``torchrun ... -m training distill`` speaks and writes from rank 0 only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.torch_required import require_torch

torch = require_torch()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from tests.training_helpers import fitted_teacher, real_pairs, tiny_config
    from training.data import CropFolder
    from training.distill import Distiller

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pairs = real_pairs(4)
        d = Distiller(
            tiny_config(), fitted_teacher(pairs), CropFolder(pairs), rank=rank, world_size=world
        )
        rec = d.train_step()
        rec2 = d.train_step()
        flat = torch.cat([p.detach().flatten() for p in d.model.parameters()])
        ema = torch.cat([p.detach().flatten() for p in d.ema.parameters()])
        lo, _ = d.batch(0)
        torch.save(
            {"params": flat, "ema": ema, "loss": [rec.loss, rec2.loss], "lo_sum": float(lo.sum())},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_run_steps_and_keep_identical_replicas(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["lo_sum"] != r1["lo_sum"]  # each rank drew its own fields
    assert torch.equal(r0["params"], r1["params"])  # gradients were averaged
    assert torch.equal(r0["ema"], r1["ema"])
    assert r0["loss"] == r1["loss"]  # logged losses are the mean over ranks


# Loaded into each process of the torchrun below (PYTHONPATH): records, per rank, the process
# start and every os.replace/os.rename onto a checkpoint.pt (how Distiller.save publishes one).
_AUDIT_SITECUSTOMIZE = """
import os, sys
_rank = os.environ.get("RANK", "launcher")
_log = os.path.join(os.environ["XMAG_TEST_AUDIT_DIR"], "rank-%s.log" % _rank)
with open(_log, "a") as fh:
    fh.write("start world=%s\\n" % os.environ.get("WORLD_SIZE"))
def _hook(event, args):
    if event == "os.rename" and str(args[1]).endswith("checkpoint.pt"):
        with open(_log, "a") as fh:
            fh.write("checkpoint %s\\n" % args[1])
sys.addaudithook(_hook)
"""


def _crops(root: Path, n: int = 2) -> Path:
    """A crops folder as ``extract`` writes it, from real CMU-1 fields."""
    from tests.training_helpers import real_pairs

    (root / "hi").mkdir(parents=True)
    (root / "lo").mkdir()
    lines = []
    for i, pair in enumerate(real_pairs(n)):
        Image.fromarray(pair.hi).save(root / "hi" / f"{i}.png")
        Image.fromarray(pair.lo).save(root / "lo" / f"{i}.png")
        rec = {"slide": pair.slide, "view": pair.student_view, "hi": f"hi/{i}.png"}
        lines.append(json.dumps({**rec, "lo": f"lo/{i}.png", "level0_xy": [0, 0]}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.timeout(300)  # torchrun and two interpreters importing torch and timm
def test_torchrun_distill_prints_each_step_once_and_writes_each_checkpoint_from_rank_0(
    tmp_path: Path,
) -> None:
    from tests.training_helpers import tiny_config
    from training.config import DataConfig, OptimConfig
    from training.models import load_checkpoint

    cfg = tiny_config(
        data=DataConfig(crops_dir=_crops(tmp_path / "crops")),
        optim=OptimConfig(batch_size=1, steps=4, lr=1e-3),
        out_dir=tmp_path / "run",
        checkpoint_every=2,
        log_every=1,
    )
    config = tmp_path / "run.json"
    config.write_text(cfg.model_dump_json())
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(_AUDIT_SITECUSTOMIZE)
    env = {
        **os.environ,
        "PYTHONPATH": str(audit),
        "XMAG_TEST_AUDIT_DIR": str(audit),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "250",
        "PYTHONUNBUFFERED": "1",
    }
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "training",
            "distill",
            "--config",
            str(config),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said
    lines = [" ".join(line.split()) for line in said.splitlines()]
    for step in range(1, 5):
        assert sum(line.startswith(f"step {step} loss ") for line in lines) == 1, said
    assert sum(line.startswith("starting a new run") for line in lines) == 1, said
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert sum(line == f"checkpoint {ckpt}" for line in lines) == 1, said
    rank0, rank1 = ((audit / f"rank-{r}.log").read_text().splitlines() for r in (0, 1))
    assert rank0[0] == rank1[0] == "start world=2"  # both processes ran, as one job of two
    assert rank0[1:] == [f"checkpoint {ckpt}"] * 2  # steps 2 and 4, by rank 0
    assert rank1[1:] == []
    assert load_checkpoint(ckpt)["step"] == 4
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4
