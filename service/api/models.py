"""Model packages loaded by live workers (their published cards)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api._deps import ERRORS, Reader, service_state
from service.schemas import ModelsView

__all__ = ["router"]

router = APIRouter()


@router.get(
    "/v1/models",
    tags=["models"],
    operation_id="listModels",
    summary="Model packages loaded by live workers, with their cards",
    response_model=ModelsView,
    responses={**ERRORS},
)
def list_models(request: Request, _: Reader) -> ModelsView:
    models = service_state(request).store.models()
    return ModelsView(models=[{"id": k, "card": v} for k, v in sorted(models.items())])
