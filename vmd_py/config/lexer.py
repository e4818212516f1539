"""Tokenizer for vm.conf, written by hand so that lines, continuations and macros are exact.

Lark only sees the resulting token stream (see grammar.lark); this module decides what a
word, a number, a quoted string and a separator are, the way vm.conf(5) describes them.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from .errors import Diagnostic

KEYWORDS = frozenset(
    {
        "allow", "boot", "cdrom", "cmdline", "delay", "device", "disable", "disk", "down",
        "enable", "format", "group", "include", "inet6", "initrd", "instance", "interface",
        "interfaces", "lladdr", "local", "locked", "memory", "net", "offload", "owner",
        "parallel", "poll", "prefix", "rdomain", "socket", "staggered", "start", "switch", "up",
        "vm",
    }
)  # fmt: skip

WORD_START = frozenset(string.ascii_letters + string.digits + "_:/.-+")
WORD_CHARS = frozenset(string.ascii_letters + string.digits + "_:/.-+@%~^*?[]|<>&")
MACRO_CHARS = frozenset(string.ascii_letters + string.digits + "_")

# Token types the parser never sees: ERROR poisons its statement, MACRO is expanded first.
ERROR = "ERROR"
MACRO = "MACRO"
SEP = "_SEP"
MAX_TOKEN = 4096  # like vmd's "string too long"; also keeps int() away from huge digit runs
LBRACE = "_LBRACE"
RBRACE = "_RBRACE"
PUNCT = {"{": LBRACE, "}": RBRACE, "=": "_EQUAL", ",": "_COMMA"}


@dataclass(frozen=True)
class Tok:
    """A token: type is a grammar terminal name (or ERROR/MACRO), line is 1-based."""

    type: str
    value: str
    line: int


def classify_word(word: str) -> str:
    """Terminal type for an unquoted word."""
    if word in KEYWORDS:
        return word.upper()
    body = word[1:] if word.startswith("-") else word
    if body.isascii() and body.isdigit():
        return "NUMBER"
    return "WORD"


def _describe_char(c: str) -> str:
    return repr(c)


def tokenize(text: str, filename: str, diags: list[Diagnostic]) -> list[Tok]:
    """Split text into tokens; lexical errors go to diags and leave an ERROR token."""
    lx = _Lexer(text, filename, diags)
    lx.run()
    return lx.toks


class _Lexer:
    def __init__(self, text: str, filename: str, diags: list[Diagnostic]) -> None:
        self.text, self.filename, self.diags = text, filename, diags
        self.toks: list[Tok] = []
        self.i = 0
        self.line = 1

    def error(self, line: int, reason: str) -> None:
        self.diags.append(Diagnostic(self.filename, line, reason))
        self.toks.append(Tok(ERROR, "", line))

    def emit(self, type_: str, value: str, line: int) -> None:
        if len(value) > MAX_TOKEN:
            self.error(line, "string too long")
        else:
            self.toks.append(Tok(type_, value, line))

    def run(self) -> None:
        text, n = self.text, len(self.text)
        while self.i < n:
            i, c = self.i, text[self.i]
            if c in " \t\r\f\v":
                self.i += 1
            elif c == "\\":
                self.backslash()
            elif c == "#":
                self.comment()
            elif c == "\n":
                self.emit(SEP, "\n", self.line)
                self.line += 1
                self.i += 1
            elif c == ";":
                self.emit(SEP, ";", self.line)
                self.i += 1
            elif c in PUNCT:
                self.emit(PUNCT[c], c, self.line)
                self.i += 1
            elif c in "\"'":
                self.quoted()
            elif c == "$":
                j = i + 1
                while j < n and text[j] in MACRO_CHARS:
                    j += 1
                if j == i + 1:
                    self.error(self.line, "invalid macro reference: '$' must be followed by a name")
                else:
                    self.emit(MACRO, text[i + 1 : j], self.line)
                self.i = j
            elif c in WORD_START:
                j = i + 1
                while j < n and text[j] in WORD_CHARS:
                    j += 1
                word = text[i:j]
                self.emit(classify_word(word), word, self.line)
                self.i = j
            else:
                self.error(self.line, f"invalid character {_describe_char(c)}")
                self.i += 1

    def backslash(self) -> None:
        for cont in ("\\\n", "\\\r\n"):
            if self.text.startswith(cont, self.i):
                self.line += 1
                self.i += len(cont)
                return
        self.error(self.line, "invalid character '\\' (not a line continuation)")
        self.i += 1

    def comment(self) -> None:
        # A continuation inside a comment continues the comment, as in vm.conf(5).
        text, n = self.text, len(self.text)
        while self.i < n and text[self.i] != "\n":
            if text.startswith("\\\n", self.i):
                self.line += 1
                self.i += 1
            self.i += 1

    def quoted(self) -> None:
        text, n = self.text, len(self.text)
        quote, start_line = text[self.i], self.line
        self.i += 1
        out: list[str] = []
        while True:
            if self.i >= n or text[self.i] == "\n":
                self.error(start_line, "unterminated quoted string")
                return
            c = text[self.i]
            if c == quote:
                self.emit("STRING", "".join(out), start_line)
                self.i += 1
                return
            if c == "\\" and self.i + 1 < n:
                nxt = text[self.i + 1]
                if nxt == "\n":
                    self.line += 1
                    self.i += 2
                    continue
                if nxt in (quote, "\\", " ", "\t"):
                    out.append(nxt)
                    self.i += 2
                    continue
            if c == "\0":
                self.error(self.line, "invalid character '\\x00' in quoted string")
            else:
                out.append(c)
            self.i += 1
