"""A small typed-client generator for the service's OpenAPI document (tests only).

Why not a generator from PyPI: ``openapi-python-client`` 0.29 pins ``typer<0.28`` (this project
runs typer 0.29), and ``datamodel-code-generator`` brings black, isort, genson and inflect for the
models alone. What a client needs from *this* document is small: one ``TypedDict`` per component
schema (required keys ``Required``, enums ``Literal``), and one method per ``operationId`` on an
``httpx.Client`` with typed path, query and body parameters and a typed return; problem+json
answers raise ``ApiProblem`` carrying the typed ``Problem``. The generated module is checked by
mypy in the test, so a document that cannot be typed fails there.
"""

from __future__ import annotations

import keyword
import re
from typing import Any

__all__ = ["generate_client"]

_HEADER = '''"""Generated from the xmag-serve OpenAPI document by tests/openapi_codegen.py."""

from __future__ import annotations

from typing import Any, Literal, Required, TypedDict, cast
from urllib.parse import quote

import httpx
'''


def _ident(name: str) -> str:
    out = re.sub(r"\W", "_", name)
    return f"{out}_" if keyword.iskeyword(out) or out[0].isdigit() else out


def _snake(name: str) -> str:
    return _ident(re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower())


def _py(schema: dict[str, Any]) -> str:
    """The Python type of a JSON schema (component references by name)."""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema and "properties" not in schema:
            parts: list[str] = []
            for sub in schema[combinator]:
                t = _py(sub)
                if t not in parts:
                    parts.append(t)
            return " | ".join(parts) if "Any" not in parts else "Any"
    if "enum" in schema:
        return "Literal[" + ", ".join(repr(v) for v in schema["enum"]) + "]"
    if "const" in schema:
        return f"Literal[{schema['const']!r}]"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_py({**schema, "type": k}) for k in kind)
    if kind == "string":
        return "bytes" if schema.get("format") == "binary" else "str"
    if kind == "integer":
        return "int"
    if kind == "number":
        return "float"
    if kind == "boolean":
        return "bool"
    if kind == "null":
        return "None"
    if kind == "array":
        items = schema.get("items") or schema.get("prefixItems")
        if isinstance(items, list):
            return "list[Any]"
        return f"list[{_py(items or {})}]"
    if kind == "object" or "properties" in schema:
        extra = schema.get("additionalProperties")
        value = _py(extra) if isinstance(extra, dict) and extra else "Any"
        return f"dict[str, {value}]"
    return "Any"


def _component(name: str, schema: dict[str, Any]) -> list[str]:
    if "properties" not in schema:
        return [f"{name} = {_py(schema)}", ""]
    required = set(schema.get("required", []))
    fields = []
    for prop, sub in schema["properties"].items():
        t = _py(sub)
        # Quoted: a functional TypedDict evaluates its types, and schemas refer to later ones.
        annotation = f"Required[{t}]" if prop in required else t
        fields.append(f"        {prop!r}: {annotation!r},")
    return [
        f"{name} = TypedDict(",
        f"    {name!r},",
        "    {",
        *fields,
        "    },",
        "    total=False,",
        ")",
        "",
    ]


def _json_schema(content: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    for media, entry in content.items():
        if "json" in media:
            return media, entry.get("schema", {})
    return None


def _operation(path: str, method: str, op: dict[str, Any]) -> list[str]:
    name = _snake(op["operationId"])
    args = ["self"]
    kwargs: list[str] = []
    path_names: list[tuple[str, str]] = []
    query: list[tuple[str, str]] = []
    for param in op.get("parameters", []):
        ident = _ident(param["name"])
        t = _py(param.get("schema", {}))
        if param["in"] == "path":
            args.append(f"{ident}: {t}")
            path_names.append((param["name"], ident))
        elif param["in"] == "query":
            optional = t if t.endswith("None") else f"{t} | None"
            kwargs.append(f"{ident}: {optional} = None")
            query.append((param["name"], ident))
    body = op.get("requestBody", {}).get("content", {})
    send = ""
    if "application/json" in body:
        t = _py(body["application/json"].get("schema", {}))
        args.append(f"body: {t}")
        send = ", json=body"
    elif "application/octet-stream" in body:
        args.append("content: bytes")
        send = ", content=content"
    elif "multipart/form-data" in body:
        args.append("files: dict[str, tuple[str, bytes]]")
        send = ", files=files"
    kwargs.append("headers: dict[str, str] | None = None")
    ok = sorted(s for s in op["responses"] if s.startswith("2"))
    returns, parse = "None", "None"
    if ok:
        found = _json_schema(op["responses"][ok[0]].get("content", {}))
        if found is not None:
            returns = _py(found[1])
            parse = f"cast({returns!r}, response.json())"
        elif op["responses"][ok[0]].get("content"):
            returns, parse = "bytes", "response.content"
    signature = ", ".join(args + (["*", *kwargs] if kwargs else []))
    url = repr(path)
    if path_names:
        fmt = ", ".join(f"{n}=quote(str({i}), safe='')" for n, i in path_names)
        url = f"{url}.format({fmt})"
    params = "{" + ", ".join(f"{n!r}: {i}" for n, i in query) + "}"
    doc = str(op.get("summary", "")).replace('"', "'")
    return [
        f"    def {name}({signature}) -> {returns}:",
        f'        """{doc} ({method.upper()} {path})."""',
        f"        query: dict[str, Any] = {params}",
        "        params = {k: v for k, v in query.items() if v is not None}",
        f"        response = self._http.request({method.upper()!r}, {url}, params=params,"
        f" headers=headers{send})",
        "        self._raise_for_problem(response)",
        f"        return {parse}" if parse != "None" else "        return None",
        "",
    ]


def generate_client(document: dict[str, Any]) -> str:
    """Python source of a typed client for an OpenAPI 3.1 document."""
    lines = [_HEADER]
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        lines += _component(name, schema)
    lines += [
        "",
        "class ApiProblem(Exception):",
        '    """A problem+json answer: ``status`` and the typed ``problem``."""',
        "",
        "    def __init__(self, status: int, problem: Problem) -> None:",
        "        super().__init__(f\"{status} {problem['code']}: {problem['detail']}\")",
        "        self.status = status",
        "        self.problem = problem",
        "",
        "",
        "class Client:",
        '    """The API as methods (one per operationId), authenticated with one key."""',
        "",
        "    def __init__(self, base_url: str, key: str, **options: Any) -> None:",
        "        self._http = httpx.Client(",
        '            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, **options',
        "        )",
        "",
        "    def close(self) -> None:",
        "        self._http.close()",
        "",
        "    @staticmethod",
        "    def _raise_for_problem(response: httpx.Response) -> None:",
        "        if response.status_code >= 400:",
        '            media = response.headers.get("content-type", "")',
        '            if media.startswith("application/problem"):',
        "                raise ApiProblem(response.status_code, cast(Problem, response.json()))",
        "            response.raise_for_status()",
        "",
    ]
    for path, item in document["paths"].items():
        for method, op in item.items():
            if "operationId" in op:
                lines += _operation(path, method, op)
    return "\n".join(lines) + "\n"
