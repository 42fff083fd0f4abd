"""Atomic writes: every file and folder the pack writes appears under its final name complete or not at all.

Why: a crash, a killed process or Ctrl-C half-way through a save must never leave a truncated
LoRA, checkpoint, sidecar or model folder under the name a loader will later trust (and an
existing good file must survive a failed overwrite). So each write goes to a temporary name in
the same folder (same filesystem, so the final rename is atomic) and is renamed onto the final
name only once it is complete; on any error the temporary is removed and the old file stays.

No ComfyUI imports here; torch and safetensors are imported only by the functions that need them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# mkstemp creates files readable by the owner only; the files we write are ordinary data.
FILE_MODE = 0o644
# A Windows drive (C:, C:/x, C:x) or UNC start: absolute on the machine that runs the host.
_DRIVE = re.compile(r"^[A-Za-z]:")


def _fsync_file(path: Path) -> None:
    """Flush the file's data to disk, so a power loss right after the rename cannot leave an empty file."""
    with open(path, "r+b") as handle:
        os.fsync(handle.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# Names longer than this are shortened in temporary names, so that any final name the folder
# accepts also has a temporary name it accepts (255 bytes on common filesystems).
_TEMP_STEM_BYTES = 200


def _temp_prefix(name: str) -> str:
    stem = name.encode("utf-8")[:_TEMP_STEM_BYTES].decode("utf-8", "ignore")
    return f".{stem}."


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to `path` to write to; on success it is renamed onto `path`
    (parent folders are created), on any exception it is removed and the exception re-raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def save_safetensors_atomic(path: str | os.PathLike, tensors: Mapping[str, Any],
                            metadata: Mapping[str, str] | None = None) -> Path:
    """safetensors.torch.save_file, atomically."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=None if metadata is None else dict(metadata))
    return Path(path)


def torch_save_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """torch.save, atomically. Only for tiny test files in public .pth layouts; the pack's own
    outputs are safetensors."""
    import torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


@contextmanager
def atomic_folder(dest: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a new empty folder beside `dest` (a unique hidden temporary name) to fill; on success
    it is renamed onto `dest`, on any exception it is removed. Only that temporary folder is ever
    removed: a folder of the user's that happens to be called `DEST.partial` is never touched.

    An existing `dest` is replaced only with `replace=True`; otherwise FileExistsError names it
    (checked before the work starts and again before the rename)."""
    dest = Path(dest)
    if not replace and (dest.exists() or dest.is_symlink()):
        raise FileExistsError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest.name), suffix=".partial", dir=dest.parent))
    try:
        yield partial
        if dest.exists() or dest.is_symlink():
            if not replace:
                raise FileExistsError(f"{dest} already exists")
            _remove(dest)
        os.rename(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def probe_writable(path: str | os.PathLike) -> None:
    """Raise OSError (naming `path`) unless `path` and the temporary names the atomic writers use
    for it can be created in its folder (too long a name, a read-only folder, a file where a folder
    should be...). Parent folders are created; nothing else is left behind, and an existing file
    at `path` is not touched (only its folder's writability is checked)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
        if not (path.exists() or path.is_symlink()):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            os.close(fd)
            os.unlink(path)
        elif not os.access(path.parent, os.W_OK):
            raise PermissionError(f"folder {path.parent} is not writable")
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def confined_path(root: str | os.PathLike, name: str, what: str = "name", plain_name: bool = False,
                  links_inside: bool = False) -> Path:
    """`name` (typed by a user or taken from a workflow) resolved inside `root`, or ValueError.

    The one confinement rule of the pack. No absolute paths, home shortcuts, control characters or
    '..' parts: the name itself cannot lead out of `root`. Symlinks inside `root` are followed as
    they are: they are the user's own set-up (a models folder linked from another disk), not
    something a workflow can create.
    plain_name: a single entry directly in `root` (no separators, no drive letters).
    links_inside: also refuse a name whose links resolve outside `root` (for names read from files
    that came with a download, such as a shard index)."""
    if not isinstance(name, str) or "\x00" in name:
        raise ValueError(f"{what} {name!r} must be a relative path inside {os.path.abspath(root)} (it is not a name)")
    text = (name or "").strip()
    kind = "plain name" if plain_name else "relative path"
    problem = None
    if not text or text in (".", ".."):
        problem = "it is empty"
    elif os.path.isabs(text) or text.startswith(("/", "\\", "~")) or _DRIVE.match(text):
        problem = "it is absolute"
    elif any(ord(c) < 32 for c in text):
        problem = "it has control characters"
    elif ".." in Path(text.replace("\\", "/")).parts:
        problem = "it has '..'"
    elif plain_name and ("/" in text or "\\" in text or ":" in text):
        problem = "it has path separators or a drive letter"
    root_abs = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root_abs, text)) if problem is None else ""
    if problem is None and (os.path.commonpath([root_abs, path]) != root_abs or path == root_abs
                            or (plain_name and os.path.dirname(path) != root_abs)):
        problem = "it leaves the folder"
    if problem is None and links_inside:
        real_root, real = os.path.realpath(root_abs), os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            problem = f"it resolves to {real}, outside the folder"
    if problem is not None:
        raise ValueError(f"{what} {name!r} must be a {kind} inside {root_abs} ({problem})")
    return Path(path)
