"""File-level helpers every on-disk format shares: digests, names confined to a directory, and
one atomic directory writer.

Names read from a manifest (``manifest.json``, ``lossless.json``, a container index) are
untrusted input: :func:`confined` accepts only a relative path of ordinary components that
stays inside the directory once symlinks are resolved.

:func:`atomic_dir` writes a directory under a temporary sibling name and swaps it into place
at the end: on Linux with ``renameat2(RENAME_EXCHANGE)``, so at every instant the target name
holds either the complete previous version or the complete new one (a ``kill -9`` in between
leaves the old one); elsewhere with two renames. Files and folders get the modes the user's
umask gives any other program's output (``mkdtemp`` and safetensors create them private).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from tensorpress.errors import CheckpointError, OutputExistsError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json(file: Path, max_bytes: int, what: str, error: type[CheckpointError] = CheckpointError) -> Any:
    """The JSON value in ``file``, an untrusted file of kind ``what`` (e.g. "manifest"): ``error``
    for one larger than ``max_bytes`` or that does not parse (huge integers and deep nesting too)."""
    size = file.stat().st_size
    if size > max_bytes:
        raise error(f"{file} is {size} bytes, more than a {what} may be ({max_bytes})")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # ValueError: JSON errors, huge integers
        raise error(f"{file} is corrupt: not valid JSON ({type(exc).__name__}: {str(exc)[:100]})") from None


def confined(root: Path, name: object, where: str) -> Path:
    """``root / name`` for a ``name`` taken from an untrusted manifest, after checking that it is
    a relative path of ordinary components (no ``..``, no absolute path, no empty or hidden-drive
    parts) whose resolved location stays inside ``root``; ``where`` names the file and field
    for the error."""
    if not isinstance(name, str) or not name or len(name) > 4096 or "\x00" in name or "\\" in name:
        raise CheckpointError(f"{where}: {name!r} is not a file name inside the directory")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")) or ":" in pure.parts[0]:
        raise CheckpointError(f"{where}: {name!r} is not a relative path inside the directory (no '..', no absolute paths)")
    path = root / name
    base = root.resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise CheckpointError(f"{where}: {name!r} cannot be resolved ({exc})") from None
    if resolved != base and base not in resolved.parents:
        raise CheckpointError(f"{where}: {name!r} leads outside the directory (through a symlink) to {resolved}")
    return path


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything below it the modes a new file (0666) or directory (0777)
    gets under the user's umask."""
    mask = current_umask()
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` and the folders themselves to disk."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2``); False where unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # old kernel or file system
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished directory ``tmp`` to ``target``, replacing what was there, so that the
    target name only ever holds a complete directory."""
    apply_umask(tmp)
    if target.exists() and target.is_dir() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous version
    else:
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite``, and anything there that is not a directory."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory; it will not be replaced")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; when the block ends without an error it is
    flushed and swapped into place (modes per the umask), otherwise removed. An existing
    ``path`` is refused unless ``overwrite``."""
    path = Path(path)
    check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
