"""Real datasets: CC3M-style webdataset shards and ImageFolder evaluation sets (ImageNet-1K val,
Caltech-101, Oxford Pets). Each is turned into the same shard layout the embedded world writes, so every
later stage reads one format. They cannot be downloaded from this machine; the stages check what they
find and say exactly what to fetch and where to put it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from clipbackdoor.config import EvalSetConfig, Params, WebdatasetConfig
from clipbackdoor.errors import UserError
from clipbackdoor.io import write_json
from clipbackdoor.data.shards import Encoded, resize_center, write_shards

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG"}

DOWNLOAD_HINTS = {
    "imagenet": "ImageNet-1K val from image-net.org, arranged as ROOT/<wnid>/*.JPEG (1000 folders)",
    "caltech101": "Caltech-101 from data.caltech.edu, arranged as ROOT/<category>/*.jpg",
    "pets": "Oxford-IIIT Pets from robots.ox.ac.uk/~vgg/data/pets, arranged as ROOT/<breed>/*.jpg",
}


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1K WordNet ids in their sorted (class index) order, from timm's package data (timm is
    an open_clip dependency; it is read as a file, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("timm")
    path = Path(spec.submodule_search_locations[0]) / "data" / "_info" / "imagenet_synsets.txt" if spec else None
    if path is None or not path.exists():
        raise UserError("the ImageNet-1K synset list (timm/data/_info/imagenet_synsets.txt) is not installed",
                        fix="pip install timm (an open_clip dependency), or give classnames as a text file")
    return path.read_text().split()


def imagenet_classnames(root: Path, folders: list[str]) -> list[str]:
    """open_clip's ImageNet class names of ``folders`` (WordNet ids such as n07753592 -> banana). A subset of
    the 1,000 folders is allowed (a rehearsal, or a class-restricted study); an unknown folder is an error."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise UserError(f"{root}: folder {unknown[0]!r} is not an ImageNet-1K WordNet id ({len(unknown)} such)",
                        fix="point root at the val set arranged as ROOT/<wnid>/*.JPEG (e.g. n01440764/)")
    return [IMAGENET_CLASSNAMES[index[f]] for f in folders]


def imagefolder_classes(root: Path, classnames: str) -> tuple[list[str], list[str]]:
    """(folder names in sorted order, human-readable class names)."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classnames == "folders":
        names = [f.replace("_", " ") for f in folders]
    elif classnames == "imagenet":
        names = imagenet_classnames(root, folders)
    else:
        path = Path(classnames)
        if not path.exists():
            raise UserError(f"classnames file {path} not found", fix="give 'folders', 'imagenet' or a text file")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) != len(folders):
            raise UserError(f"{path}: {len(names)} names for {len(folders)} class folders in {root}",
                            fix="one name per line, in sorted folder order")
    return folders, names


def convert_imagefolder(name: str, cfg: EvalSetConfig, image_size: int, out_dir: str | Path, seed: int,
                        templates: list[str]) -> int:
    """Stage ``eval_data``: ImageFolder root -> labelled eval shards + classes.json."""
    root = Path(cfg.root)
    hint = DOWNLOAD_HINTS.get(name, "an ImageFolder-style copy: ROOT/<class>/<image>")
    if not root.is_dir():
        raise UserError(f"eval set {name!r}: folder {root} does not exist (datasets cannot be downloaded here)",
                        fix=f"download {hint}, then set data.eval_sets.{name}.root")
    folders, names = imagefolder_classes(root, cfg.classnames)
    files = [(f, label) for label, folder in enumerate(folders)
             for f in sorted((root / folder).iterdir()) if f.suffix in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"eval set {name!r}: no images under {root}", fix=f"expected {hint}")
    if cfg.max_images is not None and len(files) > cfg.max_images:
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.choice(len(files), cfg.max_images, replace=False))]

    def samples() -> Iterator:
        for i, (path, label) in enumerate(files):
            try:
                with Image.open(path) as im:
                    arr = resize_center(im, image_size)
            except Exception as exc:
                raise UserError(f"{path}: unreadable image ({exc.__class__.__name__})",
                                fix="remove or replace the file") from None
            yield f"{name}-{i:07d}", arr, f"a photo of a {names[label]}.", {"cls": label, "source": str(path)}

    count = write_shards(out_dir, samples(), shard_size=4096)
    write_json(Path(out_dir) / "classes.json", {"classnames": names, "templates": templates})
    return count


def convert_webdataset(cfg: WebdatasetConfig, out_dir: str | Path) -> int:
    """Stage ``cc3m``: the first ``n_pairs`` (image, caption) pairs of CC3M-style shards -> our layout, images
    kept in their downloaded encoding and size (readers bring them to the model's size, so a change of
    ``data.image_size`` does not copy the corpus again)."""
    import webdataset as wds

    pattern = cfg.urls
    is_remote = "://" in pattern
    if not is_remote:
        import braceexpand

        missing = [p for p in braceexpand.braceexpand(pattern) if not Path(p).exists()]
        if missing:
            raise UserError(f"data.webdataset.urls: {len(missing)} shard(s) missing, first {missing[0]}",
                            fix="download CC3M as webdataset shards (e.g. with img2dataset) to that path")
    dataset = wds.WebDataset(pattern, shardshuffle=False, handler=wds.reraise_exception)

    def sample(item: dict, n: int) -> tuple:
        """One img2dataset sample -> our layout; a sample that cannot be read names its shard and key."""
        where = f"{item.get('__url__', pattern)}: sample {item['__key__']!r}"
        ext = next(k for k in ("jpg", "jpeg", "png", "webp") if k in item)
        try:
            caption = item["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise UserError(f"{where}: caption is not UTF-8 (offset {exc.start})",
                            fix="re-download the shard, or remove the sample") from None
        try:  # decoded once to catch a truncated download here (~0.4 ms), then kept as downloaded: the readers
            # decode (and resize) it again when a batch needs it
            with Image.open(io.BytesIO(item[ext])) as im:
                im.load()
                width, height = im.size
        except Exception as exc:  # PIL raises many types for corrupt data
            raise UserError(f"{where}: image cannot be read ({exc.__class__.__name__})",
                            fix="re-download the shard, or remove the sample") from None
        return (f"cc3m-{n:08d}", Encoded(ext, item[ext]), caption,
                {"source_key": item["__key__"], "width": width, "height": height})

    def samples() -> Iterator:
        n, seen = 0, set()
        try:
            for item in dataset:
                if item["__key__"] in seen:
                    raise UserError(f"{item.get('__url__', pattern)}: sample key {item['__key__']!r} appears twice",
                                    fix="the shards overlap (downloaded twice?): keep one copy of each")
                seen.add(item["__key__"])
                if not any(k in item for k in ("jpg", "jpeg", "png", "webp")) or "txt" not in item:
                    continue  # a failed download: img2dataset keeps its key without an image
                yield sample(item, n)
                n += 1
                if n == cfg.n_pairs:
                    return
        except (OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:160]
            fix = ("this machine is offline: download the shards and give a local path" if is_remote else
                   "a shard is truncated or corrupt: re-download it")
            raise UserError(f"data.webdataset.urls: cannot read {pattern} ({type(exc).__name__}: {reason})",
                            fix=fix) from None
        if n < cfg.n_pairs:
            raise UserError(f"data.webdataset.urls: only {n} pairs found, {cfg.n_pairs} requested",
                            fix="lower data.webdataset.n_pairs or add shards")

    # no re-encoding: 500K PNG encodes took ~1.1 h and 57 GB; the JPEG bytes are copied as they are
    return write_shards(Path(out_dir) / "finetune", samples(), cfg.shard_size, as_downloaded=True)


def cc3m_stage(args, p: Params) -> None:
    """CLI stage ``cc3m``."""
    print(convert_webdataset(p.data.webdataset, args.out))


def eval_data_stage(args, p: Params) -> None:
    """CLI stage ``eval-data``."""
    from clipbackdoor.models.zeroshot import templates_for

    templates = templates_for(p.zeroshot.templates, [])
    print(convert_imagefolder(args.name, p.data.eval_sets[args.name], p.data.image_size, args.out, p.seed, templates))
