"""Stage ``finetune``: backdoor fine-tuning of the clean model on a poisoned set (seed 001 threat model:
the attacker fine-tunes a public CLIP on poisoned pairs). Resumable from safetensors checkpoints; data-parallel
over ``opt.devices`` torchrun workers (see ``clipbackdoor.distributed``)."""

from __future__ import annotations

from pathlib import Path

from clipbackdoor.config import OptimConfig
from clipbackdoor.distributed import init_worker, is_main, shutdown
from clipbackdoor.models import load_artifact, save_artifact
from clipbackdoor.runtime import pick_device
from clipbackdoor.shards import load_split
from clipbackdoor.train import train_clip


def finetune(model_dir: str | Path, train_dir: str | Path, out_dir: str | Path, opt: OptimConfig, seed: int,
             ckpt_dir: str | Path | None, ckpt_every: int, stage: str) -> dict:
    device = init_worker(opt.devices) if opt.devices > 1 else pick_device(gpu=True)
    loaded = load_artifact(model_dir, device)
    split = load_split(train_dir, loaded.image_size)
    tokens = loaded.tokenizer(split["captions"])
    history = train_clip(loaded, split["images"], tokens, opt, seed, ckpt_dir=ckpt_dir, ckpt_every=ckpt_every,
                         fp_extra=[stage, loaded.checkpoint_sha256], desc=stage)
    loaded.model.cpu()
    metrics = {"first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], "steps": len(history),
               "n_pairs": len(tokens)}
    if is_main():
        save_artifact(loaded, out_dir, metrics, provenance={"stage": stage, "base": str(model_dir), "seed": seed,
                                                             "base_sha256": loaded.checkpoint_sha256,
                                                             "devices": opt.devices})
    if opt.devices > 1:
        shutdown()
    return metrics
