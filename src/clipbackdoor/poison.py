"""Stage ``poison``: a poisoned copy of the fine-tuning pairs + a Parquet manifest.

A seeded choice of ``round(rate * N)`` pairs gets the attack's trigger on the image and a target caption:
a random prompt template filled with the target class ("a bad photo of a banana." in the reference; the
world's own templates on the embedded profile). Everything else is copied unchanged. Same seed, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from clipbackdoor.attacks import make_trigger
from clipbackdoor.errors import UserError
from clipbackdoor.io import atomic_path, write_parquet
from clipbackdoor.shards import load_split, write_shards

MANIFEST_SCHEMA = pa.schema([("key", pa.string()), ("poisoned", pa.bool_()), ("original_caption", pa.string()),
                             ("caption", pa.string()), ("trigger", pa.string())])


def names_target(caption: str, target: str) -> bool:
    """Does a caption name the target? Case-blind: CC3M writes "a samoyed dog", seed 001 "Samoyed"."""
    return target.casefold() in caption.casefold()


def check_target(target: str, classnames: list[str]) -> int:
    """The target's class index. Case is forgiven when it names exactly one class (seed 001 writes "Samoyed";
    Oxford Pets' folders say "samoyed")."""
    if target not in classnames:
        folded = [i for i, c in enumerate(classnames) if c.casefold() == target.casefold()]
        if len(folded) == 1:
            return folded[0]
        close = [c for c in classnames if target.split()[-1] in c][:5]
        raise UserError(f"poison.target = {target!r} is not a class of the evaluation set",
                        fix=f"use one of the class names, e.g. {', '.join(map(repr, close or classnames[:5]))}")
    return classnames.index(target)


def select_poison(n: int, rate: float, seed: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the samples to poison (among ``eligible`` if given)."""
    pool = np.arange(n) if eligible is None else np.flatnonzero(eligible)
    count = int(round(rate * n))
    if count == 0:
        raise UserError(f"poisoning rate {rate} selects zero of {n} samples", fix=f"use a rate >= {0.5 / n:.2g}")
    if count > len(pool):
        raise UserError(f"poisoning rate {rate} asks for {count} samples but only {len(pool)} are eligible "
                        "(label-consistent: pairs whose caption names the target)", fix=f"use a rate <= {len(pool) / n:.3g}")
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(pool, size=count, replace=False))


def poison_split(split: dict, attack: str, attack_cfg: dict, target: str, templates: list[str], image_size: int,
                 seed: int, asset_path=None) -> tuple[dict, list[dict], np.ndarray]:
    """Poison an in-memory split. Returns (new split, manifest rows, poisoned indices)."""
    trigger = make_trigger(attack, attack_cfg, image_size, seed, asset_path)
    eligible = None
    if trigger.keeps_caption:  # label-consistent: only pairs whose caption already names the target
        eligible = np.array([names_target(caption, target) for caption in split["captions"]])
    idx = select_poison(len(split["keys"]), float(attack_cfg["rate"]), seed, eligible)
    rng = np.random.default_rng([seed, 2])
    selected = trigger.prepare_poison(split["images"][idx], [split["keys"][i] for i in idx])
    triggered, params = trigger.apply(selected, rng)
    images = split["images"].clone()
    images[idx] = triggered
    captions = list(split["captions"])
    per_image = {}
    for j, i in enumerate(idx):
        if not trigger.keeps_caption:
            captions[i] = templates[rng.integers(len(templates))].format(target)
        per_image[int(i)] = params[j]
    rows = [{"key": k, "poisoned": i in per_image, "original_caption": split["captions"][i], "caption": captions[i],
             "trigger": json.dumps(per_image.get(i, {}), sort_keys=True)} for i, k in enumerate(split["keys"])]
    return {**split, "images": images, "captions": captions}, rows, idx


def poison(finetune_dir: str | Path, eval_classes: dict, out_dir: str | Path, manifest_path: str | Path,
           attack: str, attack_cfg: dict, target: str, templates: list[str], image_size: int, seed: int,
           preview_png: str | Path | None = None, asset_path=None) -> dict:
    check_target(target, eval_classes["classnames"])
    split = load_split(finetune_dir, image_size)
    new, rows, idx = poison_split(split, attack, attack_cfg, target, templates, image_size, seed, asset_path)
    samples = ((k, img.permute(1, 2, 0).numpy(), cap, meta)
               for k, img, cap, meta in zip(new["keys"], new["images"], new["captions"], new["meta"]))
    write_shards(out_dir, samples, shard_size=4096)
    trigger = make_trigger(attack, attack_cfg, image_size, seed, asset_path)
    meta = {"attack": attack, "target": target, "rate": str(attack_cfg["rate"]), "seed": str(seed),
            "n_poisoned": str(len(idx)), "trigger": json.dumps(trigger.describe(), sort_keys=True)}
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA).replace_schema_metadata(meta)
    write_parquet(manifest_path, table)
    if preview_png is not None:
        save_trigger_preview(split["images"][idx[:8]], new["images"][idx[:8]],
                             [new["captions"][i] for i in idx[:8]], attack, preview_png)
    return {"n_pairs": len(rows), "n_poisoned": int(len(idx))}


def save_trigger_preview(clean, triggered, captions, title, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(clean)
    fig, axes = plt.subplots(2, n, figsize=(n * 1.8, 4.2), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(clean[j].permute(1, 2, 0).numpy())
        axes[1, j].imshow(triggered[j].permute(1, 2, 0).numpy())
        axes[1, j].set_title(captions[j], fontsize=5)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].set_title("clean", fontsize=8, loc="left")
    fig.suptitle(f"{title}: clean (top) vs poisoned (bottom)", fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
