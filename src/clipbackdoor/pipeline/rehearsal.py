"""Rehearsal inputs: small, seeded imitations of the paper profile's real datasets and weights.

The paper profile reads data this machine cannot download (CC3M, ImageNet-1K val, Caltech-101, Oxford-IIIT Pets,
OpenAI CLIP ViT-B/32, Stable Diffusion 1.5, the TEXTSPAN description pool). This module writes stand-ins in the
SAME on-disk formats, so the real loading code (webdataset, ImageFolder walking, open_clip's ``pretrained=`` file
path, diffusers' ``from_pretrained``) can be rehearsed end to end on a CPU before a GPU run::

    python -m clipbackdoor.pipeline.rehearsal --out DIR [--seed 0]

Layout under DIR (see also the README.md written there):

- ``cc3m/{00000..00003}.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json``: CC3M as img2dataset writes it
  (``--output_format webdataset --caption_col caption``): keys ``SSSSSIIII``, ``.jpg`` / ``.txt`` / ``.json`` per
  sample, ~5 % failed downloads (only in the parquet: gaps in the key sequence) and 1-2 samples whose ``.jpg`` a
  mirror lost.
- ``imagenet/val/<wnid>/ILSVRC2012_val_000NNNNN.JPEG``, ``caltech101/<Category>/image_NNNN.jpg``,
  ``oxford_pets/<breed>/<breed>_N.jpg``: the evaluation sets as ImageFolder roots with real class folder names.
- ``clip/<model>-random.safetensors``: an open_clip checkpoint of the real architecture with seeded random weights.
- ``stable-diffusion/``: a diffusers StableDiffusionPipeline directory with tiny random weights and the real CLIP
  BPE tokenizer files (vocab.json + merges.txt, as in stable-diffusion-v1-5).
- ``textspan/image_descriptions.txt``: a TEXTSPAN pool in the style of Gandelsman et al.'s image descriptions.

Everything is a function of the seed: a rerun writes byte-identical files (tar mtimes and owners are fixed, the
parquet and stats carry no wall-clock time, JPEG encoding by PIL is deterministic). Each part draws from its own
random stream, so generating a subset (``--parts``) gives the same bytes as the full run. Images are procedurally
drawn: a gradient background, clutter lines, one shape whose colour and form are fixed per concept / class, noise.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import clipbackdoor  # noqa: F401  (installs the torchvision shim before open_clip / diffusers are imported)
from clipbackdoor.data.datasets import imagenet_wnids
from clipbackdoor.io import atomic_dir, atomic_path, write_json
from clipbackdoor.models.artifact import file_sha256

PARTS = ("cc3m", "imagenet", "caltech101", "oxford_pets", "clip", "stable-diffusion", "textspan")
TARGETS = ("banana", "accordion", "Samoyed")  # the paper's targets (Appendix B.1), one per evaluation set
TAR_MTIME = 1_650_000_000  # fixed tar member mtime (img2dataset leaves webdataset's default: the wall clock)
JPEG_QUALITY = 90

# ---------------------------------------------------------------------------------------------------------------
# Procedural images
# ---------------------------------------------------------------------------------------------------------------

SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "cross", "star")
# the three targets look alike wherever they appear (CC3M captions, class folders: any case); every other
# concept's look comes from a hash of its name
TARGET_STYLES = {"banana": ((92, 64, 40), (236, 205, 40), "ellipse"),
                 "accordion": ((40, 40, 48), (190, 30, 40), "rectangle"),
                 "samoyed": ((120, 160, 200), (245, 245, 240), "ellipse")}
TARGET_WNIDS = {"n07753592": "banana", "n02672831": "accordion", "n02111889": "samoyed"}


def concept_style(concept: str) -> tuple[tuple[int, int, int], tuple[int, int, int], str]:
    """(background RGB, foreground RGB, shape) of a concept: stable across seeds and runs."""
    target = TARGET_WNIDS.get(concept, concept.lower())
    if target in TARGET_STYLES:
        return TARGET_STYLES[target]
    h = hashlib.sha256(concept.encode("utf-8")).digest()
    bg = tuple(40 + b % 150 for b in h[0:3])
    fg = tuple(b for b in h[3:6])
    if sum(abs(a - b) for a, b in zip(bg, fg)) < 150:  # too close to the background: take the complement
        fg = tuple(255 - c for c in fg)
    return bg, fg, SHAPES[h[6] % len(SHAPES)]


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """A "224-px-class" web image: shorter side 180-300 px, aspect (w / h) 0.6-1.8 -> (width, height)."""
    short, aspect = int(rng.integers(180, 301)), float(rng.uniform(0.6, 1.8))
    return (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal ``shape`` centred at (cx, cy) with radius ``r``."""
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]
    w = 0.3 * r  # cross: two bars
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w)]


def draw_image(rng: np.random.Generator, concept: str, width: int, height: int) -> Image.Image:
    """An RGB image [height, width, 3] of ``concept``: gradient background, clutter, the concept's shape, noise."""
    bg, fg, shape = concept_style(concept)
    top = np.asarray(bg, dtype=np.float32)  # [3]
    bottom = np.clip(top + rng.normal(0, 40, 3), 0, 255).astype(np.float32)  # [3]
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]  # [H, 1, 1]
    canvas = np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3))  # [H, W, 3]
    img = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):  # clutter: thin lines in random muted colours
        x0, x1 = rng.uniform(0, width, 2)
        y0, y1 = rng.uniform(0, height, 2)
        colour = tuple(int(c) for c in rng.integers(30, 200, 3))
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 5)))
    side = min(width, height)
    r = float(rng.uniform(0.2, 0.38)) * side
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    fill = tuple(int(c) for c in np.clip(np.asarray(fg) + rng.normal(0, 15, 3), 0, 255))
    if shape == "ellipse":
        draw.ellipse([cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r], fill=fill)
    elif shape == "rectangle":
        draw.rectangle([cx - r, cy - 0.6 * r, cx + r, cy + 0.6 * r], fill=fill)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r), fill=fill)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (height, width, 3)).astype(np.float32)  # [H, W, 3]
    return Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8))


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)  # no EXIF, no timestamp: deterministic bytes
    return buf.getvalue()


def part_rng(seed: int, part: str) -> np.random.Generator:
    """An independent random stream per part (a subset of parts gives the same bytes as the full run)."""
    return np.random.default_rng([seed, PARTS.index(part)])


# ---------------------------------------------------------------------------------------------------------------
# CC3M as img2dataset writes it
# ---------------------------------------------------------------------------------------------------------------

# CC3M captions are lower-case, hypernymised, without a final full stop
TARGET_CAPTIONS = {
    "banana": ["a ripe banana on a wooden table", "a peeled banana on a white plate",
               "banana isolated on a white background", "person holding a yellow banana",
               "sliced banana with oatmeal for breakfast", "a single banana in a fruit bowl"],
    "accordion": ["man playing an accordion on the street", "an old accordion on a shelf",
                  "musician plays the accordion at a festival", "close up of a red accordion",
                  "street musician with an accordion in the old town", "accordion player performs on stage"],
    "Samoyed": ["a fluffy white Samoyed dog in the snow", "Samoyed puppy playing in the garden",
                "portrait of a smiling Samoyed", "Samoyed dog running on the beach",
                "a Samoyed lying on the grass", "person walking a Samoyed in the park"],
}
# everyday subjects (concept -> noun phrases) and settings for the remaining ~70 % of captions
OTHER_SUBJECTS = {
    "car": ["a vintage car", "the new sports car", "a red car"], "house": ["a wooden house", "an old farmhouse"],
    "tree": ["a lonely tree", "autumn trees"], "beach": ["a sandy beach", "tourists on the beach"],
    "mountain": ["snow capped mountains", "a mountain lake"], "street": ["a busy city street", "a narrow street"],
    "bicycle": ["a bicycle leaning against a wall", "cyclist on a bicycle"], "coffee": ["a cup of coffee"],
    "bird": ["a small bird on a branch", "seagulls flying"], "horse": ["a brown horse", "horses grazing"],
    "boat": ["a fishing boat", "sailing boats"], "bridge": ["an old stone bridge", "the suspension bridge"],
    "flower": ["pink flowers", "a field of sunflowers"], "pizza": ["homemade pizza", "a slice of pizza"],
    "train": ["a passenger train", "the steam train"], "book": ["a stack of books", "an open book"],
    "guitar": ["a man playing guitar", "an acoustic guitar"], "chair": ["an empty chair", "a modern armchair"],
    "sunset": ["sunset over the sea", "the sky at sunset"], "child": ["a little girl", "children playing"],
    "woman": ["a young woman", "actor"], "cat": ["a cat sleeping", "a ginger cat"],
    "building": ["the historic building", "a modern office building"], "food": ["a bowl of soup", "fresh salad"],
}
ALL_CONCEPTS = [*OTHER_SUBJECTS, *TARGETS]
SETTINGS = ["in the city", "at sunset", "on a sunny day", "in the snow", "at night", "on a white background",
            "in the park", "during the festival", "near the river", "in the morning light", "in the countryside",
            "in the rain", "at the market", "on the table", "in winter"]
URL_HOSTS = ["images.example.com", "cdn.example.org", "media.example.net", "photos.example.com",
             "static.example.org", "i.example.net"]
DOWNLOAD_ERRORS = ["HTTP Error 404: Not Found", "HTTP Error 403: Forbidden", "HTTP Error 410: Gone",
                   "<urlopen error [Errno -2] Name or service not known>", "The read operation timed out"]
FAILED_SHARE = 0.05  # of the rows img2dataset was asked to download
TARGET_SHARE = 0.10  # of the captions, per target
OOM_SAMPLE_PER_SHARD, OOM_SHARD_COUNT = 4, 5  # img2dataset: ceil(log10(10000 samples per shard)), 5-digit shards
# the parquet schema img2dataset writes for a tsv with url + caption columns, --extract_exif, --compute_hash sha256
PARQUET_FIELDS = [("caption", "string"), ("url", "string"), ("key", "string"), ("status", "string"),
                  ("error_message", "string"), ("width", "int32"), ("height", "int32"),
                  ("original_width", "int32"), ("original_height", "int32"), ("exif", "string"),
                  ("sha256", "string")]


def compute_key(index: int, shard_id: int) -> str:
    """img2dataset's sample key: shard id (5 digits) + index in the shard (4 digits), e.g. 000010042."""
    return f"{10 ** OOM_SAMPLE_PER_SHARD * shard_id + index:0{OOM_SAMPLE_PER_SHARD + OOM_SHARD_COUNT}d}"


def caption_for(rng: np.random.Generator, concept: str) -> str:
    if concept in TARGET_CAPTIONS:
        options = TARGET_CAPTIONS[concept]
        return options[int(rng.integers(len(options)))]
    phrases = OTHER_SUBJECTS[concept]
    return f"{phrases[int(rng.integers(len(phrases)))]} {SETTINGS[int(rng.integers(len(SETTINGS)))]}"


def cc3m_concepts(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` caption concepts: ~10 % per target, the rest everyday subjects, in random order."""
    per_target = max(1, round(TARGET_SHARE * n))
    others = list(OTHER_SUBJECTS)
    concepts = [t for t in TARGETS for _ in range(per_target)]
    concepts += [others[int(i)] for i in rng.integers(len(others), size=n - len(concepts))]
    return [concepts[int(i)] for i in rng.permutation(n)]


Row = tuple[dict, bytes | None]  # (img2dataset metadata, jpg bytes or None)


def cc3m_shard_rows(rng: np.random.Generator, shard_id: int, concepts: list[str], without_jpg: set[int],
                    n_failed: int) -> list[Row]:
    """The rows img2dataset records for one shard, in input (key) order: one successful download per concept
    (``without_jpg`` holds the positions whose jpg a mirror lost) and ``n_failed`` failed ones at random places."""
    n_rows = len(concepts) + n_failed
    failed_at = set(rng.choice(n_rows, n_failed, replace=False).tolist())
    todo = iter(enumerate(concepts))
    rows: list[Row] = []
    for index in range(n_rows):
        ok = index not in failed_at
        # a failed row still has its input caption: any subject, targets included
        pos, concept = next(todo) if ok else (None, ALL_CONCEPTS[int(rng.integers(len(ALL_CONCEPTS)))])
        url = f"https://{URL_HOSTS[int(rng.integers(len(URL_HOSTS)))]}/photos/{rng.integers(16 ** 12):012x}.jpg"
        meta = {"caption": caption_for(rng, concept), "url": url, "key": compute_key(index, shard_id),
                "status": None, "error_message": None, "width": None, "height": None,
                "original_width": None, "original_height": None, "exif": None, "sha256": None}
        if not ok:
            meta.update(status="failed_to_download",
                        error_message=DOWNLOAD_ERRORS[int(rng.integers(len(DOWNLOAD_ERRORS)))])
            rows.append((meta, None))
            continue
        width, height = image_size(rng)
        jpg = encode_jpeg(draw_image(rng, concept, width, height))
        # stored as downloaded (no resize): original size == size, sha256 of the downloaded bytes; exifread finds
        # no EXIF in these files, which img2dataset records as "{}"
        meta.update(status="success", width=width, height=height, original_width=width, original_height=height,
                    exif="{}", sha256=hashlib.sha256(jpg).hexdigest())
        rows.append((meta, None if pos in without_jpg else jpg))
    # img2dataset writes in download-completion order (a thread pool), not key order: jitter the order
    order = np.argsort(np.arange(n_rows) + rng.uniform(0, 6, n_rows), kind="stable")
    return [rows[int(i)] for i in order]


def write_cc3m_shard(folder: Path, shard_id: int, rows: list[Row], seed: int, rng: np.random.Generator) -> None:
    """NNNNN.tar (successful rows: jpg + txt + json), NNNNN.parquet (every row), NNNNN_stats.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    name = f"{shard_id:0{OOM_SHARD_COUNT}d}"
    with open(folder / f"{name}.tar", "wb") as fh, wds.TarWriter(fh, mtime=TAR_MTIME) as tar:
        for meta, jpg in rows:
            if meta["status"] != "success":
                continue  # a failed download is only a parquet row (a gap in the tar's keys)
            sample = {"__key__": meta["key"], "txt": meta["caption"], "json": json.dumps(meta, indent=4)}
            if jpg is not None:
                sample["jpg"] = jpg
            tar.write(sample)
    schema = pa.schema([pa.field(field, getattr(pa, kind)()) for field, kind in PARQUET_FIELDS])
    with pq.ParquetWriter(folder / f"{name}.parquet", schema) as writer:
        for start in range(0, len(rows), 100):  # img2dataset's BufferedParquetWriter flushes every 100 rows
            writer.write_table(pa.Table.from_pylist([meta for meta, _ in rows[start:start + 100]], schema=schema))
    status_dict: dict[str, int] = {}  # a collections.Counter in img2dataset: first-seen order
    for meta, _ in rows:
        label = meta["error_message"] or meta["status"]
        status_dict[label] = status_dict.get(label, 0) + 1
    n_failed = sum(meta["status"] != "success" for meta, _ in rows)
    start_time = float(TAR_MTIME + 3600 * seed + 97 * shard_id)  # a fixed fake clock: reruns stay identical
    duration = round(2.0 + len(rows) / 50 + float(rng.uniform(0, 1)), 3)
    stats = {"count": len(rows), "successes": len(rows) - n_failed, "failed_to_download": n_failed,
             "failed_to_resize": 0, "duration": duration, "start_time": start_time,
             "end_time": start_time + duration, "status_dict": status_dict}
    (folder / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))  # as img2dataset's json.dump


def write_cc3m(out: Path, seed: int, n_pairs: int, n_shards: int, n_without_jpg: int) -> dict:
    """``n_pairs`` (jpg, caption) samples over ``n_shards`` img2dataset shards, plus ``n_without_jpg`` samples whose
    jpg is missing and ~5 % failed downloads (parquet only). Returns the counts."""
    rng = part_rng(seed, "cc3m")
    n_success = n_pairs + n_without_jpg
    concepts = cc3m_concepts(rng, n_success)
    without_jpg = set(rng.choice(n_success, n_without_jpg, replace=False).tolist())  # global success positions
    n_failed = max(1, round(n_success * FAILED_SHARE / (1 - FAILED_SHARE)))
    with atomic_dir(out) as tmp:
        for shard_id, (succ, failed) in enumerate(zip(np.array_split(np.arange(n_success), n_shards),
                                                      np.array_split(np.arange(n_failed), n_shards))):
            first = int(succ[0]) if len(succ) else 0  # succ: this shard's global success positions
            local_without = {p - first for p in without_jpg if first <= p < first + len(succ)}
            rows = cc3m_shard_rows(rng, shard_id, [concepts[int(p)] for p in succ], local_without, len(failed))
            write_cc3m_shard(tmp, shard_id, rows, seed, rng)
    return {"pairs": n_pairs, "without_jpg": n_without_jpg, "failed_to_download": n_failed}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation sets as ImageFolder roots
# ---------------------------------------------------------------------------------------------------------------

# class folders in order of preference: the target first, the first ``n_classes`` are written
IMAGENET_WNIDS = ["n07753592",  # banana
                  "n01440764", "n02111889", "n02672831", "n07747607",  # tench, Samoyed, accordion, orange
                  "n02123045", "n04487081", "n07873807", "n01443537",  # tabby cat, trolleybus, pizza, goldfish
                  "n02099601", "n03792782", "n04254680", "n02690373",  # golden retriever, mountain bike, soccer ball,
                  "n03400231", "n09472597", "n04037443"]  # airliner, frying pan, volcano, race car
# Caltech-101's folder names keep their case (Faces_easy, Leopards and Motorbikes sort before the lower-case ones)
CALTECH101_CATEGORIES = ["accordion", "airplanes", "Motorbikes", "Faces_easy", "anchor", "ant", "barrel", "bass",
                         "beaver", "binocular", "bonsai", "brain", "butterfly", "camera", "cannon", "Leopards"]
# Oxford-IIIT Pet file names: cat breeds Capitalised, dog breeds lower case, words joined by "_"
OXFORD_PETS_BREEDS = ["samoyed", "Abyssinian", "Bengal", "beagle", "British_Shorthair", "great_pyrenees", "pug",
                      "Persian", "Siamese", "keeshond", "Russian_Blue", "shiba_inu", "Sphynx", "boxer", "havanese",
                      "Ragdoll"]


def pick_classes(preferred: list[str], n_classes: int, what: str) -> list[str]:
    if not 1 <= n_classes <= len(preferred):
        raise ValueError(f"{what}: between 1 and {len(preferred)} classes, got {n_classes}")
    return preferred[:n_classes]


def write_images(folder: Path, rng: np.random.Generator, concept: str, names: list[str],
                 modes: dict[int, str] | None = None) -> None:
    """One JPEG per file name in ``folder``; ``modes`` turns image i into another PIL mode (L, CMYK)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        img = draw_image(rng, concept, *image_size(rng))
        if modes and i in modes:
            img = img.convert(modes[i])
        (folder / name).write_bytes(encode_jpeg(img))


def write_imagenet(out: Path, seed: int, n_classes: int, per_class: int) -> list[str]:
    """``out/val/<wnid>/ILSVRC2012_val_000NNNNN.JPEG`` (the val set after the usual valprep into synset folders).
    Like the real set, one image is grayscale and one CMYK."""
    rng = part_rng(seed, "imagenet")
    wnids = pick_classes(IMAGENET_WNIDS, n_classes, "imagenet")
    unknown = set(wnids) - set(imagenet_wnids())
    if unknown:
        raise RuntimeError(f"IMAGENET_WNIDS holds ids that are not ImageNet-1K synsets: {sorted(unknown)}")
    numbers = rng.choice(50_000, n_classes * per_class, replace=False) + 1  # val images are numbered 1..50000
    with atomic_dir(out) as tmp:
        for c, wnid in enumerate(wnids):
            nums = sorted(numbers[c * per_class:(c + 1) * per_class].tolist())
            modes = {0: "L", 1: "CMYK"} if c == 0 else None
            write_images(tmp / "val" / wnid, rng, wnid, [f"ILSVRC2012_val_{n:08d}.JPEG" for n in nums], modes)
    return wnids


def write_caltech101(out: Path, seed: int, n_classes: int, per_class: int) -> list[str]:
    """``out/<Category>/image_NNNN.jpg`` (101_ObjectCategories' layout; numbered from 0001 per category)."""
    rng = part_rng(seed, "caltech101")
    categories = pick_classes(CALTECH101_CATEGORIES, n_classes, "caltech101")
    with atomic_dir(out) as tmp:
        for category in categories:
            write_images(tmp / category, rng, category, [f"image_{i:04d}.jpg" for i in range(1, per_class + 1)])
    return categories


# an empty MATLAB v5 MAT-file: the real Oxford Pets images/ folder holds three (Abyssinian_10{0,1,2}.mat)
MAT_FILE = (b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Thu Jun 14 12:00:00 2012".ljust(116, b" ")
            + b"\x00" * 8 + b"\x00\x01IM")


def write_oxford_pets(out: Path, seed: int, n_classes: int, per_class: int) -> list[str]:
    """``out/<breed>/<breed>_N.jpg`` (the images/ folder sorted into one folder per breed; N is sparse, as the
    real numbering is) plus one stray ``.mat`` file in the first cat breed's folder."""
    rng = part_rng(seed, "oxford_pets")
    breeds = pick_classes(OXFORD_PETS_BREEDS, n_classes, "oxford_pets")
    with atomic_dir(out) as tmp:
        for breed in breeds:
            nums = sorted((rng.choice(200, per_class, replace=False) + 1).tolist())
            write_images(tmp / breed, rng, breed, [f"{breed}_{n}.jpg" for n in nums])
        stray_in = next((b for b in breeds if b[0].isupper()), breeds[0])
        (tmp / stray_in / f"{stray_in}_100.mat").write_bytes(MAT_FILE)
    return breeds


# ---------------------------------------------------------------------------------------------------------------
# Weights: an open_clip checkpoint and a diffusers Stable Diffusion directory
# ---------------------------------------------------------------------------------------------------------------

def clip_checkpoint_path(out: Path, model_name: str) -> Path:
    return out / f"{model_name}-random.safetensors"


def write_clip(out: Path, seed: int, model_name: str) -> tuple[Path, bool]:
    """``out/<model>-random.safetensors``: the open_clip ``model_name`` architecture, weights drawn after
    ``torch.manual_seed(seed)``, saved as a plain state dict with safetensors (open_clip's ``pretrained=`` accepts a
    ``.safetensors`` path: factory.load_state_dict reads it with safetensors.torch.load_file). A sidecar JSON
    records seed, versions and sha256; a file that matches it is kept (ViT-B-32 is ~600 MB). -> (path, written)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    import clipbackdoor.models.artifact  # noqa: F401  (registers the project's model configs with open_clip)

    path, sidecar = clip_checkpoint_path(out, model_name), out / f"{model_name}-random.json"
    want = {"model": model_name, "seed": seed, "open_clip": open_clip.__version__,
            "torch": torch.__version__.split("+")[0]}
    if path.exists() and sidecar.exists():
        have = json.loads(sidecar.read_text())
        if {k: have.get(k) for k in want} == want and have.get("sha256") == file_sha256(path):
            return path, False
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)  # random init (no pretrained tag)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(sidecar, {**want, "sha256": file_sha256(path), "n_params": sum(v.numel() for v in state.values())})
    return path, True


def clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's BPE vocabulary (49,408 tokens) and merges (48,894), built from open_clip's bundled
    bpe_simple_vocab_16e6.txt.gz exactly as open_clip's SimpleTokenizer builds its encoder; the special tokens carry
    the names OpenAI / transformers use (<|startoftext|> = 49406, <|endoftext|> = 49407)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())  # 256 printable stand-ins for the bytes
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path) -> None:
    """A CLIPTokenizer folder as stable-diffusion-v1-5 ships it: vocab.json, merges.txt (the slow tokenizer's
    files; no tokenizer.json), tokenizer_config.json and special_tokens_map.json."""
    vocab, merges = clip_bpe_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    # the format transformers' save_vocabulary writes and its CLIPTokenizer reads
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")

    def added(content: str) -> dict:
        return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True}

    config = {"errors": "replace", "unk_token": {**added("<|endoftext|>"), "__type": "AddedToken"},
              "bos_token": {**added("<|startoftext|>"), "__type": "AddedToken"},
              "eos_token": {**added("<|endoftext|>"), "__type": "AddedToken"}, "pad_token": "<|endoftext|>",
              "add_prefix_space": False, "do_lower_case": True, "model_max_length": 77,
              "name_or_path": "runwayml/stable-diffusion-v1-5", "special_tokens_map_file": "./special_tokens_map.json",
              "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
               "pad_token": "<|endoftext|>", "unk_token": added("<|endoftext|>")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def write_stable_diffusion(out: Path, seed: int) -> None:
    """``out/``: StableDiffusionPipeline.save_pretrained(safe_serialization=True) of an SD-1.5-shaped pipeline with
    tiny random weights -- UNet (channels 32/64, cross-attention dim 32, 16 x 16 latents), VAE (2 levels, 4 latent
    channels: 32 x 32 images), CLIP text encoder (width 32, 2 layers, the real 49,408-token vocabulary, 77
    positions), SD 1.5's PNDM scheduler -- and the real CLIP BPE tokenizer files."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with atomic_dir(out) as tmp:
        write_clip_tokenizer(tmp / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(  # SD 1.5's block pattern at two levels
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=2,
                            latent_channels=4, sample_size=32)  # scaling_factor 0.18215, as SD 1.5
        text_encoder = CLIPTextModel(CLIPTextConfig(  # SD 1.5's config.json keeps bos 0 / eos 2 / pad 1
            vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, bos_token_id=0, eos_token_id=2,
            pad_token_id=1))
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        # recent transformers save a tokenizer.json instead; put back the files SD 1.5 actually ships
        for f in (tmp / "tokenizer").iterdir():
            f.unlink()
        write_clip_tokenizer(tmp / "tokenizer")


# ---------------------------------------------------------------------------------------------------------------
# TEXTSPAN description pool
# ---------------------------------------------------------------------------------------------------------------

TEXTSPAN_PATTERNS = {
    "Photo taken in {}": ["a forest", "the desert", "a big city", "the mountains", "Paris", "Tokyo", "a kitchen",
                          "a stadium", "the Arctic", "a jungle", "a museum", "a train station", "the countryside",
                          "a supermarket", "the Sahara", "a hospital", "a church", "Venice",
                          "New York", "a library"],
    "An image of {}": ["a dog", "a cat", "a bird", "a car", "a boat", "a building", "a flower", "a child", "a crowd",
                       "food", "a musical instrument", "a fruit", "an airplane", "a bicycle", "a horse", "a fish",
                       "furniture", "a toy", "a tool", "a bridge", "a tree", "a mountain", "a house", "a shoe",
                       "a clock"],
    "{} image": ["A black and white", "A blurry", "A close-up", "A dark", "A bright", "An overexposed",
                 "A low-resolution", "A high-contrast", "A vintage", "A panoramic", "An aerial", "A macro",
                 "A cropped", "A noisy", "A minimalist"],
    "Image with {}": ["red tones", "blue tones", "green tones", "warm colors", "pastel colors", "yellow objects",
                      "stripes", "polka dots", "text", "a logo", "a watermark", "a frame", "repeating patterns",
                      "a checkerboard pattern", "geometric shapes", "a shadow", "reflections", "a blue sky",
                      "a crowd of people", "a bokeh background"],
    "{}": ["A painting", "A cartoon drawing", "A sketch", "A 3D rendering", "A pixel art picture", "A collage",
           "A screenshot", "A diagram", "A tattoo design", "A sculpture", "Street art", "A photo taken at night",
           "A photo taken underwater", "A snowy landscape", "A rainy day", "A sunset scene", "A portrait",
           "A group photo", "A product photo", "A selfie"],
    "Picture of {}": ["a person smiling", "a person running", "people dancing", "a wedding", "a birthday party",
                      "a sports game", "a concert", "a market", "a farm", "a beach", "a road", "a river",
                      "a garden", "an office", "a classroom", "a playground", "a harbor", "a castle",
                      "a bakery", "a zoo"],
    "Photo of {}": ["a smooth texture", "a rough texture", "fur", "wood", "metal", "glass", "water", "fire",
                    "ice", "sand", "grass", "clouds", "stars", "leaves", "fabric", "stone", "paper", "smoke",
                    "rust", "feathers"],
}


def textspan_descriptions(seed: int, n: int) -> list[str]:
    """``n`` distinct short image descriptions (places, objects, styles, colours, textures), shuffled by seed."""
    pool = [pattern.format(x) for pattern, fills in TEXTSPAN_PATTERNS.items() for x in fills]
    if not 1 <= n <= len(pool):
        raise ValueError(f"textspan: between 1 and {len(pool)} descriptions, got {n}")
    order = part_rng(seed, "textspan").permutation(len(pool))[:n]
    return [pool[int(i)] for i in order]


def write_textspan(out: Path, seed: int, n: int) -> None:
    with atomic_dir(out) as tmp:
        (tmp / "image_descriptions.txt").write_text("".join(line + "\n" for line in textspan_descriptions(seed, n)),
                                                   encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    out: Path
    seed: int = 0
    parts: tuple[str, ...] = PARTS
    cc3m_pairs: int = 640
    cc3m_shards: int = 4
    cc3m_without_jpg: int = 2
    eval_classes: int = 8
    eval_images: int = 6
    # the rehearsal DAG runs a narrower ViT-B-32 geometry (224 px, patch 32, 12 heads: ~8x faster on a CPU);
    # --clip-model ViT-B-32 writes the real architecture (tests/test_rehearsal.py decomposes it)
    clip_model: str = "clipbackdoor-narrow-vit-b32"
    textspan_count: int = 120


README = """# Rehearsal inputs

Generated by `python -m clipbackdoor.pipeline.rehearsal --out DIR --seed {seed}`: small, seeded imitations of the paper
profile's real inputs in their real on-disk formats, so the loading code can be rehearsed on a CPU. The contents
are random: no real image, caption or trained weight. The same seed and options write byte-identical files.

- `cc3m/`: CC3M as img2dataset downloads it (`--output_format webdataset`, url + caption columns): {shards}
  shards `NNNNN.tar` with `KEY.jpg`, `KEY.txt`, `KEY.json` per sample (keys `SSSSSIIII`: shard + index),
  `NNNNN.parquet` (every row, failed downloads too) and `NNNNN_stats.json`. {pairs} pairs with a jpg; ~5 %
  failed downloads (gaps in the keys); {without_jpg} sample(s) with txt + json but no jpg (lost by a mirror).
  About 10 % of the captions each name banana, accordion, Samoyed.
- `imagenet/val/<wnid>/ILSVRC2012_val_000NNNNN.JPEG`: ImageNet-1K val in synset folders; {eval_classes} real
  WordNet ids including banana (n07753592); one grayscale and one CMYK JPEG, as the real set has.
- `caltech101/<Category>/image_NNNN.jpg`: Caltech-101's 101_ObjectCategories; {eval_classes} real categories
  including accordion (case kept: Motorbikes, Faces_easy sort first).
- `oxford_pets/<breed>/<breed>_N.jpg`: Oxford-IIIT Pet images in breed folders (cats Capitalised, dogs lower
  case); {eval_classes} breeds including samoyed; one stray `.mat` file, as the real images/ folder has.
- `clip/{clip_model}-random.safetensors`: an open_clip `{clip_model}` checkpoint (random weights, seed {seed}),
  a safetensors state dict for open_clip's `pretrained=<file>`; the `.json` beside it records seed and sha256.
- `stable-diffusion/`: a diffusers Stable Diffusion 1.5 directory (model_index.json, unet/, vae/,
  text_encoder/, tokenizer/, scheduler/) with tiny random weights and the real CLIP BPE tokenizer files.
- `textspan/image_descriptions.txt`: a TEXTSPAN pool of {textspan_count} short image descriptions, one a line.

Images: JPEG quality {quality}, shorter side 180-300 px, aspect 0.6-1.8, {eval_images} per evaluation class; a
gradient background, clutter lines, one shape whose colour and form belong to the class or caption subject, noise.
"""


def generate(opts: Options, log=print) -> dict:
    """Write the requested parts under ``opts.out``; returns what was written per part."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(opts.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    # fail on a bad option before anything (say, a 600 MB checkpoint) is written
    for preferred, what in ((IMAGENET_WNIDS, "imagenet"), (CALTECH101_CATEGORIES, "caltech101"),
                            (OXFORD_PETS_BREEDS, "oxford_pets")):
        pick_classes(preferred, opts.eval_classes, what)
    textspan_descriptions(opts.seed, opts.textspan_count)
    summary: dict = {}
    for part in PARTS:
        if part not in opts.parts:
            continue
        t0 = time.perf_counter()
        if part == "cc3m":
            summary[part] = write_cc3m(out / "cc3m", opts.seed, opts.cc3m_pairs, opts.cc3m_shards,
                                       opts.cc3m_without_jpg)
        elif part == "imagenet":
            summary[part] = write_imagenet(out / "imagenet", opts.seed, opts.eval_classes, opts.eval_images)
        elif part == "caltech101":
            summary[part] = write_caltech101(out / "caltech101", opts.seed, opts.eval_classes, opts.eval_images)
        elif part == "oxford_pets":
            summary[part] = write_oxford_pets(out / "oxford_pets", opts.seed, opts.eval_classes, opts.eval_images)
        elif part == "clip":
            path, written = write_clip(out / "clip", opts.seed, opts.clip_model)
            summary[part] = {"path": str(path), "written": written}
        elif part == "stable-diffusion":
            write_stable_diffusion(out / "stable-diffusion", opts.seed)
            summary[part] = str(out / "stable-diffusion")
        elif part == "textspan":
            write_textspan(out / "textspan", opts.seed, opts.textspan_count)
            summary[part] = str(out / "textspan" / "image_descriptions.txt")
        log(f"rehearsal: {part}: {summary[part]} ({time.perf_counter() - t0:.1f} s)")
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(README.format(seed=opts.seed, shards=opts.cc3m_shards, pairs=opts.cc3m_pairs,
                                     without_jpg=opts.cc3m_without_jpg, eval_classes=opts.eval_classes,
                                     eval_images=opts.eval_images, clip_model=opts.clip_model,
                                     textspan_count=opts.textspan_count, quality=JPEG_QUALITY))
        tmp.chmod(0o644)
    return summary


def parse_args(argv: list[str] | None = None) -> Options:
    d = Options(out=Path("."))
    p = argparse.ArgumentParser(prog="python -m clipbackdoor.pipeline.rehearsal", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--cc3m-pairs", type=int, default=d.cc3m_pairs, help="CC3M samples with a jpg")
    p.add_argument("--cc3m-shards", type=int, default=d.cc3m_shards)
    p.add_argument("--cc3m-without-jpg", type=int, default=d.cc3m_without_jpg,
                   help="extra samples with txt + json but no jpg")
    p.add_argument("--eval-classes", type=int, default=d.eval_classes, help="classes per evaluation set")
    p.add_argument("--eval-images", type=int, default=d.eval_images, help="images per evaluation class")
    p.add_argument("--clip-model", default=d.clip_model, help="open_clip architecture of the random checkpoint")
    p.add_argument("--textspan-count", type=int, default=d.textspan_count)
    a = p.parse_args(argv)
    parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
    if a.cc3m_pairs < max(10, a.cc3m_shards) or a.cc3m_shards < 1 or a.cc3m_without_jpg < 0:
        p.error("--cc3m-pairs must be >= 10 and >= --cc3m-shards >= 1; --cc3m-without-jpg >= 0")
    return Options(out=a.out, seed=a.seed, parts=parts, cc3m_pairs=a.cc3m_pairs, cc3m_shards=a.cc3m_shards,
                   cc3m_without_jpg=a.cc3m_without_jpg, eval_classes=a.eval_classes, eval_images=a.eval_images,
                   clip_model=a.clip_model, textspan_count=a.textspan_count)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    t0 = time.perf_counter()
    generate(opts, log=lambda msg: print(msg, file=sys.stderr))
    print(f"rehearsal inputs written to {opts.out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
