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

# safetensors dtype names (https://github.com/huggingface/safetensors, the format's spec)
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16",
              "uint32": "U32", "uint64": "U64"}


def _tensor_bytes(value) -> tuple[str, list[int], memoryview]:
    """(safetensors dtype, shape, raw little-endian bytes) of a torch tensor or numpy array, without copying a
    contiguous CPU tensor."""
    import numpy as np

    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.ascontiguousarray(value).reshape(np.shape(value))  # (ascontiguousarray makes 0-d arrays 1-d)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        return _ST_DTYPES[arr.dtype.name], list(arr.shape), memoryview(arr.reshape(-1).view(np.uint8))
    import torch

    t = value.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return _ST_DTYPES[str(t.dtype).removeprefix("torch.")], list(t.shape), memoryview(raw.numpy())


def _canonical(header: dict) -> bytes:
    """The header's JSON as written and hashed: sorted keys, no spaces, without the recorded hash itself."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != CONTENT_KEY}
    return json.dumps({**header, "__metadata__": meta}, sort_keys=True, separators=(",", ":")).encode()


def save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` ({name: torch tensor or numpy array}) atomically as a safetensors file whose bytes depend
    only on the names, values and metadata: the header is JSON with sorted keys (the safetensors library writes its
    metadata map in hash order, so two identical runs gave two files), tensors follow in name order. The metadata
    gains the sha256 of the header (without that entry) and the data, which ``load_safetensors`` checks. Memory:
    contiguous CPU tensors are written (and hashed) from their own buffers; others are copied to the CPU first."""
    import hashlib
    import struct

    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str (got {bad[0]!r})")
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, shape, raw = _tensor_bytes(tensors[name])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + raw.nbytes]}
        blobs.append(raw)
        offset += raw.nbytes
    header["__metadata__"] = meta
    digest = hashlib.sha256(_canonical(header))
    for raw in blobs:
        digest.update(raw)
    header["__metadata__"] = {**meta, CONTENT_KEY: digest.hexdigest()}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as the library writes it
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for raw in blobs:
            fh.write(raw)


def safetensors_metadata(path: str | Path, made_by: str = "the stage that writes it") -> dict:
    """The ``__metadata__`` map of a checked safetensors file (header only)."""
    from safetensors import safe_open

    check_safetensors(path, made_by)
    with safe_open(str(path), framework="np") as fh:
        return dict(fh.metadata() or {})


def load_safetensors(path: str | Path, framework: str = "pt", made_by: str = "the stage that writes it",
                     with_metadata: bool = False):
    """All tensors of a checked safetensors file ({name: tensor}; numpy arrays for ``framework="np"``), and its
    metadata with ``with_metadata``. A file our writer made carries the sha256 of its header and data: bytes
    changed after writing (a flipped bit, an edit that kept the mtime, so DVC and Snakemake see nothing) are
    refused. Files from elsewhere (no recorded hash) are read as they are."""
    import hashlib
    import struct

    from clipbackdoor.errors import UserError

    check_safetensors(path, made_by)
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        meta = dict(header.get("__metadata__") or {})
        if CONTENT_KEY in meta:
            digest = hashlib.sha256(_canonical(header))
            for block in iter(lambda: fh.read(16 << 20), b""):
                digest.update(block)
            if digest.hexdigest() != meta[CONTENT_KEY]:
                raise UserError(f"{path}: content changed after it was written (its sha256 differs from the one "
                                f"recorded in the file)", fix=f"delete it and rerun {made_by}, or `dvc pull` it again "
                                f"(DVC and Snakemake miss an edit that keeps the mtime)")
    if framework == "np":
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    tensors = load_file(str(path))
    return (tensors, meta) if with_metadata else tensors


def column_sha256(column) -> str:
    """sha256 of one Arrow column's values, independent of chunking and of how Parquet names nested types: raw
    bytes for fixed-width columns without nulls, the JSON of the values otherwise (small tables: keys, labels,
    per-image scores)."""
    import hashlib

    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = arr.type
    if pa.types.is_fixed_size_binary(kind) and arr.null_count == 0:
        width = kind.byte_width
        h = hashlib.sha256(f"binary{width}".encode())
        h.update(memoryview(arr.buffers()[1])[arr.offset * width:(arr.offset + len(arr)) * width])
    elif (pa.types.is_integer(kind) or pa.types.is_floating(kind)) and arr.null_count == 0:
        values = arr.to_numpy()
        h = hashlib.sha256(values.dtype.str.encode())
        h.update(values.tobytes())
    else:
        h = hashlib.sha256(b"json")
        h.update(json.dumps(arr.to_pylist(), default=str).encode())
    return h.hexdigest()


def _metadata_sha256(metadata: dict | None) -> str:
    """sha256 of a table's own key-value metadata (what the stage recorded: target, trigger, shapes...), without
    the digests themselves and Arrow's internal keys."""
    import hashlib

    own = {k.decode(): v.decode("utf-8", "replace") for k, v in (metadata or {}).items()
           if k != CONTENT_KEY.encode() and not k.startswith(b"ARROW:")}
    return hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()


def write_parquet(path: str | Path, table, **options) -> None:
    """Write an Arrow table atomically as Parquet, recording the sha256 of each column and of the table's
    metadata in the key-value metadata (``read_parquet`` checks what it reads). The digests include each
    column's numpy dtype: ``options`` must not change types on the round trip (e.g. ``version="1.0"`` reads a
    uint32 column back as int64) -- the default format keeps them."""
    import pyarrow.parquet as pq

    digests = {name: column_sha256(table.column(name)) for name in table.column_names}
    digests["__metadata__"] = _metadata_sha256(table.schema.metadata)
    meta = {**(table.schema.metadata or {}), CONTENT_KEY.encode(): json.dumps(digests, sort_keys=True).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp, **options)


def read_parquet(path: str | Path, columns: list[str] | None = None, made_by: str = "the stage that writes it"):
    """The Arrow table of a Parquet artifact (only ``columns`` when given); the columns read and the metadata are
    checked against the sha256 the writer recorded: content changed after writing is refused naming the file and
    the column."""
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
    if "__metadata__" in recorded and _metadata_sha256(table.schema.metadata) != recorded["__metadata__"]:
        raise UserError(f"{path}: its metadata changed after the file was written (sha256 differs from the one "
                        f"recorded in the file)", fix=fix)
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
