"""Validate docker/docker-compose.yml with whatever this machine has, and say which was used.

Order: ``docker-compose config -q`` (v1), then ``docker compose config -q`` (the v2 plugin), then,
with neither, an offline check in Python (``check_compose``, also run by ``tests/test_deploy.py``):
the file parses, ``${VAR:-default}`` interpolations are well formed, every service has an image or
a build whose Dockerfile exists, ``depends_on`` names services, named volumes are declared, bind
mounts of the repository exist, and the services the stack needs (redis, api, a worker) are there.
It is less than Compose's own schema validation, and says so.

Usage: ``python docker/compose_check.py [docker/docker-compose.yml]`` (``make compose-check``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["check_compose", "compose_command", "interpolate"]

#: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``; ``$$`` is ``$``.
_VAR = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}|"
    r"(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
#: Services the stack cannot run without.
REQUIRED_SERVICES = ("redis", "api")


def compose_command() -> list[str] | None:
    """The Compose command line this machine has: v1 ``docker-compose``, else ``docker compose``."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution on one string (``ValueError`` on a malformed one)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        if match.group("braced") is not None and op is None and arg:
            raise ValueError(f"malformed substitution {match.group(0)!r}")
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return current if current is not None else arg
        if op in (":?", "?") and not current:
            raise ValueError(f"required variable {name} is unset: {arg}")
        return current or ""

    if "${" in _VAR.sub("", value):
        raise ValueError(f"malformed substitution in {value!r}")
    return _VAR.sub(replace, value)


def _walk(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_walk(value, env) for value in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def _volume_source(entry: Any) -> tuple[str | None, str]:
    """(source, kind) of a service volume, short (``src:dst:ro``) or long syntax."""
    if isinstance(entry, dict):
        return entry.get("source"), entry.get("type", "volume")
    source = str(entry).split(":")[0] if ":" in str(entry) else None
    if source is None:
        return None, "anonymous"
    kind = "bind" if source.startswith((".", "/", "~")) else "volume"
    return source, kind


def check_compose(path: Path, env: dict[str, str] | None = None) -> list[str]:
    """Problems found in the compose file at ``path`` (empty: valid as far as this check goes)."""
    import yaml

    env = dict(os.environ if env is None else env)
    base = path.resolve().parent
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        return [f"{path}: not YAML: {exc}"]
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        return [f"{path}: no services mapping"]
    try:
        document = _walk(document, env)
    except ValueError as exc:
        return [f"{path}: {exc}"]
    problems: list[str] = []
    services: dict[str, Any] = document["services"]
    volumes = document.get("volumes") or {}
    for name in REQUIRED_SERVICES:
        if name not in services:
            problems.append(f"service {name!r} is missing")
    if not any(name.startswith("worker") for name in services):
        problems.append("no worker service")
    for name, service in services.items():
        if not isinstance(service, dict):
            problems.append(f"service {name!r} is not a mapping")
            continue
        if "image" not in service and "build" not in service:
            problems.append(f"service {name!r} has neither image nor build")
        build = service.get("build")
        if isinstance(build, dict):
            context = (base / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"service {name!r}: Dockerfile {dockerfile} does not exist")
        depends = service.get("depends_on") or []
        for other in depends if isinstance(depends, list) else depends.keys():
            if other not in services:
                problems.append(f"service {name!r} depends on unknown service {other!r}")
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment if "=" in item)
        if name.startswith("worker") and not environment.get("REDIS_URL"):
            problems.append(f"service {name!r} has no REDIS_URL")
        for entry in service.get("volumes") or []:
            source, kind = _volume_source(entry)
            if kind == "volume" and source is not None and source not in volumes:
                problems.append(f"service {name!r} uses undeclared volume {source!r}")
            # Only sources inside this repository must exist (a host path like /mnt/slides is
            # the deployment's business; Compose creates a missing one).
            inside = kind == "bind" and source is not None and source.startswith("..")
            if inside and not (base / str(source)).exists():
                problems.append(f"service {name!r}: bind source {base / str(source)} is missing")
    return problems


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else Path(__file__).with_name("docker-compose.yml"))
    command = compose_command()
    if command is not None:
        shown = " ".join(command)
        result = subprocess.run([*command, "-f", str(path), "config", "-q"], check=False)
        if result.returncode != 0:
            print(f"compose-check: {path} is NOT valid ({shown} config -q)", file=sys.stderr)
            return result.returncode
        print(f"compose-check: {path} valid ({shown} config -q)")
        return 0
    try:
        problems = check_compose(path)
    except ImportError:
        print(
            "compose-check: no docker-compose, no `docker compose`, and no PyYAML for the "
            "Python check; run `make install` (or install docker-compose)",
            file=sys.stderr,
        )
        return 2
    for problem in problems:
        print(f"compose-check: {problem}", file=sys.stderr)
    if problems:
        print(
            f"compose-check: {path} is NOT valid (Python check; no Compose binary found)",
            file=sys.stderr,
        )
        return 1
    print(
        f"compose-check: {path} valid (Python check of structure and references: no "
        "docker-compose or `docker compose` here, so not Compose's full schema)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
