"""Stages ``decompose`` and ``class_embeddings``: cache every evaluation image's direct terms (clean or
triggered) as Parquet, and the zero-shot class embeddings, so defenses need no model forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clipbackdoor.attacks import make_trigger, trigger_eval_images
from clipbackdoor.config import Params
from clipbackdoor.decomposition.cache import DecompositionWriter
from clipbackdoor.decomposition.decompose import Decomposition, decompose
from clipbackdoor.io import load_safetensors, save_safetensors
from clipbackdoor.models.artifact import load_artifact, normalize
from clipbackdoor.runtime import autocast
from clipbackdoor.logs import progress
from clipbackdoor.data.shards import count_samples, iter_batches
from clipbackdoor.data.world import world_classes_json
from clipbackdoor.models.zeroshot import class_text_embeddings, templates_for


def decompose_images(loaded, images: torch.Tensor, centering: str, normalize_terms: bool,
                     batch_size: int, bf16: bool = False) -> Decomposition:
    """bf16 autocast on CUDA (fp32 on the CPU, where the terms equal the reference code's); ``bf16`` forces it on
    the CPU too (benchmarks/bf16_deviation.py)."""
    device = next(loaded.model.parameters()).device
    parts = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size].to(device), loaded.mean, loaded.std)
        with autocast(device, force=bf16):
            parts.append(decompose(loaded.model.visual, x, centering=centering, normalize=normalize_terms))
    return Decomposition(*(torch.cat([getattr(p, f).float().cpu() for p in parts]) for f in
                           ("embed", "heads", "mlps", "bias", "embedding", "norm")))


def run_decompose(model_dir: str | Path, eval_dir: str | Path, out_path: str | Path, trigger: str,
                  attacks: dict, seed: int, centering: str, normalize_terms: bool, batch_size: int,
                  device: str = "cpu", asset_path=None) -> int:
    """Decompose the eval set, triggered with ``trigger`` (an attack name) or clean (``none``), streaming: a batch
    is decoded, triggered, decomposed and handed to the writer, which flushes a row group at a time (memory
    O(batch + row group), whatever the set's size)."""
    loaded = load_artifact(model_dir, device)
    trig = None if trigger == "none" else make_trigger(trigger, attacks[trigger], loaded.image_size, seed,
                                                       asset_path).to(device)  # triggers batches on the device
    meta = {"model": Path(model_dir).name, "open_clip_name": loaded.name, "checkpoint_sha256": loaded.checkpoint_sha256,
            "eval_set": Path(eval_dir).name, "trigger": trigger, "centering": centering,
            "normalisation": "unit_embedding" if normalize_terms else "none"}
    n = 0
    with DecompositionWriter(out_path, trig is not None, meta) as out:
        total = -(-count_samples(eval_dir) // batch_size)
        for batch in progress(iter_batches(eval_dir, batch_size, loaded.image_size), "decompose", total=total):
            images = batch["images"].to(device)  # [B, 3, H, W] uint8: 4x less to copy than the float batch
            if trig is not None:
                images = trigger_eval_images(trig, images, np.arange(batch["start"], batch["start"] + len(images)),
                                             seed)
            out.add(batch["keys"], batch["labels"].numpy(),
                    decompose_images(loaded, images, centering, normalize_terms, batch_size))
            n += len(images)
    return n


def run_class_embeddings(model_dir: str | Path, eval_dir: str | Path, out_path: str | Path, templates_kind: str,
                         device: torch.device | str = "cpu") -> int:
    import json

    loaded = load_artifact(model_dir, device)  # the rule's GPU: 80 templates x the classes through the text tower
    classes = world_classes_json(eval_dir)
    emb = class_text_embeddings(loaded, classes["classnames"], templates_for(templates_kind, classes["templates"]))
    save_safetensors(out_path, {"class_embeddings": emb},
                     {"classnames": json.dumps(classes["classnames"]), "checkpoint_sha256": loaded.checkpoint_sha256})
    return len(classes["classnames"])


def load_class_embeddings(path: str | Path) -> tuple[np.ndarray, list[str]]:
    import json

    tensors, meta = load_safetensors(path, "np", made_by="the class_embeddings stage", with_metadata=True)
    return tensors["class_embeddings"], json.loads(meta["classnames"])


def decompose_stage(args, p: Params) -> None:
    """CLI stage ``decompose``."""
    from clipbackdoor.pipeline.runs import parse_run
    from clipbackdoor.runtime import pick_device

    trigger, seed = ("none", 0) if args.trigger == "none" else parse_run(args.trigger)
    cfg = p.decompose
    n = run_decompose(args.model, args.eval_dir, args.out, trigger, p.attacks or {}, seed, cfg.centering,
                      cfg.normalize, cfg.batch_size, device=pick_device(gpu=True), asset_path=args.asset)
    print(f"decomposed {n} images")


def class_embeddings_stage(args, p: Params) -> None:
    """CLI stage ``class-embeddings``."""
    from clipbackdoor.runtime import pick_device

    print(run_class_embeddings(args.model, args.eval_dir, args.out, p.zeroshot.templates, device=pick_device(gpu=True)))
