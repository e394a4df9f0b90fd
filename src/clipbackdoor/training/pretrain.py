"""Stage ``pretrain`` (embedded profile: a tiny CLIP from scratch) and ``clean_model`` (real profile:
open_clip pretrained weights). Both write the same model artifact with zero-shot top-1 in metrics.json."""

from __future__ import annotations

from pathlib import Path

import torch

from clipbackdoor.errors import UserError
from clipbackdoor.config import ModelConfig, OptimConfig, Params, ZeroShotConfig
from clipbackdoor.models.artifact import create, save_artifact
from clipbackdoor.runtime import seed_everything
from clipbackdoor.data.pairs import ShardPairs
from clipbackdoor.data.shards import iter_batches
from clipbackdoor.training.train import train_clip
from clipbackdoor.data.world import world_classes_json
from clipbackdoor.models.zeroshot import class_text_embeddings, image_embeddings, predict, templates_for


def evaluate_zeroshot(loaded, eval_dirs: dict[str, Path], zs: ZeroShotConfig) -> dict:
    """Zero-shot top-1 on each evaluation set, streamed in batches of ``zs.batch_size`` images (memory O(batch);
    only one bool per image is kept)."""
    out = {}
    for name, folder in eval_dirs.items():
        classes = world_classes_json(folder)
        cls = class_text_embeddings(loaded, classes["classnames"], templates_for(zs.templates, classes["templates"]))
        hits = [predict(image_embeddings(loaded, b["images"], zs.batch_size), cls.cpu()) == b["labels"]
                for b in iter_batches(folder, zs.batch_size, loaded.image_size)]
        if not hits:
            raise UserError(f"{folder}: the evaluation set has no images", fix="rerun the stage that writes it")
        out[f"zeroshot_top1/{name}"] = float(torch.cat(hits).float().mean())
    return out


def pretrain(train_dir: str | Path, eval_dirs: dict[str, Path], out_dir: str | Path, model_cfg: ModelConfig,
             opt: OptimConfig, zs: ZeroShotConfig, seed: int, ckpt_dir: str | Path | None = None,
             ckpt_every: int = 100, device: str = "cpu") -> dict:
    """Train a CLIP from scratch on the ``pretrain`` split; write the artifact; return its metrics."""
    seed_everything(seed)  # the random initialisation must come from the params, not the process
    loaded = create(model_cfg.name, pretrained=None)
    loaded.model.to(device)
    pairs = ShardPairs(Path(train_dir) / "pretrain", loaded.image_size)  # decoded batch by batch
    tokens = loaded.tokenizer(pairs.captions)
    history = train_clip(loaded, pairs, tokens, opt, seed, ckpt_dir=ckpt_dir, ckpt_every=ckpt_every,
                         fp_extra=model_cfg.name, desc="pretrain")
    # no wall time in the artifact (it would change its bytes, hence its DVC hash, on every run): the log's
    # progress lines and footer and data/benchmarks/pretrain.tsv have it
    metrics = {"final_loss": history[-1]["loss"], "first_loss": history[0]["loss"], "steps": len(history),
               "n_pairs": len(tokens)}
    metrics.update(evaluate_zeroshot(loaded, eval_dirs, zs))
    loaded.model.cpu()
    save_artifact(loaded, out_dir, metrics, provenance={"stage": "pretrain", "seed": seed}, history=history)
    return metrics


def clean_model(eval_dirs: dict[str, Path], out_dir: str | Path, model_cfg: ModelConfig, zs: ZeroShotConfig,
                device: torch.device | str = "cpu") -> dict:
    """Real profile: open_clip pretrained weights (a tag or a local checkpoint file; fails offline with a clear
    message); zero-shot top-1 on every evaluation set, on ``device`` (the rule's GPU: 80 templates x 1,000 classes)."""
    loaded = create(model_cfg.name, pretrained=model_cfg.pretrained)
    loaded.model.to(device)
    metrics = evaluate_zeroshot(loaded, eval_dirs, zs)
    loaded.model.cpu()
    save_artifact(loaded, out_dir, metrics, provenance={"stage": "clean_model", "pretrained": model_cfg.pretrained})
    return metrics


def pretrain_stage(args, p: Params) -> None:
    """CLI stage ``pretrain``."""
    import json

    from clipbackdoor.pipeline.runs import name_paths
    from clipbackdoor.runtime import pick_device

    metrics = pretrain(args.train, name_paths(args.eval), args.out, p.model, p.pretrain, p.zeroshot, p.seed,
                       ckpt_dir=args.ckpt_dir, ckpt_every=p.pretrain.ckpt_every, device=pick_device(gpu=True))
    print(json.dumps(metrics, indent=1))


def clean_model_stage(args, p: Params) -> None:
    """CLI stage ``clean-model``."""
    import json

    from clipbackdoor.pipeline.runs import name_paths
    from clipbackdoor.runtime import pick_device

    print(json.dumps(clean_model(name_paths(args.eval), args.out, p.model, p.zeroshot, device=pick_device(gpu=True)),
                     indent=1))
