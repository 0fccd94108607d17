"""The config reference of ``docs/training.md``, generated from the pydantic models.

Every field of every run config (name, type, default, meaning) is written between two markers in
the guide; ``python -m training docs`` rewrites that section, ``--check`` fails when it is stale,
and a test asserts the committed guide equals the generated one, so the two cannot drift. A field
without a ``description`` is refused: the model is the one place its meaning is written.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

__all__ = ["BEGIN", "END", "GUIDE", "config_models", "field_tables", "render_guide"]

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "training.md"
BEGIN = "<!-- BEGIN GENERATED config reference: python -m training docs -->"
END = "<!-- END GENERATED config reference -->"


def config_models() -> list[tuple[str, type[BaseModel], str]]:
    """(title, model, where it is used) in the order the guide lists them."""
    from training.config import (
        AugmentConfig,
        DataConfig,
        DistillConfig,
        LossConfig,
        MilConfig,
        OptimConfig,
        SlideEntry,
        StudentConfig,
        TeacherConfig,
    )
    from training.finetune import FinetuneConfig

    return [
        ("DistillConfig", DistillConfig, "the JSON file of `distill --config`"),
        ("TeacherConfig", TeacherConfig, "`teacher` in DistillConfig"),
        ("StudentConfig", StudentConfig, "`student` in DistillConfig"),
        ("LossConfig", LossConfig, "`loss` in DistillConfig"),
        ("AugmentConfig", AugmentConfig, "`augment` in DistillConfig"),
        ("DataConfig", DataConfig, "`data` in DistillConfig"),
        ("SlideEntry", SlideEntry, "each item of `data.slides`"),
        ("OptimConfig", OptimConfig, "`optim` in DistillConfig"),
        ("MilConfig", MilConfig, "`train-mil` and `evaluate` (flags set some fields)"),
        ("FinetuneConfig", FinetuneConfig, "`finetune` (flags set some fields)"),
    ]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{name}[{inner}]" if args else name
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(repr(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "*required*"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return f"{type(value).__name__}()"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, Path):
        value = value.as_posix()
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value, default=str)}`"  # as written in the JSON config


def _escape(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def field_tables() -> str:
    """The generated section (without the markers).

    Raises:
        ValueError: a field has no description.
    """
    missing = [
        f"{title}.{name}"
        for title, model, _ in config_models()
        for name, field in model.model_fields.items()
        if not field.description
    ]
    if missing:
        raise ValueError(f"config fields without a description: {missing}")
    lines = []
    for title, model, used in config_models():
        lines += [f"### {title}", "", f"Used by {used}.", ""]
        lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            lines.append(
                f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | "
                f"{_escape(field.description or '')} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render_guide(text: str) -> str:
    """``text`` (the guide) with its generated section replaced by ``field_tables()``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the guide needs the markers {BEGIN!r} and {END!r}, in that order")
    return text[: start + len(BEGIN)] + "\n\n" + field_tables() + "\n" + text[end:]
