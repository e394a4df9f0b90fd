"""Stage ``finetune``: backdoor fine-tuning of the clean model on a poisoned set (seed 001 threat model:
the attacker fine-tunes a public CLIP on poisoned pairs). Resumable from safetensors checkpoints; data-parallel
over ``opt.devices`` torchrun workers (see ``clipbackdoor.distributed``)."""

from __future__ import annotations

from pathlib import Path

from clipbackdoor.config import OptimConfig
from clipbackdoor.distributed import init_worker, is_main, shutdown
from clipbackdoor.runtime import pick_device
from clipbackdoor.train import load_training_pairs, save_trained, train_clip


def finetune(model_dir: str | Path, train_dir: str | Path, out_dir: str | Path, opt: OptimConfig, seed: int,
             ckpt_dir: str | Path | None, ckpt_every: int, stage: str) -> dict:
    device = init_worker(opt.devices) if opt.devices > 1 else pick_device(gpu=True)
    loaded, split, tokens = load_training_pairs(model_dir, train_dir, device)
    history = train_clip(loaded, split["images"], tokens, opt, seed, ckpt_dir=ckpt_dir, ckpt_every=ckpt_every,
                         fp_extra=[stage, loaded.checkpoint_sha256], desc=stage)
    metrics = save_trained(loaded, out_dir, history, len(tokens), stage, model_dir, seed,
                           provenance_extra={"devices": opt.devices}, write=is_main())
    if opt.devices > 1:
        shutdown()
    return metrics
