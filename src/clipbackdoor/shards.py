"""Webdataset shard I/O shared by the embedded world and the real-data stages.

A shard directory holds ``shard-000000.tar`` ... with samples ``{key}.png|jpg`` (RGB), ``{key}.txt``
(caption) and ``{key}.json`` (attributes; ``cls`` for labelled evaluation images), plus ``index.json``
with the sample count. Tar headers carry a fixed mtime so equal inputs give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from clipbackdoor.errors import UserError
from clipbackdoor.io import atomic_dir

SHARD_PATTERN = "shard-{:06d}.tar"
FIXED_MTIME = 0.0


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_shards(out_dir: str | Path, samples: Iterable[tuple[str, np.ndarray, str, dict]], shard_size: int) -> int:
    """Write (key, image uint8 [H,W,3], caption, meta) samples as tar shards, atomically. Returns count."""
    import webdataset as wds

    count = 0
    with atomic_dir(out_dir) as tmp:
        writer = None
        for key, image, caption, meta in samples:
            if count % shard_size == 0:
                if writer is not None:
                    writer.close()
                writer = wds.TarWriter(str(tmp / SHARD_PATTERN.format(count // shard_size)), mtime=FIXED_MTIME,
                                       user="clipbackdoor", group="clipbackdoor")
            writer.write({"__key__": key, "png": encode_png(image), "txt": caption,
                          "json": json.dumps(meta, sort_keys=True)})
            count += 1
        if writer is not None:
            writer.close()
        (tmp / "index.json").write_text(json.dumps({"n_samples": count, "shard_size": shard_size}) + "\n")
    return count


def shard_paths(shard_dir: str | Path) -> list[Path]:
    shard_dir = Path(shard_dir)
    if not shard_dir.is_dir():
        raise UserError(f"{shard_dir}: dataset folder not found", fix="run the pipeline stage that creates it "
                        "(snakemake) or `dvc pull` it")
    paths = sorted(shard_dir.glob("*.tar"))
    if not paths:
        raise UserError(f"{shard_dir}: no .tar shards in the folder", fix="rerun the stage that writes it")
    return paths


def _decode_image(data: bytes, key: str, shard: Path) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises many types for corrupt data
        raise UserError(f"{shard}: image of sample {key!r} cannot be decoded ({exc.__class__.__name__})",
                        fix="regenerate the shard (rerun its stage) or remove the sample") from None


TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)  # what a truncated or damaged tar raises


def corrupt_tar(shard: Path, exc: BaseException) -> UserError:
    """The one-line refusal of a shard that cannot be read as a tar (the exception's text folded into it)."""
    reason = " ".join(str(exc).split())[:120]
    return UserError(f"{shard}: truncated or corrupt tar shard ({type(exc).__name__}: {reason})",
                     fix="delete the shard folder and rerun its stage, or `dvc pull` it again")


def _text(data: bytes, shard: Path, key: str, ext: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{shard}: sample {key!r}: {ext} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                        f"{exc.start})", fix="regenerate the shard (rerun its stage) or remove the sample") from None


def _meta(data: bytes, shard: Path, key: str) -> dict:
    try:
        meta = json.loads(_text(data, shard, key, "json"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{shard}: sample {key!r}: json is not valid JSON ({exc.msg} at line {exc.lineno})",
                        fix="regenerate the shard (rerun its stage) or remove the sample") from None
    if not isinstance(meta, dict):
        raise UserError(f"{shard}: sample {key!r}: json holds a {type(meta).__name__}, not an object",
                        fix="regenerate the shard (rerun its stage) or remove the sample")
    return meta


def _shard_members(shard: Path, seen: set[str]) -> tuple[list[str], dict[str, dict[str, bytes]]]:
    """(keys in order, {key: {ext: bytes}}) of one tar shard. A key whose member repeats, or that an earlier
    shard of the folder already had, is refused: the later copy would silently win."""
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(shard, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if key not in groups:
                    if key in seen:
                        raise UserError(f"{shard}: sample key {key!r} also appears in an earlier shard of "
                                        f"{shard.parent}", fix="give every sample one key (rerun the stage "
                                        "that wrote the shards)")
                    groups[key] = {}
                    order.append(key)
                elif ext in groups[key]:
                    raise UserError(f"{shard}: sample key {key!r} appears twice ({member.name})",
                                    fix="give every sample one key (rerun the stage that wrote the shard)")
                groups[key][ext] = tar.extractfile(member).read()
    except TAR_ERRORS as exc:
        raise corrupt_tar(shard, exc) from None
    seen.update(order)
    return order, groups


def iter_shards(shard_dir: str | Path) -> Iterator[dict]:
    """Yield dicts with key, image (uint8 [H,W,3]), caption, meta, in shard order."""
    seen: set[str] = set()
    for shard in shard_paths(shard_dir):
        order, groups = _shard_members(shard, seen)
        for key in order:
            parts = groups[key]
            img_ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in parts), None)
            if img_ext is None or "txt" not in parts:
                raise UserError(f"{shard}: sample {key!r} lacks an image or a caption (has {sorted(parts)})",
                                fix="regenerate the shard")
            meta = _meta(parts["json"], shard, key) if "json" in parts else {}
            yield {"key": key, "image": _decode_image(parts[img_ext], key, shard),
                   "caption": _text(parts["txt"], shard, key, "txt"), "meta": meta}


def read_captions(shard_dir: str | Path) -> list[str]:
    """Every caption of a shard folder, in shard order, reading only the ``.txt`` members (no image is decoded:
    the B² audit's vocabulary of a 500K-pair corpus)."""
    captions = []
    for shard in shard_paths(shard_dir):
        try:
            with tarfile.open(shard, "r") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".txt"):
                        key = member.name.partition(".")[0]
                        captions.append(_text(tar.extractfile(member).read(), shard, key, "txt"))
        except TAR_ERRORS as exc:
            raise corrupt_tar(shard, exc) from None
    return captions


def load_split(shard_dir: str | Path, image_size: int | None = None, limit: int | None = None) -> dict:
    """Load a whole (small) split, or its first ``limit`` samples, into memory.

    Returns keys (list[str]), images (uint8 tensor [N, 3, H, W]), captions (list[str]), meta (list[dict]),
    labels (int64 tensor [N], -1 where unlabelled)."""
    keys, images, captions, metas = [], [], [], []
    for item in iter_shards(shard_dir):
        if limit is not None and len(keys) == limit:
            break
        img = item["image"]
        if image_size is not None and img.shape[:2] != (image_size, image_size):
            raise UserError(f"{shard_dir}: sample {item['key']!r} is {img.shape[1]}x{img.shape[0]}, "
                            f"expected {image_size}x{image_size}",
                            fix="regenerate the data with data.image_size matching the model")
        keys.append(item["key"])
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        captions.append(item["caption"])
        metas.append(item["meta"])
    labels = torch.tensor([int(m.get("cls", -1)) for m in metas], dtype=torch.long)
    return {"keys": keys, "images": torch.stack(images), "captions": captions, "meta": metas, "labels": labels}
