"""Help for config fields, read from the comments beside them, and the `--show_config` listing.

Every field of a config is set in one place with a comment after it, e.g. in configs/ablate.py

    ab.draws = 3                    # random draws per image; A_r = their mean

and, for the shared fields, in vitsparse_jax/runtime/config_defaults.py. `field_help(config_file)` reads
those comments (a comment may continue on the next lines, aligned under it) and maps them to dotted field
names ('ablation.draws', 'data.batch_size'), following which variable holds which section
(`ab = config.ablation = ConfigDict()`, `config.sparsity = sparsity_section()`). The first comment of a
field wins (config_defaults.py before the config file, top-level statements before presets), so an
override (`config.data.batch_size = 16  # ...`) does not replace the field's help.
"""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path
from typing import Any, Iterable, Mapping

from vitsparse_jax.runtime import config_defaults

ROOT_FUNCTIONS = ("get_config", "base_config")   # functions whose ConfigDict is the whole config


def split_config_arg(spec: str) -> tuple[str, str | None]:
    """'configs/ablate.py:paper' -> ('configs/ablate.py', 'paper'); no ':arg' -> (path, None)."""
    path, sep, arg = spec.rpartition(":")
    if sep and path.endswith(".py"):
        return path, arg or None
    return spec, None


def _comments(source: str) -> dict[int, tuple[int, str, bool]]:
    """line -> (column, text, alone on its line) of every comment."""
    out = {}
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip(), tok.start[0] not in code_lines)
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return out


def _comment_of(node: ast.stmt, comments: Mapping[int, tuple[int, str, bool]]) -> str | None:
    """The comment on the statement's lines, joined with the comment-only lines aligned under it."""
    for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
        if line in comments and not comments[line][2]:
            column, text, _ = comments[line]
            parts, nxt = [text], line + 1
            while nxt in comments and comments[nxt][2] and comments[nxt][0] == column:
                parts.append(comments[nxt][1])
                nxt += 1
            return " ".join(p for p in parts if p)
    return None


def _chain(node: ast.expr) -> tuple[str, ...] | None:
    """`a.b.c` -> ('a', 'b', 'c'); anything else -> None."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return (node.id, *reversed(names))
    return None


def _called(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        func = node.func
        return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return None


class _Collector:
    """Walks the functions of the config sources; section prefixes are resolved at the end."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, tuple[str, ...], str]] = []   # (function, dotted path, help)
        self.placements: dict[str, tuple[str, tuple[str, ...]]] = {}  # function -> (caller, path in caller)
        self.functions: set[str] = set()

    def add_source(self, source: str) -> None:
        tree, comments = ast.parse(source), _comments(source)
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        self.functions.update(f.name for f in functions)
        for func in functions:
            self._function(func, comments)

    def _function(self, func: ast.FunctionDef, comments: Mapping[int, tuple[int, str, bool]]) -> None:
        where: dict[str, tuple[str, ...]] = {}   # variable -> path inside this function's ConfigDict
        for node in ast.walk(func):
            if not isinstance(node, ast.Assign):
                continue
            called = _called(node.value)
            chains = [_chain(t) for t in node.targets]
            roots = [c for c in chains if c and len(c) == 1]
            attrs = [c for c in chains if c and len(c) > 1 and c[0] in where]
            if called in ("ConfigDict", *ROOT_FUNCTIONS) and not attrs:
                for (name,) in roots:          # `c = ConfigDict()`, `config = base_config(...)`
                    where[name] = ()
                continue
            paths = [where[c[0]] + c[1:] for c in attrs]
            for (name,) in roots:              # `ab = config.ablation = ConfigDict()`
                if paths:
                    where[name] = paths[0]
            if called and called not in ("ConfigDict",) and paths:
                self.placements.setdefault(called, (func.name, paths[0]))   # `config.data = data_config()`
            if called is None or called == "ConfigDict" or called not in self.functions:
                text = _comment_of(node, comments)
                if text:
                    for path in paths:
                        self.entries.append((func.name, path, text))

    def prefix(self, function: str, seen: tuple[str, ...] = ()) -> tuple[str, ...] | None:
        if function in ROOT_FUNCTIONS:
            return ()
        if function not in self.placements or function in seen:
            return None
        caller, path = self.placements[function]
        base = self.prefix(caller, seen + (function,))
        return None if base is None else base + path

    def help(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for function, path, text in self.entries:
            base = self.prefix(function)
            if base is not None:
                out.setdefault(".".join(base + path), text)
        return out


def field_help(config_file: str | Path | None = None, extra_sources: Iterable[str | Path] = ()) -> dict[str, str]:
    """Dotted field name -> one-line help, from the comments of config_defaults.py and `config_file`."""
    collector = _Collector()
    files = [Path(config_defaults.__file__), *map(Path, extra_sources)]
    if config_file:
        files.append(Path(split_config_arg(str(config_file))[0]))
    texts = [f.read_text() for f in files]
    for text in texts:                 # function names first: a call to one of them places its section
        collector.functions.update(n.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef))
    for text in texts:                 # the shared defaults' help first: a config file's comment on a shared
        collector.add_source(text)     # field (`config.data.num_images = 64  # ...`) says why, not what
    return collector.help()


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted name -> value of every leaf field, in the config's order."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items") and not isinstance(value, dict):   # a ConfigDict section
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _value_text(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_value_text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def describe_config(config: Any, config_file: str, overrides: Mapping[str, Any] | None = None) -> str:
    """Every field with its value and help (top-level fields first, then each section); the fields set on
    the command line are marked '*'."""
    helps = field_help(config_file)
    overrides = overrides or {}
    path, arg = split_config_arg(config_file)
    fields = flatten(config)
    order = sorted(fields, key=lambda name: ("." in name, name.rpartition(".")[0]))   # stable: keeps key order
    lines = [f"# {path}" + (f" (preset {arg!r})" if arg else "") + f", experiment {config.experiment!r}: every "
             "field, its value and what it does. Set any with --config.<name>=<value>; '*' = set on the command "
             "line. --dry_run says what the run would do.", ""]
    assignments = {name: f"{'*' if name in overrides else ' '}{name} = {_value_text(fields[name])}" for name in order}
    width = min(56, max(len(a) for a in assignments.values()))
    section = ""
    for name in order:
        head = name.rpartition(".")[0]
        if head != section:
            lines += ["", f"# {head}"]
            section = head
        help_text = helps.get(name, "(no help: add a comment after the field in the config file)")
        lines.append(f"{assignments[name]:<{width}}  # {help_text}")
    return "\n".join(lines) + "\n"


def missing_help(config: Any, config_file: str) -> list[str]:
    """Fields of `config` without a help comment (tests keep this empty for every config and preset)."""
    helps = field_help(config_file)
    return [name for name in flatten(config) if name not in helps]
