"""Stage ``finetune``: backdoor fine-tuning of the clean model on a poisoned set (seed 001 threat model:
the attacker fine-tunes a public CLIP on poisoned pairs). Resumable from safetensors checkpoints; data-parallel
over ``opt.devices`` torchrun workers (see ``clipbackdoor.training.distributed``)."""

from __future__ import annotations

from pathlib import Path

from clipbackdoor.config import OptimConfig, Params
from clipbackdoor.training.distributed import init_worker, is_main, shutdown
from clipbackdoor.runtime import pick_device
from clipbackdoor.training.train import load_training_pairs, save_trained, train_clip


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


def finetune_stage(args, p: Params) -> None:
    """CLI stage ``finetune``: one process, or (``finetune.devices`` > 1) this command again as torchrun workers."""
    import json
    import os

    from clipbackdoor.config import check_devices
    from clipbackdoor.errors import UserError
    from clipbackdoor.pipeline.runs import parse_run
    from clipbackdoor.runtime import set_threads
    from clipbackdoor.training.distributed import is_main, launch, without_log

    check_devices(p.finetune, "--params")
    devices = p.finetune.devices
    if devices > 1 and not os.environ.get("LOCAL_RANK"):
        from clipbackdoor.runtime import claim_gpu

        claim_gpu(count=devices)  # the workers inherit CUDA_VISIBLE_DEVICES = the claimed ids (none: gloo on CPU)
    rc = launch(devices, without_log(args.argv))  # devices > 1: rerun this command as torchrun workers
    if rc is not None:
        if rc != 0:
            raise UserError(f"{devices} data-parallel finetune workers exited with status {rc}",
                            fix="see the workers' messages above in this log")
        return
    set_threads(max(1, (args.threads if args.threads > 0 else os.cpu_count() or 1) // devices))
    _, seed = parse_run(args.run)
    metrics = finetune(args.model, args.train, args.out, p.finetune, seed, args.ckpt_dir, p.finetune.ckpt_every,
                       f"finetune-{args.run}")
    if is_main():
        print(json.dumps(metrics))
