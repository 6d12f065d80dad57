"""The command line: help for every command, usage errors, and how user errors are reported."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import atlas
import atlas.build
from atlas.cli import build_parser, main
from atlas.docs_cli import option_strings, subcommands
from atlas.errors import AtlasError

COMMANDS = tuple(subcommands(build_parser()))


def run_atlas(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """Run ``atlas ARGS`` in a fresh interpreter (``code`` runs first, e.g. to patch a command)."""
    prelude = code or ""
    script = f"{prelude}\nimport sys\nfrom atlas.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(autouse=True)
def _restore_sigterm():
    """main() installs a SIGTERM handler; put pytest's back after each test."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def test_parser_has_the_core_commands():
    assert {"build", "analyze", "render", "inspect", "serve"} <= set(COMMANDS)


def test_top_level_help_lists_every_command():
    res = run_atlas("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: atlas")
    for name in COMMANDS:
        assert name in res.stdout
    for opt in option_strings(build_parser()):
        assert opt in res.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help_mentions_every_option(command):
    res = run_atlas(command, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: atlas {command}")
    sub, _ = subcommands(build_parser())[command]
    names = option_strings(sub)
    assert names, f"atlas {command} has no options?"
    for name in names:
        assert name in res.stdout, f"`atlas {command} --help` does not mention {name}"
    assert res.stderr == ""


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "atlas"
    if not script.exists():  # an environment whose scripts live elsewhere
        pytest.skip(f"no console script beside {sys.executable}")
    res = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert res.stdout.strip() == f"atlas {atlas.__version__}"


def test_no_command_prints_usage_and_exits_2():
    res = run_atlas()
    assert res.returncode == 2
    assert "usage: atlas" in res.stdout + res.stderr
    for name in COMMANDS:
        assert name in res.stdout + res.stderr


def test_unknown_option_is_a_usage_error():
    res = run_atlas("render", "cache", "--no-such-option")
    assert res.returncode == 2
    assert "unrecognized arguments: --no-such-option" in res.stderr
    assert "Traceback" not in res.stderr


def test_invalid_choice_is_a_usage_error():
    res = run_atlas("build", "--dtype", "int8")
    assert res.returncode == 2
    assert "invalid choice: 'int8'" in res.stderr


def test_atlas_error_is_one_line_and_exit_2(monkeypatch, capsys):
    def fail(args):
        raise AtlasError("checkpoint foo.pt has no cfg; pass --hook-point")

    monkeypatch.setattr(atlas.build, "inspect_command", fail)
    assert main(["inspect", "foo.pt"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "atlas: error: checkpoint foo.pt has no cfg; pass --hook-point\n"


def test_atlas_error_in_a_real_process_has_no_traceback():
    patch = textwrap.dedent(
        """
        import atlas.build
        from atlas.errors import AtlasError
        def fail(args):
            raise AtlasError("the cache in x is unfinished; rerun atlas analyze")
        atlas.build.render_command = fail
        """
    )
    res = run_atlas("render", "x", code=patch)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.splitlines() == ["atlas: error: the cache in x is unfinished; rerun atlas analyze"]
    assert "Traceback" not in res.stderr


def test_each_command_reaches_its_function(monkeypatch):
    """Every command dispatches to the function that implements it, with its parsed options."""
    import types

    seen = {}

    def recorder(name):
        def f(args, *rest, **kw):
            seen[name] = args
        return f

    for name in ("build", "analyze_command", "render_command", "inspect_command"):
        monkeypatch.setattr(atlas.build, name, recorder(name))
    fake_serve = types.ModuleType("atlas.serve")
    fake_serve.serve = lambda site, host, port: seen.setdefault("serve", (site, host, port))
    monkeypatch.setitem(sys.modules, "atlas.serve", fake_serve)
    monkeypatch.setattr(atlas, "serve", fake_serve, raising=False)

    assert main(["build", "ck.pt", "--model", "a", "--model", "b", "-n", "0"]) == 0
    assert seen["build"].model == ["a", "b"] and seen["build"].n_features == 0
    assert main(["analyze", "-o", "data"]) == 0
    assert seen["analyze_command"].output == "data" and seen["analyze_command"].checkpoint is None
    assert main(["render", "data", "--title", "T"]) == 0
    assert seen["render_command"].cache == "data" and seen["render_command"].title == "T"
    assert main(["inspect", "ck.pt", "--scale", "2.5"]) == 0
    assert seen["inspect_command"].scale == [2.5]
    assert main(["serve", "out", "--port", "9001"]) == 0
    assert seen["serve"] == (Path("out"), "127.0.0.1", 9001)


def test_ctrl_c_exits_130_with_a_resume_hint(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(atlas.build, "analyze_command", interrupted)
    assert main(["analyze"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("atlas: interrupted")
    assert "resume" in err


def test_cli_and_docs_modules_do_not_import_torch():
    """`atlas --help`, `atlas render` and the docs build must work without loading torch."""
    code = (
        "import sys, atlas.cli, atlas.build, atlas.errors, atlas.docs_cli, atlas.mkdocs_plugin\n"
        "atlas.cli.build_parser().format_help()\n"
        "atlas.docs_cli.render_cli_reference()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nnsight', 'transformers'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
