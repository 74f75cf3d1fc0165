"""Socket details shared by the gateway and replica servers."""

from __future__ import annotations

import asyncio
import os
import socket

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port that other processes of this user can bind too
    (SO_REUSEPORT: the kernel spreads connections over them; gateway workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(False)
    return sock


def unix_listener(path: str) -> socket.socket:
    """A Unix socket bound at `path`, readable and writable by this user only (0600)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    return sock


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with TCP_NODELAY on every accepted connection.

    A server started on an inherited socket (our replicas) accepts connections without
    TCP_NODELAY; uvicorn writes a response's head and body separately, so Nagle plus the
    peer's delayed ACK added 40 ms to every request (measured: p50 44 ms → 0.7 ms).
    """

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        # no family check: uvicorn wraps an inherited fd as AF_UNIX whatever it really is
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        super().connection_made(transport)
