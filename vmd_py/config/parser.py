"""vm.conf front end: files and includes, macros, statement splitting, lark, recovery.

Each top-level statement is parsed on its own with lark's LALR parser, so one bad statement
never hides the next. When a vm or switch block fails, each of its options is re-parsed
alone inside an otherwise empty copy of the block, so every bad option gets its own report.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedInput, UnexpectedToken
from lark.lexer import Lexer

from .build import Builder
from .errors import ConfigError, Diagnostic
from .lexer import ERROR, LBRACE, MACRO, RBRACE, SEP, Tok, tokenize
from .model import Config

MAX_INCLUDE_DEPTH = 16
MAX_FILE_SIZE = 4 * 1024 * 1024
# Keywords that only start top-level statements: seeing one at the start of a line inside
# a block means a '}' is missing, so the block is cut there.
_TOP_ONLY = frozenset({"VM", "INCLUDE", "SOCKET", "STAGGERED"})
_SYNTHETIC = ""  # value of tokens made up during recovery


class _TokenListLexer(Lexer):
    """Hands lark the tokens we already made; the 'text' given to parse() is a list."""

    def __init__(self, lexer_conf: Any) -> None:
        pass

    def lex(self, data: Any) -> Iterator[Token]:  # type: ignore[override]
        # lark hands a custom lexer the object given to parse() as is.
        return iter(data)


@cache
def _lark() -> Lark:
    grammar = files(__package__).joinpath("grammar.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer=_TokenListLexer, start="statement")


@dataclass
class _Statement:
    toks: list[Tok] = field(default_factory=list)
    poisoned: bool = False
    unclosed_line: int | None = None


def _describe(tok: Token) -> str:
    if tok.type == "$END" or tok.value == _SYNTHETIC:
        return "end of line"
    if tok.type == SEP:
        return "end of line" if tok.value == "\n" else "';'"
    if tok.type == "STRING":
        return f'"{tok.value}"'
    return f"'{tok.value}'"


def _to_lark(toks: list[Tok]) -> list[Token]:
    return [Token(t.type, t.value, start_pos=i, line=t.line) for i, t in enumerate(toks)]


class _Session:
    def __init__(self) -> None:
        self.diags: list[Diagnostic] = []
        self.builder = Builder(self.diags)
        self.stack: list[str] = []

    # -- files ----------------------------------------------------------------------

    def run_text(self, text: str, filename: str, base: Path | None) -> None:
        toks = tokenize(text, filename, self.diags)
        for stmt in self._statements(toks, filename):
            self._handle(stmt, filename, base)

    def run_file(self, path: Path, shown: str, at: tuple[str, int] | None) -> None:
        real = os.path.realpath(path)
        where_file, where_line = at if at is not None else (shown, 0)
        if real in self.stack:
            self.diags.append(Diagnostic(where_file, where_line, f"include loop: {shown}"))
            return
        if len(self.stack) >= MAX_INCLUDE_DEPTH:
            self.diags.append(Diagnostic(where_file, where_line, "includes nested too deeply"))
            return
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_FILE_SIZE + 1)
        except OSError as exc:
            verb = "failed to include file" if at is not None else "cannot open"
            self.diags.append(
                Diagnostic(where_file, where_line, f"{verb} {shown}: {exc.strerror or exc}")
            )
            return
        if len(data) > MAX_FILE_SIZE:
            self.diags.append(Diagnostic(shown, 0, "file too large"))
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            self.diags.append(Diagnostic(shown, line, "invalid UTF-8"))
            return
        self.stack.append(real)
        try:
            self.run_text(text, shown, path.parent)
        finally:
            self.stack.pop()

    # -- statements -----------------------------------------------------------------

    def _statements(self, toks: list[Tok], filename: str) -> Iterator[_Statement]:
        """Group tokens into top-level statements, expanding macros as they are reached."""
        stmt = _Statement()
        opened: list[int] = []
        at_line_start = True
        for tok in toks:
            if (
                opened
                and at_line_start
                and (tok.type in _TOP_ONLY or (tok.type == "SWITCH" and len(opened) == 1))
            ):
                stmt.unclosed_line = opened[-1]
                yield stmt
                stmt, opened = _Statement(), []
            at_line_start = tok.type == SEP and tok.value == "\n"
            if tok.type == SEP and not opened:
                if stmt.toks or stmt.poisoned:
                    yield stmt
                stmt = _Statement()
                continue
            if tok.type == ERROR:
                stmt.poisoned = True
                continue
            if tok.type == MACRO:
                value = self.builder.config.macros.get(tok.value)
                if value is None:
                    self.diags.append(
                        Diagnostic(filename, tok.line, f"macro '{tok.value}' not defined")
                    )
                    stmt.poisoned = True
                    continue
                kind = "NUMBER" if value.isascii() and value.lstrip("-").isdigit() else "STRING"
                tok = Tok(kind, value, tok.line)
            elif tok.type == LBRACE:
                opened.append(tok.line)
            elif tok.type == RBRACE and opened:
                opened.pop()
            stmt.toks.append(tok)
        if opened:
            stmt.unclosed_line = opened[-1]
        if stmt.toks or stmt.poisoned:
            yield stmt

    def _handle(self, stmt: _Statement, filename: str, base: Path | None) -> None:
        if stmt.unclosed_line is not None:
            self.diags.append(
                Diagnostic(filename, stmt.unclosed_line, "missing '}' to close this block")
            )
            return
        if stmt.poisoned:
            return
        first = len(self.diags)
        tree = self._parse(stmt.toks, filename)
        if tree is None:
            return
        b = self.builder
        if tree.data == "include":
            self._include(tree, filename, base)
            return
        if tree.data == "macro":
            b.macro(tree, filename)
        elif tree.data == "switch":
            b.switch(tree, filename, partial=len(self.diags) > first)
        elif tree.data == "vm":
            b.vm(tree, filename, base)
        else:
            b.global_opt(tree, filename)
        # Syntax and semantic reports of one statement, in line order.
        self.diags[first:] = sorted(self.diags[first:], key=lambda d: d.line)

    def _include(self, tree: Tree[Token], filename: str, base: Path | None) -> None:
        arg = tree.children[-1]
        assert isinstance(arg, Tree)
        tok = arg.children[0]
        assert isinstance(tok, Token)
        name, line = str(tok), int(tok.line or 0)
        if not name:
            self.diags.append(Diagnostic(filename, line, "include path must not be empty"))
            return
        path = Path(name)
        if not path.is_absolute() and base is not None:
            path = base / path
        self.run_file(path, os.path.normpath(path), (filename, line))

    # -- lark -----------------------------------------------------------------------

    def _parse(self, toks: list[Tok], filename: str) -> Tree[Token] | None:
        """The statement's tree; on syntax errors, report them and return the tree of
        the block's valid options (if any) so their semantics are checked too."""
        res = _try_parse(toks)
        if isinstance(res, Tree):
            return res
        errors, valid = _recover(toks)
        for line, reason in errors or [res]:
            self.diags.append(Diagnostic(filename, line, reason))
        if valid is None:
            return None
        partial = _try_parse(valid)
        return partial if isinstance(partial, Tree) else None


def _try_parse(toks: list[Tok]) -> Tree[Token] | tuple[int, str]:
    try:
        return _lark().parse(_to_lark(toks))
    except UnexpectedToken as exc:
        tok = exc.token
        line = int(tok.line) if isinstance(tok.line, int) else (toks[-1].line if toks else 0)
        if tok.type == "$END" and toks:
            line = toks[-1].line
        return line, f"syntax error: unexpected {_describe(tok)}"
    except (UnexpectedInput, LarkError):
        return (toks[-1].line if toks else 0), "syntax error"


def _recover(toks: list[Tok]) -> tuple[list[tuple[int, str]], list[Tok] | None]:
    """Per-option errors of a vm/switch block whose braces balance, and the block rebuilt
    from its valid options; ([], None) when the block cannot be taken apart."""
    if not toks or toks[0].type not in ("VM", "SWITCH") or toks[-1].type != RBRACE:
        return [], None
    lb = next((i for i, t in enumerate(toks) if t.type == LBRACE), None)
    if lb is None:
        return [], None
    head, body = toks[: lb + 1], toks[lb + 1 : -1]
    res = _try_parse([*head, Tok(RBRACE, _SYNTHETIC, toks[-1].line)])
    if not isinstance(res, Tree):
        return [res], None
    items: list[list[Tok]] = [[]]
    depth = 0
    for tok in body:
        if tok.type == SEP and depth == 0:
            items.append([])
            continue
        depth += {LBRACE: 1, RBRACE: -1}.get(tok.type, 0)
        if depth < 0:
            return [], None
        items[-1].append(tok)
    errors: list[tuple[int, str]] = []
    valid = list(head)
    for item in filter(None, items):
        res = _try_parse([*head, *item, Tok(RBRACE, _SYNTHETIC, item[-1].line)])
        if isinstance(res, Tree):
            valid.extend([*item, Tok(SEP, "\n", item[-1].line)])
        else:
            errors.append(res)
    valid.append(toks[-1])
    return errors, valid if errors else None


def _finish(session: _Session) -> Config:
    config = session.builder.finish()
    if session.diags:
        raise ConfigError(session.diags)
    return config


def parse_text(text: str, filename: str = "<string>") -> Config:
    """Parse vm.conf text; includes are relative to filename's directory (or the cwd)."""
    session = _Session()
    base = Path(filename).parent if not filename.startswith("<") else None
    try:
        session.run_text(text, filename, base)
    except RecursionError:
        session.diags.append(Diagnostic(filename, 0, "configuration nested too deeply"))
    return _finish(session)


def load(path: str | Path) -> Config:
    """Read and parse a vm.conf file (and everything it includes)."""
    session = _Session()
    session.run_file(Path(path), str(path), None)
    return _finish(session)
