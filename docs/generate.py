"""Publishes the machine-readable half of the configuration reference: docs/schema/*.json.

``make docs`` runs this file. Each schema is ``model_json_schema()`` of a service's top-level
config model, written as pretty JSON with sorted keys and a trailing newline. Durations are
described as what the loaders accept (Go-style strings such as ``250ms``), not as pydantic's
ISO 8601 default. ``tests/test_docs.py`` checks the committed files against a fresh run and
walks the same schemas (:func:`key_paths`) for every key docs/configuration.md must document.
``--check`` exits 1 and names the stale files instead of writing them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema
from svidgate.pki.durations import format_duration

DOCS = Path(__file__).resolve().parent
SCHEMA_DIR = DOCS / "schema"
# service -> "module:Model", the top-level model of <service>.yaml
MODELS = {
    "gateway": "svidgate.gateway.config:GatewayConfig",
    "signer": "svidgate.signer.config:SignerConfig",
}
DRAFT = "https://json-schema.org/draft/2020-12/schema"
GO_DURATION = r"^(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+)$"
PLACEHOLDER = "<name>"  # the key path segment standing for a user-chosen map key


def _plain(value: Any) -> Any:
    """A default as a user writes it in YAML: durations Go-style, models as mappings."""
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, BaseModel):
        return {name: _plain(field) for name, field in value}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class SchemaGenerator(GenerateJsonSchema):
    """pydantic's generator, with durations and their defaults in the config's own syntax."""

    def timedelta_schema(self, schema: core_schema.TimedeltaSchema) -> JsonSchemaValue:
        return {"type": "string", "pattern": GO_DURATION}

    def encode_default(self, dft: Any) -> Any:
        return super().encode_default(_plain(dft))


def model_class(service: str) -> type[BaseModel]:
    module_name, _, name = MODELS[service].partition(":")
    model: type[BaseModel] = getattr(importlib.import_module(module_name), name)
    return model


def build_schema(service: str) -> dict[str, Any]:
    """The JSON schema of ``<service>.yaml`` (validation mode: what the loader accepts)."""
    schema = model_class(service).model_json_schema(schema_generator=SchemaGenerator)
    return {"$schema": DRAFT, **schema}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def schema_path(service: str) -> Path:
    return SCHEMA_DIR / f"{service}.schema.json"


def stale_files() -> list[Path]:
    """The schema files whose content differs from a fresh generation (or that are missing)."""
    stale = []
    for service in MODELS:
        path = schema_path(service)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current != render(build_schema(service)):
            stale.append(path)
    return stale


def write_all() -> list[Path]:
    SCHEMA_DIR.mkdir(exist_ok=True)
    written = []
    for service in MODELS:
        path = schema_path(service)
        path.write_text(render(build_schema(service)), encoding="utf-8")
        written.append(path)
    return written


# -- key paths ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPath:
    """One key a config file may hold. ``path`` joins fields with ``.``, list items with ``[]``
    and a user-chosen map key as ``<name>`` (``routes[].jwt.bind``, ``upstreams.<name>.url``)."""

    path: str
    required: bool
    has_default: bool
    default: Any
    choices: tuple[str, ...]


def key_paths(schema: dict[str, Any]) -> dict[str, KeyPath]:
    """Every key path the schema accepts: properties, nested $defs, list items and maps."""
    defs: dict[str, Any] = schema.get("$defs", {})
    found: dict[str, KeyPath] = {}

    def alternatives(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """``node`` with $refs followed and anyOf/oneOf flattened; ``null`` left out."""
        if "$ref" in node:
            yield from alternatives(defs[node["$ref"].removeprefix("#/$defs/")])
            return
        branches = node.get("anyOf") or node.get("oneOf")
        if branches:
            for branch in branches:
                yield from alternatives(branch)
            return
        if node.get("type") != "null":
            yield node

    def choices(node: dict[str, Any]) -> tuple[str, ...]:
        out: list[str] = []
        for alt in alternatives(node):
            out += [str(v) for v in alt.get("enum", ())]
            if "const" in alt:
                out.append(str(alt["const"]))
        return tuple(out)

    def add(path: str, node: dict[str, Any], *, required: bool) -> None:
        found[path] = KeyPath(path, required, "default" in node, node.get("default"), choices(node))
        descend(path, node)

    def descend(path: str, node: dict[str, Any]) -> None:
        for alt in alternatives(node):
            required = set(alt.get("required", ()))
            for name, sub in alt.get("properties", {}).items():
                add(f"{path}.{name}" if path else name, sub, required=name in required)
            items = alt.get("items")
            if isinstance(items, dict):
                descend(f"{path}[]", items)
            entries = alt.get("additionalProperties")
            if isinstance(entries, dict):
                add(f"{path}.{PLACEHOLDER}", entries, required=False)

    descend("", schema)
    return found


def main(argv: Sequence[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            out(f"stale: {path.relative_to(DOCS.parent)} (run `make docs`)")
        return 1 if stale else 0
    for path in write_all():
        out(f"wrote {path.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
