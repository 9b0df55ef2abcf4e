"""A local endpoint's stable address: a TCP relay from a port that never changes to the live server.

A local update starts the new server on a new port beside the old one, then points this relay
at it (the `backend` file: "PORT PID"), so a URL a client saved keeps working. Each connection
reads the file when it opens; open connections stay with the server they reached. The relay
exits by itself once the server it points at is gone (a deleted endpoint, a killed test),
so it never outlives what it fronts.

    python -m cloudllm.local_front --backend-file F --port-file P [--port N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

CHUNK = 64 * 1024
WATCH_SECONDS = 1.0


def read_backend(path: Path) -> tuple[int, int] | None:
    """(port, pid) of the live server, None when the file is missing or damaged."""
    try:
        port, pid = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return None
    return port, pid


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""  # a zombie has none
    except OSError:
        return True


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # a half-close passes through: the other direction may still be answering
    except (ConnectionError, OSError):
        writer.close()


async def _relay(backend_file: Path, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
    backend = read_backend(backend_file)
    try:
        if backend is None:
            raise ConnectionError
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", backend[0])
    except (ConnectionError, OSError):
        client_writer.close()
        return
    try:
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))
    finally:
        server_writer.close()
        client_writer.close()


async def _serve(backend_file: Path, port: int, port_file: Path) -> None:
    server = await asyncio.start_server(lambda r, w: _relay(backend_file, r, w), "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    tmp = port_file.with_name(f".{port_file.name}.tmp")
    tmp.write_text(str(bound))
    os.replace(tmp, port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        while not stop.is_set():
            backend = read_backend(backend_file)
            if backend is None or not _running(backend[1]):
                return
            try:
                await asyncio.wait_for(stop.wait(), WATCH_SECONDS)
            except asyncio.TimeoutError:
                pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cloudllm.local_front", description=__doc__.splitlines()[0])
    parser.add_argument("--backend-file", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.backend_file, args.port, args.port_file))


if __name__ == "__main__":
    main()
