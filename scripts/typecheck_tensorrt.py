#!/usr/bin/env python
"""Type-checks the TensorRT backend with mypy against the ``tensorrt-stubs`` package (no GPU needed).

    python scripts/typecheck_tensorrt.py [--stubs DIR] [--no-install] [mypy args ...]

What it does, and why each step is there:

1. ``pip install --no-deps --target DIR tensorrt-stubs==STUBS_VERSION``. ``--no-deps``: the
   stubs require the ``tensorrt`` wheel, whose libraries only pypi.nvidia.com serves, so a
   plain install fails on a CPU machine that reaches PyPI only. ``--target``: a stub-only
   ``tensorrt`` folder in site-packages would import as an empty namespace package and make
   ``import tensorrt`` succeed where TensorRT is absent.
2. Repairs the few stub signatures that are not valid Python (pybind11-stubgen output: a
   parameter named ``in``, a parameter without a default after defaulted ones), which would
   stop mypy before it checks anything. Each broken ``def`` line becomes
   ``def name(*args: typing.Any, **kwargs: typing.Any) -> typing.Any`` and is reported; every
   other TensorRT name keeps its stubbed signature.
3. Runs ``mypy`` on ``fd_trt/backends/tensorrt.py`` (the runner) and ``tensorrt_build.py``
   (plan builds) with ``MYPYPATH=DIR`` and the ``[tool.mypy]``
   settings of pyproject.toml. A misspelled or removed TensorRT call
   (``builder.create_netwrok``, ``trt.BuilderFlag.FP61``) fails here.
4. Checks that the CPU stand-in the tests run instead of TensorRT (``tests/fake_tensorrt.py``)
   has TensorRT's names: each of its public classes, methods, properties and enum members
   exists in the stubs, and each method's parameter names (constructors' included, for the
   classes TensorRT lets users construct) are those of one of the stubbed overloads. A stand-in that drifted from TensorRT would let the CPU tests pass on calls that
   fail on a GPU.

Exits non-zero when mypy or the stand-in check fails.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: tensorrt-stubs release checked against (the newest on PyPI when this was written: TensorRT 10.13).
STUBS_VERSION = "10.13.0.35.1"
TARGETS = ["fd_trt/backends/tensorrt.py", "fd_trt/backends/tensorrt_build.py", "fd_trt/backends/tensorrt_dit.py"]
_DEF = re.compile(r"^(\s*)def\s+(\w+)\s*\(")


def install_stubs(target: Path) -> None:
    """Installs the stubs, without their dependencies, into ``target``.

    Args:
        target: the folder (replaced when it exists).
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--upgrade",
        "--target",
        str(target),
        f"tensorrt-stubs=={STUBS_VERSION}",
    ]
    subprocess.run(cmd, check=True)


def repair_stub(path: Path, max_fixes: int = 100) -> list[str]:
    """Degrades the ``def`` lines of a stub that Python cannot parse, until the file parses.

    Args:
        path: a ``.pyi`` file, rewritten in place when something is repaired.
        max_fixes: give up after this many repairs.

    Returns:
        One ``"line N: name"`` entry per repaired signature.

    Raises:
        SyntaxError: when an error is not on a one-line ``def`` (nothing safe to repair).
    """
    lines = path.read_text().splitlines(keepends=True)
    fixed: list[str] = []
    while True:
        try:
            ast.parse("".join(lines), filename=str(path))
            break
        except SyntaxError as exc:
            if exc.lineno is None or len(fixed) >= max_fixes:
                raise
            i = exc.lineno - 1
            m = _DEF.match(lines[i])
            if m is None or not lines[i].rstrip().endswith(":"):
                raise
            lines[i] = f"{m.group(1)}def {m.group(2)}(*args: typing.Any, **kwargs: typing.Any) -> typing.Any:\n"
            fixed.append(f"line {exc.lineno}: {m.group(2)}")
    if fixed:
        text = "".join(lines)
        if not re.search(r"^import typing\b", text, re.M):
            text = "import typing\n" + text
        path.write_text(text)
    return fixed


#: Classes of the stand-in that replace ``torch.cuda``, not TensorRT.
FAKE = ROOT / "tests" / "fake_tensorrt.py"
FAKE_TORCH_CLASSES = {"FakeStream", "FakeCUDAGraph"}


def _stub_classes(stub: Path) -> dict[str, ast.ClassDef]:
    tree = ast.parse(stub.read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _is_property(node: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list)


def _members(name: str, classes: dict[str, ast.ClassDef]) -> dict[str, list[list[str] | None]]:
    """A stub class's members, its bases' included: ``{name: [parameter names per overload]}``.

    Attributes and properties map to ``[None]``; a repaired ``(*args, **kwargs)`` signature to ``None``
    too (any parameters pass).
    """
    out: dict[str, list[list[str] | None]] = {}
    cls = classes.get(name)
    if cls is None:
        return out
    for base in cls.bases:
        if isinstance(base, ast.Name):
            out.update(_members(base.id, classes))
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            args = node.args
            params = None if _is_property(node) or args.vararg else [a.arg for a in args.posonlyargs + args.args][1:]
            out.setdefault(node.name, []).append(params)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.setdefault(node.target.id, []).append(None)
        elif isinstance(node, ast.ClassDef):
            out.setdefault(node.name, []).append(None)
    return out


def check_fake(stubs: Path, fake: Path = FAKE) -> list[str]:
    """Names of the stand-in that TensorRT (as stubbed) does not have.

    Args:
        stubs: where ``tensorrt-stubs`` is installed.
        fake: the stand-in module.

    Returns:
        One message per mismatch; empty when the stand-in matches.
    """
    classes = _stub_classes(stubs / "tensorrt_bindings" / "tensorrt.pyi")
    problems = []
    for node in ast.parse(fake.read_text()).body:
        if not isinstance(node, ast.ClassDef) or node.name.startswith("_") or node.name in FAKE_TORCH_CLASSES:
            continue
        if node.name not in classes:
            problems.append(f"{fake.name}: class {node.name} is not a TensorRT class")
            continue
        members = _members(node.name, classes)
        for item in node.body:
            # Constructors too, of the classes TensorRT lets users construct (Refitter(engine, logger),
            # OnnxParser(network, logger), ...); the I* classes come from factory methods, and the
            # stand-in's constructors of those are its own.
            public_init = isinstance(item, ast.FunctionDef) and item.name == "__init__" and "__init__" in members
            if isinstance(item, ast.FunctionDef) and (not item.name.startswith("_") or public_init):
                if item.name not in members:
                    problems.append(f"{fake.name}: {node.name}.{item.name} is not in TensorRT")
                    continue
                params = [a.arg for a in item.args.posonlyargs + item.args.args][1:]
                if not _is_property(item) and None not in members[item.name] and params not in members[item.name]:
                    problems.append(
                        f"{fake.name}: {node.name}.{item.name}({', '.join(params)}) differs from TensorRT's "
                        f"{' | '.join('(' + ', '.join(p or []) + ')' for p in members[item.name])}"
                    )
            elif isinstance(item, ast.Assign):
                names = [
                    t.id
                    for target in item.targets
                    for t in (target.elts if isinstance(target, ast.Tuple) else [target])
                    if isinstance(t, ast.Name)
                ]
                problems += [
                    f"{fake.name}: {node.name}.{n} is not in TensorRT"
                    for n in names
                    if n.isupper() and n not in members
                ]
    return problems


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns mypy's exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stubs", default=str(ROOT / ".venv" / "typing-stubs"), help="where the stubs are installed")
    p.add_argument("--no-install", action="store_true", help="use the stubs already in --stubs")
    args, mypy_args = p.parse_known_args(argv)
    stubs = Path(args.stubs)
    if not args.no_install:
        install_stubs(stubs)
    for pyi in sorted(stubs.glob("tensorrt*/**/*.pyi")):
        for entry in repair_stub(pyi):
            print(f"typecheck: repaired unparsable stub signature {pyi.relative_to(stubs)} {entry}")
    env = dict(os.environ, MYPYPATH=str(stubs))
    cmd = [sys.executable, "-m", "mypy", *mypy_args, *TARGETS]
    status = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    problems = check_fake(stubs)
    for problem in problems:
        print(f"typecheck: {problem}")
    print(
        f"typecheck: {FAKE.relative_to(ROOT)}: "
        + (
            f"{len(problems)} name(s) TensorRT does not have"
            if problems
            else "every class, method and enum member is TensorRT's"
        )
    )
    return status or int(bool(problems))


if __name__ == "__main__":
    sys.exit(main())
