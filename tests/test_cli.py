"""The `nsa` command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nsa.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    return list(next(a for a in parser._actions if a.dest == "command").choices)


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "gpu", "flash attention implementations", "torch SDPA flash"):
        assert word in out


def test_module_runs_from_the_checkout_root():
    """`python -m nsa` and `torchrun -m nsa` in the checkout's root import its nsa/ folder before the installed
    package: the subpackages in the folders beside it must resolve from there."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "nsa", "tune", "--help"], capture_output=True, text=True, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert "--budget-s" in out.stdout


def test_info_json_from_the_installed_entry_point(tmp_path):
    # Run outside the checkout: the installed package.
    out = subprocess.run([sys.executable, "-m", "nsa", "info", "--json"], capture_output=True, text=True, check=True,
                         cwd=tmp_path)
    info = json.loads(out.stdout)
    assert info["torch"] and "flash_attention" in info and isinstance(info["gpus"], list)


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in _subcommands()], ids=" ".join)
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert "usage: nsa" in capsys.readouterr().out


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2
