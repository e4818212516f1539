"""A guest's serial shell over a pty (vmd's console) or a unix socket (the QEMU reference)."""

from __future__ import annotations

import contextlib
import os
import re
import select
import time
import tty


class ConsoleError(RuntimeError):
    pass


class GuestConsole:
    """Types commands into the guest shell and collects what it prints."""

    def __init__(self, fd: int, *, raw: bool = False) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        if raw:
            tty.setraw(fd)
        self._seq = 0
        self.transcript = bytearray()

    @classmethod
    def open_pty(cls, path: str) -> GuestConsole:
        return cls(os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK), raw=True)

    def wait_for(self, pattern: bytes, timeout: float, start: int = 0) -> re.Match[bytes]:
        return self._read_until(re.compile(re.escape(pattern)), start, timeout)

    def _read_until(self, pattern: re.Pattern[bytes], start: int,
                    timeout: float) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.transcript, start)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                tail = self.transcript[-2000:].decode(errors="replace")
                raise ConsoleError(f"console: no {pattern.pattern!r} in time; tail:\n{tail}")
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready:
                with contextlib.suppress(BlockingIOError):
                    data = os.read(self.fd, 65536)
                    if not data:
                        raise ConsoleError("console closed")
                    self.transcript += data

    def run(self, command: str, timeout: float = 60.0, check: bool = True) -> str:
        """Run a shell command in the guest; its output (stdout and stderr)."""
        self._seq += 1
        marker = f"__vmdb{self._seq}__"
        start = len(self.transcript)
        os.write(self.fd, f"{command} 2>&1; echo {marker}=$?\n".encode())
        m = self._read_until(re.compile(rb"\n" + marker.encode() + rb"=(\d+)"), start, timeout)
        text = self.transcript[start : m.start()].decode(errors="replace").replace("\r", "")
        # The first line is the shell's echo of the command.
        out = "\n".join(line for line in text.split("\n")[1:] if marker not in line)
        if check and int(m.group(1)) != 0:
            raise ConsoleError(f"guest: {command!r} exited {m.group(1).decode()}:\n{out}")
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
