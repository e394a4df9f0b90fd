"""Atomic artifact writing: every file appears complete under its final name, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _read_umask() -> int:
    mask = os.umask(0o022)  # (os.umask both sets and returns: read once, at import, and put back)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _usual_mode(path: Path, directory: bool = False) -> None:
    """mkstemp / mkdtemp create 0600 / 0700 (private) temporaries; an artifact gets the mode a plain open() or
    mkdir() would give it under the user's umask, so colleagues sharing a cluster's results folder can read it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


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
        _usual_mode(tmp_path)
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
        _usual_mode(tmp, directory=True)
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


DIGEST_FORMAT = "2"  # how ColumnHasher hashes a column (recorded with the digests; format 1 hashed whole columns)


class ColumnHasher:
    """sha256 of one Arrow column's values, fed chunk by chunk: the digest does not depend on how the column is
    chunked (row groups written one at a time, read back as one array or in batches) nor on how Parquet names
    nested types. Fixed-width values hash their bytes (nulls as zeros) plus the validity mask, strings their
    lengths and UTF-8 bytes, anything else the JSON of each value."""

    def __init__(self, kind):
        import hashlib

        import pyarrow as pa

        self._pa = pa
        self.mode = ("binary" if pa.types.is_fixed_size_binary(kind) else
                     "number" if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
                     else "string" if pa.types.is_string(kind) or pa.types.is_large_string(kind) else "json")
        # fixed-width types name themselves (an int32 column of the same bytes as a float32 one differs); nested
        # types are named by their values only, as Parquet renames their fields (list<item> -> list<element>)
        self.values = hashlib.sha256(f"{self.mode}:{kind if self.mode in ('binary', 'number') else ''}".encode())
        self.extra = hashlib.sha256()  # validity (fixed width) or lengths (strings)

    def update(self, column) -> "ColumnHasher":
        import numpy as np
        import pyarrow.compute as pc

        pa = self._pa
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        for arr in chunks:
            if self.mode == "binary":
                width = arr.type.byte_width
                filled = arr if arr.null_count == 0 else pc.fill_null(arr, b"\0" * width)
                self.values.update(memoryview(filled.buffers()[1])[filled.offset * width:
                                                                   (filled.offset + len(filled)) * width])
                self.extra.update(np.asarray(arr.is_valid()).tobytes())
            elif self.mode == "number":
                filled = arr if arr.null_count == 0 else pc.fill_null(arr, False if pa.types.is_boolean(arr.type) else 0)
                self.values.update(np.ascontiguousarray(filled.to_numpy(zero_copy_only=False)).tobytes())
                self.extra.update(np.asarray(arr.is_valid()).tobytes())
            elif self.mode == "string":
                lengths = pc.fill_null(pc.binary_length(arr), -1)
                self.extra.update(np.ascontiguousarray(lengths.to_numpy()).astype(np.int64).tobytes())
                offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if pa.types.is_large_string(arr.type)
                                        else np.int32)[arr.offset:arr.offset + len(arr) + 1]
                if len(arr):
                    self.values.update(memoryview(arr.buffers()[2] or b"")[offsets[0]:offsets[-1]])
            else:
                for value in arr.to_pylist():
                    self.values.update(json.dumps(value, default=str).encode() + b"\n")
        return self

    def hexdigest(self) -> str:
        import hashlib

        return hashlib.sha256(self.values.digest() + self.extra.digest()).hexdigest()


def column_sha256(column) -> str:
    """sha256 of a whole Arrow column (:class:`ColumnHasher`)."""
    return ColumnHasher(column.type).update(column).hexdigest()


def _metadata_sha256(metadata: dict | None) -> str:
    """sha256 of a table's own key-value metadata (what the stage recorded: target, trigger, shapes...), without
    the digests themselves and Arrow's internal keys."""
    import hashlib

    own = {k.decode(): v.decode("utf-8", "replace") for k, v in (metadata or {}).items()
           if k != CONTENT_KEY.encode() and not k.startswith(b"ARROW:")}
    return hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()


class ParquetStream:
    """A Parquet artifact written one row group (or more) at a time: memory O(chunk), not O(file). Each column's
    sha256 is accumulated as chunks arrive and recorded in the footer's key-value metadata with the schema's
    metadata digest, as :func:`write_parquet` records them (``read_parquet`` / :func:`iter_parquet` check both).
    Use through :func:`parquet_stream`; the file appears under its name only when the block succeeds."""

    def __init__(self, writer, schema):
        self.writer, self.schema = writer, schema
        self.hashers = {f.name: ColumnHasher(f.type) for f in schema}
        self.num_rows = 0

    def write(self, table, row_group_size: int | None = None) -> None:
        """Append ``table`` (columns in the schema's order and types), as row groups of ``row_group_size`` rows."""
        table = table.replace_schema_metadata(self.schema.metadata)
        if table.schema != self.schema:
            raise ValueError(f"chunk schema {table.schema} differs from the stream's {self.schema}")
        for name, hasher in self.hashers.items():
            hasher.update(table.column(name))
        self.writer.write_table(table, row_group_size=row_group_size)
        self.num_rows += table.num_rows


@contextlib.contextmanager
def parquet_stream(path: str | Path, schema, **options) -> Iterator[ParquetStream]:
    """``with parquet_stream(path, schema) as out: out.write(chunk)`` -- atomic, digests in the footer."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema, **options)
        try:
            stream = ParquetStream(writer, schema)
            yield stream
            digests = {name: h.hexdigest() for name, h in stream.hashers.items()}
            digests["__metadata__"] = _metadata_sha256(schema.metadata)
            digests["__format__"] = DIGEST_FORMAT
            writer.add_key_value_metadata({CONTENT_KEY: json.dumps(digests, sort_keys=True)})
        finally:
            writer.close()


def write_parquet(path: str | Path, table, row_group_size: int | None = None, **options) -> None:
    """Write an Arrow table atomically as Parquet (a one-chunk :func:`parquet_stream`). The digests include each
    column's numpy dtype: ``options`` must not change types on the round trip (e.g. ``version="1.0"`` reads a
    uint32 column back as int64) -- the default format keeps them."""
    with parquet_stream(path, table.schema, **options) as out:
        out.write(table, row_group_size=row_group_size)


def _parquet_fix(made_by: str) -> str:
    return f"delete it and rerun {made_by}, or `dvc pull` it again"


def _open_parquet(path: Path, made_by: str):
    """(ParquetFile, recorded digests) of an artifact; unreadable files and changed metadata are refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipbackdoor.errors import UserError

    if not path.is_file():
        raise UserError(f"{path}: file not found", fix=f"run {made_by}, or `dvc pull` it")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})",
                        fix=_parquet_fix(made_by)) from None
    metadata = pf.metadata.metadata or {}  # the footer's key-value pairs (the digests are added at closing)
    try:
        recorded = json.loads(metadata.get(CONTENT_KEY.encode(), b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        recorded = {}
    if not isinstance(recorded, dict) or recorded.get("__format__", DIGEST_FORMAT) != DIGEST_FORMAT \
            or (recorded and "__format__" not in recorded):
        raise UserError(f"{path}: written by an older clipbackdoor (its content digests are in another format)",
                        fix=f"delete it and rerun {made_by}")
    if _metadata_sha256(metadata) != recorded.get("__metadata__"):  # (a rewrite by another tool drops the digests)
        raise UserError(f"{path}: its metadata changed after the file was written (sha256 differs from the one "
                        f"recorded in the file)", fix=_parquet_fix(made_by))
    return pf, recorded


def _column_changed(path: Path, name: str, made_by: str):
    from clipbackdoor.errors import UserError

    return UserError(f"{path}: column {name!r} changed after the file was written (its sha256 differs from the one "
                     f"recorded in the file)", fix=_parquet_fix(made_by))


def iter_parquet(path: str | Path, columns: list[str] | None = None, batch_rows: int = 1024,
                 made_by: str = "the stage that writes it") -> Iterator:
    """Arrow record batches of ``batch_rows`` rows of a Parquet artifact (only ``columns``), memory O(batch). The
    columns read are hashed as they stream; a digest that differs from the recorded one is refused when the last
    batch has been read -- consumers must not publish anything before the iteration ends (stages write
    atomically, at the end)."""
    import pyarrow as pa

    from clipbackdoor.errors import UserError

    path = Path(path)
    pf, recorded = _open_parquet(path, made_by)
    names = columns if columns is not None else pf.schema_arrow.names
    missing = [name for name in names if name not in pf.schema_arrow.names]
    if missing:
        raise UserError(f"{path}: has no column {missing[0]!r}", fix=_parquet_fix(made_by))
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be positive, not {batch_rows}")
    hashers = {name: ColumnHasher(pf.schema_arrow.field(name).type) for name in names if name in recorded}
    # one row group at a time, re-cut into batches of exactly ``batch_rows`` rows (the last may be shorter), so two
    # files of equal rows stream in lockstep whatever their row-group layout. (pyarrow's iter_batches reads ahead:
    # its peak memory grows with the file.)
    pending, n_pending = [], 0
    try:
        for i in range(pf.num_row_groups):
            group = pf.read_row_group(i, columns=names, use_threads=False)
            for name, hasher in hashers.items():
                hasher.update(group.column(name))
            pending.append(group)
            n_pending += group.num_rows
            while n_pending >= batch_rows:
                table = pa.concat_tables(pending)
                yield table.slice(0, batch_rows).combine_chunks().to_batches()[0]
                rest = table.slice(batch_rows)
                pending, n_pending = [rest], rest.num_rows
        if n_pending:
            yield pa.concat_tables(pending).combine_chunks().to_batches()[0]
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})",
                        fix=_parquet_fix(made_by)) from None
    for name, hasher in hashers.items():
        if hasher.hexdigest() != recorded[name]:
            raise _column_changed(path, name, made_by)


def read_parquet(path: str | Path, columns: list[str] | None = None, made_by: str = "the stage that writes it"):
    """The Arrow table of a Parquet artifact (only ``columns`` when given); the columns read and the metadata are
    checked against the sha256 the writer recorded: content changed after writing is refused naming the file and
    the column."""
    import pyarrow as pa

    from clipbackdoor.errors import UserError

    path = Path(path)
    pf, recorded = _open_parquet(path, made_by)
    try:
        table = pf.read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})",
                        fix=_parquet_fix(made_by)) from None
    for name in table.column_names:
        if name in recorded and column_sha256(table.column(name)) != recorded[name]:
            raise _column_changed(path, name, made_by)
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


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG, written atomically, then closed (its memory freed)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
