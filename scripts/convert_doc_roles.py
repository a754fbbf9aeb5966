"""Rewrites Sphinx roles in fd_trt's docstrings as mkdocstrings cross-references.

``:class:`Runner``` becomes ``[`Runner`][fd_trt.core.runner.Runner]`` when the name resolves (with
griffe, in the scope of the object whose docstring holds it) to a public object that the API
reference renders, and plain backticks (```Runner```) otherwise. ``~`` keeps the last component as
the text, as in Sphinx. Only the role syntax changes.

Usage: ``python scripts/convert_doc_roles.py [--check] [FILES...]`` (default: every module the API
reference renders). ``--check`` changes nothing and exits 1 if a role is left.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parent.parent
ROLE = re.compile(r":(?:py:)?(class|func|mod|meth|attr|data|exc|obj|const):`([^`]+)`")
# The command-line modules are documented by the generated CLI reference, not the API reference.
SKIP = ("fd_trt/cli/",)


def files_to_convert() -> list[Path]:
    return sorted(
        p for p in (ROOT / "fd_trt").rglob("*.py") if not any(str(p.relative_to(ROOT)).startswith(s) for s in SKIP)
    )


def _objects(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def _scope_at(module: griffe.Module, line: int) -> griffe.Object:
    """The innermost object whose docstring (or body) holds the line."""
    best = module
    for obj in _objects(module):
        start, end = getattr(obj, "lineno", None), getattr(obj, "endlineno", None)
        if obj is module or start is None or end is None:
            continue
        if start <= line <= end and (best is module or (best.lineno or 0) <= start):
            best = obj
    return best


def _public(path: str) -> bool:
    return not any(part.startswith("_") and not part.startswith("__") for part in path.split("."))


def _rendered(package: griffe.Module, path: str) -> str | None:
    """The canonical path of the object at ``path`` if the API reference renders it (public, with a
    docstring or a module or class, outside the CLI package), else None."""
    if not path.startswith("fd_trt."):
        return None
    try:
        obj = package[path[len("fd_trt.") :]]
        if obj.is_alias:
            obj = obj.final_target
    except Exception:
        return None
    path = obj.path
    if not _public(path) or path.startswith("fd_trt.cli") or not path.startswith("fd_trt."):
        return None
    if obj.parent is not None and not obj.parent.is_module and not obj.parent.is_class:
        return None
    if obj.is_module or obj.is_class or obj.docstring:
        return path
    return None


def _resolve(scope: griffe.Object, name: str) -> str | None:
    head, _, rest = name.partition(".")
    candidates = []
    if name.startswith("fd_trt."):
        candidates.append(name)
    else:
        obj = scope
        while obj is not None:
            try:
                full = obj.resolve(head)
                candidates.append(full + ("." + rest if rest else ""))
                break
            except Exception:
                obj = obj.parent
    return candidates[0] if candidates else None


def convert(path: Path, package: griffe.Module) -> tuple[str, int, int]:
    text = path.read_text()
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    module = package if len(parts) == 1 else package[".".join(parts[1:])]
    refs = plain = 0

    def sub(m: re.Match) -> str:
        nonlocal refs, plain
        kind, target = m.group(1), m.group(2).strip()
        titled = re.fullmatch(r"(.*?)\s*<([^>]+)>", target, re.S)  # :meth:`Title <full.path>`
        title = " ".join(titled.group(1).split()) if titled else None
        target = titled.group(2) if titled else target
        short = target.startswith("~")
        target = target.lstrip("~").rstrip("()")
        label = title or (target.rsplit(".", 1)[-1] if short else target)
        if kind in ("func", "meth") and not label.endswith(")") and title is None:
            label += "()"
        line = text.count("\n", 0, m.start()) + 1
        scope = _scope_at(module, line)
        lookup = target.lstrip(".")
        full = _resolve(scope, lookup)
        # Methods and attributes named alone refer to the enclosing class.
        canonical = _rendered(package, full) if full else None
        if canonical is None:
            cls = (
                scope
                if scope.is_class
                else (scope.parent if scope.parent is not None and scope.parent.is_class else None)
            )
            if cls is not None and "." not in lookup and lookup in cls.members:
                canonical = _rendered(package, f"{cls.path}.{lookup}")
        if canonical is not None:
            refs += 1
            return f"[`{label}`][{canonical}]"
        plain += 1
        return f"`{label}`"

    new = ROLE.sub(sub, text)
    return new, refs, plain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a role is left")
    args = ap.parse_args(argv)
    files = [p.resolve() for p in args.files] or files_to_convert()
    if args.check:
        left = [
            f"{p.relative_to(ROOT)}:{p.read_text().count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for p in files
            for m in ROLE.finditer(p.read_text())
        ]
        print("\n".join(left) or "no Sphinx roles left")
        return 1 if left else 0
    package = griffe.load("fd_trt", search_paths=[str(ROOT)], resolve_aliases=True, resolve_external=False)
    total_refs = total_plain = 0
    for p in files:
        new, refs, plain = convert(p, package)
        if refs or plain:
            p.write_text(new)
            print(f"{p.relative_to(ROOT)}: {refs} cross-references, {plain} in backticks")
        total_refs += refs
        total_plain += plain
    print(f"total: {total_refs} cross-references, {total_plain} in backticks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
