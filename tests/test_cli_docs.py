"""docs/reference/cli.md is what scripts/gen_cli_docs.py writes from the fd-trt parser."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_cli_reference_is_current():
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--check"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_cli_reference_names_every_command_and_flag(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_cli_docs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from fd_trt.cli import COMMANDS, build_parser

    text = gen_cli_docs.render()
    for name in COMMANDS:
        assert f"## `fd-trt {name}`" in text
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        section = text.split(f"## `fd-trt {name}`")[1].split("\n## ")[0]
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section, (name, flag)
    # --check refuses a stale page.
    stale = tmp_path / "cli.md"
    stale.write_text(text.replace("inference steps", "steps"))
    assert gen_cli_docs.main(["--check", "--out", str(stale)]) == 1
    assert gen_cli_docs.main(["--out", str(stale)]) == 0 and stale.read_text() == text
