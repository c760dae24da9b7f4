"""Atomic file writes, and the rules every output path follows.

`atomic_path` writes to a temporary file in the target's folder, then `os.replace`s it onto the
target: a killed process leaves either the old file or the new one, never a half-written one.

Rules for an output path (all commands):
- Replacing an existing file keeps that file's permission bits; a new file gets the mode a plain
  `open()` would give it (0666 & ~umask).
- A symbolic link is followed: the file it points to is replaced (the link stays a link). A
  dangling link or a link loop is refused (`OutputPathError`), since following it would create
  a file somewhere the user did not name.
- An output path that is one of the command's input files (or a file inside an input folder, or
  the data file of an input .mhd header) is refused by `check_output_path` before anything is
  read or written: an output must never destroy the data it was computed from.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_pipeline.errors import InputError


class OutputPathError(InputError):
    """An output path that must not be written (an input file, a broken link, a folder...)."""


def resolve_output(path: str | os.PathLike) -> Path:
    """The file an output path writes to: symbolic links followed, loops and dangling links
    refused (`OutputPathError`)."""
    target = Path(path)
    if os.fspath(path) == "":
        raise OutputPathError(None, "empty output path")
    if not target.is_symlink():
        return target
    try:
        resolved = target.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        raise OutputPathError(target, "symbolic link loop; give a real file path") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OutputPathError(target, "symbolic link loop; give a real file path") from None
        raise OutputPathError(target, f"is a symbolic link to a missing file "
                                      f"({os.readlink(target)}); give a real file path") from None
    if resolved.is_dir():
        raise OutputPathError(target, f"is a symbolic link to a folder ({resolved}), not a file")
    return resolved


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yields a temporary path next to `path`; on success it is renamed onto `path`.

    `suffix` defaults to the target's full suffix (e.g. ".nii.gz") so writers that pick a format
    from the file name (SimpleITK) behave as they would on the final name. Symbolic links and
    permissions follow the module's rules.
    """
    target = resolve_output(path)
    if target.is_dir():
        raise OutputPathError(target, "is a folder, not a file")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(target, f"cannot write it: {folder} is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(target.suffixes)
    mode = output_mode(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(err, OSError) and err.errno is not None and \
                err.filename in (None, str(tmp), tmp):
            err.filename = str(target)  # a failed write (a full disk) names the output
        raise


def _read_umask() -> int:
    # os.umask can only be read by setting it; do that once, at import, rather than on every
    # write where another thread could create a file in between with the temporary mask.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def output_mode(target: Path) -> int:
    """The permission bits a write to `target` gives: those of the file it replaces, else what a
    plain open() gives a new file (0666 & ~umask; mkstemp would give 0600)."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    with atomic_path(path, suffix="") as tmp:
        tmp.write_text(text, encoding="utf-8")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _side_files(path: Path) -> list[Path]:
    """Data files an image header names (MetaImage ElementDataFile), so they count as inputs."""
    if path.suffix.lower() not in (".mhd", ".nhdr") or not path.is_file():
        return []
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024).decode("latin-1")
    except OSError:
        return []
    for line in head.splitlines():
        key, _, value = line.partition("=")
        if key.strip() in ("ElementDataFile", "data file", "datafile") and value.strip():
            value = value.strip()
            if value.upper() != "LOCAL" and not value.upper().startswith("LIST"):
                return [path.parent / value]
    return []


def check_output_path(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None],
                      *, option: str = "output") -> Path:
    """Refuses (`OutputPathError`, naming `option`) an output path that would overwrite an input.

    An input is a file (with an .mhd header's data file) or a folder (every existing file under
    it). Returns the path that will be written (symbolic links followed, see the module rules).
    """
    target = resolve_output(output)
    if target.is_dir():
        raise OutputPathError(output, f"{option} is a folder, not a file")
    for given in inputs:
        if given is None or os.fspath(given) == "":
            continue
        source = Path(given)
        protected = [source, *_side_files(source)]
        if any(_same_file(target, p) or target.absolute() == p.absolute() for p in protected):
            raise OutputPathError(output, f"{option} is the input {source}; writing it would "
                                          "destroy the input: choose another path")
        if source.is_dir() and target.exists() and target.resolve().is_relative_to(
                source.resolve()):
            raise OutputPathError(output, f"{option} is a file inside the input folder "
                                          f"{source}; writing it would replace input data: "
                                          "choose another path")
    return target
