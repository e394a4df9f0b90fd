"""Atomic artifact writing: every file appears complete under its final name, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # data on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; swap it in for ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_safetensors(path: str | Path, made_by: str = "the stage that writes it") -> None:
    """Refuse, naming the file, anything that is not a complete safetensors file -- another format, a
    truncated download, a header pointing past the end -- before a reader gets a SafetensorError traceback.
    Reads the 8-byte header length and the JSON header only."""
    import struct

    from clipbackdoor.errors import UserError

    path = Path(path)
    fix = f"delete it and rerun {made_by}, or `dvc pull` it again"
    if not path.is_file():
        raise UserError(f"{path}: file not found", fix=f"run {made_by}, or `dvc pull` it")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise UserError(f"{path}: not a safetensors file (no valid header)", fix=fix)
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path}: not a safetensors file (its header is not JSON)", fix=fix) from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)", fix=fix)
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and max(ends) > size - 8 - n:
        raise UserError(f"{path}: truncated safetensors file ({size:,} bytes, its tensors need "
                        f"{8 + n + max(ends):,})", fix=fix)


def load_safetensors(path: str | Path, framework: str = "pt", made_by: str = "the stage that writes it") -> dict:
    """All tensors of a checked safetensors file ({name: tensor}; numpy arrays for ``framework="np"``)."""
    check_safetensors(path, made_by)
    if framework == "np":
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    return load_file(str(path))


def read_json(path: str | Path, made_by: str = "the stage that writes it"):
    """A JSON artifact (model.json, classes.json, metrics.json, provenance.json): missing, not UTF-8 or not JSON
    is refused naming the file."""
    from clipbackdoor.errors import UserError

    path = Path(path)
    fix = f"rerun {made_by}, or `dvc pull` it again"
    if not path.is_file():
        raise UserError(f"{path}: file not found", fix=fix)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (offset {exc.start})", fix=fix) from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})", fix=fix) from None
