"""The command lines the documentation shows still parse: every `customcrafter ...` line of README.md and docs/*.md
(fenced shell blocks and inline code spans) against the current typer/click command tree, and the
`python benchmarks/*.py ...` lines of benchmarks/RESULTS.md's "Re-running" block against each script's argparse options.

Nothing is executed: click's parser of each (sub)command reads the arguments (no callbacks, no command bodies), and
the benchmark scripts are read with `ast`, not imported (they import torch). A failure names the file, the line and
what no longer exists or no longer fits (a subcommand, an option, an option's value).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main

from customcrafter.cli import _load_stages, app

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
RESULTS = REPO_ROOT / "benchmarks" / "RESULTS.md"
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "zsh"}  # ```python, ```yaml, ```json blocks are not read
SEPARATORS = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class DocCommand:
    """One command line of a document: ``program`` (``customcrafter`` or ``benchmarks/NAME.py``) and its arguments."""

    path: Path
    line: int
    program: str
    args: tuple[str, ...]
    inline: bool  # an inline code span of prose: maybe a fragment, so required options are not asked for
    comment: str = ""  # a shell line's trailing comment: the options it names must be the command's too

    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where()}: {shlex.join([self.program, *self.args])}"


# ---------------------------------------------------------------------------------------------------------------
# extraction


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) of the fenced shell blocks of a markdown text: backslash continuations joined,
    a leading ``$ `` prompt stripped. The line number is the logical line's first."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    pending: tuple[int, str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence, pending = (stripped[3:].strip().lower() if fence is None else None), None
            continue
        if fence not in SHELL_FENCES:  # outside any block (None), or a block of another language
            continue
        line = stripped.removeprefix("$ ")
        start = number
        if pending is not None:
            start, line = pending[0], f"{pending[1]} {line}"
        if line.endswith("\\"):
            pending = (start, line[:-1].rstrip())
            continue
        pending = None
        lines.append((start, line))
    return lines


def inline_spans(text: str) -> list[tuple[int, str]]:
    """(line number, content) of the prose's inline code spans (outside fenced blocks); a span may wrap lines."""
    prose = []
    in_fence = False
    for raw in text.splitlines():  # blank fenced lines out, keeping the line numbers
        if raw.strip().startswith("```"):
            in_fence = not in_fence
            prose.append("")
        else:
            prose.append("" if in_fence else raw)
    joined = "\n".join(prose)
    return [(joined.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", joined)]


def _program(tokens: list[str]) -> tuple[str, list[str]] | None:
    """The program a shell command runs, and its arguments, for those this test knows: ``customcrafter`` (also as
    ``python -m customcrafter``, ``accelerate launch ... -m customcrafter``) and ``python benchmarks/NAME.py``."""
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "customcrafter":
        return "customcrafter", tokens[1:]
    if tokens[0] in ("python", "python3", "accelerate", "torchrun"):
        for i, token in enumerate(tokens[:-1]):
            if token == "-m" and tokens[i + 1] == "customcrafter":
                return "customcrafter", tokens[i + 2:]
        if tokens[0].startswith("python") and len(tokens) > 1 and re.fullmatch(r"benchmarks/\w+\.py", tokens[1]):
            return tokens[1], tokens[2:]
    return None


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its trailing ``# comment`` (a ``#`` outside quotes that starts a word)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:]
    return line, ""


def commands_in(line: str, *, strict: bool) -> list[tuple[str, list[str]]]:
    """The known commands of a shell line (several when joined by ``&&``, ``;``, ``|``); comments after ``#``
    dropped. A line that is not valid shell raises ValueError if ``strict``, else gives nothing."""
    try:
        tokens = shlex.split(split_comment(line)[0])
    except ValueError:
        if strict:
            raise
        return []
    found = []
    for is_separator, group in itertools.groupby(tokens, lambda t: t in SEPARATORS):
        if not is_separator and (command := _program(list(group))):
            program, args = command
            found.append((program, _unbracket(args)))
    return found


def _unbracket(args: list[str]) -> list[str]:
    """``[--flag]``, ``[--option VALUE]`` mark optional arguments: they are checked as written, without brackets."""
    out, inside = [], False
    for arg in args:
        if arg.startswith("[-"):
            arg, inside = arg[1:], True
        if inside and arg.endswith("]"):
            arg, inside = arg[:-1], False
        out.append(arg)
    return out


def _expand_alternatives(args: list[str]) -> list[list[str]]:
    """Prose writes several subcommands as one: ``data add/list/validate`` is ``data add``, ``data list``, ...; a
    trailing ``...`` (``customcrafter ...``: any subcommand) is dropped."""
    while args and args[-1] == "...":
        args = args[:-1]
    words = list(itertools.takewhile(lambda a: not a.startswith("-"), args))
    choices = [w.split("/") if re.fullmatch(r"[a-z-]+(/[a-z-]+)+", w) else [w] for w in words]
    return [[*combo, *args[len(words):]] for combo in itertools.product(*choices)]


def doc_commands(path: Path) -> list[DocCommand]:
    text = path.read_text(encoding="utf-8")
    found = []
    for number, line in shell_lines(text):
        for program, args in commands_in(line, strict=line.startswith(("customcrafter ", "python benchmarks/"))):
            found.append(DocCommand(path, number, program, tuple(args), inline=False, comment=split_comment(line)[1]))
    for number, span in inline_spans(text):
        for program, args in commands_in(span, strict=False):
            for expanded in _expand_alternatives(args):
                found.append(DocCommand(path, number, program, tuple(expanded), inline=True))
    return found


# ---------------------------------------------------------------------------------------------------------------
# the customcrafter command tree


def cli_root():
    _load_stages()
    return typer.main.get_command(app)


def _message(exc: Exception) -> str:
    return exc.format_message() if hasattr(exc, "format_message") else str(exc)


def _name(param) -> str:
    return (param.opts or [param.name])[0]


def _coerce(param, ctx, value):
    """The parsed ``value`` converted as the command would (an int option's ``fifty`` fails), without the param's
    callback: typer >= 0.20's own coercion, else click's ``type_cast_value``."""
    if hasattr(param, "get_runtime_param"):
        if getattr(param, "is_flag", False):
            return value
        return param.get_runtime_param().coerce(value, param=param, ctx=ctx)
    return param.type_cast_value(ctx, value)


def cli_problem(root, args: list[str], *, complete: bool, mentioned: list[str] = ()) -> str | None:
    """Why ``customcrafter ARGS`` does not parse (None when it does): an unknown subcommand or option, an option
    without its value or a flag given one (extra arguments), a value of the wrong type, a single-valued option given
    twice (not repeatable: the last would win), and, if ``complete``, a missing required option or argument, or a
    group without its subcommand; ``mentioned``: more option names (a comment's) the command must have. Only click's
    parser runs: no callback, no command."""
    command, names, args = root, ["customcrafter"], list(args)
    while True:
        # not resilient_parsing: it makes the parser swallow its UsageErrors; the parser alone runs no callback
        ctx = command.context_class(command, info_name=names[-1])
        try:
            opts, rest, order = command.make_parser(ctx).parse_args(args=args)
        except Exception as exc:  # noqa: BLE001 - click's UsageErrors: NoSuchOption, BadOptionUsage, ...
            return f"`{' '.join(names)}`: {_message(exc)}"
        if "help" in opts:
            return None
        params = [p for p in command.get_params(ctx) if p.expose_value]
        for param in params:
            if order.count(param) > 1 and param.param_type_name == "option" and not param.multiple \
                    and not getattr(param, "count", False):
                return f"`{' '.join(names)}`: {param.opts[0]} given {order.count(param)} times; it is not repeatable"
        for param in params:
            if param.name in opts:
                try:
                    _coerce(param, ctx, opts[param.name])
                except Exception as exc:  # noqa: BLE001 - click's BadParameter
                    return f"`{' '.join(names)}`: {_name(param)} {opts[param.name]!r}: {_message(exc)}"
            elif complete and param.required:
                return f"`{' '.join(names)}`: missing {param.param_type_name} {_name(param)}"
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            if rest and not ctx.allow_extra_args:
                return f"`{' '.join(names)}`: unexpected extra argument(s) {' '.join(rest)!r}"
            known = {o for p in params for o in p.opts + p.secondary_opts}
            unknown = [o for o in mentioned if o not in known]
            return f"`{' '.join(names)}`: its comment names {', '.join(unknown)}: no such option" if unknown else None
        if not rest:
            return f"`{' '.join(names)}`: which subcommand? ({', '.join(sorted(subcommands))})" if complete else None
        name, args = rest[0], rest[1:]
        if name not in subcommands:
            return f"`{' '.join(names)}`: no such command {name!r} (has: {', '.join(sorted(subcommands))})"
        command = subcommands[name]
        names.append(name)


# ---------------------------------------------------------------------------------------------------------------
# the benchmark scripts' argparse options, read with ast


def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def script_parser(script: Path) -> argparse.ArgumentParser:
    """An argparse parser with the script's options: every ``*.add_argument(...)`` call of the file, with its
    literal ``nargs``, ``action``, ``choices`` and ``required`` (``type``, ``default`` and non-literal choices are
    not read). Errors raise instead of exiting."""

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ValueError(message)

    parser = Parser(prog=script.name, add_help=True)
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            flags = [_literal(a) for a in node.args]
            kwargs = {k.arg: _literal(k.value) for k in node.keywords if k.arg in ("nargs", "action", "choices",
                                                                                  "required")}
            parser.add_argument(*flags, **{k: v for k, v in kwargs.items() if v is not None})
    return parser


def benchmark_problem(script: str, args: list[str]) -> str | None:
    path = REPO_ROOT / script
    if not path.is_file():
        return f"{script}: no such script"
    try:
        script_parser(path).parse_args(args)
    except ValueError as exc:
        return f"{script}: {exc}"
    return None


def rerunning_block(text: str) -> str:
    """RESULTS.md's "## Re-running" section (up to the next ``## `` heading)."""
    match = re.search(r"^## Re-running\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, "benchmarks/RESULTS.md has no '## Re-running' section"
    return match.group(1)


def results_commands() -> list[DocCommand]:
    text = RESULTS.read_text(encoding="utf-8")
    offset = text[:text.index("## Re-running")].count("\n") + 1  # the heading's line number
    return [DocCommand(RESULTS, offset + number, program, tuple(args), inline=False)
            for number, line in shell_lines(rerunning_block(text))
            for program, args in commands_in(line, strict=line.startswith("python benchmarks/"))]


def problem(root, command: DocCommand) -> str | None:
    if command.program == "customcrafter":
        mentioned = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command.comment)
        return cli_problem(root, list(command.args), complete=not command.inline, mentioned=mentioned)
    return benchmark_problem(command.program, list(command.args))


# ---------------------------------------------------------------------------------------------------------------
# the checks


@pytest.fixture(scope="module")
def root():
    return cli_root()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_documented_commands_parse(doc, root):
    problems = [f"{c.where()}: {p}\n    {c}" for c in doc_commands(doc) if (p := problem(root, c))]
    assert not problems, "documented commands that the current CLI rejects:\n" + "\n".join(problems)


def test_results_rerunning_commands_parse(root):
    commands = results_commands()
    assert len(commands) >= 10, commands  # the block is found and read
    problems = [f"{c.where()}: {p}\n    {c}" for c in commands if (p := problem(root, c))]
    assert not problems, "benchmark commands the scripts reject:\n" + "\n".join(problems)


def test_the_docs_show_every_subcommand(root):
    """The extraction finds the docs' commands: each leaf command of the CLI is shown at least once (a doc set
    that lost one, or an extractor that finds nothing, fails here)."""
    leaves = set()

    def walk(command, names):
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*names, name)) if hasattr(sub, "commands") else leaves.add((*names, name))

    walk(root, ())
    shown = {c.args[:len(leaf)] for doc in DOCS for c in doc_commands(doc) if c.program == "customcrafter"
             for leaf in leaves}
    assert leaves - shown == set()


def cli_options(root) -> set[str]:
    options = set(root.get_help_option_names(root.context_class(root)))

    def walk(command):
        for param in command.params:
            options.update(param.opts + param.secondary_opts)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(root)
    return options


# options of other tools that the prose names on their own (`--index-url`, not `pip install --index-url ...`)
OTHER_TOOLS_OPTIONS = {"--index-url": "pip", "--cpu": "accelerate launch", "--allowed-hosts": "mlflow server"}


def test_options_named_in_prose_exist(root):
    """An inline code span that is an option alone (`--prompt-limit N`, `--dtype`) names an option of some
    customcrafter command: the prose does not say which command, so only its existence is checked."""
    options = cli_options(root) | set(OTHER_TOOLS_OPTIONS)
    problems = [f"{doc.relative_to(REPO_ROOT)}:{number}: `{span}`: no customcrafter command has {option}"
                for doc in DOCS for number, span in inline_spans(doc.read_text(encoding="utf-8"))
                if span.startswith("--") and (option := re.split(r"[\s=:\[]", span)[0]) not in options]
    assert not problems, "options the prose names that the CLI does not have:\n" + "\n".join(problems)


def test_the_checker_reports_what_no_longer_parses(root):
    """Self-test of the checker on made-up lines: each kind of drift is named."""
    sample = ["sample", "--prompt", "p", "--out", "a.mp4"]
    assert cli_problem(root, [*sample, "--steps", "8", "--set", "a=1", "--set", "b=2"], complete=True) is None
    assert "No such option: --no-such" in cli_problem(root, [*sample, "--no-such"], complete=True)
    assert "'samples'" in cli_problem(root, ["samples", "--prompt", "p"], complete=False)
    assert "'yes'" in cli_problem(root, ["train", "--subject", "dog", "--force", "yes"], complete=True)  # a flag
    assert "requires an argument" in cli_problem(root, ["sample", "--prompt"], complete=False)
    assert "--steps" in cli_problem(root, ["sample", "--steps", "fifty"], complete=False)
    assert "--seed given 2 times" in cli_problem(root, [*sample, "--seed", "0", "--seed", "1"], complete=True)
    assert "missing option --out" in cli_problem(root, ["sample", "--prompt", "p"], complete=True)
    assert cli_problem(root, ["sample", "--prompt", "p"], complete=False) is None  # prose: a fragment
    assert "which subcommand" in cli_problem(root, ["data"], complete=True)
    assert "--tokens" in cli_problem(root, ["data", "add", "d"], complete=False, mentioned=["--tokens"])
    assert "gpu.py" in benchmark_problem("benchmarks/gpu.py", ["--no-such"])
    assert benchmark_problem("benchmarks/profile_train.py", ["--frames", "4", "--compile", "full"]) is None
    assert "invalid choice" in benchmark_problem("benchmarks/profile_train.py", ["--compile", "max"])

    text = ("```bash\n$ customcrafter sample --prompt 'a # b' \\\n  --out x.gif   # --force: a comment\n```\n"
            "`customcrafter data add/list`\n```python\ncustomcrafter --no-such\n```\n")
    lines = shell_lines(text)
    assert lines == [(2, "customcrafter sample --prompt 'a # b' --out x.gif   # --force: a comment")]
    assert commands_in(lines[0][1], strict=True) == [("customcrafter", ["sample", "--prompt", "a # b", "--out",
                                                                        "x.gif"])]
    assert split_comment(lines[0][1])[1] == " --force: a comment"
    spans = inline_spans(text)
    assert [_expand_alternatives(args) for _, span in spans for _, args in commands_in(span, strict=False)] \
        == [[["data", "add"], ["data", "list"]]]
    assert commands_in("CUDA_VISIBLE_DEVICES=0 python -m customcrafter train --subject dog && ls", strict=True) \
        == [("customcrafter", ["train", "--subject", "dog"])]
    assert commands_in("python benchmarks/gpu.py [--weights W] [--cuda-graphs]", strict=True) \
        == [("benchmarks/gpu.py", ["--weights", "W", "--cuda-graphs"])]
