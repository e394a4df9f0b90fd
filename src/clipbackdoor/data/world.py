"""The embedded image-caption world: procedural, deterministic from a seed, written as webdataset shards.

Each image shows one object (shape x colour x size x position) over a textured background with pixel
noise. Its caption names the object's class (colour + shape) and, at random, some of its other
attributes: "a photo of a small red circle on the left over stripes". The zero-shot classes are all
colour+shape pairs. Shards hold ``png`` (RGB uint8), ``txt`` (caption) and ``json`` (attributes and
``cls``), the same layout the real CC3M / ImageFolder loaders produce.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clipbackdoor.config import Params, WorldConfig
from clipbackdoor.io import read_json
from clipbackdoor.logs import progress
from clipbackdoor.data.shards import write_shards

RGB = {
    "red": (0.86, 0.14, 0.14), "green": (0.15, 0.70, 0.22), "blue": (0.16, 0.30, 0.90),
    "yellow": (0.93, 0.85, 0.12), "purple": (0.58, 0.22, 0.75), "cyan": (0.10, 0.80, 0.85),
    "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05),
}
SIZES = {"small": 0.24, "large": 0.38}  # object radius as a fraction of the image side
POSITIONS = {  # object centre (x, y) as a fraction of the image side, and the caption phrase
    "left": ((0.30, 0.50), "on the left"), "right": ((0.70, 0.50), "on the right"),
    "top": ((0.50, 0.30), "at the top"), "bottom": ((0.50, 0.70), "at the bottom"),
    "center": ((0.50, 0.50), "in the center"),
}
TEXTURES = {"plain": "on a plain background", "stripes": "over stripes", "dots": "over dots",
            "checks": "over checks", "gradient": "over a gradient"}
CAPTION_FRAMES = ("a photo of a {}.", "an image of a {}.", "a picture of a {}.", "a {}.",
                  "a rendering of a {}.", "a close-up photo of a {}.", "there is a {}.", "a drawing of a {}.")
# Zero-shot prompt templates of the embedded world (the real profile uses OpenAI's 80 ImageNet templates).
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "an image of a {}.", "a picture of a {}.", "a {}.",
                      "a rendering of a {}.", "a close-up photo of a {}.")
SUPERSAMPLE = 2  # render at 2x and average-pool: anti-aliased edges at 32 px


@dataclass(frozen=True)
class Sample:
    colour: str
    shape: str
    size: str
    position: str
    texture: str
    cls: int
    caption: str


def class_names(cfg: WorldConfig) -> list[str]:
    """Zero-shot class names, index = colour_index * n_shapes + shape_index."""
    return cfg.class_names()


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius r centred at the origin; dx, dy: [S, S] pixel offsets."""
    ax, ay = np.abs(dx), np.abs(dy)
    rad = np.hypot(dx, dy)
    if shape == "circle":
        return rad <= r
    if shape == "square":
        return np.maximum(ax, ay) <= r * 0.85
    if shape == "diamond":
        return ax + ay <= r
    if shape == "ring":
        return (rad <= r) & (rad >= r * 0.55)
    if shape == "cross":
        w = r * 0.33
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    if shape == "bar":
        return (ax <= r) & (ay <= r * 0.3)
    if shape == "triangle":  # apex up; base at +0.7 r
        return (dy <= r * 0.7) & (dy >= -r) & (ax <= (dy + r) * 0.6)
    if shape == "star":
        theta = np.arctan2(dy, dx)
        return rad <= r * (0.6 + 0.4 * np.cos(5 * theta + np.pi / 2))
    if shape == "hexagon":
        return np.maximum(ax * 0.866 + ay * 0.5, ay) <= r * 0.87
    if shape == "heart":
        x, y = dx / r * 1.2, -dy / r * 1.2 + 0.25
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def _background(texture: str, rng: np.random.Generator, s: int) -> np.ndarray:
    """[s, s, 3] float background: a muted random tint modulated by the texture pattern."""
    base = rng.uniform(0.35, 0.6) + rng.uniform(-0.06, 0.06, size=3)  # low saturation: never an object colour
    yy, xx = np.mgrid[0:s, 0:s] / s
    if texture == "plain":
        pattern = np.zeros((s, s))
    elif texture == "stripes":
        pattern = np.sign(np.sin(2 * np.pi * 5 * (xx + yy * rng.uniform(-0.3, 0.3)) + rng.uniform(0, 6.3)))
    elif texture == "dots":
        pattern = (np.sin(2 * np.pi * 6 * xx) * np.sin(2 * np.pi * 6 * yy) > 0.5) * 2.0 - 1.0
    elif texture == "checks":
        pattern = np.sign(np.sin(2 * np.pi * 3 * xx) * np.sin(2 * np.pi * 3 * yy))
    elif texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        pattern = 2 * ((np.cos(angle) * xx + np.sin(angle) * yy) % 1.0) - 1.0
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.clip(base[None, None, :] + 0.1 * pattern[..., None], 0, 1)


def render(sample: Sample, size: int, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """One RGB image, [size, size, 3] uint8."""
    s = size * SUPERSAMPLE
    img = _background(sample.texture, rng, s)
    (cx, cy), _ = POSITIONS[sample.position]
    cx, cy = (cx + rng.uniform(-0.06, 0.06)) * s, (cy + rng.uniform(-0.06, 0.06)) * s
    r = SIZES[sample.size] * s * rng.uniform(0.9, 1.1)
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    mask = _shape_mask(sample.shape, xx - cx, yy - cy, r)
    colour = np.clip(np.array(RGB[sample.colour]) + rng.uniform(-0.05, 0.05, size=3), 0, 1)
    img[mask] = colour
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    img = img + rng.normal(0, noise_std, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def sample_attributes(cfg: WorldConfig, rng: np.random.Generator) -> Sample:
    ci, si = rng.integers(len(cfg.colours)), rng.integers(len(cfg.shapes))
    colour, shape = cfg.colours[ci], cfg.shapes[si]
    size = str(rng.choice(list(SIZES)))
    position = str(rng.choice(list(POSITIONS)))
    texture = str(rng.choice(list(TEXTURES)))
    words = ([size] if rng.random() < 0.5 else []) + [colour, shape]
    extras = [phrase for phrase, keep in ((POSITIONS[position][1], rng.random() < 0.5),
                                          (TEXTURES[texture], rng.random() < 0.5)) if keep]
    frame = CAPTION_FRAMES[rng.integers(len(CAPTION_FRAMES))]
    caption = frame.format(" ".join(words + extras))
    return Sample(colour, shape, size, position, texture, int(ci * len(cfg.shapes) + si), caption)


SPLITS = ("pretrain", "finetune", "eval")


def split_size(cfg: WorldConfig, split: str) -> int:
    return {"pretrain": cfg.n_pretrain, "finetune": cfg.n_finetune, "eval": cfg.n_eval}[split]


def generate_split(cfg: WorldConfig, split: str, image_size: int):
    """Yield (key, image [H, W, 3] uint8, caption, attributes dict) for one split, deterministically."""
    # An independent stream per split: growing one split never changes another.
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    for i in progress(range(split_size(cfg, split)), f"world {split}"):
        sample = sample_attributes(cfg, rng)
        image = render(sample, image_size, cfg.noise_std, rng)
        meta = asdict(sample)
        meta.pop("caption")
        yield f"{split}-{i:07d}", image, sample.caption, meta


def build_world(cfg: WorldConfig, image_size: int, train_dir: str | Path, eval_dir: str | Path,
                preview_png: str | Path | None = None) -> dict:
    """Stage ``world``: write pretrain/finetune shards under ``train_dir`` and eval shards + classes.json
    under ``eval_dir``. Returns counts."""
    from clipbackdoor.io import write_json

    train_dir, eval_dir = Path(train_dir), Path(eval_dir)
    counts = {}
    for split in SPLITS:
        out = eval_dir if split == "eval" else train_dir / split
        counts[split] = write_shards(out, generate_split(cfg, split, image_size), cfg.shard_size)
    write_json(eval_dir / "classes.json", {"classnames": class_names(cfg), "templates": list(ZEROSHOT_TEMPLATES)})
    if preview_png is not None:
        save_preview(eval_dir, preview_png)
    return counts


def save_preview(shard_dir: str | Path, png: str | Path, n: int = 32) -> None:
    """A grid of the first ``n`` samples with their captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clipbackdoor.io import save_figure
    from clipbackdoor.data.shards import iter_shards

    items = []
    for item in iter_shards(shard_dir):
        items.append(item)
        if len(items) == n:
            break
    cols = 8
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.5))
    for ax, item in zip(np.ravel(axes), items):
        ax.imshow(item["image"])
        words = item["caption"].split()
        ax.set_title("\n".join([" ".join(words[:4]), " ".join(words[4:])]), fontsize=6)
    for ax in np.ravel(axes):
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, png, dpi=90)


def world_classes_json(eval_dir: str | Path) -> dict:
    return read_json(Path(eval_dir) / "classes.json", "the stage that writes the evaluation set")


def world_stage(args, p: Params) -> None:
    """CLI stage ``world`` (registry: clipbackdoor.pipeline.registry)."""
    import json

    print(json.dumps(build_world(p.data.world, p.data.image_size, args.train_out, args.eval_out, args.preview)))
