"""Zero-shot classification: per class, the normalised mean of its template text embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from clipbackdoor.models.artifact import LoadedModel, normalize
from clipbackdoor.runtime import autocast
from clipbackdoor.errors import UserError


def templates_for(kind: str, embedded_templates: list[str]) -> list[str]:
    """Prompt templates as format strings ("a bad photo of a {}."): open_clip ships OpenAI's 80 as lambdas, which
    neither classes.json nor the poisoned captions' ``str.format`` can take."""
    if kind == "openai_imagenet":
        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    return list(embedded_templates)


@torch.no_grad()
def class_text_embeddings(loaded: LoadedModel, classnames: list[str], templates: list) -> torch.Tensor:
    """[C, d] unit-norm class embeddings."""
    device = next(loaded.model.parameters()).device
    with autocast(device):
        weights = build_zero_shot_classifier(loaded.model, loaded.tokenizer, classnames, templates,
                                             num_classes_per_batch=10, device=device, use_tqdm=False).float()
    return weights.T.contiguous()  # open_clip returns [d, C]


@torch.no_grad()
def image_embeddings(loaded: LoadedModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> unit-norm image embeddings [N, d]."""
    device = next(loaded.model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size].to(device), loaded.mean, loaded.std)
        with autocast(device):
            out.append(F.normalize(loaded.model.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(loaded: LoadedModel, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Texts -> unit-norm text embeddings [len(texts), d] on the host, ``batch_size`` texts at a time (a pool of
    thousands of descriptions in one batch would hold every layer's activations of all of them)."""
    device = next(loaded.model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        with autocast(device):
            out.append(F.normalize(loaded.model.encode_text(loaded.tokenizer(texts[i:i + batch_size]).to(device))
                                   .float(), dim=-1).cpu())
    return torch.cat(out)


def predict(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """[N, d] x [C, d] -> predicted class indices [N]."""
    return (image_emb @ class_emb.T).argmax(dim=-1)


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
