"""The training guide's configuration reference is generated from the config models."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field

from tests.torch_required import require_torch

require_torch()

from training import docs  # noqa: E402


def test_the_committed_guide_equals_the_generated_one() -> None:
    text = docs.GUIDE.read_text(encoding="utf-8")
    assert docs.render_guide(text) == text, "run `python -m training docs` (make docs-training)"


def test_every_field_of_every_config_model_is_in_the_guide_with_its_default() -> None:
    text = docs.GUIDE.read_text(encoding="utf-8")
    for title, model, _ in docs.config_models():
        assert f"### {title}" in text
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{title}.{name}"
    assert "| `lr` | float | `0.0005` |" in text  # OptimConfig's default, as JSON


def test_a_field_without_a_meaning_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class Bare(BaseModel):
        said: int = Field(1, description="has one")
        unsaid: int = 2

    monkeypatch.setattr(docs, "config_models", lambda: [("Bare", Bare, "a test")])
    with pytest.raises(ValueError, match=r"Bare\.unsaid"):
        docs.field_tables()


def test_the_guide_section_is_rewritten_between_its_markers() -> None:
    stale = f"intro\n{docs.BEGIN}\nold table\n{docs.END}\noutro\n"
    new = docs.render_guide(stale)
    assert new.startswith("intro\n") and new.endswith(f"{docs.END}\noutro\n")
    assert "old table" not in new and "### DistillConfig" in new
