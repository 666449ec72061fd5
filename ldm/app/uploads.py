"""Reference images on the page: an uploaded picture, or one of this page's own results; never a path
on the server, and no answer that tells whether some path exists.

A submitted form lists its references as `{"name": ..., "data": <base64>}` (an upload) or
`{"url": "/files/..."}` (an image the page showed). `ReferenceFiles` turns each into a file the
builder reads: an upload is written (at most MAX_UPLOAD_BYTES, under a plain version of its name)
into a folder of its own that the job removes when it ends; a result's URL is resolved by the page's
own file lookup, which only knows PNGs inside its output folder. Any other item, or a URL that lookup
does not know, gets the same one line.
"""
from __future__ import annotations

import base64
import binascii
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from ldm.errors import InvalidValue

MAX_UPLOAD_BYTES = 16 * 2 ** 20
FILES_PREFIX = "/files/"
WHAT_GOES = "give an uploaded picture or an image of this page's results"


def plain_name(name: Any, number: int) -> str:
    """A file name made of letters, digits, '.', '-' and '_' only (no folder, no hidden file)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(name)).name).strip("._")[:80]
    return stem or f"reference-{number}.png"


class ReferenceFiles:
    """The references of one submitted form, as files; `close()` removes the uploads' folder."""

    def __init__(self, page_file: Callable[[str], Optional[Path]]):
        self.page_file = page_file  # a /files/ path -> the page's own file, or None
        self.folder: Optional[Path] = None
        self.uploads: dict[Path, str] = {}  # written file -> the name it was uploaded under

    def resolve(self, item: Any) -> str:
        """The file of one reference item; InvalidValue("references", ...) for anything else."""
        if isinstance(item, dict) and isinstance(item.get("url"), str) and set(item) == {"url"}:
            url = item["url"]
            file = self.page_file(url[len(FILES_PREFIX):]) if url.startswith(FILES_PREFIX) else None
            if file is None:
                raise InvalidValue("references", url, f"is not an image of this page's results; {WHAT_GOES}")
            return str(file)
        if isinstance(item, dict) and isinstance(item.get("data"), str) and set(item) <= {"name", "data"}:
            return str(self._write_upload(item.get("name", ""), item["data"]))
        raise InvalidValue("references", str(item)[:80], WHAT_GOES)

    def _write_upload(self, name: Any, data: str) -> Path:
        if len(data) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
            raise InvalidValue("references", plain_name(name, 0), f"is larger than {MAX_UPLOAD_BYTES // 2 ** 20} MiB; "
                                                                  "upload a smaller picture")
        try:
            content = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidValue("references", plain_name(name, 0), "the upload is not base64 data; upload the "
                                                                  "picture again") from None
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="page-references-"))
        base = plain_name(name, len(self.uploads))
        path, number = self.folder / base, 1
        while path.exists():  # two uploads of one name keep both
            path, number = self.folder / f"{number}-{base}", number + 1
        path.write_bytes(content)
        self.uploads[path] = path.name
        return path

    def close(self) -> None:
        """Remove the uploads' folder (its path stays in `folder`)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
