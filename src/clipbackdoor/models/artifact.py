"""CLIP models through open_clip: the project's tiny configs, pretrained loading, and model artifacts.

A model artifact is a folder with ``model.safetensors`` (weights only: never pickled), ``model.json``
(open_clip name, config, preprocessing statistics, provenance) and ``metrics.json``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from clipbackdoor.errors import UserError
from clipbackdoor.io import load_safetensors, read_json, save_safetensors, write_json, write_text

CONFIG_DIR = Path(__file__).with_name("configs")
PROJECT_MODELS = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def register_model_configs() -> list[str]:
    """Make the project's model configs known to open_clip (idempotent)."""
    if not set(PROJECT_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)
    return PROJECT_MODELS


register_model_configs()


@dataclass
class LoadedModel:
    model: open_clip.CLIP
    tokenizer: object
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    checkpoint_sha256: str | None = None


def _preprocess_stats(model) -> tuple[tuple, tuple, int]:
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return tuple(cfg["mean"]), tuple(cfg["std"]), int(size)


def check_pretrained(name: str, pretrained: str | None, key: str = "model.pretrained") -> None:
    """``pretrained`` must be None, a local checkpoint file, or one of open_clip's tags for ``name`` (checked at
    workflow load for the tags, so a typo never waits for a GPU job to fail)."""
    if pretrained is None or Path(pretrained).is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        looks_like_path = "/" in pretrained or pretrained.endswith((".safetensors", ".bin", ".pt", ".pth"))
        raise UserError(f"{key} = {pretrained!r} is " + (
            "not a file" if looks_like_path else f"not a pretrained tag of {name}"),
            fix=f"give a local open_clip checkpoint file, or one of {name}'s tags: "
                + (", ".join(tags[:8]) + (", ..." if len(tags) > 8 else "") if tags else "(none: use a file)"))


def create(name: str, pretrained: str | None = None) -> LoadedModel:
    """A fresh (random or open_clip-pretrained) model. Fails with a clear message when offline."""
    if name not in open_clip.list_models():
        raise UserError(f"model.name = {name!r} is not an open_clip model",
                        fix=f"use one of the project's ({', '.join(PROJECT_MODELS)}) or an open_clip name")
    check_pretrained(name, pretrained)
    try:
        model = open_clip.create_model(name, pretrained=pretrained)
    except Exception as exc:  # hub/network errors come in many types
        if pretrained is None:
            raise
        if Path(pretrained).is_file():
            raise UserError(f"{pretrained}: not an open_clip checkpoint of {name} ({exc.__class__.__name__}: "
                            f"{str(exc)[:160]})", fix=f"give the checkpoint file of a {name} (safetensors or "
                            "open_clip's own format), or change model.name to the checkpoint's architecture") from None
        raise UserError(f"cannot load pretrained weights {name}/{pretrained!r} ({exc.__class__.__name__}: "
                        f"{str(exc)[:160]})", fix="this machine has no internet: download the open_clip weights "
                        "elsewhere and set model.pretrained to the local file path (or pre-fill the HF cache)") from None
    mean, std, size = _preprocess_stats(model)
    return LoadedModel(model, open_clip.get_tokenizer(name), name, mean, std, size)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


HISTORY_FILE = "history.csv"  # a trained model's loss per step (the training-curve figure reads it)


def save_artifact(loaded: LoadedModel, out_dir: str | Path, metrics: dict | None = None,
                  provenance: dict | None = None, history: list[dict] | None = None) -> None:
    """model.safetensors, model.json, metrics.json and, for a trained model, history.csv (step, loss, lr)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}
    save_safetensors(out_dir / "model.safetensors", state, {"open_clip_name": loaded.name})
    write_json(out_dir / "model.json", {
        "name": loaded.name, "open_clip_cfg": open_clip.get_model_config(loaded.name),
        "mean": list(loaded.mean), "std": list(loaded.std), "image_size": loaded.image_size,
        "provenance": provenance or {}})
    write_json(out_dir / "metrics.json", metrics or {})
    if history:
        lines = ["step,loss,lr"] + [f"{h['step']},{h['loss']:.6g},{h['lr']:.6g}" for h in history]
        write_text(out_dir / HISTORY_FILE, "\n".join(lines) + "\n")


def load_artifact(model_dir: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a model artifact; the weights must match the recorded config exactly."""
    model_dir = Path(model_dir)
    weights, meta_path = model_dir / "model.safetensors", model_dir / "model.json"
    if not weights.exists() or not meta_path.exists():
        raise UserError(f"{model_dir}: not a model artifact (needs model.safetensors and model.json)",
                        fix="run the stage that produces it, or `dvc pull` it")
    meta = read_json(meta_path, "the stage that wrote this model")
    loaded = create(meta["name"], pretrained=None)
    state = load_safetensors(weights, made_by="the stage that wrote this model")
    expected = loaded.model.state_dict()
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    extra = [k for k in state if k not in expected]
    if wrong or extra:
        culprit = (wrong or extra)[0]
        raise UserError(f"{weights}: checkpoint does not fit model {meta['name']!r} (e.g. {culprit!r}: "
                        f"{tuple(state[culprit].shape) if culprit in state else 'missing'})",
                        fix="the checkpoint comes from another model config: rerun the stage that wrote it")
    loaded.model.load_state_dict(state)
    loaded.model.to(device).eval()
    # the preprocessing the weights were trained with (e.g. a pretrained tag's mean/std), not the config default
    loaded.mean = tuple(meta.get("mean", loaded.mean))
    loaded.std = tuple(meta.get("std", loaded.std))
    loaded.image_size = int(meta.get("image_size", loaded.image_size))
    loaded.checkpoint_sha256 = file_sha256(weights)
    return loaded


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, 3, H, W] (or float in [0, 1]) -> CLIP-normalised float [B, 3, H, W]."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    if images.dtype != torch.uint8:  # (may require grad: the adversarial stages) out of place
        return (images.float() - m) / s
    # the same operations as (x / 255 - m) / s, in place on the one float copy: bit-identical, and a third of the
    # memory traffic (out of place, normalising a batch took longer than decoding it in the training loader)
    return images.float().div_(255.0).sub_(m).div_(s)


def text_token_states(model, token_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP text tower on token embeddings [B, ctx, w] -> per-token states after ``ln_final`` [B, ctx, w]
    (what encode_text pools; Stable Diffusion conditions on these; the audit feeds continuous embeddings)."""
    x = token_embeds + model.positional_embedding
    return model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
