"""The CLI reference page, generated from the argparse parser so that it cannot drift from the code.

Used as an MkDocs hook (``hooks: [atlas/docs_cli.py]`` in ``mkdocs.yml``): :func:`on_files` adds a page
``cli.md`` rendered from :func:`atlas.cli.build_parser` to every docs build. ``python -m atlas.docs_cli``
prints the same Markdown.

This module must be importable both as ``atlas.docs_cli`` and as a standalone file (MkDocs loads hook
files by path), so it uses absolute imports only.
"""

from __future__ import annotations

import argparse
import html
import os

PAGE = "cli.md"
_WIDTH = 80  # fixed help width: the page must not depend on the terminal that built it


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """``{name: (subparser, one-line help)}`` in the order the parser defines them."""
    out: dict[str, tuple[argparse.ArgumentParser, str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                out[name] = (sub, helps.get(name, ""))
    return out


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string (``-o``, ``--output``, ...) and positional argument (as its help shows it:
    the metavar, else the name) of ``parser``, help excluded."""
    names: list[str] = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            names.extend(action.option_strings)
        else:
            names.append(action.metavar or action.dest)
    return names


def _cell(text: str) -> str:
    """Text made safe for a Markdown table cell (no HTML, no column breaks, `code` kept)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside backticks: escape HTML
        parts[i] = html.escape(parts[i], quote=False)
    return "`".join(parts).replace("|", "\\|").replace("\n", " ")


def _expand(action: argparse.Action, prog: str) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    params = dict(vars(action), prog=prog)
    params = {k: (v.__name__ if hasattr(v, "__name__") else v) for k, v in params.items()}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    try:
        return action.help % params
    except (KeyError, TypeError, ValueError):
        return action.help


def _signature(action: argparse.Action) -> str:
    if not action.option_strings:
        name = action.metavar or action.dest
        extra = {"?": " (optional)", "*": " (any number)", "+": " (one or more)"}.get(action.nargs, "")
        return f"`{name}`{extra}"
    takes_value = action.nargs != 0
    if takes_value:
        if action.choices is not None and action.metavar is None:
            value = "{" + ",".join(str(c) for c in action.choices) + "}"
        else:
            value = action.metavar or action.dest.upper()
        sig = ", ".join(f"`{o} {value}`" for o in action.option_strings)
    else:
        sig = ", ".join(f"`{o}`" for o in action.option_strings)
    if isinstance(action, argparse._AppendAction):
        sig += " (repeatable)"
    return sig


def _usage(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(_WIDTH)
    try:
        return parser.format_usage().strip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        rows.append(f"| {_signature(action)} | {_cell(_expand(action, parser.prog))} |")
    if not rows:
        return []
    return ["| argument | meaning |", "|---|---|", *rows, ""]


def render_cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown of the CLI reference page for ``parser`` (default: ``atlas.cli.build_parser()``)."""
    if parser is None:
        from atlas.cli import build_parser

        parser = build_parser()
    subs = subcommands(parser)
    lines = [
        "# CLI reference",
        "",
        "<!-- Generated at docs build time from atlas.cli.build_parser() by atlas/docs_cli.py. "
        "Do not edit: change the parser instead. -->",
        "",
        _cell(parser.description or ""),
        "",
        "```text",
        _usage(parser),
        "```",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for name, (_, help_) in subs.items():
        lines.append(f"| [`{parser.prog} {name}`](#{parser.prog}-{name}) | {_cell(help_)} |")
    lines.append("")
    lines += _arguments_table(parser)
    lines.append("Every command also takes `-h`, `--help`: print its help and exit.")
    lines.append("")
    for name, (sub, _) in subs.items():
        lines += [
            f"## {parser.prog} {name}",
            "",
            _cell(sub.description or ""),
            "",
            "```text",
            _usage(sub),
            "```",
            "",
            *_arguments_table(sub),
        ]
    return "\n".join(lines).rstrip() + "\n"


# -- MkDocs hook ---------------------------------------------------------------------------------


def on_files(files, config):
    """MkDocs hook: add the generated ``cli.md`` page (it is not a file in ``docs/``)."""
    from mkdocs.structure.files import File

    existing = files.get_file_from_path(PAGE)
    if existing is not None:
        files.remove(existing)
    files.append(File.generated(config, PAGE, content=render_cli_reference()))
    return files


if __name__ == "__main__":  # pragma: no cover
    print(render_cli_reference(), end="")
