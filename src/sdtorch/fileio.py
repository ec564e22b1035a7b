"""Every file and folder sdtorch writes goes through here, so nothing is left half-written.

A file is written under a temporary name in its target's folder and renamed into place
(`os.replace` is atomic on one file system), and the temporary file is removed on any failure.
A folder is built under a temporary name beside its target and renamed into place the same way.
Destinations are checked before the work starts (`check_file_destination`, `check_folder_destination`),
so a long generation or conversion does not end in an error about where to put the result.
Files written inside a folder that `atomic_folder` is building need no helper of their own: the whole
folder appears at once or not at all.

Writing onto an existing folder replaces it whole (the result holds exactly what was written, with no
stale file from an earlier save beside it). Where a caller passes `replaceable`, only an empty folder or
one of the kind it writes is replaced; any other is refused, so `sdtorch convert m.safetensors ~/photos`
can never delete unrelated files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import SDTorchError


def shown(path) -> str:
    """`path` as it goes into a one-line message: as given, or repr() when it holds a newline or another
    character that does not print."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    return text if text.isprintable() else repr(text)


def check_file_destination(path, suffixes: tuple[str, ...] | None = None) -> Path:
    """`path` can take a new file: its folder exists and takes files, and it is not a folder itself (a
    file there is replaced). `suffixes`: the allowed extensions, lower case with the dot."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise SDTorchError(f"{shown(path)}: not a file name")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise SDTorchError(f"{shown(path)}: must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise SDTorchError(f"{shown(path)}: is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise SDTorchError(f"{shown(path)}: exists and is not a regular file")
    _check_parent(path)
    return path


def check_folder_destination(path, replace: bool = True, replaceable: Callable[[Path], bool] | None = None,
                             what: str = "a folder sdtorch wrote") -> Path:
    """`path` can take a new folder: its parent exists and takes files, and it is not a file. An existing
    folder is replaced as a whole when `replace`, else it is an error. With `replaceable` (a test of an
    existing folder), only an empty folder or one it accepts is replaced; any other is refused (`what`
    names the kind accepted, for the message)."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise SDTorchError(f"{shown(path)}: not a folder name")
    if path.exists() and not path.is_dir():
        raise SDTorchError(f"{shown(path)}: exists and is not a folder")
    if path.is_dir() and not replace:
        raise SDTorchError(f"{shown(path)}: folder exists")
    if path.is_dir() and replaceable is not None and any(path.iterdir()) and not replaceable(path):
        raise SDTorchError(f"{shown(path)}: folder exists and is not {what}; it would be replaced whole, so "
                           "remove it or give a new name")
    _check_parent(path)
    return path


def make_parents(path) -> None:
    """Create the missing folders above `path`, as diffusers' `save_pretrained` does for the Python API's
    folder writers. Where that fails (a file in the way, no permission) nothing is raised here: the
    destination check that follows says why in one line."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass


def _check_parent(path: Path) -> None:
    """The folder that will hold `path` exists and takes a new entry (tried, since permission bits do
    not stop root and do not show a read-only mount)."""
    parent = path.parent
    if not parent.is_dir():
        raise SDTorchError(f"{shown(path)}: folder {shown(parent)} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sdtorch-probe.", dir=parent)
    except OSError as e:
        raise SDTorchError(f"{shown(path)}: folder {shown(parent)} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_file(path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a unique name, `.NAME.XXXX.tmp`); on a clean exit it is
    renamed to `path`, on any error (KeyboardInterrupt included) it is removed and `path` is left as it
    was. `durable`: also flush the file and the rename to disk (for what a power cut must not lose)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def write_bytes(path, data: bytes, durable: bool = False) -> Path:
    with atomic_file(path, durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_all(files: list[tuple[Path, bytes]]) -> None:
    """Write every (path, bytes) under a temporary name, then rename them all; on any failure none is left."""
    with contextlib.ExitStack() as stack:
        for path, data in files:
            stack.enter_context(atomic_file(path)).write_bytes(data)


def write_text(path, text: str, durable: bool = False) -> Path:
    with atomic_file(path, durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def append_line(path, line: str) -> None:
    """Append one line to a log with a single write, so a kill leaves every earlier line whole (at worst
    the last line is cut; readers of such logs skip a line that does not parse)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
