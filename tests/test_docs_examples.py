"""Every ```python example in README.md and docs/**/*.md runs.

Each fenced block runs on its own, in a fresh namespace (so it must import what it uses), with the
working directory and ``FD_TRT_CACHE`` in a temporary folder, on the embedded default model (what
the examples use to stay runnable offline). The code is compiled under the markdown file's name
with its own line numbers, so that a traceback points into the page. A block whose first line is
``# doc: skip`` (a reason may follow it), or that follows the line ``<!-- doc: skip -->`` (invisible on the rendered page),
is an example needing weights that are not here, a GPU, or a server: it is reported as skipped with
its file and line.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARK = "# doc: skip"
SKIP_COMMENT = "<!-- doc: skip -->"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)")


@dataclass(frozen=True)
class Example:
    """One fenced python block: the file, the line of its first code line (1-based), and its code."""

    path: Path
    line: int
    code: str
    skip: bool = False

    @property
    def where(self) -> str:
        try:
            name = self.path.relative_to(ROOT)
        except ValueError:
            name = self.path
        return f"{name}:{self.line}"


def find_examples(paths: list[Path]) -> list[Example]:
    """The ```python (or ```py) blocks of the markdown files, in order; indented fences are dedented."""
    found = []
    for path in paths:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = _FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
            close = re.compile(rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
            j = i + 1
            while j < len(lines) and not close.match(lines[j]):
                j += 1
            if lang in ("python", "py"):
                body = [ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]]
                before = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
                found.append(Example(path, i + 2, "\n".join(body) + "\n", skip=before == SKIP_COMMENT))
            i = j + 1
    return found


def doc_pages() -> list[Path]:
    """README.md and every markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def run_example(ex: Example) -> None:
    """Runs one example in a fresh namespace; fails naming ``file:line`` and the error, or skips a marked one."""
    first = ex.code.lstrip().splitlines()[0].strip() if ex.code.strip() else ""
    if first.startswith(SKIP_MARK) or ex.skip:
        pytest.skip(f"{ex.where}: {first if first.startswith(SKIP_MARK) else SKIP_COMMENT}")
    # Padded so that the compiled lines keep the markdown file's line numbers.
    source = "\n" * (ex.line - 1) + ex.code
    try:
        exec(compile(source, str(ex.path), "exec"), {"__name__": "__main__"})
    except SystemExit as e:
        if e.code not in (None, 0):
            pytest.fail(f"{ex.where}: the example exited with {e.code!r}", pytrace=False)
    except Exception as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(ex.path)]
        at = f" (line {frames[-1].lineno})" if frames else ""
        if isinstance(e, SyntaxError) and e.filename == str(ex.path):
            at = f" (line {e.lineno})"
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-12:])
        pytest.fail(f"{ex.where}: the example failed{at}: {type(e).__name__}: {e}\n{tb}", pytrace=False)


@pytest.fixture(scope="module")
def docs_cache(tmp_path_factory):
    """One temporary engine cache for the examples of a run: graphs and ``auto``'s decisions are made once."""
    return tmp_path_factory.mktemp("docs_fd_trt_cache")


@pytest.fixture
def sandbox(tmp_path, monkeypatch, docs_cache):
    """A temporary working directory, and the temporary engine cache, for one example."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FD_TRT_CACHE", str(docs_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


EXAMPLES = find_examples(doc_pages())


# slow: the examples run the default model at the pages' step counts (50), with backend="auto"
# tuning on its first call: README's two runnable examples took about 85 s of CPU time here.
@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=[ex.where for ex in EXAMPLES])
def test_doc_example_runs(example, sandbox):
    run_example(example)


# The harness itself, on two small pages of its own ------------------------------------------------

DATA = Path(__file__).parent / "data" / "docs_examples"


def test_the_harness_runs_a_passing_example_and_reports_a_skip_with_file_and_line(sandbox):
    examples = find_examples([DATA / "passing.md"])
    assert [ex.line for ex in examples] == [7, 15, 25, 30]  # the ```text block is not an example
    run_example(examples[0])
    assert (sandbox / "out.png").is_file()  # the example ran in the sandbox
    run_example(examples[2])  # an indented fence (an admonition's)
    with pytest.raises(pytest.skip.Exception, match=r"passing\.md:15: # doc: skip"):
        run_example(examples[1])
    with pytest.raises(pytest.skip.Exception, match=r"passing\.md:30: <!-- doc: skip -->"):
        run_example(examples[3])


def test_the_harness_reports_a_failing_example_with_file_and_line(sandbox):
    (ok, broken, syntax) = find_examples([DATA / "failing.md"])
    run_example(ok)  # a fresh namespace: nothing carries over from the block before
    with pytest.raises(pytest.fail.Exception) as info:
        run_example(broken)
    message = str(info.value)
    assert re.search(r"tests/data/docs_examples/failing\.md:10: the example failed \(line 11\)", message), message
    assert "NameError" in message and "'x'" in message
    with pytest.raises(pytest.fail.Exception, match=r"failing\.md:15: the example failed \(line 15\): SyntaxError"):
        run_example(syntax)
