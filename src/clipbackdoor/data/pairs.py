"""Image-caption pairs for training, read by random access from tar shards (memory O(batch), not O(dataset)).

:class:`ShardPairs` indexes a shard folder once -- for each sample its shard, the byte offset and size of its
image member, and its caption -- and decodes images only when a batch asks for them (``pairs[idx]``, in the
training loop's DataLoader workers). Captions, keys and the index stay in memory: O(N) small values, not images.

A **poison overlay** is a shard folder holding only the pairs a poisoning stage changed, plus ``overlay.json``
naming its base folder (relative to the overlay) and the keys it replaces. Opening an overlay merges it with its
base by key: the base's order, the overlay's image and caption wherever it has the key. So poisoning writes
O(poisoned pairs), not a re-encoded copy of the corpus.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipbackdoor.errors import UserError
from clipbackdoor.io import read_json
from clipbackdoor.data.shards import (TAR_ERRORS, _decode_image, _text, check_size, corrupt_tar, shard_paths,
                                 stored_as_downloaded)

OVERLAY_FILE = "overlay.json"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def _index_shards(folder: Path) -> tuple[list[Path], list[str], list[tuple[int, int, int]], list[str]]:
    """(shard files, keys, (file number, image offset, image size) per key, captions) of a shard folder, in shard
    order, reading tar headers and the small ``.txt`` members only."""
    files = shard_paths(folder)
    keys, where, captions = [], [], []
    seen: set[str] = set()
    for f_id, shard in enumerate(files):
        parts: dict[str, dict[str, tarfile.TarInfo]] = {}
        order: list[str] = []
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    if key not in parts:
                        if key in seen:
                            raise UserError(f"{shard}: sample key {key!r} also appears in an earlier shard of "
                                            f"{folder}", fix="give every sample one key (rerun the stage that "
                                            "wrote the shards)")
                        parts[key] = {}
                        order.append(key)
                    elif ext in parts[key]:
                        raise UserError(f"{shard}: sample key {key!r} appears twice ({member.name})",
                                        fix="give every sample one key (rerun the stage that wrote the shard)")
                    parts[key][ext] = member
                for key in order:
                    img_ext = next((e for e in IMAGE_EXTS if e in parts[key]), None)
                    if img_ext is None or "txt" not in parts[key]:
                        raise UserError(f"{shard}: sample {key!r} lacks an image or a caption (has "
                                        f"{sorted(parts[key])})", fix="regenerate the shard")
                    captions.append(_text(tar.extractfile(parts[key]["txt"]).read(), shard, key, "txt"))
                    image = parts[key][img_ext]
                    keys.append(key)
                    where.append((f_id, image.offset_data, image.size))
        except TAR_ERRORS as exc:
            raise corrupt_tar(shard, exc) from None
        seen.update(order)
    return files, keys, where, captions


class ShardPairs:
    """``len(pairs)``; ``pairs[idx]`` (int tensor / array / slice) -> uint8 images [B, 3, H, W]; ``keys`` and
    ``captions`` in order. ``limit`` keeps the first pairs only (a stage's ``n_pairs``)."""

    def __init__(self, folder: str | Path, image_size: int | None = None, limit: int | None = None):
        self.folder, self.image_size = Path(folder), image_size
        overlay = self.folder / OVERLAY_FILE
        self.overlay: dict | None = None
        if overlay.is_file():
            self.overlay = read_json(overlay, "the poison stage")
            rel = self.overlay.get("base") if isinstance(self.overlay, dict) else None
            if not isinstance(rel, str) or not isinstance(self.overlay.get("keys"), list) or rel in ("", "."):
                raise UserError(f"{overlay}: not an overlay description (needs a base folder and a list of keys)",
                                fix="rerun the poison stage that wrote it")
            base = self.folder / rel
            if not base.is_dir():
                raise UserError(f"{self.folder}: the base folder of this overlay, {base}, does not exist",
                                fix="run (or `dvc pull`) the stage that writes it, then rerun the poison stage")
            if (base / OVERLAY_FILE).is_file():
                raise UserError(f"{self.folder}: its base {base} is itself an overlay",
                                fix="poison the clean pairs (the rule's --finetune-dir)")
            files, keys, where, captions = _index_shards(base)
            o_files, o_keys, o_where, o_captions = _index_shards(self.folder)
            listed = list(self.overlay.get("keys", []))
            if sorted(o_keys) != sorted(listed):
                missing = sorted(set(listed) - set(o_keys)) or sorted(set(o_keys) - set(listed))
                raise UserError(f"{self.folder}: overlay shards and {OVERLAY_FILE} disagree on the replaced keys "
                                f"(e.g. {missing[0]!r})", fix="rerun the poison stage that wrote the overlay")
            position = {k: i for i, k in enumerate(keys)}
            absent = [k for k in o_keys if k not in position]
            if absent:
                raise UserError(f"{self.folder}: overlay key {absent[0]!r} is not in its base {base}",
                                fix="the base folder changed after poisoning: rerun the poison stage")
            offset = n_base = len(files)
            files = files + o_files
            for k, (f_id, off, size), cap in zip(o_keys, o_where, o_captions):
                i = position[k]
                where[i], captions[i] = (f_id + offset, off, size), cap
        else:
            base = self.folder
            files, keys, where, captions = _index_shards(self.folder)
            n_base = len(files)
        # images the base keeps as downloaded (the cc3m stage) are resized to the model's size here, in the loader
        # workers; an overlay's own images were written at the model's size and stay held to it (a stale overlay
        # is refused, not rescaled)
        self.resize_files = n_base if stored_as_downloaded(base) else 0  # files [0, resize_files) are the base's
        if self.resize_files and image_size is None:
            raise UserError(f"{base}: its images are kept as downloaded (any size) and no image size was given",
                            fix="read it with the model's image size (the stages pass it)")
        if limit is not None:
            keys, where, captions = keys[:limit], where[:limit], captions[:limit]
        self.files = files
        self.keys, self.captions = keys, captions
        self.where = np.asarray(where, dtype=np.int64).reshape(-1, 3)  # [N, (file, offset, size)]
        self._fds: dict[int, int] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """[N, 3, H, W] as the images will be decoded (H = W = ``image_size``)."""
        return (len(self), 3, self.image_size or 0, self.image_size or 0)

    def _fd(self, f_id: int) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker: close the inherited copies, open its own
            for fd in self._fds.values():
                os.close(fd)
            self._fds, self._pid = {}, os.getpid()
        if f_id not in self._fds:
            self._fds[f_id] = os.open(self.files[f_id], os.O_RDONLY)
        return self._fds[f_id]

    def _decode(self, i: int) -> np.ndarray:
        """uint8 [H, W, 3] of pair i (resized when its folder keeps images as downloaded)."""
        f_id, offset, size = (int(v) for v in self.where[i])
        arr = _decode_image(os.pread(self._fd(f_id), size, offset), self.keys[i], self.files[f_id],
                            self.image_size if f_id < self.resize_files else None)
        check_size(self.folder, self.keys[i], arr.shape[1], arr.shape[0], self.image_size)
        return arr

    def image(self, i: int) -> torch.Tensor:
        """uint8 [3, H, W] of pair i, decoded from its shard."""
        return torch.from_numpy(self._decode(i).copy()).permute(2, 0, 1)

    def _positions(self, idx) -> list[int]:
        """Positions from a slice, a sequence / array / tensor of ints, or a boolean mask over the pairs."""
        if isinstance(idx, slice):
            return list(range(*idx.indices(len(self))))
        arr = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx)
        if arr.dtype == bool:
            if arr.shape != (len(self),):
                raise IndexError(f"a boolean mask of {arr.shape} over {len(self)} pairs")
            return np.flatnonzero(arr).tolist()
        return [int(i) for i in arr.reshape(-1)]

    def __getitem__(self, idx) -> torch.Tensor:
        idx = self._positions(idx)
        if self.image_size is None:
            if not idx:
                return torch.zeros((0, 3, 0, 0), dtype=torch.uint8)
            return torch.stack([self.image(i) for i in idx])
        # decoded straight into one [B, H, W, 3] array, then one transposing copy (per-image copies, permutes and a
        # stack made the batch cost a third more than its decoding)
        size = self.image_size
        batch = np.empty((len(idx), size, size, 3), dtype=np.uint8)
        for j, i in enumerate(idx):
            batch[j] = self._decode(i)
        return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()

    def select(self, index) -> "ShardPairs":
        """The pairs at ``index`` (positions, in that order) as a view over the same shards: nothing is decoded,
        so a stage can hand "the non-target images" of 500K pairs to a per-step sampler."""
        index = np.asarray(self._positions(index), dtype=np.int64)
        view = copy.copy(self)
        view.keys, view.captions = [self.keys[i] for i in index], [self.captions[i] for i in index]
        view.where, view._fds, view._pid = self.where[index], {}, None
        return view

    def digest(self) -> str:
        """Content hash of the pairs as training sees them (index, captions and every image member's bytes read
        by streaming): a checkpoint is never resumed on other data. Each image's header is parsed on the way (not
        decoded), so an unreadable or wrongly sized image stops the stage before training, not hours into it."""
        h = hashlib.sha256()
        for i, (key, (f_id, offset, size), caption) in enumerate(zip(self.keys, self.where.tolist(), self.captions)):
            data = os.pread(self._fd(f_id), size, offset)
            h.update(f"{key}\0{caption}\0{size}\0".encode())
            h.update(data)
            try:
                with Image.open(io.BytesIO(data)) as im:
                    width, height = im.size
            except Exception as exc:  # PIL raises many types for corrupt data
                raise UserError(f"{self.files[f_id]}: image of sample {key!r} cannot be read "
                                f"({exc.__class__.__name__})", fix="regenerate the shard (rerun its stage)") from None
            if f_id >= self.resize_files:  # (images kept as downloaded are resized by the readers)
                check_size(self.folder, key, width, height, self.image_size)
        return h.hexdigest()[:16]

    def __getstate__(self):  # DataLoader workers (spawn) get the index, not the parent's descriptors
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)


def write_overlay(out_dir: str | Path, base_dir: str | Path, samples, shard_size: int = 4096) -> int:
    """The poison stage's output: shards of the changed samples ((key, image uint8 [H,W,3], caption, meta)) and
    ``overlay.json`` naming the base folder (relative) and the replaced keys. Returns the number written."""
    from clipbackdoor.io import atomic_dir
    from clipbackdoor.data.shards import write_shards

    samples = list(samples)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_shards(tmp / "shards", iter(samples), shard_size)
        for f in (tmp / "shards").glob("*.tar"):  # (not write_shards' index.json: its count is the overlay's)
            os.replace(f, tmp / f.name)
        (tmp / "shards" / "index.json").unlink()
        (tmp / "shards").rmdir()
        rel = os.path.relpath(os.path.abspath(base_dir), os.path.abspath(out_dir))  # symlinks kept: same on every machine
        import json

        (tmp / OVERLAY_FILE).write_text(json.dumps({"base": rel, "keys": [s[0] for s in samples]}, indent=1,
                                                   sort_keys=True) + "\n")
    return len(samples)
