"""Reading a file a user hands the program: only regular files, and never more than a bound.

Every file a user names is untrusted (checkpoints, configs, prompt files, images, JSON of a diffusers
folder). A FIFO blocks the first read forever, `/dev/zero` never ends, a socket or a folder is not a
file at all, so a path is checked to be a regular file before anything reads it: by `os.stat`
(without opening it: opening some device files has effects), then once more on the opened
descriptor, which is opened non-blocking, so a path swapped for a FIFO in between cannot hang the
read either. Text and JSON-like formats are read whole with a size bound; the bound is checked on the
file's size and again on what was read (a file may grow meanwhile).

Errors name the file and its kind: FileNotFoundError, IsADirectoryError, or `NotARegularFile` (a
FIFO, a device, a socket); `FileTooLarge` for a file beyond its bound.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotARegularFile(OSError):
    """The path is a FIFO, a device or a socket: reading it could block or never end, so it is refused."""


class FileTooLarge(OSError):
    """The file is larger than what its format ever needs."""


def file_kind(mode: int) -> str:
    """What a path of this `st_mode` is, as a message says it: 'a FIFO (named pipe)', ..."""
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def check_regular_file(path: str | os.PathLike, what: str, hint: str) -> Path:
    """`path` if it names a regular file (after following links); otherwise an error naming `what` the
    file was meant to be, what it is, and `hint` (what to give instead). Nothing is opened."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist; give {hint}") from None
    except (OSError, ValueError) as error:  # a NUL in the path, a loop of links, no permission, ...
        raise NotARegularFile(f"{what} {path} cannot be read ({getattr(error, 'strerror', None) or error}); "
                              f"give {hint}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{what} {path} is a folder; give {hint}")
    if not stat.S_ISREG(mode):
        raise NotARegularFile(f"{what} {path} is {file_kind(mode)}, not a file; give {hint}")
    return path


def open_regular_file(path: str | os.PathLike, what: str, hint: str) -> BinaryIO:
    """`path` opened for binary reading, refused unless it is a regular file (checked before and after
    opening; the open itself never blocks)."""
    path = check_regular_file(path, what, hint)
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise NotARegularFile(f"{what} {path} cannot be opened ({error.strerror or error}); give {hint}") from None
    mode = os.fstat(descriptor).st_mode
    if not stat.S_ISREG(mode):
        os.close(descriptor)
        raise NotARegularFile(f"{what} {path} is {file_kind(mode)}, not a file; give {hint}")
    if hasattr(os, "set_blocking"):
        os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def read_bytes(path: str | os.PathLike, what: str, hint: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    with open_regular_file(path, what, hint) as handle:
        size = os.fstat(handle.fileno()).st_size
        data = handle.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise FileTooLarge(f"{what} {path} is larger than {describe_size(limit)}, more than a {what} ever needs; "
                           f"give {hint}")
    return data


def read_text(path: str | os.PathLike, what: str, hint: str, limit: int, encoding: str = "utf-8") -> str:
    """The text of a regular file of at most `limit` bytes; UnicodeDecodeError if it is not `encoding`."""
    return read_bytes(path, what, hint, limit).decode(encoding)


def describe_size(size: int) -> str:
    """1048576 -> '1 MiB'."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} bytes"
