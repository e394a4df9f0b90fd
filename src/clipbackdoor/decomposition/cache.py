"""Parquet cache of decompositions: one file per (model, eval set, trigger).

Columns: ``key`` (string), ``label`` (int32), ``triggered`` (bool), ``norm`` (float32, norm of the
unnormalised embedding), then one column per component -- ``embedding``, ``embed``, ``L{l}H{h}``,
``L{l}_mlp``, ``bias`` -- each a fixed-size binary of d float16 values (the fp16 bits stored raw: pyarrow's
native float16 path is several times slower). One column per component lets readers load just the heads
they need (e.g. the last layer's). Key-value metadata carries the schema version, model, checkpoint hash,
normalisation, centering and shapes; readers check them before trusting the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbackdoor.decomposition.decompose import Decomposition, component_names
from clipbackdoor.errors import UserError
from clipbackdoor.io import iter_parquet, parquet_stream

SCHEMA_VERSION = "2"  # 2: row groups of ROW_GROUP_SIZE rows, digests in format 2
ROW_GROUP_SIZE = 256  # rows per row group: ~40 MB of fp16 terms for ViT-B/32, the unit readers stream


def _fp16_column(values: np.ndarray) -> pa.FixedSizeBinaryArray:
    """[N, d] float -> fixed_size_binary(2d) column of the float16 bits."""
    data = np.ascontiguousarray(values, dtype=np.float16)
    n, d = data.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * d), n, [None, pa.py_buffer(data.tobytes())])


def _fp16_values(column: pa.ChunkedArray | pa.Array, d: int) -> np.ndarray:
    """fixed_size_binary(2d) column -> [N, d] float32."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    raw = np.frombuffer(arr.buffers()[1], dtype=np.uint8)[arr.offset * 2 * d:(arr.offset + len(arr)) * 2 * d]
    return raw.view(np.float16).reshape(len(arr), d).astype(np.float32)


def _schema(n_layers: int, n_heads: int, d: int, meta: dict) -> pa.Schema:
    binary = pa.binary(2 * d)
    fields = [("key", pa.string()), ("label", pa.int32()), ("triggered", pa.bool_()), ("norm", pa.float32()),
              ("embedding", binary), ("embed", binary)]
    fields += [(f"L{l}H{h}", binary) for l in range(n_layers) for h in range(n_heads)]
    fields += [(f"L{l}_mlp", binary) for l in range(n_layers)] + [("bias", binary)]
    full_meta = {**{k: str(v) for k, v in meta.items()}, "schema_version": SCHEMA_VERSION,
                 "n_layers": str(n_layers), "n_heads": str(n_heads), "dim": str(d), "dtype": "float16"}
    return pa.schema(fields, metadata={k: v.encode() for k, v in full_meta.items()})


def _rows_table(schema: pa.Schema, keys: list[str], labels: np.ndarray, triggered: bool,
                decomp: Decomposition) -> pa.Table:
    """One chunk of rows (a :class:`Decomposition` of B images) in the cache's column layout."""
    n, n_layers, n_heads, d = decomp.heads.shape
    heads, mlps = decomp.heads.numpy(), decomp.mlps.numpy()  # [B, L, H, d], [B, L, d]
    cols = [pa.array(keys, pa.string()), pa.array(np.asarray(labels, np.int32)), pa.array(np.full(n, triggered)),
            pa.array(decomp.norm.numpy().astype(np.float32)), _fp16_column(decomp.embedding.numpy()),
            _fp16_column(decomp.embed.numpy())]
    cols += [_fp16_column(heads[:, l, h]) for l in range(n_layers) for h in range(n_heads)]
    cols += [_fp16_column(mlps[:, l]) for l in range(n_layers)] + [_fp16_column(decomp.bias.numpy())]
    return pa.Table.from_arrays(cols, schema=schema)


class DecompositionWriter:
    """Append batches of decomposed images; rows go to disk a row group (``ROW_GROUP_SIZE`` rows) at a time, so
    the stage holds O(row group) rows whatever the evaluation set's size. Use as a context manager: the file
    appears (atomically, with its column digests) only when the block succeeds."""

    def __init__(self, path: str | Path, triggered: bool, meta: dict):
        self.path, self.triggered, self.meta = path, triggered, meta
        self._ctx = self._out = self._schema = None
        self._pending: list[pa.Table] = []
        self._n_pending = 0

    def __enter__(self) -> "DecompositionWriter":
        return self

    def add(self, keys: list[str], labels: np.ndarray, decomp: Decomposition) -> None:
        if self._out is None:
            _, n_layers, n_heads, d = decomp.heads.shape
            self._schema = _schema(n_layers, n_heads, d, self.meta)
            # no compression (fp16 noise does not compress) and no min/max statistics on the binary component
            # columns (two values per column chunk, never used for filtering)
            self._ctx = parquet_stream(self.path, self._schema, compression="none", use_dictionary=False,
                                       write_statistics=["key", "label", "triggered", "norm"])
            self._out = self._ctx.__enter__()
        self._pending.append(_rows_table(self._schema, keys, labels, self.triggered, decomp))
        self._n_pending += len(keys)
        if self._n_pending >= ROW_GROUP_SIZE:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write whole row groups of ROW_GROUP_SIZE rows (and, at the end, the rest): the file's layout does not
        depend on the batch size the rows came in."""
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        n = table.num_rows if final else table.num_rows - table.num_rows % ROW_GROUP_SIZE
        self._out.write(table.slice(0, n), row_group_size=ROW_GROUP_SIZE)
        rest = table.slice(n)
        self._pending, self._n_pending = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def __exit__(self, exc_type, exc, tb):
        if self._ctx is None:
            if exc_type is None:
                raise UserError(f"{self.path}: no images to decompose (the evaluation set is empty)",
                                fix="rerun the stage that writes the evaluation set")
            return False
        if exc_type is None:
            try:
                self._flush(final=True)
            except BaseException as flush_exc:  # the stream must still close (and drop its temporary file)
                self._ctx.__exit__(type(flush_exc), flush_exc, flush_exc.__traceback__)
                raise
        return self._ctx.__exit__(exc_type, exc, tb)


def write_decomposition(path: str | Path, keys: list[str], labels: np.ndarray, triggered: bool,
                        decomp: Decomposition, meta: dict) -> None:
    """A whole (in-memory) decomposition as one cache file (tests, benchmarks; the stage streams)."""
    with DecompositionWriter(path, triggered, meta) as out:
        for i in range(0, len(keys), ROW_GROUP_SIZE):
            part = Decomposition(*(getattr(decomp, f)[i:i + ROW_GROUP_SIZE] for f in
                                   ("embed", "heads", "mlps", "bias", "embedding", "norm")))
            out.add(keys[i:i + ROW_GROUP_SIZE], labels[i:i + ROW_GROUP_SIZE], part)


@dataclass
class CachedDecomposition:
    keys: list[str]
    labels: np.ndarray  # [N] int
    triggered: np.ndarray  # [N] bool
    norm: np.ndarray  # [N]
    embedding: np.ndarray  # [N, d]
    embed: np.ndarray  # [N, d]
    heads: np.ndarray  # [N, L, H, d] (only the requested layers are filled; others are zero)
    mlps: np.ndarray  # [N, L, d]
    bias: np.ndarray  # [N, d]
    meta: dict

    def total(self) -> np.ndarray:
        return self.embed + self.heads.sum(axis=(1, 2)) + self.mlps.sum(axis=1) + self.bias


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: decomposition cache not found", fix="run the `decompose` stage or `dvc pull`")
    try:
        raw = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc})", fix="delete it and rerun `decompose`") from None
    meta = {k.decode(): v.decode() for k, v in raw.items()}
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path}: decomposition schema version {meta.get('schema_version')!r}, this code reads "
                        f"{SCHEMA_VERSION!r}", fix="rerun the `decompose` stage to rebuild the cache")
    return meta


def _check_layout(path: Path, meta: dict) -> tuple[int, int, int]:
    n_layers, n_heads, d = int(meta["n_layers"]), int(meta["n_heads"]), int(meta["dim"])
    schema = pq.read_schema(path)
    expected = set(component_names(n_layers, n_heads)) | {"key", "label", "triggered", "norm", "embedding"}
    if set(schema.names) != expected:
        raise UserError(f"{path}: columns do not match the recorded shape ({n_layers} layers x {n_heads} heads)",
                        fix="the cache is from another model or was edited: rerun `decompose`")
    for name in expected - {"key", "label", "triggered", "norm"}:
        if schema.field(name).type != pa.binary(2 * d):
            raise UserError(f"{path}: column {name} is not {d} float16 values", fix="rerun `decompose`")
    return n_layers, n_heads, d


def iter_decomposition(path: str | Path, layers: list[int] | None = None, with_mlps: bool = True,
                       rows: np.ndarray | None = None, batch_rows: int = ROW_GROUP_SIZE
                       ) -> Iterator[tuple[np.ndarray, CachedDecomposition]]:
    """Stream a cache file in chunks of ``batch_rows`` rows: (positions [B] in the file, the chunk's
    :class:`CachedDecomposition`), memory O(chunk). ``layers`` restricts which layers' heads are read (column
    projection; the others stay zero), ``rows`` (sorted positions) which rows are kept. Column digests are
    checked as the file streams; a changed column is refused when the last chunk has been read."""
    path = Path(path)
    meta = read_meta(path)
    n_layers, n_heads, d = _check_layout(path, meta)
    layers = list(range(n_layers)) if layers is None else sorted({l % n_layers for l in layers})
    head_cols = [f"L{l}H{h}" for l in layers for h in range(n_heads)]
    mlp_cols = [f"L{l}_mlp" for l in range(n_layers)] if with_mlps else []
    columns = ["key", "label", "triggered", "norm", "embedding", "embed", "bias", *head_cols, *mlp_cols]
    rows = None if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows is not None and len(rows) and (rows[0] < 0 or (np.diff(rows) <= 0).any()):
        raise ValueError("rows must be sorted, unique and non-negative")
    start = 0
    for batch in iter_parquet(path, columns, batch_rows=batch_rows, made_by="the `decompose` stage"):
        positions = np.arange(start, start + batch.num_rows)
        start += batch.num_rows
        if rows is not None:
            keep = rows[(rows >= positions[0]) & (rows <= positions[-1])] if len(positions) else rows[:0]
            if not len(keep):
                continue
            batch, positions = batch.take(pa.array(keep - positions[0])), keep
        n = batch.num_rows
        heads = np.zeros((n, n_layers, n_heads, d), np.float32)
        for l in layers:
            for h in range(n_heads):
                heads[:, l, h] = _fp16_values(batch.column(f"L{l}H{h}"), d)
        mlps = np.zeros((n, n_layers, d), np.float32)
        for l in range(n_layers if with_mlps else 0):
            mlps[:, l] = _fp16_values(batch.column(f"L{l}_mlp"), d)
        yield positions, CachedDecomposition(
            keys=batch.column("key").to_pylist(), labels=batch.column("label").to_numpy(),
            triggered=batch.column("triggered").to_numpy(zero_copy_only=False),
            norm=batch.column("norm").to_numpy(), embedding=_fp16_values(batch.column("embedding"), d),
            embed=_fp16_values(batch.column("embed"), d), heads=heads, mlps=mlps,
            bias=_fp16_values(batch.column("bias"), d), meta=meta)
    if rows is not None and len(rows) and (rows[-1] >= start or rows[0] < 0):
        raise UserError(f"{path}: has {start} rows, asked for row {int(rows[-1])}",
                        fix="the prototypes / split come from another evaluation set: rerun them")


def read_decomposition(path: str | Path, layers: list[int] | None = None, with_mlps: bool = True,
                       rows: np.ndarray | None = None) -> CachedDecomposition:
    """The rows ``rows`` (default: all) of a cache file in memory (memory O(len(rows))); see
    :func:`iter_decomposition`."""
    chunks = [c for _, c in iter_decomposition(path, layers, with_mlps, rows)]
    if not chunks:
        raise UserError(f"{path}: no rows", fix="rerun `decompose`")
    cat = lambda f: np.concatenate([getattr(c, f) for c in chunks])  # noqa: E731
    return CachedDecomposition(keys=[k for c in chunks for k in c.keys], labels=cat("labels"),
                               triggered=cat("triggered"), norm=cat("norm"), embedding=cat("embedding"),
                               embed=cat("embed"), heads=cat("heads"), mlps=cat("mlps"), bias=cat("bias"),
                               meta=chunks[0].meta)
