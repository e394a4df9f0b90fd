"""What a trigger-making attack stage starts from (BadCLIP's patch, Label-Consistent's hardened images): the
frozen clean model, the evaluation classes and their prompts, the target, and the clean fine-tuning pairs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipbackdoor.models.artifact import LoadedModel, load_artifact
from clipbackdoor.data.pairs import ShardPairs
from clipbackdoor.models.zeroshot import check_target
from clipbackdoor.runtime import pick_device
from clipbackdoor.data.world import world_classes_json
from clipbackdoor.models.zeroshot import templates_for


@dataclass
class AttackerView:
    device: object
    loaded: LoadedModel  # frozen (no gradients to its weights)
    classes: dict  # {"classnames": [...], "templates": [...]}
    target_idx: int
    templates: list
    split: dict  # the clean fine-tuning pairs: keys, captions, images (a ShardPairs: decoded when indexed)


def attacker_view(model_dir: str | Path, train_dir: str | Path, eval_dir: str | Path, target: str,
                  templates_kind: str) -> AttackerView:
    device = pick_device(gpu=True)
    loaded = load_artifact(model_dir, device)
    loaded.model.requires_grad_(False)
    classes = world_classes_json(eval_dir)
    pairs = ShardPairs(train_dir, loaded.image_size)  # memory O(batch): the attacks sample batches from it
    return AttackerView(device, loaded, classes, check_target(target, classes["classnames"]),
                        templates_for(templates_kind, classes["templates"]),
                        {"keys": pairs.keys, "captions": pairs.captions, "images": pairs})
