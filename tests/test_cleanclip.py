"""CleanCLIP: the loss (InfoNCE pieces, weights), and the stage on the smoke world with the micro CLIP."""

import hashlib
import math

import torch
from open_clip.loss import ClipLoss

from clipbackdoor.defenses.cleanclip import cleanclip_loss_fn, info_nce, run_cleanclip
from clipbackdoor.config import CleanCLIPConfig, OptimConfig
from clipbackdoor.defenses.eda import eda_captions
from clipbackdoor.models.artifact import load_artifact, normalize
from clipbackdoor.data.shards import load_split

OPT = OptimConfig(steps=3, batch_size=8, lr=1e-3, weight_decay=0.1, warmup_steps=1, betas=(0.9, 0.98), eps=1e-6)


def cfg(inmodal=1.0, augment="autoaugment"):
    return CleanCLIPConfig(optim=OPT, inmodal_weight=inmodal, crossmodal_weight=1.0, eda_alpha=0.1,
                           synonyms="builtin", augment=augment)


def test_info_nce_limits():
    a = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    assert info_nce(a, a, torch.tensor(1000.0)) < 1e-6  # matched pairs, sharp logits
    assert abs(info_nce(a, a, torch.tensor(0.0)) - math.log(16)) < 1e-5  # no signal: log B


def test_loss_is_clip_loss_plus_inmodal(world_dirs, micro_model):
    loaded = load_artifact(micro_model)
    split = load_split(world_dirs / "train" / "finetune", loaded.image_size)
    images, tokens = split["images"][:8], loaded.tokenizer(split["captions"][:8])
    aug = loaded.tokenizer(eda_captions(split["captions"][:8], 0))
    idx = torch.arange(8)
    img_f, txt_f, scale = loaded.model(normalize(images, loaded.mean, loaded.std), tokens)[:3]
    reference = ClipLoss()(img_f, txt_f, scale)
    crossmodal_only = cleanclip_loss_fn(aug, cfg(inmodal=0.0))(loaded, images, tokens, idx)
    assert torch.allclose(crossmodal_only, reference, atol=1e-5)
    torch.manual_seed(0)
    full = cleanclip_loss_fn(aug, cfg())(loaded, images, tokens, idx)
    assert full > crossmodal_only  # the in-modal terms add a positive InfoNCE
    full.backward()
    grads = {n: p.grad for n, p in loaded.model.named_parameters() if p.grad is not None}
    assert any(n.startswith("visual.") for n in grads) and any(n.startswith("transformer.") for n in grads)


def test_stage_repairs_into_a_new_deterministic_artifact(world_dirs, micro_model, tmp_path):
    outs = []
    for name in ("a", "b"):
        m = run_cleanclip(micro_model, world_dirs / "train" / "finetune", tmp_path / name, cfg(), seed=0)
        outs.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
        assert m["steps"] == 3 and len(m["eda_example"]) == 2
    assert outs[0] == outs[1]  # seeded: same bytes
    before = load_artifact(micro_model).model.state_dict()
    after = load_artifact(tmp_path / "a").model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
