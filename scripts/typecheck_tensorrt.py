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
3. Runs ``mypy fd_trt/backends/tensorrt.py`` with ``MYPYPATH=DIR`` and the ``[tool.mypy]``
   settings of pyproject.toml, and exits with mypy's status. A misspelled or removed TensorRT
   call (``builder.create_netwrok``, ``trt.BuilderFlag.FP61``) fails here.
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
TARGETS = ["fd_trt/backends/tensorrt.py"]
_DEF = re.compile(r"^(\s*)def\s+(\w+)\s*\(")


def install_stubs(target: Path) -> None:
    """Installs the stubs, without their dependencies, into ``target``.

    Args:
        target: the folder (replaced when it exists).
    """
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(target),
           f"tensorrt-stubs=={STUBS_VERSION}"]
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
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
