"""Webdataset shard I/O shared by the embedded world and the real-data stages.

A shard directory holds ``shard-000000.tar`` ... with samples ``{key}.png|jpg`` (RGB), ``{key}.txt``
(caption) and ``{key}.json`` (attributes; ``cls`` for labelled evaluation images), plus ``index.json``
with the sample count. Tar headers carry a fixed mtime so equal inputs give byte-identical shards.

Images are stored at the model's size (``image_size`` square), except in a folder whose ``index.json`` says
``"images": "as downloaded"`` (the ``cc3m`` stage copies the corpus' own JPEG bytes rather than re-encoding
500K images): readers bring those to the model's size on the fly -- :func:`resize_center`, CLIP's preprocessing.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image

from clipbackdoor.errors import UserError
from clipbackdoor.io import atomic_dir

SHARD_PATTERN = "shard-{:06d}.tar"
FIXED_MTIME = 0.0
AS_DOWNLOADED = "as downloaded"  # index.json "images": stored in the corpus' own encoding and size


class Encoded(NamedTuple):
    """An image kept in its own encoding (``ext`` as in the tar member name: jpg, png, webp), written unchanged."""

    ext: str
    data: bytes


def resize_center(img: Image.Image, size: int) -> np.ndarray:
    """CLIP-style preprocessing to a fixed square -> uint8 [size, size, 3]: shorter side to ``size`` (bicubic),
    centre crop."""
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) == (size, size):
        return np.asarray(img)
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def check_size(folder, key: str, width: int, height: int, image_size: int | None) -> None:
    """Refuse an image held to size (not "as downloaded") whose size is not the model's, naming it."""
    if image_size is not None and (width, height) != (image_size, image_size):
        raise UserError(f"{folder}: sample {key!r} is {width}x{height}, expected {image_size}x{image_size}",
                        fix="regenerate the data with data.image_size matching the model")


def stored_as_downloaded(shard_dir: str | Path) -> bool:
    """Whether a shard folder keeps its images as downloaded (any size; readers resize them), per index.json."""
    index = Path(shard_dir) / "index.json"
    if not index.is_file():
        return False
    from clipbackdoor.io import read_json

    info = read_json(index, "the stage that wrote the shards")
    return isinstance(info, dict) and info.get("images") == AS_DOWNLOADED


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_shards(out_dir: str | Path, samples: Iterable[tuple[str, np.ndarray | Encoded, str, dict]],
                 shard_size: int, as_downloaded: bool = False) -> int:
    """Write (key, image, caption, meta) samples as tar shards, atomically. Returns count. An image is uint8
    [H,W,3] (stored as PNG) or :class:`Encoded` (stored unchanged); ``as_downloaded`` marks the folder's images as
    any size, brought to the model's size by the readers."""
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
            ext, data = (image.ext, image.data) if isinstance(image, Encoded) else ("png", encode_png(image))
            writer.write({"__key__": key, ext: data, "txt": caption, "json": json.dumps(meta, sort_keys=True)})
            count += 1
        if writer is not None:
            writer.close()
        info = {"n_samples": count, "shard_size": shard_size, **({"images": AS_DOWNLOADED} if as_downloaded else {})}
        (tmp / "index.json").write_text(json.dumps(info) + "\n")
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


def _decode_image(data: bytes, key: str, shard: Path, resize_to: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] of an image member (``resize_to``: brought to that square by :func:`resize_center`)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB")) if resize_to is None else resize_center(im, resize_to)
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


def _shard_samples(shard: Path, seen: set[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) of one tar shard, one sample in memory at a time (a sample's files are adjacent,
    as webdataset writes them). A key whose member repeats, or that an earlier sample or shard already had, is
    refused: the later copy would silently win."""
    key, parts = None, {}
    seen_here: set[str] = set()
    try:
        with tarfile.open(shard, "r|*") as tar:  # stream mode (any compression): read front to back, once
            for member in tar:
                if not member.isfile():
                    continue
                name_key, _, ext = member.name.partition(".")
                if name_key != key:
                    if key is not None:
                        yield key, parts
                    if name_key in seen_here:  # the key came back after other samples of this shard
                        raise UserError(f"{shard}: sample key {name_key!r} appears twice ({member.name})",
                                        fix="give every sample one key (rerun the stage that wrote the shard)")
                    if name_key in seen:
                        raise UserError(f"{shard}: sample key {name_key!r} also appears in an earlier shard of "
                                        f"{shard.parent}", fix="give every sample one key (rerun the stage "
                                        "that wrote the shards)")
                    key, parts = name_key, {}
                    seen_here.add(key)
                elif ext in parts:
                    raise UserError(f"{shard}: sample key {key!r} appears twice ({member.name})",
                                    fix="give every sample one key (rerun the stage that wrote the shard)")
                parts[ext] = tar.extractfile(member).read()
    except TAR_ERRORS as exc:
        raise corrupt_tar(shard, exc) from None
    seen.update(seen_here)
    if key is not None:
        yield key, parts


def iter_shards(shard_dir: str | Path, decode: Callable[[int], bool] | None = None) -> Iterator[dict]:
    """Yield dicts with key, image (uint8 [H,W,3]), caption, meta, in shard order, streaming (memory O(sample)).
    ``decode(i)`` says whether sample i's image is wanted; ``image`` is None for the others (not decoded)."""
    seen: set[str] = set()
    i = 0
    for shard in shard_paths(shard_dir):
        for key, parts in _shard_samples(shard, seen):
            img_ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in parts), None)
            if img_ext is None or "txt" not in parts:
                raise UserError(f"{shard}: sample {key!r} lacks an image or a caption (has {sorted(parts)})",
                                fix="regenerate the shard")
            meta = _meta(parts["json"], shard, key) if "json" in parts else {}
            wanted = decode is None or decode(i)
            yield {"key": key, "image": _decode_image(parts[img_ext], key, shard) if wanted else None,
                   "caption": _text(parts["txt"], shard, key, "txt"), "meta": meta}
            i += 1


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


def _stack(shard_dir, items: list[dict], image_size: int | None) -> dict:
    """Samples -> keys (list[str]), images (uint8 tensor [B, 3, H, W]), captions, meta, labels (int64 [B], -1
    where unlabelled)."""
    images = []
    shapes = {item["image"].shape for item in items}
    if image_size is None and len(shapes) > 1:
        raise UserError(f"{shard_dir}: its images have different sizes (e.g. {sorted(shapes)[:2]}) and no image "
                        "size was given", fix="read it with the model's image size (the stages pass it)")
    resize = image_size is not None and any(s[:2] != (image_size, image_size) for s in shapes) \
        and stored_as_downloaded(shard_dir)
    for item in items:
        img = item["image"]
        if resize:
            img = resize_center(Image.fromarray(img), image_size)
        else:
            check_size(shard_dir, item["key"], img.shape[1], img.shape[0], image_size)
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    metas = [item["meta"] for item in items]
    return {"keys": [item["key"] for item in items],
            "images": torch.stack(images) if images else torch.zeros((0, 3, image_size or 0, image_size or 0),
                                                                    dtype=torch.uint8),
            "captions": [item["caption"] for item in items], "meta": metas,
            "labels": torch.tensor([int(m.get("cls", -1)) for m in metas], dtype=torch.long)}


def iter_batches(shard_dir: str | Path, batch_size: int, image_size: int | None = None) -> Iterator[dict]:
    """A split as consecutive batches of ``batch_size`` samples (the last may be shorter), memory O(batch): each
    batch is a dict as :func:`load_split` returns, plus ``start``, the index of its first sample."""
    items: list[dict] = []
    start = 0
    for item in iter_shards(shard_dir):
        items.append(item)
        if len(items) == batch_size:
            yield {**_stack(shard_dir, items, image_size), "start": start}
            start += len(items)
            items = []
    if items:
        yield {**_stack(shard_dir, items, image_size), "start": start}


def load_rows(shard_dir: str | Path, index, image_size: int | None = None) -> dict:
    """Only the samples at ``index`` (sorted, unique sample positions in the split), as :func:`load_split`
    returns them: the others are streamed past without decoding their images (memory O(len(index)))."""
    index = np.asarray(index, dtype=np.int64).reshape(-1)
    if len(index) and (index[0] < 0 or (np.diff(index) <= 0).any()):
        raise ValueError("index must be sorted, unique and non-negative")
    wanted = set(index.tolist())
    items = [item for item in iter_shards(shard_dir, decode=wanted.__contains__) if item["image"] is not None]
    if len(items) != len(wanted):
        raise UserError(f"{shard_dir}: holds fewer samples than the index asks for (largest {max(wanted)})",
                        fix="the prototypes / split were made from another version of this set: rerun them")
    return _stack(shard_dir, items, image_size)


def count_samples(shard_dir: str | Path) -> int:
    """Number of samples of a shard folder: its ``index.json`` when it has one, else counted by streaming keys."""
    index = Path(shard_dir) / "index.json"
    if index.is_file():
        from clipbackdoor.io import read_json

        n = read_json(index, "the stage that wrote the shards").get("n_samples")
        if isinstance(n, int) and n >= 0:
            return n
    return sum(1 for _ in iter_shards(shard_dir, decode=lambda i: False))


def load_split(shard_dir: str | Path, image_size: int | None = None, limit: int | None = None) -> dict:
    """Load a whole (small) split, or its first ``limit`` samples, into memory (see :func:`_stack`). A poison
    overlay (:mod:`clipbackdoor.data.pairs`) comes merged with its base (keys, images, captions; no per-sample meta)."""
    if (Path(shard_dir) / "overlay.json").is_file():
        from clipbackdoor.data.pairs import ShardPairs

        pairs = ShardPairs(shard_dir, image_size, limit)
        n = len(pairs)
        return {"keys": pairs.keys, "images": pairs[:], "captions": pairs.captions, "meta": [{} for _ in range(n)],
                "labels": torch.full((n,), -1, dtype=torch.long)}
    items = []
    for item in iter_shards(shard_dir):
        if limit is not None and len(items) == limit:
            break
        items.append(item)
    return _stack(shard_dir, items, image_size)
