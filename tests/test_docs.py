"""The documentation's generated parts are current, and its numbers agree with their sources.

- docs/reference/http.md and openapi.json against the FastAPI app's OpenAPI schema;
- the benchmark tables (docs/benchmarks.md, README.md) against the JSON reports, re-read here
  independently of the generator: every s/image and speedup in a table row is found in its report;
- no Sphinx role (``:class:`X```) left in a docstring, and the mkdocs hook that fails the strict
  build on one;
- every module of fd_trt has an entry in the API reference.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_http_reference_is_current():
    pytest.importorskip("fastapi")
    assert _script("gen_http_docs").main(["--check"]) == 0, "run python scripts/gen_http_docs.py"
    schema = json.loads((ROOT / "docs" / "reference" / "openapi.json").read_text())
    page = (ROOT / "docs" / "reference" / "http.md").read_text()
    # Every field of the request body is documented on the page.
    for field in schema["components"]["schemas"]["GenerateBody"]["properties"]:
        assert f"| `{field}` |" in page


def test_benchmark_tables_are_current():
    assert _script("gen_benchmarks").main(["--check"]) == 0, "run python scripts/gen_benchmarks.py"


def _reports() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in (ROOT / "docs" / "benchmarks").glob("bench_*.json")}


def _table_rows(text: str) -> list[list[str]]:
    """Markdown table rows, split on the pipes that are not escaped (a decoder schedule's ``\\|``)."""
    return [
        [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        for line in text.splitlines()
        if line.startswith("| ")
    ]


def test_benchmark_page_numbers_agree_with_their_json():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    reports = _reports()
    checked = 0
    for section in page.split("\n### ")[1:]:
        runs = dict(re.findall(r"^- \[([a-h])\] \[`benchmarks/([^`]+)`\]", section, re.M))
        for row in _table_rows(section):
            if not row[0].startswith("[") or not re.match(r"\d+\.\d{3} \(", row[5]):
                continue
            tag, system, backend, schedule, precision = row[0][1], *row[1:5]
            s_img = row[5].split()[0]
            results = reports[runs[tag]]["results"]
            match = [
                r
                for r in results
                if (r["system"], r["backend"], r["schedule"], r["precision"]) == (system, backend, schedule, precision)
            ]
            assert len(match) == 1, row
            assert f"{match[0]['s_per_image']:.3f}" == s_img, row
            base = next(
                r
                for r in results
                if r["system"] == ("diffusers+controlnet" if "+controlnet" in system else "diffusers")
            )
            assert row[7].strip("*") == f"{base['s_per_image'] / match[0]['s_per_image']:.2f}x", row
            checked += 1
    assert checked >= 15


def test_readme_speedups_agree_with_their_json():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- speedups:begin")[1].split("<!-- speedups:end")[0]
    pairs = [
        (r["s_per_image"], d["s_per_image"])
        for rep in _reports().values()
        for r in rep["results"]
        if r.get("s_per_image")
        for d in rep["results"]
        if d["system"] in ("diffusers", "diffusers+controlnet") and d.get("s_per_image")
    ]
    rows = [r for r in _table_rows(table) if re.fullmatch(r"\d+\.\d{3}", r[3])]
    assert len(rows) >= 5
    for row in rows:
        ours, theirs, sp = float(row[3]), float(row[4]), row[5].strip("*")
        assert any(f"{a:.3f}" == row[3] and f"{b:.3f}" == row[4] for a, b in pairs), row
        assert sp == f"{theirs / ours:.2f}x" or abs(float(sp[:-1]) - theirs / ours) < 0.006, row


def test_no_sphinx_roles_left_in_docstrings():
    assert _script("convert_doc_roles").main(["--check"]) == 0


def test_mkdocs_hook_warns_on_a_sphinx_role(caplog):
    hook = _script("mkdocs_roles_hook")

    class Page:
        class file:
            src_path = "reference/api/core.md"

    with caplog.at_level(logging.WARNING, logger="mkdocs.hooks.roles"):
        hook.on_page_content("<p>see :class:<code>Runner</code></p>", Page, None, None)
        hook.on_page_content('<p>see <a href="#x"><code>Runner</code></a></p>', Page, None, None)
    warnings = [r for r in caplog.records if r.name == "mkdocs.hooks.roles"]
    assert len(warnings) == 1 and "reference/api/core.md" in warnings[0].getMessage()


def test_every_module_is_in_the_api_reference():
    """Each module of fd_trt (the command line aside, which has its own page) has a ``:::`` entry."""
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "reference" / "api").glob("*.md"))
    documented = set(re.findall(r"^::: (fd_trt[\w.]*)$", pages, flags=re.M))
    modules = set()
    for path in (ROOT / "fd_trt").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if "cli" in parts or parts[-1] in ("__init__", "__main__") or parts[-1] == "serve_ray":
            continue
        modules.add(".".join(parts))
    missing = sorted(modules - documented)
    assert not missing, f"modules with no page in docs/reference/api/: {missing}"
