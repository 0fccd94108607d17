"""DDP with two CPU processes (gloo): a step runs and the replicas stay identical."""

from __future__ import annotations

import socket
from pathlib import Path

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
