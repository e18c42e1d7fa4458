"""Atomic file writing: a crash or a signal never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["atomic_path", "check_writable", "write_text"]


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    On any exception (``KeyboardInterrupt`` and ``SystemExit`` included) the temporary file
    is removed and ``path`` is left as it was.

    Args:
        path: the file to write.
        suffix: the ending of the temporary file's name, for writers that choose a format
            by extension (``".onnx"``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it an ordinary file's mode
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def check_writable(path: str, option: str) -> None:
    """Raise ``ConfigError`` unless a file can be created at ``path`` (checked before any compute)."""
    from .errors import ConfigError

    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise ConfigError(f"{option}={path} is a folder; give a file path")
    if not os.path.isdir(folder):
        raise ConfigError(f"{option}={path}: the folder {folder} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"{option}={path}: cannot write in {folder} ({err.strerror}); choose a writable folder") from None


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
