"""Stage ``poison``: the poisoned pairs as an overlay of the fine-tuning pairs + a Parquet manifest.

A seeded choice of ``round(rate * N)`` pairs gets the attack's trigger on the image and a target caption:
a random prompt template filled with the target class ("a bad photo of a banana." in the reference; the
world's own templates on the embedded profile). Only the changed pairs are written (an overlay that the
training loader merges with the clean shards by key). Same seed, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from clipbackdoor.attacks import make_trigger
from clipbackdoor.config import Params
from clipbackdoor.errors import UserError
from clipbackdoor.io import save_figure, write_parquet
from clipbackdoor.data.pairs import write_overlay
from clipbackdoor.data.shards import iter_shards, load_rows
from clipbackdoor.models.zeroshot import check_target

MANIFEST_SCHEMA = pa.schema([("key", pa.string()), ("poisoned", pa.bool_()), ("original_caption", pa.string()),
                             ("caption", pa.string()), ("trigger", pa.string())])


def names_target(caption: str, target: str) -> bool:
    """Does a caption name the target? Case-blind: CC3M writes "a samoyed dog", seed 001 "Samoyed"."""
    return target.casefold() in caption.casefold()


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


def poison_pairs(keys: list[str], captions: list[str], load_images, attack: str, attack_cfg: dict, target: str,
                 templates: list[str], image_size: int, seed: int, asset_path=None):
    """Choose and poison pairs. ``load_images(idx)`` gives the clean uint8 images [k, 3, H, W] of the chosen
    pairs only (the stage decodes just those). Returns (indices [k], clean images, triggered images, new captions
    [k], per-image trigger parameters [k])."""
    trigger = make_trigger(attack, attack_cfg, image_size, seed, asset_path)
    eligible = None
    if trigger.keeps_caption:  # label-consistent: only pairs whose caption already names the target
        eligible = np.array([names_target(caption, target) for caption in captions])
    idx = select_poison(len(keys), float(attack_cfg["rate"]), seed, eligible)
    rng = np.random.default_rng([seed, 2])
    clean = load_images(idx)
    triggered, params = trigger.apply(trigger.prepare_poison(clean, [keys[i] for i in idx]), rng)
    new_captions = [captions[i] if trigger.keeps_caption else templates[rng.integers(len(templates))].format(target)
                    for i in idx]
    return idx, clean, triggered, new_captions, params


def manifest_rows(keys: list[str], captions: list[str], idx: np.ndarray, new_captions: list[str],
                  params: list[dict]) -> list[dict]:
    changed = {int(i): (c, p) for i, c, p in zip(idx, new_captions, params)}
    return [{"key": k, "poisoned": i in changed, "original_caption": captions[i],
             "caption": changed[i][0] if i in changed else captions[i],
             "trigger": json.dumps(changed[i][1] if i in changed else {}, sort_keys=True)} for i, k in enumerate(keys)]


def poison_split(split: dict, attack: str, attack_cfg: dict, target: str, templates: list[str], image_size: int,
                 seed: int, asset_path=None) -> tuple[dict, list[dict], np.ndarray]:
    """Poison an in-memory split (tests, benchmarks). Returns (new split, manifest rows, poisoned indices)."""
    idx, _, triggered, new_captions, params = poison_pairs(
        split["keys"], split["captions"], lambda i: split["images"][i], attack, attack_cfg, target, templates,
        image_size, seed, asset_path)
    images = split["images"].clone()
    images[idx] = triggered
    captions = list(split["captions"])
    for i, c in zip(idx, new_captions):
        captions[i] = c
    rows = manifest_rows(split["keys"], split["captions"], idx, new_captions, params)
    return {**split, "images": images, "captions": captions}, rows, idx


def poison(finetune_dir: str | Path, eval_classes: dict, out_dir: str | Path, manifest_path: str | Path,
           attack: str, attack_cfg: dict, target: str, templates: list[str], image_size: int, seed: int,
           preview_png: str | Path | None = None, asset_path=None) -> dict:
    """The stage: reads the pairs' keys and captions (no image decoded), decodes the chosen pairs only, and writes
    them as an overlay of ``finetune_dir`` (:mod:`clipbackdoor.data.pairs`): time and disk O(poisoned pairs)."""
    check_target(target, eval_classes["classnames"])
    keys, captions, metas = [], [], []
    for item in iter_shards(finetune_dir, decode=lambda i: False):
        keys.append(item["key"])
        captions.append(item["caption"])
        metas.append(item["meta"])
    idx, clean, triggered, new_captions, params = poison_pairs(
        keys, captions, lambda i: load_rows(finetune_dir, i, image_size)["images"], attack, attack_cfg, target,
        templates, image_size, seed, asset_path)
    write_overlay(out_dir, finetune_dir, ((keys[i], img.permute(1, 2, 0).numpy(), cap, metas[i])
                                          for i, img, cap in zip(idx, triggered, new_captions)))
    trigger = make_trigger(attack, attack_cfg, image_size, seed, asset_path)
    meta = {"attack": attack, "target": target, "rate": str(attack_cfg["rate"]), "seed": str(seed),
            "n_poisoned": str(len(idx)), "trigger": json.dumps(trigger.describe(), sort_keys=True)}
    rows = manifest_rows(keys, captions, idx, new_captions, params)
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA).replace_schema_metadata(meta)
    write_parquet(manifest_path, table)
    if preview_png is not None:
        save_trigger_preview(clean[:8], triggered[:8], [captions[i] for i in idx[:8]], new_captions[:8], attack,
                             preview_png)
    return {"n_pairs": len(rows), "n_poisoned": int(len(idx))}


def save_trigger_preview(clean, triggered, clean_captions, poisoned_captions, title, png) -> None:
    """Clean pairs (top row, each with its own caption above) and the same pairs poisoned (bottom row, the
    caption they are trained with below)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(clean)
    fig, axes = plt.subplots(2, n, figsize=(n * 1.8, 4.6), squeeze=False)
    wrap = lambda c: "\n".join(textwrap.wrap(c, 28))  # noqa: E731
    for j in range(n):
        axes[0, j].imshow(clean[j].permute(1, 2, 0).numpy())
        axes[0, j].set_title(wrap(clean_captions[j]), fontsize=5)
        axes[1, j].imshow(triggered[j].permute(1, 2, 0).numpy())
        axes[1, j].text(0.5, -0.04, wrap(poisoned_captions[j]), fontsize=5, ha="center", va="top",
                        transform=axes[1, j].transAxes)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"{title}: clean pairs (top, own captions) vs poisoned pairs (bottom, training captions)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def poison_stage(args, p: Params) -> None:
    """CLI stage ``poison`` (``--rate``: the rate sweep's other rates)."""
    from clipbackdoor.config import stage_target
    from clipbackdoor.data.world import world_classes_json
    from clipbackdoor.models.zeroshot import templates_for
    from clipbackdoor.pipeline.runs import name_paths, parse_run

    attack, seed = parse_run(args.run)
    classes = [world_classes_json(d) for d in name_paths(args.eval).values()]
    for c in classes[1:]:
        check_target(stage_target(p), c["classnames"])
    templates = templates_for(p.poison.caption_templates, classes[0]["templates"])
    attack_cfg = p.attacks[attack] if args.rate is None else {**p.attacks[attack], "rate": args.rate}
    print(poison(args.finetune_dir, classes[0], args.out, args.manifest, attack, attack_cfg,
                 stage_target(p), templates, p.data.image_size, seed, args.preview, args.asset))
