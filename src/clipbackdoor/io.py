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


CONTENT_KEY = "content_sha256"  # safetensors metadata / Parquet key-value metadata: what the writer wrote


def _data_sha256(fh, start: int) -> str:
    """sha256 of a file's bytes from ``start`` to its end, read in 16 MiB blocks."""
    import hashlib

    fh.seek(start)
    h = hashlib.sha256()
    for block in iter(lambda: fh.read(16 << 20), b""):
        h.update(block)
    return h.hexdigest()


def save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` ({name: torch tensor or numpy array}) atomically as a safetensors file whose bytes
    depend only on the values: the header is JSON with sorted keys (the safetensors library writes its
    metadata map in hash order, so two identical runs gave two files), and ``metadata`` gains the sha256 of
    the data section, which ``load_safetensors`` checks."""
    import hashlib
    import struct

    import numpy as np

    if tensors and all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save
        blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    else:
        from safetensors.torch import save
        blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    data = memoryview(blob)[8 + n:]
    header.pop("__metadata__", None)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[CONTENT_KEY] = hashlib.sha256(data).hexdigest()
    text = json.dumps({"__metadata__": meta, **header}, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as the library writes it
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        fh.write(data)


def safetensors_metadata(path: str | Path, made_by: str = "the stage that writes it") -> dict:
    """The ``__metadata__`` map of a checked safetensors file (header only)."""
    from safetensors import safe_open

    check_safetensors(path, made_by)
    with safe_open(str(path), framework="np") as fh:
        return dict(fh.metadata() or {})


def load_safetensors(path: str | Path, framework: str = "pt", made_by: str = "the stage that writes it",
                     with_metadata: bool = False):
    """All tensors of a checked safetensors file ({name: tensor}; numpy arrays for ``framework="np"``), and its
    metadata with ``with_metadata``. A file our writer made carries the sha256 of its data: bytes changed after
    writing (a flipped bit, an edit that kept the mtime, so DVC and Snakemake see nothing) are refused."""
    import struct

    from clipbackdoor.errors import UserError

    meta = safetensors_metadata(path, made_by)
    if CONTENT_KEY in meta:
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if _data_sha256(fh, 8 + n) != meta[CONTENT_KEY]:
                raise UserError(f"{path}: content changed after it was written (sha256 differs from the one "
                                f"recorded in the file)", fix=f"delete it and rerun {made_by}, or `dvc pull` it again "
                                f"(`dvc status` misses edits that keep the mtime: `dvc status` after a `touch`)")
    if framework == "np":
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    tensors = load_file(str(path))
    return (tensors, meta) if with_metadata else tensors


def column_sha256(column) -> str:
    """sha256 of one Arrow column's values (chunking-independent): raw bytes for fixed-width columns without
    nulls, the JSON of the values otherwise (small tables: keys, labels, per-image scores)."""
    import hashlib

    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    h = hashlib.sha256(str(arr.type).encode())
    kind = arr.type
    if pa.types.is_fixed_size_binary(kind) and arr.null_count == 0:
        width = kind.byte_width
        h.update(memoryview(arr.buffers()[1])[arr.offset * width:(arr.offset + len(arr)) * width])
    elif (pa.types.is_integer(kind) or pa.types.is_floating(kind)) and arr.null_count == 0:
        h.update(arr.to_numpy().tobytes())
    else:
        h.update(json.dumps(arr.to_pylist(), default=str).encode())
    return h.hexdigest()


def write_parquet(path: str | Path, table, **options) -> None:
    """Write an Arrow table atomically as Parquet, recording each column's sha256 in the key-value metadata
    (``read_parquet`` checks the columns it reads)."""
    import pyarrow.parquet as pq

    digests = {name: column_sha256(table.column(name)) for name in table.column_names}
    meta = {**(table.schema.metadata or {}), CONTENT_KEY.encode(): json.dumps(digests, sort_keys=True).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp, **options)


def read_parquet(path: str | Path, columns: list[str] | None = None, made_by: str = "the stage that writes it"):
    """The Arrow table of a Parquet artifact (only ``columns`` when given); the columns read are checked against
    the sha256 the writer recorded: content changed after writing is refused naming the file and the column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipbackdoor.errors import UserError

    path = Path(path)
    fix = f"delete it and rerun {made_by}, or `dvc pull` it again"
    if not path.is_file():
        raise UserError(f"{path}: file not found", fix=f"run {made_by}, or `dvc pull` it")
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})", fix=fix) from None
    recorded = json.loads((table.schema.metadata or {}).get(CONTENT_KEY.encode(), b"{}"))
    for name in table.column_names:
        if name in recorded and column_sha256(table.column(name)) != recorded[name]:
            raise UserError(f"{path}: column {name!r} changed after the file was written (its sha256 differs "
                            f"from the one recorded in the file)", fix=fix)
    return table


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
