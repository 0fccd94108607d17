"""The deployment files, checked offline: the compose file, the Dockerfiles' base and build context,
and the Kubernetes manifests in deploy/k8s (core objects against the Kubernetes schemas with
kubernetes-validate; the KEDA ScaledObjects against the fields they rely on and the Redis keys
Dramatiq really writes). Running the stack is `make compose-e2e`, not a test."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from service.embedded_redis import EmbeddedRedis
from service.queue import PRIORITY_QUEUES, broker_namespace, declare_actors, make_broker
from service.settings import DEFAULT_MODEL_DIR, ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
#: The Kubernetes release the manifests are checked against (kubernetes-validate's schemas).
K8S_VERSION = "1.30.0"
#: The model `make serve` runs (Makefile MODEL_DIR); compose mounts the same package.
SERVE_MODEL = ROOT / "models" / "demo"

sys.path.insert(0, str(DOCKER))
from compose_check import check_compose, interpolate  # noqa: E402


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    return dict(_interpolated(document, env or {}))


def _interpolated(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    documents = []
    for name in [*kustomization["resources"], "secret.example.yaml"]:
        documents += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return documents


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests() if doc["kind"] == kind}


def container(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"]["containers"][0])


def mounts(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mount["mountPath"]: mount for mount in container(workload).get("volumeMounts", [])}


def slide_lists() -> set[str]:
    """The Redis lists Dramatiq keeps the slide queues' waiting messages in (and their retries)."""
    namespace = broker_namespace(ServiceSettings())
    names = {f"{namespace}:{queue}" for queue, _ in PRIORITY_QUEUES.values()}
    return names | {f"{name}.DQ" for name in names}


# Compose ----------------------------------------------------------------------------------------


def test_the_compose_file_passes_the_offline_check() -> None:
    assert check_compose(COMPOSE_FILE, env={}) == []


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose not installed (optional)"
)
def test_docker_compose_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_offline_check_reports_broken_references(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        "services:\n"
        "  api:\n    image: a\n    depends_on: [cache]\n    volumes: [results:/data]\n"
        "  worker:\n    image: w\n    environment: {X: '${BROKEN'}\n"
    )
    problems = check_compose(broken, env={})
    assert any("malformed substitution" in problem for problem in problems), problems
    broken.write_text(
        "services:\n"
        "  api:\n    image: a\n    depends_on: [cache]\n    volumes: [results:/data]\n"
        "  worker:\n    build: {context: ., dockerfile: Nope}\n"
    )
    problems = check_compose(broken, env={})
    assert "service 'redis' is missing" in problems
    assert "service 'api' depends on unknown service 'cache'" in problems
    assert "service 'api' uses undeclared volume 'results'" in problems
    assert any("Dockerfile" in problem for problem in problems)
    assert "service 'worker' has no REDIS_URL" in problems


def test_compose_interpolation_follows_compose_rules() -> None:
    assert interpolate("${A:-x}", {}) == "x"
    assert interpolate("${A:-x}", {"A": ""}) == "x"
    assert interpolate("${A-x}", {"A": ""}) == ""
    assert interpolate("$$HOME ${A}", {"A": "1"}) == "$HOME 1"
    with pytest.raises(ValueError):
        interpolate("${A:?set A}", {})


def test_compose_redis_keeps_an_everysec_append_only_file_on_a_volume_and_never_evicts() -> None:
    redis_service = compose()["services"]["redis"]
    command = redis_service["command"]
    flags = dict(zip(command[1::2], command[2::2], strict=False))
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert "redis-data:" + flags["--dir"] in redis_service["volumes"]
    assert redis_service["build"]["dockerfile"] == "docker/Dockerfile.redis"


def test_compose_workers_load_the_model_make_serve_runs_read_only() -> None:
    services = compose()["services"]
    for name in ("worker-cpu", "worker-gpu"):
        volumes = services[name]["volumes"]
        model = [volume for volume in volumes if volume.endswith(f":{DEFAULT_MODEL_DIR}:ro")]
        assert len(model) == 1, volumes
        source = (DOCKER / model[0].split(":")[0]).resolve()
        assert source == SERVE_MODEL
        assert (source / "model.json").is_file()
    makefile = (ROOT / "Makefile").read_text()
    assert "MODEL_DIR ?= models/demo" in makefile


def test_compose_images_build_from_the_base_image_argument() -> None:
    services = compose()["services"]
    for name in ("redis", "api", "worker-cpu"):
        assert services[name]["build"]["args"]["BASE_IMAGE"] == "xmag-base:bookworm"
    built = compose({"BASE_IMAGE": "python:3.11-slim"})["services"]
    assert built["api"]["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"


@pytest.mark.parametrize(
    "dockerfile", ["Dockerfile.api", "Dockerfile.worker-cpu", "Dockerfile.redis"]
)
def test_local_images_start_from_the_base_argument(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    assert re.search(r"^ARG BASE_IMAGE=xmag-base:bookworm$", text, re.M)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(image == "${BASE_IMAGE}" for image in froms), froms


def _dockerignore_allows(path: str, rules: list[str]) -> bool:
    allowed = True
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negated
    return allowed


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("Dockerfile.*")))
def test_the_build_context_holds_every_file_a_dockerfile_copies(dockerfile: str) -> None:
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#") and "*" not in line.strip().lstrip("!")[1:]
    ]
    for line in (DOCKER / dockerfile).read_text().splitlines():
        if not line.startswith("COPY ") or "--from=" in line:
            continue
        for source in line.split()[1:-1]:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: no such path"
            assert _dockerignore_allows(source, rules), (
                f"{dockerfile}: .dockerignore drops {source}"
            )


# Kubernetes -------------------------------------------------------------------------------------


def core_manifests() -> list[dict[str, Any]]:
    return [doc for doc in manifests() if not doc["apiVersion"].startswith("keda.sh/")]


@pytest.mark.parametrize(
    "document",
    core_manifests(),
    ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}",
)
def test_core_manifests_match_the_kubernetes_schema(document: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"secret.example.yaml"}
    images = {image["name"] for image in kustomization["images"]}
    used = {
        c["image"]
        for doc in manifests()
        if doc["kind"] in ("Deployment", "StatefulSet")
        for c in doc["spec"]["template"]["spec"]["containers"]
        + doc["spec"]["template"]["spec"].get("initContainers", [])
    }
    assert used <= images


def test_the_api_and_workers_share_one_read_write_many_volume() -> None:
    claims = by_kind("PersistentVolumeClaim")
    assert claims["xmag-data"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("api", "worker-cpu", "worker-gpu"):
        workload = by_kind("Deployment")[name]
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        data = mounts(workload)["/data"]
        assert volumes[data["name"]]["persistentVolumeClaim"]["claimName"] == "xmag-data"
        assert mounts(workload)["/slides"]["readOnly"] is True
    for name in ("worker-cpu", "worker-gpu"):
        model = mounts(by_kind("Deployment")[name])[str(DEFAULT_MODEL_DIR)]
        assert model["readOnly"] is True


def test_api_keys_come_from_a_secret_never_from_a_manifest() -> None:
    secret = by_kind("Secret")["xmag-secrets"]
    api = container(by_kind("Deployment")["api"])
    env = {item["name"]: item for item in api["env"]}
    ref = env["XMAG_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "xmag-secrets"
    assert ref["key"] in secret["stringData"]
    for doc in core_manifests():
        if doc["kind"] == "ConfigMap":
            assert not {"XMAG_API_KEYS", "XMAG_WEBHOOK_SECRET"} & set(doc["data"])


def test_the_gpu_worker_takes_one_gpu_on_gpu_nodes_only() -> None:
    workload = by_kind("Deployment")["worker-gpu"]
    pod = workload["spec"]["template"]["spec"]
    worker = container(workload)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    env = {item["name"]: item.get("value") for item in worker["env"]}
    assert env["XMAG_REQUIRE_GPU"] == "1"
    assert "nvidia.com/gpu" not in str(by_kind("Deployment")["worker-cpu"])


def test_redis_runs_as_a_statefulset_with_its_append_only_file_on_a_claim() -> None:
    redis_set = by_kind("StatefulSet")["redis"]
    args = container(redis_set)["args"]
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert (flags["--appendonly"], flags["--appendfsync"]) == ("yes", "everysec")
    assert flags["--maxmemory-policy"] == "noeviction"
    claim = redis_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert mounts(redis_set)[flags["--dir"]]["name"] == claim
    service = by_kind("Service")[redis_set["spec"]["serviceName"]]
    config = by_kind("ConfigMap")["xmag-config"]["data"]
    assert config["REDIS_URL"] == f"redis://redis-0.{service['metadata']['name']}:6379/0"


# KEDA -------------------------------------------------------------------------------------------

#: Fields of keda.sh/v1alpha1 ScaledObject these manifests use (KEDA >= 2.12: scalingModifiers).
_SPEC_FIELDS = {
    "scaleTargetRef",
    "minReplicaCount",
    "maxReplicaCount",
    "pollingInterval",
    "cooldownPeriod",
    "advanced",
    "triggers",
}
_REDIS_METADATA = {"address", "databaseIndex", "listName", "listLength"}


def scaled_objects() -> dict[str, dict[str, Any]]:
    return by_kind("ScaledObject")


def test_keda_scales_both_worker_deployments() -> None:
    objects = scaled_objects()
    assert set(objects) == {"worker-cpu", "worker-gpu"}
    for name, scaled in objects.items():
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled["spec"]
        assert set(spec) <= _SPEC_FIELDS, set(spec) - _SPEC_FIELDS
        assert spec["scaleTargetRef"] == {"name": name}
        assert name in by_kind("Deployment")
        assert isinstance(spec["minReplicaCount"], int)
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert set(spec["advanced"]) <= {"horizontalPodAutoscalerConfig", "scalingModifiers"}


def test_keda_watches_the_exact_lists_dramatiq_queues_slides_in() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    redis_set = by_kind("StatefulSet")["redis"]
    address = f"redis-0.{redis_set['spec']['serviceName']}.{kustomization['namespace']}"
    for scaled in scaled_objects().values():
        triggers = scaled["spec"]["triggers"]
        assert {t["metadata"]["listName"] for t in triggers} == slide_lists()
        for trigger in triggers:
            assert trigger["type"] == "redis"
            metadata = trigger["metadata"]
            assert set(metadata) == _REDIS_METADATA
            # The CRD types trigger metadata as map[string]string.
            assert all(isinstance(value, str) for value in metadata.values()), metadata
            assert metadata["address"] == f"{address}.svc.cluster.local:6379"
            assert metadata["listLength"] == "1"  # a worker runs one slide at a time
            assert re.fullmatch(r"[a-z_]+", trigger["name"])


def test_keda_adds_up_every_list_to_one_worker_per_waiting_slide() -> None:
    for scaled in scaled_objects().values():
        modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
        assert set(modifiers) == {"formula", "target", "activationTarget", "metricType"}
        assert modifiers["metricType"] == "AverageValue"
        assert modifiers["target"] == "1"
        names = {t["name"] for t in scaled["spec"]["triggers"]}
        terms = [term.strip() for term in modifiers["formula"].split("+")]
        assert sorted(terms) == sorted(names)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedRedis(tmp_path_factory.mktemp("deploy-redis")) as server:
        yield server.url


def test_a_submitted_slide_job_waits_in_the_list_keda_watches(redis_url: str) -> None:
    settings = ServiceSettings(redis_url=redis_url)
    broker = make_broker(settings, redis_url)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        actors = declare_actors(broker, settings)
        watched = {
            t["metadata"]["listName"] for t in scaled_objects()["worker-gpu"]["spec"]["triggers"]
        }
        for priority, actor in actors.slides.items():
            actor.send(f"job-{priority}")
            key = f"{broker_namespace(settings)}:{PRIORITY_QUEUES[priority][0]}"
            assert key in watched
            assert client.type(key) == "list"
            assert client.llen(key) == 1
        actors.slides["normal"].send_with_options(args=("job-retry",), delay=60_000)
        assert client.type("xmag-dq:xmag-slides.DQ") == "list"
        assert "xmag-dq:xmag-slides.DQ" in watched
    finally:
        client.flushdb()
        client.close()
        broker.close()
