"""The documentation: the generated CLI reference, commands quoted in the docs, the MkDocs build, and
the ``atlas`` MkDocs plugin."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import atlas.render
from atlas.cli import build_parser
from atlas.docs_cli import option_strings, render_cli_reference, subcommands

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]

mkdocs = pytest.importorskip("mkdocs")
from mkdocs.commands.build import build as mkdocs_build  # noqa: E402
from mkdocs.config import load_config  # noqa: E402
from mkdocs.exceptions import Abort, PluginError  # noqa: E402


# -- CLI reference -------------------------------------------------------------------------------


def test_cli_reference_documents_every_option_of_every_command():
    parser = build_parser()
    page = render_cli_reference(parser)
    for name, (sub, help_) in subcommands(parser).items():
        assert f"## atlas {name}\n" in page
        assert help_ and help_ in page
        section = page.split(f"## atlas {name}\n", 1)[1].split("\n## ", 1)[0]
        for opt in option_strings(sub):
            assert f"`{opt}" in section, f"the CLI reference lacks {opt} of atlas {name}"
        for action in sub._actions:
            if (action.help and action.option_strings and action.default not in (None, False)
                    and action.default != "==SUPPRESS=="):
                assert str(action.default) in section  # defaults are stated in the help text
    for opt in option_strings(parser):
        assert f"`{opt}" in page


def test_cli_reference_escapes_html_and_is_stable():
    page = render_cli_reference()
    assert "<output>" not in page and "&lt;output&gt;" in page
    assert page == render_cli_reference()  # no terminal-width or ordering dependence
    os.environ["COLUMNS"] = "40"
    try:
        assert page == render_cli_reference()
    finally:
        del os.environ["COLUMNS"]


def test_cli_reference_is_in_the_nav_and_not_hand_written():
    text = (REPO / "mkdocs.yml").read_text()
    assert "cli.md" in text and "atlas/docs_cli.py" in text
    assert not (REPO / "docs" / "cli.md").exists(), "docs/cli.md is generated at build time; remove the copy"


# -- commands quoted in the docs ------------------------------------------------------------------


def _shell_commands(md: str) -> list[tuple[str, bool]]:
    """Every `atlas ...` command in a Markdown text, with whether it is a whole command line (from a
    fenced shell block) or a mention in inline code (which may name just a command or an option)."""
    found: list[tuple[str, bool]] = []
    for block in re.findall(r"```(?:bash|sh|console|shell)\n(.*?)```", md, flags=re.S):
        block = re.sub(r"\\\n\s*", " ", block)  # line continuations
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in re.split(r"&&|\|\||;|\|", line):
                found.append((part.strip(), True))
    for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", md):
        found.append((span.strip(), False))
    return [(c, whole) for c, whole in found if c.startswith("atlas ") or c == "atlas"]


def _doc_commands():
    for path in DOC_FILES:
        for cmd, whole in _shell_commands(path.read_text("utf-8")):
            yield path.relative_to(REPO), cmd, whole


def test_the_docs_quote_commands():
    commands = list(_doc_commands())
    assert len(commands) > 20
    quoted = {cmd.split()[1] for _, cmd, _ in commands if len(cmd.split()) > 1}
    assert set(subcommands(build_parser())) <= quoted, "every command is shown in the docs"


def test_every_command_in_the_docs_parses(capsys):
    """Each `atlas ...` line in README.md and docs/ uses commands and options that exist."""
    parser = build_parser()
    subs = subcommands(parser)
    bad = []
    for path, cmd, whole in _doc_commands():
        argv = [a for a in shlex.split(cmd)[1:] if a not in ("...", "--help", "-h")]
        if not argv or argv[0] == "COMMAND":  # the generic `atlas COMMAND --help`
            continue
        if whole:
            try:
                parser.parse_args(argv)
            except SystemExit:
                bad.append(f"{path}: {cmd}")
        elif argv[0] not in subs:
            bad.append(f"{path}: {cmd} (no such command)")
        else:
            known = set(option_strings(subs[argv[0]][0]))
            bad += [f"{path}: {cmd} ({a}?)" for a in argv[1:] if a.startswith("-") and a.split("=")[0] not in known]
    capsys.readouterr()
    assert not bad, "commands in the docs that atlas rejects:\n" + "\n".join(bad)


# other tools whose command lines the docs quote, and their options mentioned on their own
OTHER_TOOLS = {"python", "pip", "mkdocs", "make", "git", "zip", "cd", "xdg-open", "apt-get", "sudo"}
OTHER_TOOLS_OPTIONS = {"--no-deps", "--strict"}


def test_every_option_mentioned_in_the_docs_exists():
    """An inline `--option` in README.md or docs/ is an option of some atlas command (catches renames)."""
    parser = build_parser()
    known = set(option_strings(parser)) | {"-h", "--help"}
    for sub, _ in subcommands(parser).values():
        known |= set(option_strings(sub))
    unknown = []
    for path in DOC_FILES:
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", path.read_text("utf-8")):
            if span.split()[0] in OTHER_TOOLS:
                continue
            for opt in re.findall(r"(?:^|\s)(--?[a-zA-Z][\w-]*)", span):
                if opt not in known and opt not in OTHER_TOOLS_OPTIONS:
                    unknown.append(f"{path.name}: {opt} in `{span}`")
    assert not unknown, unknown


def test_readme_lists_every_command():
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    for name in subcommands(build_parser()):
        assert f"| `atlas {name}" in table, f"the README's command table lacks atlas {name}"


def test_readme_quickstart_is_the_two_make_targets():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick, flags=re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("make test")


def test_docs_link_only_existing_pages():
    """Relative links to .md files resolve (mkdocs --strict checks the nav's pages; this is quicker)."""
    missing = []
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", path.read_text("utf-8")):
            if target.startswith("http"):
                continue
            if not (path.parent / target).exists() and target != "cli.md":
                missing.append(f"{path.name} -> {target}")
    assert not missing, missing


# -- the full docs build ---------------------------------------------------------------------------


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    out = tmp_path / "docs-site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    cli_page = (out / "cli" / "index.html").read_text("utf-8")
    parser = build_parser()
    for name, (sub, _) in subcommands(parser).items():
        assert f"atlas {name}" in cli_page
        for opt in option_strings(sub):
            assert opt in cli_page, f"{opt} of atlas {name} missing from the built CLI reference"
    for page in ("panels", "deploy", "offline", "large-runs", "troubleshooting", "formats", "demo"):
        assert (out / page / "index.html").is_file()


# -- the MkDocs plugin -----------------------------------------------------------------------------

FAKE_ATLAS = {
    "index.html": b"<!doctype html><title>atlas</title><a href=\"f/0/\">0</a>",
    "f/0/index.html": b"<!doctype html><title>feature 0</title>",
    "f/1/index.html": b"<!doctype html><title>feature 1</title>",
    "data/chunk-000.js": b"atlasChunk(0, 'AAEC');",
    "data/blob.bin": bytes(range(256)),
}


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _docs_project(tmp_path: Path, plugin_cfg: str, pages: dict[str, str] | None = None) -> Path:
    proj = tmp_path / "proj"
    pages = pages or {"index.md": "# Home\n\nThe atlas is [here](atlas/).\n"}
    _write_tree(proj / "docs", {k: v.encode() for k, v in pages.items()})
    (proj / "mkdocs.yml").write_text(
        "site_name: Plugin test\ntheme: mkdocs\nstrict: true\nplugins:\n  - atlas:\n" + plugin_cfg
    )
    return proj


def _build(proj: Path) -> Path:
    cfg = load_config(config_file=str(proj / "mkdocs.yml"))
    mkdocs_build(cfg)
    return Path(cfg.site_dir)


def _build_fails(proj: Path, caplog, match: str) -> None:
    """The build stops with an error whose logged message matches ``match`` (MkDocs logs a plugin's
    error and raises Abort)."""
    with caplog.at_level(logging.ERROR):
        with pytest.raises((PluginError, Abort)):
            _build(proj)
    messages = " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert re.search(match, messages), messages


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_plugin_copies_a_built_atlas_under_path(tmp_path):
    _write_tree(tmp_path / "fake-site", FAKE_ATLAS)
    proj = _docs_project(tmp_path, "      site: ../fake-site\n")
    out = _build(proj)
    assert _tree(out / "atlas") == FAKE_ATLAS
    assert (out / "index.html").is_file()  # the docs themselves are still there


def test_plugin_sub_path_and_rebuild_replaces_old_files(tmp_path):
    _write_tree(tmp_path / "fake-site", FAKE_ATLAS)
    proj = _docs_project(tmp_path, "      site: ../fake-site\n      path: papers/2026/atlas/\n")
    out = _build(proj)
    assert _tree(out / "papers" / "2026" / "atlas") == FAKE_ATLAS
    (tmp_path / "fake-site" / "f" / "1" / "index.html").unlink()
    cfg = load_config(config_file=str(proj / "mkdocs.yml"))
    cfg.strict = False  # MkDocs warns about every dirty build
    mkdocs_build(cfg, dirty=True)  # even when MkDocs does not clean the site folder, the atlas is replaced whole
    assert "f/1/index.html" not in _tree(out / "papers" / "2026" / "atlas")


def test_plugin_optional_missing_site_is_skipped_with_info(tmp_path, caplog):
    proj = _docs_project(tmp_path, "      site: ../no-such-site\n      optional: true\n")
    with caplog.at_level(logging.INFO, logger="mkdocs.plugins.atlas"):
        out = _build(proj)
    assert (out / "index.html").is_file() and not (out / "atlas").exists()
    assert any("not found" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_plugin_missing_site_fails_unless_optional(tmp_path, caplog):
    proj = _docs_project(tmp_path, "      site: ../no-such-site\n")
    _build_fails(proj, caplog, "not found")


def test_plugin_rejects_a_folder_that_is_not_an_atlas(tmp_path, caplog):
    _write_tree(tmp_path / "not-atlas", {"readme.txt": b"hello"})
    proj = _docs_project(tmp_path, "      site: ../not-atlas\n")
    _build_fails(proj, caplog, "index.html")


@pytest.mark.parametrize("path", ["../outside/", "/abs/", "./", ""])
def test_plugin_path_must_stay_inside_the_docs_site(tmp_path, path, caplog):
    _write_tree(tmp_path / "fake-site", FAKE_ATLAS)
    proj = _docs_project(tmp_path, f"      site: ../fake-site\n      path: '{path}'\n")
    _build_fails(proj, caplog, "path")


def test_plugin_refuses_to_hide_a_docs_page(tmp_path, caplog):
    _write_tree(tmp_path / "fake-site", FAKE_ATLAS)
    pages = {"index.md": "# Home\n", "demo.md": "# Demo\n"}  # demo.md is written to demo/index.html
    proj = _docs_project(tmp_path, "      site: ../fake-site\n      path: demo/\n", pages)
    _build_fails(proj, caplog, "demo/index.html")


def test_plugin_needs_site_or_cache(tmp_path, caplog):
    proj = _docs_project(tmp_path, "      path: atlas/\n")
    _build_fails(proj, caplog, "'site'.*'cache'")


def test_plugin_renders_a_cache_when_there_is_no_site(tmp_path, monkeypatch):
    """With ``cache:``, the plugin calls atlas.render.render_site(cache, out) and publishes what it wrote."""
    calls = []

    def fake_render(cache_dir, out, **kwargs):
        calls.append((Path(cache_dir), kwargs))
        _write_tree(Path(out), FAKE_ATLAS)

    monkeypatch.setattr(atlas.render, "render_site", fake_render, raising=False)
    (tmp_path / "atlas-data").mkdir()
    proj = _docs_project(tmp_path, "      site: ../no-site-yet\n      cache: ../atlas-data\n")
    out = _build(proj)
    assert calls == [((tmp_path / "atlas-data").resolve(), {})]
    assert _tree(out / "atlas") == FAKE_ATLAS

    # an existing site folder wins over the cache
    _write_tree(tmp_path / "no-site-yet", {"index.html": b"built"})
    out = _build(proj)
    assert len(calls) == 1 and _tree(out / "atlas") == {"index.html": b"built"}


def test_plugin_reports_an_unusable_cache(tmp_path, monkeypatch, caplog):
    from atlas.errors import AtlasError

    def failing_render(cache_dir, out, **kwargs):
        raise AtlasError(f"{cache_dir} holds an unfinished analysis")

    monkeypatch.setattr(atlas.render, "render_site", failing_render, raising=False)
    (tmp_path / "atlas-data").mkdir()
    proj = _docs_project(tmp_path, "      cache: ../atlas-data\n")
    _build_fails(proj, caplog, "unfinished analysis")


def test_plugin_is_registered_as_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="mkdocs.plugins")}
    assert eps.get("atlas") == "atlas.mkdocs_plugin:AtlasPlugin"


# -- the GitHub Pages workflow ---------------------------------------------------------------------

WORKFLOW = REPO / ".github" / "workflows" / "atlas-pages.yml"


def _workflow():
    import yaml

    return yaml.safe_load(WORKFLOW.read_text())


def test_pages_workflow_renders_and_deploys():
    wf = _workflow()
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as true
    assert "workflow_dispatch" in on
    assert wf["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    build = wf["jobs"]["build"]["steps"]
    runs = "\n".join(s.get("run", "") for s in build)
    uses = [s.get("uses", "") for s in build] + [s.get("uses", "") for s in wf["jobs"]["deploy"]["steps"]]
    assert 'atlas render "$ATLAS_CACHE" -o _site' in runs
    assert "--no-deps" in runs and "torch" not in runs
    assert any(u.startswith("actions/upload-pages-artifact@") for u in uses)
    assert any(u.startswith("actions/deploy-pages@") for u in uses)
    upload = next(s for s in build if s.get("uses", "").startswith("actions/upload-pages-artifact@"))
    assert upload["with"]["path"] == "_site"
    assert wf["jobs"]["deploy"]["needs"] == "build"
    assert wf["env"]["ATLAS_CACHE"] + "/**" in on["push"]["paths"]


def _workflow_requirements() -> set[str]:
    """Distribution names the workflow installs besides Crosscoder Atlas (from its `pip install` lines)."""
    runs = "\n".join(s.get("run", "") for s in _workflow()["jobs"]["build"]["steps"])
    names = set()
    for line in runs.splitlines():
        if "pip install" in line and "--no-deps" not in line:
            for req in re.findall(r'"([A-Za-z0-9_.-]+)[^"]*"', line):
                names.add(req.lower())
    return names


@pytest.mark.slow
def test_pages_workflow_installs_everything_render_imports(tmp_path):
    """Render a cache in a fresh interpreter; every third-party module it loads must come from the
    workflow's `pip install` list (or their requirements), and torch must not be loaded at all."""
    from importlib.metadata import packages_distributions, requires

    sys.path.insert(0, str(REPO / "tests"))
    from synthetic_cache import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "atlas-data", n_features=6, vocab_size=120, n_sequences=24, seq_len=40)
    code = (
        "import sys, json\n"
        "startup = set(sys.modules)\n"  # what site-packages' .pth files load, before atlas
        "from atlas.cli import main\n"
        f"rc = main(['render', {str(cache)!r}, '-o', {str(tmp_path / 'site')!r}])\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - startup})))\n"
        "sys.exit(rc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    loaded = set(json.loads(res.stdout.strip().splitlines()[-1]))
    assert (tmp_path / "site" / "index.html").is_file()
    assert "torch" not in loaded

    allowed = set(_workflow_requirements())
    todo = list(allowed)
    while todo:  # add the requirements of what the workflow installs
        try:
            reqs = requires(todo.pop()) or []
        except Exception:
            continue
        for r in reqs:
            if "extra ==" in r:
                continue
            name = re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower()
            if name not in allowed:
                allowed.add(name)
                todo.append(name)
    dists = packages_distributions()
    third_party = {m for m in loaded if m not in sys.stdlib_module_names and m in dists and m != "atlas"}
    missing = {m: dists[m] for m in third_party
               if not {d.lower().replace("_", "-") for d in dists[m]} & {a.replace("_", "-") for a in allowed}}
    assert not missing, f"atlas render imports {missing}, which atlas-pages.yml does not install"
