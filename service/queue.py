"""The Dramatiq broker and the service's two actors, built explicitly (no import-time broker).

Queues: ``xmag-slides-high``, ``xmag-slides`` and ``xmag-slides-low`` (one per job priority: the
Redis broker has no per-message priority, so each priority is its own actor with a Dramatiq actor
priority that orders a worker's local work queue), and ``xmag-webhooks`` (deliveries, consumed by
the API process). Actor options are set explicitly: the time limit is raised from Dramatiq's 10
minutes, input errors are listed in ``throws`` (never retried), transient faults are retried with
exponential backoff, and our own attempts counter in the job record (see ``service.store``) bounds
crash requeues, which Dramatiq does not count as retries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from service.errors import ServiceUnavailableError
from service.settings import ServiceSettings
from xmag.errors import JobError, ModelPackageError, SlideError

__all__ = [
    "PRIORITY_QUEUES",
    "WEBHOOK_QUEUE",
    "Actors",
    "broker_namespace",
    "declare_actors",
    "make_broker",
    "redis_client",
    "send_webhook",
]

#: priority -> (queue, Dramatiq actor priority: lower runs first within a worker).
PRIORITY_QUEUES: dict[str, tuple[str, int]] = {
    "high": ("xmag-slides-high", 0),
    "normal": ("xmag-slides", 10),
    "low": ("xmag-slides-low", 20),
}
WEBHOOK_QUEUE = "xmag-webhooks"
#: Errors that say the input is wrong: retrying the same slide cannot help.
INPUT_ERRORS: tuple[type[Exception], ...] = (SlideError, ModelPackageError, JobError)


def broker_namespace(settings: ServiceSettings) -> str:
    return f"{settings.namespace}-dq"


def redis_client(url: str, *, decode: bool = True) -> redis.Redis:
    """A redis-py client that retries a few times on connection errors (Redis restarts)."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=30,
        socket_connect_timeout=5,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), 8),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def make_broker(settings: ServiceSettings, url: str) -> RedisBroker:
    """A RedisBroker with explicit middleware and the configured heartbeat timeout."""
    middleware = [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(max_retries=settings.max_attempts),
        CurrentMessage(),  # the slide actor reads its claimed job from the current message
    ]
    broker = RedisBroker(
        client=redis_client(url, decode=False),
        middleware=middleware,
        namespace=broker_namespace(settings),
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        maintenance_chance=settings.maintenance_chance,
    )
    return broker


def _no_slide_jobs_here(job_id: str) -> None:
    """The slide actors' body in processes that only send (the API): never consumed there."""
    raise ServiceUnavailableError(
        f"This process does not run slide jobs (job {job_id}); start `xmag worker`."
    )


@dataclass(frozen=True)
class Actors:
    """The declared actors: one slide actor per priority and the webhook actor."""

    slides: dict[str, dramatiq.Actor[Any, Any]]
    webhook: dramatiq.Actor[Any, Any]

    @property
    def slide_queues(self) -> list[str]:
        return [actor.queue_name for actor in self.slides.values()]


def declare_actors(
    broker: RedisBroker,
    settings: ServiceSettings,
    *,
    slide_job: Callable[[str], Any] = _no_slide_jobs_here,
    webhook_secret: Callable[[str], str] | None = None,
) -> Actors:
    """Declare the actors on ``broker`` (in the API and in workers, so either can send).

    Args:
        slide_job: the slide actors' body, called with the job id. A worker passes its
            ``service.worker.SlideJob``: a callable bound at declaration to the worker's engine,
            which reads its claimed job from the current message (``CurrentMessage``), where the
            state middleware put it. That is how Dramatiq hands per-message data to an actor;
            processes that only send keep the default, which never runs.
        webhook_secret: returns the signing secret of a client (its own, else the service's);
            only the process that delivers needs it.
    """
    slides = {}
    for priority, (queue, actor_priority) in PRIORITY_QUEUES.items():
        slides[priority] = dramatiq.Actor(
            slide_job,
            broker=broker,
            actor_name=f"embed_slide_{priority}",
            queue_name=queue,
            priority=actor_priority,
            options={
                "max_retries": settings.max_attempts,
                "min_backoff": settings.retry_min_backoff_ms,
                "max_backoff": settings.retry_max_backoff_ms,
                "throws": INPUT_ERRORS,
                "time_limit": int(settings.job_time_limit_s * 1000),
                "max_age": None,
            },
        )

    def deliver_webhook(url: str, msg_id: str, body: str, client: str = "") -> None:
        from service.webhooks import deliver

        if webhook_secret is None:
            raise ServiceUnavailableError("This process cannot sign webhooks (no secret).")
        deliver(
            url,
            msg_id,
            body,
            webhook_secret(client),
            timeout_s=settings.webhook_timeout_s,
            allowed_hosts=settings.callback_allowed_hosts,
        )

    webhook = dramatiq.Actor(
        deliver_webhook,
        broker=broker,
        actor_name="deliver_webhook",
        queue_name=WEBHOOK_QUEUE,
        priority=0,
        options={
            "max_retries": settings.webhook_max_retries,
            "min_backoff": settings.webhook_min_backoff_ms,
            "max_backoff": settings.webhook_max_backoff_ms,
            "time_limit": int((settings.webhook_timeout_s + 5) * 1000),
        },
    )
    return Actors(slides=slides, webhook=webhook)


def send_webhook(actors: Actors, url: str, msg_id: str, payload: dict[str, Any]) -> None:
    """Queue one delivery; the id stays the same across retries (receivers deduplicate on it).
    It is signed with the secret of the client named in ``payload["data"]["client"]``."""
    client = str((payload.get("data") or {}).get("client") or "")
    body = json.dumps(payload, separators=(",", ":"))
    if client:
        actors.webhook.send(url, msg_id, body, client)
    else:
        actors.webhook.send(url, msg_id, body)
