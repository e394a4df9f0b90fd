"""Contrastive CLIP training shared by pretraining and every fine-tuning stage.

AdamW with no weight decay on norms, biases, embeddings-of-rank-1 and ``logit_scale`` (the open_clip
rule), cosine schedule with linear warm-up, ``logit_scale`` clamped to [0, ln 100] after each step.
Checkpoints are safetensors (model + optimizer + scheduler + RNG state) written atomically every
``ckpt_every`` steps; a rerun with the same fingerprint resumes from the last one and, on CPU, ends with
bit-identical weights to an uninterrupted run (batch order is a pure function of (seed, epoch)).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from open_clip.loss import ClipLoss

from clipbackdoor.config import OptimConfig
from clipbackdoor.training.distributed import barrier, is_main, rank_world
from clipbackdoor.errors import UserError
from clipbackdoor.io import load_safetensors, safetensors_metadata, save_safetensors
from clipbackdoor.logs import progress
from clipbackdoor.models.artifact import LoadedModel, load_artifact, normalize, save_artifact
from clipbackdoor.runtime import autocast

LOGIT_SCALE_MAX = math.log(100.0)
CKPT_NAME = "last.safetensors"


def lr_scale(name: str, n_layers: int, layer_decay: float) -> float:
    """Layer-wise learning-rate decay over the image tower: block l gets ``decay ** (L-1-l)``, the patch
    embedding and ``ln_pre`` ``decay ** L``; ``ln_post``, ``proj`` and the text tower the full rate."""
    if layer_decay == 1.0 or not name.startswith("visual.") or name.startswith(("visual.ln_post", "visual.proj")):
        return 1.0
    m = re.match(r"visual\.transformer\.resblocks\.(\d+)\.", name)
    return layer_decay ** (n_layers - 1 - int(m.group(1)) if m else n_layers)


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no decay on norms/biases/rank-1 parameters/logit_scale; with ``layer_decay`` < 1 one
    group per (decay, lr scale) so each group carries its own ``lr_scale``."""
    n_layers = len(getattr(getattr(model.visual, "transformer", None), "resblocks", ()))
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        groups.setdefault((not exclude, lr_scale(name, n_layers, layer_decay)), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), params in sorted(groups.items(), key=lambda kv: (kv[0][1] != 1.0, -kv[0][1], kv[0][0]))]


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig):
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for g in groups:
        g["lr"] = cfg.lr * g.pop("lr_scale")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    return opt, sched


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch at ``step``: epoch-wise permutations seeded by (seed, epoch); drop-last."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[pos * batch_size:(pos + 1) * batch_size]


def data_digest(*data) -> str:
    """Content hash of the training data (tensors, or :class:`~clipbackdoor.data.pairs.ShardPairs` hashed by streaming
    their shards): a checkpoint must never be resumed on other data."""
    h = hashlib.sha256()
    for t in data:
        if hasattr(t, "digest"):
            h.update(t.digest().encode())
            continue
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class StepBatches(torch.utils.data.Dataset):
    """Item s = (indices, uint8 images) of training step s on this rank: a pure function of (seed, step), so a
    DataLoader may decode batches ahead in worker processes and a resumed run reads exactly the same batches."""

    def __init__(self, images, batch_size: int, seed: int, rank: int, world: int):
        self.images, self.batch_size, self.seed, self.rank, self.world = images, batch_size, seed, rank, world

    def __getitem__(self, step: int):
        idx = batch_indices(len(self.images), self.batch_size, step, self.seed).chunk(self.world)[self.rank]
        try:
            return idx, self.images[idx]
        except UserError as exc:  # a worker's exception would reach the trainer wrapped in its traceback
            return idx, (exc.problem, exc.fix)


def _unwrap(batch):
    """A batch, or the one-line error its worker met (re-raised here, in the training process)."""
    idx, images = batch
    if not torch.is_tensor(images):  # (problem, fix) -- the loader hands sequences back as lists
        raise UserError(*images)
    return idx, images


def step_loader(images, batch_size: int, seed: int, start: int, steps: int, rank: int, world: int, device):
    """Batches for steps start..steps-1, in order. Images in shards (ShardPairs) are decoded in
    ``loader_workers()`` worker processes, pinned when training on CUDA; in-memory tensors are indexed directly."""
    dataset = StepBatches(images, batch_size, seed, rank, world)
    workers = loader_workers() if hasattr(images, "digest") else 0
    # its own generator: a DataLoader otherwise draws its base seed from the global torch state, which
    # CleanCLIP's augmentations use (and checkpoints): results and resume would change
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, steps), num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda", persistent_workers=False,
                                         prefetch_factor=2 if workers else None,
                                         generator=torch.Generator().manual_seed(seed))
    return map(_unwrap, loader)


def loader_workers() -> int:
    """Decoding processes for the training loader: ``CLIPBACKDOOR_LOADER_WORKERS``, else half the cores the job
    may use (at most 8), 0 (decode in the training process) on a 2-core machine."""
    import os

    value = os.environ.get("CLIPBACKDOOR_LOADER_WORKERS")
    if value is not None:
        return max(0, int(value))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores // 2) if cores > 2 else 0


def fingerprint(*parts) -> str:
    """Identity of a training run: a checkpoint is only resumed by the run that wrote it."""
    blob = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_checkpoint(path: Path, model, opt, sched, step: int, fp: str, history: list) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, state in opt_state["state"].items():
        for name, value in state.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": str(step), "fingerprint": fp, "param_groups": json.dumps(opt_state["param_groups"]),
            "scheduler": json.dumps(sched.state_dict(), default=lambda o: None), "history": json.dumps(history)}
    save_safetensors(path, tensors, meta)


def load_checkpoint(path: Path, model, opt, sched, fp: str) -> tuple[int, list] | None:
    """Restore state from ``path`` if it belongs to this run; returns (step, history) or None."""
    if not path.exists():
        return None
    made_by = "the training stage (a damaged checkpoint: delete it to start over)"
    if safetensors_metadata(path, made_by).get("fingerprint") != fp:
        return None
    tensors, meta = load_safetensors(path, made_by=made_by, with_metadata=True)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    sched_state = json.loads(meta["scheduler"])
    sched_state.pop("lr_lambdas", None)
    sched.load_state_dict({**sched.state_dict(), **sched_state})
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), json.loads(meta["history"])


LossFn = Callable[[LoadedModel, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between paired unit features a, b [B, d] (row i of a matches row i of b)."""
    logits = scale * a @ b.T
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_loss_fn() -> LossFn:
    rank, world = rank_world()
    # across ranks: gather features with their gradients so every rank's loss is the global-batch loss
    loss = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world)

    def fn(loaded: LoadedModel, images: torch.Tensor, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        img_f, txt_f, scale = loaded.model(normalize(images, loaded.mean, loaded.std), tokens)[:3]
        return loss(img_f, txt_f, scale)

    return fn


def train_clip(loaded: LoadedModel, images: torch.Tensor, tokens: torch.Tensor, cfg: OptimConfig, seed: int,
               ckpt_dir: str | Path | None = None, ckpt_every: int = 0, loss_fn: LossFn | None = None,
               fp_extra=None, stop_after: int | None = None, desc: str = "train") -> list[dict]:
    """Train ``loaded.model`` in place on uint8 ``images`` [N, 3, H, W] and ``tokens`` [N, ctx].

    Returns the loss history (one entry per logged step). ``stop_after`` ends the run early after that
    many steps (used by tests to simulate an interruption)."""
    model = loaded.model
    device = next(model.parameters()).device
    model.train()
    torch.manual_seed(seed)  # torch seeds itself randomly per process: every random draw must come from here
    opt, sched = make_optimizer(model, cfg)
    loss_fn = loss_fn or clip_loss_fn()
    rank, world = rank_world()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} devices")
    if world > 1:  # the loss function calls loaded.model: route it through DDP for gradient averaging
        loaded.model = torch.nn.parallel.DistributedDataParallel(model)
    try:
        return _train_loop(loaded, model, images, tokens, cfg, seed, opt, sched, loss_fn, device, ckpt_dir,
                           ckpt_every, fp_extra, stop_after, desc, rank, world)
    finally:
        loaded.model = model
        model.eval()


def _train_loop(loaded, model, images, tokens, cfg, seed, opt, sched, loss_fn, device, ckpt_dir, ckpt_every,
                fp_extra, stop_after, desc, rank, world) -> list[dict]:
    fp = fingerprint(cfg, seed, data_digest(images, tokens), fp_extra)
    ckpt = Path(ckpt_dir) / CKPT_NAME if ckpt_dir else None
    start, history = 0, []
    if ckpt is not None:
        resumed = load_checkpoint(ckpt, model, opt, sched, fp)
        if resumed is not None:
            start, history = resumed
            print(f"[{desc}] resumed from {ckpt} at step {start}", file=sys.stderr)
    bar = progress(range(start, cfg.steps), desc, total=cfg.steps, initial=start, disable=rank != 0)
    batches = step_loader(images, cfg.batch_size, seed, start, cfg.steps, rank, world, device)
    for step, (idx, batch_images) in zip(bar, batches):  # idx: this rank's slice of the step's batch
        if hasattr(loss_fn, "begin_step"):  # losses whose targets change during training (RoCLIP)
            loss_fn.begin_step(loaded, step)
        with autocast(device):  # bf16 on CUDA, fp32 (exact, reproducible) on the CPU
            loss = loss_fn(loaded, batch_images.to(device, non_blocking=True), tokens[idx].to(device), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
        history.append({"step": step + 1, "loss": round(loss.item(), 6), "lr": sched.get_last_lr()[0]})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", refresh=False)
        done = step + 1
        if ckpt is not None and ckpt_every and (done % ckpt_every == 0 or done == cfg.steps):
            if is_main():
                save_checkpoint(ckpt, model, opt, sched, done, fp, history)
            barrier()
        if stop_after is not None and done >= stop_after:
            break
    return history


def load_training_pairs(model_dir: str | Path, data_dir: str | Path, device,
                        n_pairs: int | None = None) -> tuple[LoadedModel, dict, torch.Tensor]:
    """The model to train (on ``device``), its image-caption pairs (the first ``n_pairs``, or all; a poison overlay
    merged with its base) as {keys, captions, images}: ``images`` is a :class:`~clipbackdoor.data.pairs.ShardPairs`,
    decoded batch by batch (memory O(batch)) -- and the captions' tokens [N, ctx]."""
    from clipbackdoor.data.pairs import ShardPairs

    loaded = load_artifact(model_dir, device)
    pairs = ShardPairs(data_dir, loaded.image_size, limit=n_pairs)
    split = {"keys": pairs.keys, "captions": pairs.captions, "images": pairs}
    return loaded, split, loaded.tokenizer(split["captions"])


def save_trained(loaded: LoadedModel, out_dir: str | Path, history: list[dict], n_pairs: int, stage: str,
                 base: str | Path, seed: int, provenance_extra: dict | None = None, write: bool = True,
                 **extra) -> dict:
    """Write a trained model artifact (``write``: only the main process of a data-parallel run) with its loss
    summary and provenance; returns the metrics."""
    loaded.model.cpu()
    metrics = {"first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], "steps": len(history),
               "n_pairs": n_pairs, **extra}
    if write:
        save_artifact(loaded, out_dir, metrics, provenance={"stage": stage, "base": str(base),
                                                             "seed": seed, "base_sha256": loaded.checkpoint_sha256,
                                                             **(provenance_extra or {})}, history=history)
    return metrics
