"""A distillation run never guesses what to do with the checkpoint in its folder.

Resuming checks the config against the checkpoint's; starting never silently replaces a
checkpoint; resuming needs one; a finished run is extended only on request, and that is recorded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.torch_required import require_torch

torch = require_torch()

from tests.training_helpers import fitted_teacher, real_pairs, tiny_config  # noqa: E402
from training.config import DataConfig, OptimConfig, StudentConfig  # noqa: E402
from training.data import CropFolder  # noqa: E402
from training.distill import Distiller  # noqa: E402
from training.errors import (  # noqa: E402
    CheckpointExistsError,
    CheckpointMissingError,
    ResumeMismatchError,
    RunFinishedError,
)
from training.models import load_checkpoint  # noqa: E402
from training.resume import plan_run  # noqa: E402


@pytest.fixture(scope="module")
def pairs():
    return real_pairs(2)


@pytest.fixture(scope="module")
def finished(pairs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 2 steps out of 2 (finished), saved as OUT/checkpoint.pt."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out_dir=out, optim=OptimConfig(batch_size=1, steps=2, lr=1e-3))
    d = Distiller(cfg, fitted_teacher(pairs), CropFolder(pairs))
    d.run(2, checkpoint_path=out / "checkpoint.pt")
    return out / "checkpoint.pt"


def _cfg(ckpt: Path, **over):
    base = {"out_dir": ckpt.parent, "optim": OptimConfig(batch_size=1, steps=2, lr=1e-3)}
    return tiny_config(**{**base, **over})


def test_starting_where_a_checkpoint_exists_is_refused_unless_overwrite_is_chosen(
    finished: Path,
) -> None:
    with pytest.raises(CheckpointExistsError, match=r"--resume .* --overwrite"):
        plan_run(_cfg(finished), finished, resume=False)
    plan = plan_run(_cfg(finished), finished, resume=False, overwrite=True)
    assert plan.checkpoint is None
    assert plan.events == ({"event": "overwrite", "replaced": str(finished)},)


def test_resume_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointMissingError, match="does not exist"):
        plan_run(_cfg(tmp_path / "c.pt"), tmp_path / "c.pt", resume=True)
    assert plan_run(_cfg(tmp_path / "c.pt"), tmp_path / "c.pt", resume=False).checkpoint is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"optim": OptimConfig(batch_size=1, steps=2, lr=5e-3)}, "optim.lr"),
        (
            {
                "teacher": tiny_config().teacher.model_copy(update={"seed": 7}),
            },
            "teacher.seed",
        ),
        ({"data": DataConfig(crops_dir=Path("other-crops"))}, "data.crops_dir"),
        (
            {
                "student": StudentConfig(
                    arch="vit_small_patch14_dinov2",
                    timm_kwargs={"embed_dim": 64, "depth": 1, "num_heads": 2},
                )
            },
            "student.timm_kwargs.embed_dim",
        ),
    ],
)
def test_resuming_with_a_changed_config_names_each_changed_field(
    finished: Path, change: dict, field: str
) -> None:
    with pytest.raises(ResumeMismatchError) as info:
        plan_run(_cfg(finished, **change), finished, resume=True, extend_to=5)
    assert info.value.code == "RESUME_MISMATCH"
    assert info.value.fields["fields"] == [field]
    assert field in info.value.message


def test_bookkeeping_fields_may_change_on_resume(finished: Path) -> None:
    plan = plan_run(
        _cfg(finished, log_every=1, checkpoint_every=5), finished, resume=True, extend_to=3
    )
    assert plan.cfg.log_every == 1 and plan.cfg.checkpoint_every == 5


def test_a_finished_run_is_extended_only_on_request_and_the_extension_is_recorded(
    finished: Path, pairs, tmp_path: Path
) -> None:
    with pytest.raises(RunFinishedError, match=r"step 2 of 2.*--extend-to"):
        plan_run(_cfg(finished), finished, resume=True)
    with pytest.raises(RunFinishedError, match="not past"):
        plan_run(_cfg(finished), finished, resume=True, extend_to=2)
    plan = plan_run(_cfg(finished), finished, resume=True, extend_to=3)
    assert plan.cfg.optim.steps == 3
    d = Distiller(plan.cfg, fitted_teacher(pairs), CropFolder(pairs))
    d.resume(plan.checkpoint)
    d.run_log += list(plan.events)
    out = tmp_path / "checkpoint.pt"
    d.run(1, checkpoint_path=out)
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 3 and ckpt["config"]["optim"]["steps"] == 3
    assert {"event": "extend", "step": 2, "from_steps": 2, "to_steps": 3} in ckpt["run_log"]
    # The extended run resumes again with the config file of its first schedule.
    with pytest.raises(RunFinishedError, match="step 3 of 3"):
        plan_run(_cfg(out), out, resume=True)


def test_a_checkpoint_that_does_not_fit_the_networks_is_a_typed_error(
    finished: Path, pairs
) -> None:
    cfg = _cfg(
        finished,
        student=StudentConfig(
            arch="vit_small_patch14_dinov2",
            timm_kwargs={"embed_dim": 64, "depth": 1, "num_heads": 2},
        ),
    )
    d = Distiller(cfg, fitted_teacher(pairs), CropFolder(pairs))
    with pytest.raises(ResumeMismatchError, match="does not fit"):
        d.resume(finished)


def test_the_cli_exits_with_the_error_s_code_when_it_would_overwrite(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from training.cli import main

    config = tmp_path / "run.json"
    config.write_text(_cfg(finished).model_dump_json())
    for flags, code, status in (
        ([], "CHECKPOINT_EXISTS", 3),
        (["--resume"], "RUN_FINISHED", 3),
    ):
        monkeypatch.setattr(sys, "argv", ["training", "distill", "--config", str(config), *flags])
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code == status
        assert f"[{code}]" in capsys.readouterr().err
