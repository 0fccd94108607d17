"""The distillation run: student + heads + EMA, AdamW, clipping, mixed precision, DDP, resume.

Determinism: the fields and augmentations of step ``s`` on rank ``r`` are drawn from generators
seeded by ``(seed, s, r)``, so a run resumed from a checkpoint at step ``s`` sees exactly the data
an uninterrupted run would have seen (the RNG states are saved as well, for anything else).

DDP: launch with ``torchrun --nproc-per-node N -m training distill ...``; the process group is
read from the environment (gloo on CPU, nccl on CUDA). Each rank draws its own fields; gradients
are averaged; the EMA and the checkpoints are kept identically on every rank, written by rank 0.

Interrupts: a ``KeyboardInterrupt`` (SIGINT, Ctrl-C) during ``run`` saves the checkpoint of the
last completed step before it propagates, so ``--resume`` continues from there.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from training.augment import cut_tiles, paired_augment, to_float
from training.config import DistillConfig
from training.data import FieldSource, pairs_to_arrays
from training.errors import ResumeMismatchError
from training.losses import DistillLoss
from training.models import CHECKPOINT_FORMAT, build_student, load_checkpoint, student_tokens
from training.normalise import Normalise, preprocess_tiles
from training.teachers import HandcraftedTeacher, Teacher

__all__ = ["DistillStep", "Distiller", "StudentWithHeads", "init_distributed", "resolve_device"]

_TEACHER_CHUNK = 64  # teacher tiles per forward, bounds memory for a ViT-giant


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StudentWithHeads(nn.Module):
    """What DDP wraps: the student and the distillation heads, returning the loss dict."""

    def __init__(self, student: nn.Module, loss: DistillLoss, normalise: Normalise):
        super().__init__()
        self.student, self.loss, self.normalise = student, loss, normalise

    def forward(self, lo: Tensor, teacher_tiles: Tensor) -> dict[str, Tensor]:
        """``lo``: (B, 3, S, S) 5x views in [0, 1], normalised here as the engine does."""
        cls, patches = student_tokens(self.student, self.normalise(lo))
        return self.loss(cls, patches, teacher_tiles)


@dataclass(frozen=True)
class DistillStep:
    step: int
    loss: float
    global_loss: float
    local_loss: float
    lr: float


class Distiller:
    """One distillation run. ``run(n)`` trains ``n`` more steps; ``save``/``resume`` checkpoint."""

    def __init__(
        self,
        cfg: DistillConfig,
        teacher: Teacher,
        source: FieldSource,
        *,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg, self.source, self.rank, self.world_size = cfg, source, rank, world_size
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.teacher = teacher.to(self.device).freeze()
        s = cfg.student
        student = build_student(s.arch, img_size=s.img_size, weights=s.weights, **s.timm_kwargs)
        loss = DistillLoss(
            int(student.num_features),
            int(teacher.embed_dim),
            grid=cfg.loss.grid,
            hidden=cfg.loss.head_hidden,
            global_weight=cfg.loss.global_weight,
            local_weight=cfg.loss.local_weight,
        )
        self.preprocessor = s.preprocessor()
        self.model = StudentWithHeads(student, loss, Normalise(self.preprocessor)).to(self.device)
        self.ema = copy.deepcopy(student).to(self.device).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.ddp: nn.Module = DistributedDataParallel(self.model) if world_size > 1 else self.model
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.lr
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.amp_dtype = _amp_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.step = 0
        self.history: list[DistillStep] = []
        # Starts, resumes, extensions and overwrites of this run, saved in the checkpoint.
        self.run_log: list[dict[str, Any]] = []
        self.interrupted = False

    # -- schedule ------------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        t = min(1.0, (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    # -- data ------------------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(5x views [B*V, 3, S, S], teacher tile embeddings [B*V, grid*grid, Dt]) for ``step``."""
        seed = [self.cfg.seed, step, self.rank]
        pairs = self.source.draw(self.cfg.optim.batch_size, np.random.default_rng(seed))
        hi_np, lo_np = pairs_to_arrays(pairs)
        hi, lo = to_float(hi_np).to(self.device), to_float(lo_np).to(self.device)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        views_lo, targets = [], []
        for _ in range(self.cfg.augment.views):
            # Augment on the CPU generator's draws; params are per sample, identical for 20x/5x.
            hi_v, lo_v = paired_augment(hi, lo, self.cfg.augment, gen)
            views_lo.append(lo_v)
            targets.append(self.teacher_targets(hi_v))
        return torch.cat(views_lo), torch.cat(targets)

    @torch.no_grad()
    def teacher_targets(self, hi: Tensor) -> Tensor:
        """(B, grid*grid, Dt) teacher embeddings of the row-major tiles of (B, 3, F, F) fields."""
        tiles = cut_tiles(hi, self.cfg.loss.grid)
        b, k = tiles.shape[:2]
        flat = tiles.flatten(0, 1)
        with self._autocast():
            out = torch.cat([self.teacher(c) for c in flat.split(_TEACHER_CHUNK)])
        return out.float().view(b, k, -1)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- optimisation --------------------------------------------------------------------------
    def train_step(self) -> DistillStep:
        """One optimiser step on the data of ``self.step``; returns its (pre-update) losses."""
        self.ddp.train()
        lo, targets = self.batch(self.step)
        with self._autocast():
            losses = self.ddp(lo, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self._update_ema()
        rec = DistillStep(
            self.step,
            _mean_across_ranks(losses["loss"].detach()),
            _mean_across_ranks(losses["global"]),
            _mean_across_ranks(losses["local"]),
            lr,
        )
        self.step += 1
        self.history.append(rec)
        return rec

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = self.cfg.ema_decay
        for e, p in zip(self.ema.parameters(), self.model.student.parameters(), strict=True):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, b in zip(self.ema.buffers(), self.model.student.buffers(), strict=True):
            e.copy_(b)

    def run(
        self,
        steps: int,
        *,
        on_step: Callable[[DistillStep], None] | None = None,
        checkpoint_path: Path | None = None,
    ) -> list[DistillStep]:
        """Train ``steps`` more steps, checkpointing every ``checkpoint_every`` and at the end."""
        out: list[DistillStep] = []
        try:
            for _ in range(steps):
                rec = self.train_step()
                out.append(rec)
                if on_step is not None:
                    on_step(rec)
                if checkpoint_path is not None and self.step % self.cfg.checkpoint_every == 0:
                    self.save(checkpoint_path)
        except KeyboardInterrupt:
            # Keep the completed steps: a step interrupted half-way changed nothing saved
            # (train_step updates self.step last), so the checkpoint is consistent.
            self.interrupted = True
            if checkpoint_path is not None:
                self.run_log.append({"event": "interrupt", "step": self.step})
                self.save(checkpoint_path)
            raise
        if checkpoint_path is not None and out and self.step % self.cfg.checkpoint_every:
            self.save(checkpoint_path)
        return out

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint dict (BRIEF.md layout plus ``distill_heads``, ``rng``, ``history``)."""
        s = self.cfg.student
        return {
            "format": CHECKPOINT_FORMAT,
            "arch": s.arch,
            "img_size": s.img_size,
            "embed_dim": int(self.model.student.num_features),
            "timm_kwargs": dict(s.timm_kwargs),
            "mean": list(s.mean),
            "std": list(s.std),
            "mpp": s.mpp,
            "student": _cpu_state(self.model.student),
            "student_ema": _cpu_state(self.ema),
            "distill_heads": _cpu_state(self.model.loss),
            "heads": {},
            "teacher_state": (
                _cpu_state(self.teacher) if isinstance(self.teacher, HandcraftedTeacher) else None
            ),
            "config": self.cfg.model_dump(mode="json"),
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema_decay": self.cfg.ema_decay,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "history": [r.__dict__ for r in self.history],
            "run_log": list(self.run_log),
            "lineage": [
                {
                    "stage": "distill",
                    "step": self.step,
                    "steps": self.cfg.optim.steps,
                    "teacher": f"{self.cfg.teacher.kind.value}:{self.cfg.teacher.arch}",
                }
            ],
        }

    def save(self, path: Path) -> None:
        """Write the checkpoint atomically (rank 0 only; other ranks wait at a barrier)."""
        if self.rank == 0:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            torch.save(self.checkpoint(), tmp)
            os.replace(tmp, path)
            with (path.parent / "metrics.jsonl").open("w") as fh:
                for r in self.history:
                    fh.write(json.dumps(r.__dict__) + "\n")
        if dist.is_initialized():
            dist.barrier()

    def resume(self, path: Path | dict[str, Any]) -> None:
        """Restore model, EMA, heads, optimizer, scheduler, scaler, step, history and RNG.

        Check the config first with ``training.resume.plan_run`` (the CLI does).

        Raises:
            ResumeMismatchError: the checkpoint's tensors do not fit this run's networks.
        """
        ckpt = path if isinstance(path, dict) else load_checkpoint(path)
        try:
            self.model.student.load_state_dict(ckpt["student"])
            self.ema.load_state_dict(ckpt["student_ema"])
            self.model.loss.load_state_dict(ckpt["distill_heads"])
            if ckpt.get("teacher_state") is not None:
                self.teacher.load_state_dict(ckpt["teacher_state"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise ResumeMismatchError(
                f"the checkpoint does not fit the networks of this config ({type(exc).__name__}: "
                f"{first}); resume with the config it was trained with, or start a new run.",
            ) from exc
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.history = [DistillStep(**r) for r in ckpt.get("history", [])]
        self.run_log = list(ckpt.get("run_log") or [])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_fields(self, source_pairs: list[Any], *, ema: bool = True) -> Iterator[Tensor]:
        """Yield per batch of fields: (global-projected student, teacher mean) cosine (B,)."""
        student = self.ema if ema else self.model.student
        self.model.eval()
        for i in range(0, len(source_pairs), self.cfg.optim.batch_size):
            hi_np, lo_np = pairs_to_arrays(source_pairs[i : i + self.cfg.optim.batch_size])
            t = self.teacher_targets(to_float(hi_np).to(self.device))
            x = preprocess_tiles(self.preprocessor, lo_np, self.device)
            cls, _ = student_tokens(student, x)
            g = self.model.loss.global_head(cls)
            yield torch.nn.functional.cosine_similarity(g, t.mean(1), dim=-1)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16":
        return torch.bfloat16
    return torch.float16  # "fp16", or "auto" on CUDA (with a GradScaler)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases, norms, tokens and position embeddings (1-d or token parameters).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "reg_token"))
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _mean_across_ranks(x: Tensor) -> float:
    if dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return float(x)
