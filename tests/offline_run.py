"""Run a script with the network cut off: `python tests/offline_run.py SCRIPT ARGS...`.

Every connection to an address other than the loopback, and every name lookup other than localhost,
is refused (OSError) and reported on stderr as a line starting with OFFLINE_MARK, so a test can see
that the script tried to reach the network, even where the script catches the error.
"""
from __future__ import annotations

import runpy
import socket
import sys

OFFLINE_MARK = "offline run: refused"
LOCAL = ("127.0.0.1", "::1", "localhost")


def _refuse(what: str) -> None:
    print(f"{OFFLINE_MARK} {what}", file=sys.stderr, flush=True)
    raise OSError(f"{OFFLINE_MARK} {what} (the network is cut off)")


def cut_off_the_network() -> None:
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def is_remote(sock: socket.socket, address) -> bool:
        return sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL

    def local_connect(self, address):
        if is_remote(self, address):
            _refuse(f"connection to {address}")
        return connect(self, address)

    def local_connect_ex(self, address):
        if is_remote(self, address):
            _refuse(f"connection to {address}")
        return connect_ex(self, address)

    def local_getaddrinfo(host, *args, **kwargs):
        if host not in (*LOCAL, None, ""):
            _refuse(f"name lookup of {host}")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = local_connect, local_connect_ex
    socket.getaddrinfo = local_getaddrinfo


if __name__ == "__main__":
    cut_off_the_network()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
