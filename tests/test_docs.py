"""docs/ is the reference inside the repository; these tests keep it true to the code.

(a) docs/schema/*.schema.json equal a fresh run of docs/generate.py (the config models' JSON
schemas); (b) docs/configuration.md documents exactly the key paths those schemas accept, each
as a row of a key table (first cell: the path in backticks) under the file's own heading, with
the model's default and every allowed value; (c) every relative link in README.md and
docs/*.md points to an existing file (and heading) inside the repository, and README links
nothing outside it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
SECTIONS = {"gateway": "gateway.yaml", "signer": "signer.yaml"}  # service -> "## <heading>"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("svidgate_docs_generate", DOCS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


# -- (a) the published schemas are fresh ---------------------------------------------------------


@pytest.mark.parametrize("service", sorted(generate.MODELS))
def test_schema_file_is_fresh(service: str) -> None:
    path = generate.schema_path(service)
    fresh = generate.render(generate.build_schema(service))
    committed = path.read_text(encoding="utf-8") if path.exists() else None
    assert committed == fresh, f"{path.relative_to(ROOT)} is stale: run `make docs`"


def test_schema_describes_durations_as_the_loader_reads_them() -> None:
    text = generate.schema_path("gateway").read_text(encoding="utf-8")
    assert '"default": "250ms"' in text  # signer.timeout
    assert "PT0.25S" not in text and '"format": "duration"' not in text
    pattern = re.compile(generate.GO_DURATION)
    for good in ("250ms", "1h30m", "1.5s", "0", "90µs"):
        assert pattern.fullmatch(good), good
    for bad in ("PT10S", "10", "1d", "-1s", "s"):
        assert not pattern.fullmatch(bad), bad


def test_generator_check_mode_reports_stale_files(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    assert generate.main(["--check"], out=lines.append) == 0, lines
    monkeypatch.setattr(generate, "render", lambda schema: "{}\n")
    assert generate.main(["--check"], out=lines.append) == 1
    assert any("make docs" in line for line in lines)


# -- (b) configuration.md documents exactly the models' keys ------------------------------------


@dataclass(frozen=True)
class Row:
    line: int
    path: str
    cells: dict[str, str]  # column header (lower case) -> cell text
    text: str


def _normalize(path: str) -> str:
    """Any ``<placeholder>`` segment stands for a user-chosen map key."""
    return re.sub(r"<[A-Za-z_][A-Za-z0-9_-]*>", "<*>", path)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def documented_rows(text: str) -> dict[str, dict[str, Row]]:
    """Key-table rows per service. A key table is a table whose first header cell is ``key``;
    it must sit under a ``## gateway.yaml`` / ``## signer.yaml`` heading."""
    rows: dict[str, dict[str, Row]] = {service: {} for service in SECTIONS}
    section: str | None = None
    header: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("## "):
            title = line[3:].strip().strip("`")
            section = next((s for s, h in SECTIONS.items() if title == h), None)
        if not line.startswith("|"):
            header = None
            continue
        if header is None:
            header = [c.lower() for c in _cells(line)]
            continue
        if re.fullmatch(r"[|\-: ]+", line) or header[0] != "key":
            continue
        where = f"{CONFIGURATION.name}:{number}"
        assert section is not None, (
            f"{where}: a key table outside the gateway.yaml/signer.yaml part"
        )
        cells = _cells(line)
        assert len(cells) == len(header), f"{where}: {len(cells)} cells, header has {len(header)}"
        match = re.fullmatch(r"`([^`\s]+)`", cells[0])
        assert match, f"{where}: the first cell must be one key path in backticks: {cells[0]!r}"
        path = _normalize(match.group(1))
        assert path not in rows[section], f"{where}: {path} is documented twice"
        rows[section][path] = Row(number, path, dict(zip(header, cells, strict=True)), line)
    return rows


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, Row]]:
    return documented_rows(CONFIGURATION.read_text(encoding="utf-8"))


def model_keys(service: str) -> dict[str, Any]:
    keys = generate.key_paths(generate.build_schema(service))
    return {_normalize(path): key for path, key in keys.items()}


@pytest.mark.parametrize("service", sorted(SECTIONS))
def test_every_model_key_is_documented(service: str, rows: dict[str, dict[str, Row]]) -> None:
    missing = sorted(set(model_keys(service)) - set(rows[service]))
    assert not missing, f"{SECTIONS[service]} keys missing from {CONFIGURATION.name}: {missing}"


@pytest.mark.parametrize("service", sorted(SECTIONS))
def test_every_documented_key_exists(service: str, rows: dict[str, dict[str, Row]]) -> None:
    stale = sorted(set(rows[service]) - set(model_keys(service)))
    assert not stale, (
        f"{CONFIGURATION.name} documents {SECTIONS[service]} keys the model lacks: {stale}"
    )


def expected_default(key: Any) -> str | None:
    """What the default cell must contain; None: not checked (maps, objects, factories)."""
    if key.required:
        return "required"
    if not key.has_default:
        return None
    value = key.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float | str):
        return f"`{value}`"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return f"`[{', '.join(value)}]`"
    return None


@pytest.mark.parametrize("service", sorted(SECTIONS))
def test_documented_defaults_and_choices_match_the_model(
    service: str, rows: dict[str, dict[str, Row]]
) -> None:
    problems = []
    for path, key in model_keys(service).items():
        row = rows[service].get(path)
        if row is None:
            continue  # reported by test_every_model_key_is_documented
        default = row.cells.get("default", "")
        wanted = expected_default(key)
        if wanted == "required" and not default.startswith("required"):
            problems.append(f"line {row.line}: {path} is required; default cell says {default!r}")
        elif wanted == "none" and "none" not in default.lower():
            problems.append(f"line {row.line}: {path} defaults to none; cell says {default!r}")
        elif wanted is not None and wanted not in ("required", "none") and wanted not in default:
            problems.append(f"line {row.line}: {path} defaults to {wanted}; cell says {default!r}")
        if key.required is False and default.startswith("required"):
            problems.append(f"line {row.line}: {path} is optional in the model")
        missing = [c for c in key.choices if f"`{c}`" not in row.text]
        if missing:
            problems.append(f"line {row.line}: {path} does not name its allowed values {missing}")
    assert not problems, "\n".join(problems)


def test_rows_are_parsed_as_intended() -> None:
    text = "\n".join(
        [
            "## `gateway.yaml`",
            "| key | type | default | reload | meaning |",
            "|---|---|---|---|---|",
            "| `routes[].jwt.bind` | string | `subject` | reload | `subject`, `none` |",
            "| `upstreams.<svc>.url` | URL | required | reload | x |",
            "",
            "| other | table |",
            "|---|---|",
            "| `not.a.key` | ignored |",
        ]
    )
    found = documented_rows(text)
    assert sorted(found["gateway"]) == ["routes[].jwt.bind", "upstreams.<*>.url"]
    assert found["gateway"]["routes[].jwt.bind"].cells["default"] == "`subject`"
    assert found["signer"] == {}
    with pytest.raises(AssertionError, match="outside"):
        documented_rows("## Other\n| key | default |\n|---|---|\n| `x` | y |\n")
    with pytest.raises(AssertionError, match="one key path"):
        documented_rows("## signer.yaml\n| key | default |\n|---|---|\n| x | y |\n")


def test_key_paths_cover_lists_and_maps() -> None:
    keys = model_keys("gateway")
    for path in ("routes[].jwt.bind", "trust_domains.<*>", "upstreams.<*>.tls.spiffe_id"):
        assert path in keys, path
    assert "identity_headers.claims.<*>" in keys
    assert keys["routes[].jwt.bind"].choices == ("subject", "certificate", "none")
    assert keys["listen"].required and not keys["workers"].required


# -- (c) links stay inside the repository -------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text)


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def link_problems(source: Path, *, allow_urls: bool, root: Path = ROOT) -> list[str]:
    text = source.read_text(encoding="utf-8")
    problems = []
    for target in LINK.findall(_prose(text)):
        if SCHEME.match(target):
            if not allow_urls:
                problems.append(f"{target}: README links only files inside the repository")
            continue
        file_part, _, anchor = target.partition("#")
        dest = (source.parent / file_part).resolve() if file_part else source
        if not dest.is_relative_to(root):
            problems.append(f"{target}: points outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif (
            anchor
            and dest.suffix == ".md"
            and anchor not in github_anchors(dest.read_text(encoding="utf-8"))
        ):
            problems.append(f"{target}: no heading with anchor #{anchor}")
    return [f"{source.relative_to(root)}: {p}" for p in problems]


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("source", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_into_the_repository(source: Path) -> None:
    problems = link_problems(source, allow_urls=source.parent != ROOT)
    assert not problems, "\n".join(problems)


def test_docs_exist_and_readme_points_to_them() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("architecture.md", "configuration.md", "operations.md"):
        assert (DOCS / name).is_file(), name
        assert f"](docs/{name}" in readme, f"README.md does not link docs/{name}"
    assert "shared/DESIGN.md" not in readme


def test_link_checker_catches_what_it_should(tmp_path: Path) -> None:
    assert github_anchors("## `gateway.yaml`\n## Rules for both files\n## A\n## A\n") == {
        "gatewayyaml",
        "rules-for-both-files",
        "a",
        "a-1",
    }
    assert "](" not in _prose("see `[x](nowhere.md)` and\n```\n[y](gone.md)\n```\n")
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "there.md").write_text("## Reload\n", encoding="utf-8")
    page = root / "docs" / "page.md"
    page.write_text(
        "[ok](there.md#reload) [a](../../outside.md) [b](missing.md) [c](there.md#nope) "
        "[d](https://example.org) `[e](inline.md)`\n",
        encoding="utf-8",
    )
    assert len(link_problems(page, allow_urls=True, root=root)) == 3
    found = link_problems(page, allow_urls=False, root=root)
    assert len(found) == 4, found
    assert any("outside the repository" in p for p in found)
