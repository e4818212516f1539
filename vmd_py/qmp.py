"""Asynchronous QMP client (trio, unix socket)."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

JsonDict = dict[str, Any]
MAX_LINE = 1 << 20


class QmpError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


class QmpClosed(ConnectionError):
    """The QMP connection ended (QEMU exited or closed the socket)."""


class QmpClient:
    """One QMP session; create with qmp_connect()."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._send_lock = trio.Lock()
        self._next_id = 0
        self._pending: dict[str, tuple[trio.Event, list[JsonDict]]] = {}
        self._events_send, self.events = trio.open_memory_channel[JsonDict](math.inf)
        self._rbuf = bytearray()
        self.closed = False
        self.greeting: JsonDict = {}

    async def _read_message(self) -> JsonDict:
        while b"\n" not in self._rbuf:
            if len(self._rbuf) > MAX_LINE:
                raise QmpClosed("QMP message too long")
            data = await self._stream.receive_some(65536)
            if not data:
                raise QmpClosed("QMP connection closed")
            self._rbuf.extend(data)
        line, _, rest = bytes(self._rbuf).partition(b"\n")
        self._rbuf = bytearray(rest)
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QmpClosed(f"QMP sent a non-object: {line!r}")
        return msg

    async def _handshake(self) -> None:
        self.greeting = await self._read_message()
        if "QMP" not in self.greeting:
            raise QmpClosed(f"not a QMP greeting: {self.greeting!r}")
        await self._send({"execute": "qmp_capabilities", "id": "caps"})
        while True:
            msg = await self._read_message()
            if msg.get("id") == "caps":
                if "error" in msg:
                    raise QmpError(msg["error"].get("class", "?"), msg["error"].get("desc", ""))
                return
            if "event" in msg:
                self._events_send.send_nowait(msg)

    async def _reader(self) -> None:
        try:
            while True:
                msg = await self._read_message()
                if "event" in msg:
                    self._events_send.send_nowait(msg)
                    continue
                waiter = self._pending.pop(str(msg.get("id")), None)
                if waiter is not None:
                    waiter[1].append(msg)
                    waiter[0].set()
        except (QmpClosed, trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
            pass
        finally:
            self.closed = True
            self._events_send.close()
            for ev, _ in self._pending.values():
                ev.set()
            self._pending.clear()

    async def _send(self, msg: JsonDict) -> None:
        async with self._send_lock:
            try:
                await self._stream.send_all(json.dumps(msg).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise QmpClosed("QMP connection closed") from exc

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run command and return its "return" value; QmpError on an error reply."""
        if self.closed:
            raise QmpClosed("QMP connection closed")
        self._next_id += 1
        mid = f"c{self._next_id}"
        done = trio.Event()
        box: list[JsonDict] = []
        self._pending[mid] = (done, box)
        msg: JsonDict = {"execute": command, "id": mid}
        if arguments:
            msg["arguments"] = dict(arguments)
        try:
            await self._send(msg)
            await done.wait()
        finally:
            self._pending.pop(mid, None)
        if not box:
            raise QmpClosed(f"QMP connection closed during {command}")
        if "error" in box[0]:
            err = box[0]["error"]
            raise QmpError(str(err.get("class", "?")), str(err.get("desc", "")))
        return box[0].get("return")

    async def wait_event(self, name: str) -> JsonDict:
        """Next event called name (others are dropped); wrap in trio.fail_after."""
        async for ev in self.events:
            if ev.get("event") == name:
                return ev
        raise QmpClosed(f"QMP connection closed before event {name}")


@asynccontextmanager
async def qmp_connect(path: Path, timeout: float = 10.0) -> AsyncIterator[QmpClient]:
    """Connect (retrying until QEMU has created the socket), negotiate, yield a client."""
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_unix_socket(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                await trio.sleep(0.05)
        client = QmpClient(stream)
        try:
            await client._handshake()
        except BaseException:
            await stream.aclose()
            raise
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(client._reader)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
