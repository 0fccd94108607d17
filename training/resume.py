"""What a distillation run does with the checkpoint already in its folder: decided, never guessed.

    no checkpoint, no flag          start
    no checkpoint, --resume         CheckpointMissingError
    checkpoint, no flag             CheckpointExistsError (--resume, or --overwrite to start over)
    checkpoint, --overwrite         start over; the overwrite is recorded in the new run's log
    checkpoint, --resume            continue, if the config matches the checkpoint's
                                    (ResumeMismatchError names each differing field) and the
                                    schedule has steps left (RunFinishedError otherwise)
    checkpoint, --resume
        --extend-to N               continue to step N: the schedule's end moves to N, recorded
                                    in the checkpoint (``run_log``), so the lr curve is explained

Fields that only steer the run's bookkeeping may change on resume (``RESUME_FREE_FIELDS``);
anything that changes what is learnt (architecture, data, teacher, optimiser, seeds) may not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import DistillConfig
from training.errors import (
    CheckpointExistsError,
    CheckpointMissingError,
    ResumeMismatchError,
    RunFinishedError,
)

__all__ = ["RESUME_FREE_FIELDS", "RunPlan", "config_differences", "plan_run"]

#: Config fields (dotted) that a resumed run may change: they do not change what is learnt.
RESUME_FREE_FIELDS = frozenset({"checkpoint_every", "log_every", "device", "out_dir"})
_MAX_LISTED = 6


@dataclass(frozen=True)
class RunPlan:
    """What the run will do.

    Attributes:
        cfg: the config to run with (for a resume: the checkpoint's, with the free fields and an
            extension applied).
        checkpoint: the checkpoint dict to resume from, or None to start.
        events: what to record in the run log (``overwrite``, ``resume``, ``extend``).
    """

    cfg: DistillConfig
    checkpoint: dict[str, Any] | None
    events: tuple[dict[str, Any], ...]


def config_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, old value, new value) for every leaf that differs between two dumps."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += config_differences(old.get(key), new.get(key), path)
        return out
    return [] if old == new else [(prefix, old, new)]


def plan_run(
    cfg: DistillConfig,
    checkpoint_path: Path,
    *,
    resume: bool,
    overwrite: bool = False,
    extend_to: int | None = None,
) -> RunPlan:
    """Decide start / resume / extend from the flags and the run folder (see the module doc).

    Raises:
        CheckpointExistsError, CheckpointMissingError, RunFinishedError, ResumeMismatchError.
    """
    from training.models import load_checkpoint

    path = Path(checkpoint_path)
    if extend_to is not None and not resume:
        raise CheckpointMissingError(
            f"--extend-to {extend_to} continues a run: add --resume (the checkpoint is {path}).",
            path=path,
        )
    if not path.is_file():
        if resume:
            raise CheckpointMissingError(
                f"--resume was given but {path} does not exist; drop --resume to start a new "
                "run, or point out_dir at the run to continue.",
                path=path,
            )
        return RunPlan(cfg, None, ())
    if not resume:
        if not overwrite:
            raise CheckpointExistsError(
                f"{path} exists; pass --resume to continue that run, --overwrite to start "
                "over and replace it, or choose another out_dir.",
                path=path,
            )
        return RunPlan(cfg, None, ({"event": "overwrite", "replaced": str(path)},))
    ckpt = load_checkpoint(path)
    saved = DistillConfig.model_validate(ckpt["config"])
    step = int(ckpt["step"])
    original_steps = _original_steps(ckpt)
    differences = [
        d
        for d in config_differences(saved.model_dump(mode="json"), cfg.model_dump(mode="json"))
        if d[0] not in RESUME_FREE_FIELDS
        # the schedule's end: the checkpoint's (after extensions) or the run's first one
        and not (d[0] == "optim.steps" and d[2] in (saved.optim.steps, original_steps))
    ]
    if differences:
        listed = "; ".join(f"{f}: {o!r} -> {n!r}" for f, o, n in differences[:_MAX_LISTED])
        more = f" (and {len(differences) - _MAX_LISTED} more)" if len(differences) > 6 else ""
        hint = (
            " To train longer use --extend-to N."
            if any(f == "optim.steps" for f, _, _ in differences)
            else ""
        )
        raise ResumeMismatchError(
            f"the config differs from the one {path} was trained with: {listed}{more}. Restore "
            "those fields to resume, or start a new run in another out_dir." + hint,
            path=path,
            fields=[f for f, _, _ in differences],
        )
    free = {f: getattr(cfg, f) for f in RESUME_FREE_FIELDS}
    run_cfg = saved.model_copy(update=free)
    events: list[dict[str, Any]] = [{"event": "resume", "step": step}]
    end = saved.optim.steps
    if extend_to is not None:
        if extend_to <= step:
            raise RunFinishedError(
                f"--extend-to {extend_to} is not past the checkpoint's step {step}; give a "
                "larger N.",
                path=path,
                step=step,
            )
        events.append({"event": "extend", "step": step, "from_steps": end, "to_steps": extend_to})
        run_cfg = run_cfg.model_copy(
            update={"optim": run_cfg.optim.model_copy(update={"steps": extend_to})}
        )
    elif step >= end:
        raise RunFinishedError(
            f"{path} finished its schedule (step {step} of {end}); resuming would train past the "
            f"end of its learning-rate schedule. Pass --extend-to N (N > {step}) to continue to "
            "step N with the schedule's end moved there (recorded in the checkpoint).",
            path=path,
            step=step,
        )
    return RunPlan(run_cfg, ckpt, tuple(events))


def _original_steps(ckpt: dict[str, Any]) -> int | None:
    for event in ckpt.get("run_log") or []:
        if event.get("event") == "extend":
            return int(event["from_steps"])
    return None
