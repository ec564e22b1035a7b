"""Every file and folder sdtorch writes goes through here, so nothing is left half-written.

A file is written under a temporary name in its target's folder and renamed into place
(`os.replace` is atomic on one file system), and the temporary file is removed on any failure.
A folder is built under a temporary name beside its target and renamed into place the same way.
Destinations are checked before the work starts (`check_file_destination`, `check_folder_destination`),
so a long generation or conversion does not end in an error about where to put the result.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import SDTorchError


def check_file_destination(path, suffixes: tuple[str, ...] | None = None) -> Path:
    """`path` can take a new file: its folder exists and it is not a folder itself (a file there is
    replaced). `suffixes`: the allowed extensions, lower case with the dot."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise SDTorchError(f"{path}: not a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise SDTorchError(f"{path}: must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise SDTorchError(f"{path}: is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise SDTorchError(f"{path}: exists and is not a regular file")
    if not path.parent.is_dir():
        raise SDTorchError(f"{path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise SDTorchError(f"{path}: folder {path.parent} is not writable")
    return path


def check_folder_destination(path, replace: bool = True) -> Path:
    """`path` can take a new folder: its parent exists, and it is not a file. An existing folder is
    replaced as a whole when `replace`, else it is an error."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise SDTorchError(f"{path}: not a folder name")
    if path.exists() and not path.is_dir():
        raise SDTorchError(f"{path}: exists and is not a folder")
    if path.is_dir() and not replace:
        raise SDTorchError(f"{path}: folder exists")
    if not path.parent.is_dir():
        raise SDTorchError(f"{path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise SDTorchError(f"{path}: folder {path.parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it is renamed to `path`, on any error
    (KeyboardInterrupt included) it is removed and `path` is left as it was."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_folder(path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on a clean exit it replaces `path` (an existing
    folder there is removed only then), on any error it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)  # move the old folder aside, then the new one in
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
