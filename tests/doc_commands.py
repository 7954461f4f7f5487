"""The shell commands of the Markdown docs: fenced blocks, command lines, placeholders, and usage lines checked
against an argparse parser."""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")
PROGRAMS = ("nni-pipebd", "python", "python3", "torchrun", "nnictl", "pip", "pytest")
"""First words of a command line: an unlabelled block holding such a line must be labelled ``bash`` or ``console``."""

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.[a-z]+)?$|[\[\]|]|^\.\.\.$")


@dataclass(frozen=True)
class Command:
    """One command of a doc: where it stands, its text (continuations joined, comment cut) and its words."""

    where: str  # "docs/quickstart.md:23"
    text: str
    words: tuple

    @property
    def placeholders(self) -> List[str]:
        """Words that stand for a value (``CONFIG``, ``DIR``, ``W``, ``PLAN.json``) or mark a synopsis (``[``, ``|``,
        ``...``): a command holding any is a usage line."""
        return [w for w in self.words if _PLACEHOLDER.search(w)]


@dataclass(frozen=True)
class Block:
    """A fenced block: its file and first line, its language and its text."""

    path: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{_shown(self.path)}:{self.line}"


def blocks(paths: Iterable[Path] = DOCS) -> List[Block]:
    """Every fenced block of ``paths``."""
    found = []
    for path in paths:
        text = path.read_text()
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2  # the block's first line, after the fence
            found.append(Block(path, line, match.group(1).lower(), match.group(2)))
    return found


def commands(block: Block) -> List[Command]:
    """The commands of a shell block, as the shell reads them.

    ``bash``/``sh``: every line; a trailing ``\\`` joins the next line; ``#`` starts a comment; ``&&`` and ``;`` separate
    commands. ``console``: only lines after a ``$ `` prompt are commands (the others are their output).

    Raises
    ------
    ValueError
        A line the shell cannot split (an open quote), or a block that ends inside a continuation.
    """
    lines = block.text.splitlines()
    if block.lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    found, pending, start = [], "", 0
    for number, line in enumerate(lines):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical, pending = pending + line, ""
        try:
            lexer = shlex.shlex(logical, posix=True, punctuation_chars=";&")
            lexer.whitespace_split, lexer.commenters = True, "#"
            words = list(lexer)
        except ValueError as err:
            raise ValueError(f"{block.where}+{start}: {logical!r}: {err}") from None
        current: List[str] = []
        for word in words + [";"]:
            if word in (";", "&&", "||"):
                if current:
                    where = f"{_shown(block.path)}:{block.line + start}"
                    found.append(Command(where, " ".join(current), tuple(current)))
                current = []
            else:
                current.append(word)
    if pending:
        raise ValueError(f"{block.where}: the block ends inside a continued line: {pending!r}")
    return found


def usage_problems(words: Sequence[str], parser: argparse.ArgumentParser,
                   value_checks: Optional[Dict[str, Callable[[str], bool]]] = None) -> List[str]:
    """What is wrong with a synopsis of a command line against its ``parser`` (empty: nothing).

    ``words`` are the words after the program name, as a synopsis writes them: ``[--flag VALUE]`` optional,
    ``a|b|c`` alternatives, upper-case placeholders. Checked: the subcommand exists; every flag exists in it (or in
    the main parser, before the subcommand); alternatives of a flag with ``choices`` are among them (or pass
    ``value_checks[flag]``); a flag that takes no value is not given one; the positionals are as many as the parser's;
    the required options are shown.
    """
    words = [w.strip("[]") for w in words if w.strip("[]") and w != "..."]
    problems: List[str] = []
    current = parser
    positionals: List[str] = []
    shown = set()
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word.startswith("-") and len(word) > 1:
            flag, _, inline = word.partition("=")
            action = current._option_string_actions.get(flag)
            if action is None and current is not parser:
                action = parser._option_string_actions.get(flag)  # a main option written after the subcommand
            if action is None:
                problems.append(f"{flag} is not an option of {current.prog!r}")
                if not inline and index < len(words) and not words[index].startswith("-"):
                    index += 1  # its value, most likely (a synopsis shows a flag's value after it)
                continue
            shown.add(action.dest)
            if action.nargs == 0:
                if inline:
                    problems.append(f"{flag} takes no value, got {inline!r}")
                continue
            value = inline or (words[index] if index < len(words) else "")
            if not inline:
                index += 1
            if not value:
                problems.append(f"{flag} needs a value")
                continue
            check = (value_checks or {}).get(flag)
            for alternative in value.split("|"):
                if _PLACEHOLDER.search(alternative):
                    continue
                if action.choices is not None and alternative not in action.choices:
                    problems.append(f"{flag} {alternative!r} is not one of {list(action.choices)}")
                elif check is not None and not check(alternative):
                    problems.append(f"{flag} {alternative!r} is not valid")
                elif action.type is not None and action.choices is None:
                    try:
                        action.type(alternative)
                    except (TypeError, ValueError):
                        problems.append(f"{flag} {alternative!r} is not a valid {action.type.__name__}")
            continue
        subparsers = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if subparsers and not positionals and current is parser:
            if word not in subparsers[0].choices:
                problems.append(f"{word!r} is not a command of {parser.prog!r}; commands: "
                                f"{sorted(subparsers[0].choices)}")
                return problems
            current = subparsers[0].choices[word]
            continue
        positionals.append(word)
    expected = [a for a in current._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    if len(positionals) != len(expected):
        problems.append(f"{len(positionals)} positional arguments {positionals} for {current.prog!r}, which takes "
                        f"{len(expected)}: {[a.dest for a in expected]}")
    for action in current._actions:
        if action.required and action.option_strings and action.dest not in shown:
            problems.append(f"{current.prog!r} requires {action.option_strings[0]}, not shown")
    return problems


def help_flags(text: str) -> set:
    """The ``--long`` and ``-s`` options a ``--help`` text lists."""
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))


def unknown_flags(words: Sequence[str], text: str) -> List[str]:
    """The flags among ``words`` that a ``--help`` ``text`` does not list, as argparse reads them: a long flag may be
    a unique prefix of one (NNI's docs write ``nnictl algo register --meta`` for ``--meta_path``)."""
    listed = help_flags(text)
    unknown = []
    for word in words:
        flag = word.split("=")[0]
        if not flag.startswith("-") or flag in listed:
            continue
        if not (flag.startswith("--") and len([f for f in listed if f.startswith(flag)]) == 1):
            unknown.append(flag)
    return unknown


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)
