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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbackdoor.decompose import Decomposition, component_names
from clipbackdoor.errors import UserError
from clipbackdoor.io import read_parquet, write_parquet

SCHEMA_VERSION = "1"
ROW_GROUP_SIZE = 1024


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


def write_decomposition(path: str | Path, keys: list[str], labels: np.ndarray, triggered: bool,
                        decomp: Decomposition, meta: dict) -> None:
    n, n_layers, n_heads, d = decomp.heads.shape
    cols = {"key": pa.array(keys, pa.string()), "label": pa.array(np.asarray(labels, np.int32)),
            "triggered": pa.array(np.full(n, triggered)), "norm": pa.array(decomp.norm.numpy().astype(np.float32))}
    cols["embedding"] = _fp16_column(decomp.embedding.numpy())
    cols["embed"] = _fp16_column(decomp.embed.numpy())
    heads = decomp.heads.numpy()
    for l in range(n_layers):
        for h in range(n_heads):
            cols[f"L{l}H{h}"] = _fp16_column(heads[:, l, h])
    for l in range(n_layers):
        cols[f"L{l}_mlp"] = _fp16_column(decomp.mlps[:, l].numpy())
    cols["bias"] = _fp16_column(decomp.bias.numpy())
    full_meta = {**{k: str(v) for k, v in meta.items()}, "schema_version": SCHEMA_VERSION,
                 "n_layers": str(n_layers), "n_heads": str(n_heads), "dim": str(d), "dtype": "float16"}
    table = pa.table(cols).replace_schema_metadata({k: v.encode() for k, v in full_meta.items()})
    # no compression (fp16 noise does not compress) and no min/max statistics on the binary component
    # columns (they would add two values per column chunk and are never used for filtering); each column's
    # sha256 goes into the metadata, so a reader refuses bytes changed after writing
    write_parquet(path, table, row_group_size=ROW_GROUP_SIZE, compression="none", use_dictionary=False,
                  write_statistics=["key", "label", "triggered", "norm"])


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


def read_decomposition(path: str | Path, layers: list[int] | None = None, with_mlps: bool = True) -> CachedDecomposition:
    """Read a cache file; ``layers`` restricts which layers' heads are loaded (column projection)."""
    meta = read_meta(path)
    n_layers, n_heads, d = int(meta["n_layers"]), int(meta["n_heads"]), int(meta["dim"])
    layers = list(range(n_layers)) if layers is None else [l % n_layers for l in layers]
    head_cols = [f"L{l}H{h}" for l in layers for h in range(n_heads)]
    mlp_cols = [f"L{l}_mlp" for l in range(n_layers)] if with_mlps else []
    columns = ["key", "label", "triggered", "norm", "embedding", "embed", "bias", *head_cols, *mlp_cols]
    expected = set(component_names(n_layers, n_heads)) | {"key", "label", "triggered", "norm", "embedding"}
    if set(pq.read_schema(path).names) != expected:
        raise UserError(f"{path}: columns do not match the recorded shape ({n_layers} layers x {n_heads} heads)",
                        fix="the cache is from another model or was edited: rerun `decompose`")
    table = read_parquet(path, columns, made_by="the `decompose` stage")
    for name in ("embedding", *head_cols):
        if table.schema.field(name).type != pa.binary(2 * d):
            raise UserError(f"{path}: column {name} is not {d} float16 values", fix="rerun `decompose`")
    n = table.num_rows
    heads = np.zeros((n, n_layers, n_heads, d), np.float32)
    for l in layers:
        for h in range(n_heads):
            heads[:, l, h] = _fp16_values(table[f"L{l}H{h}"], d)
    mlps = np.zeros((n, n_layers, d), np.float32)
    for l in range(n_layers if with_mlps else 0):
        mlps[:, l] = _fp16_values(table[f"L{l}_mlp"], d)
    return CachedDecomposition(
        keys=table["key"].to_pylist(), labels=table["label"].to_numpy(), triggered=table["triggered"].to_numpy(),
        norm=table["norm"].to_numpy(), embedding=_fp16_values(table["embedding"], d),
        embed=_fp16_values(table["embed"], d), heads=heads, mlps=mlps, bias=_fp16_values(table["bias"], d),
        meta=meta)
