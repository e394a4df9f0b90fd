"""Label-Consistent's adversarial step: PGD respects its bound and lowers the true-class score; the stage's
hardened images are what the poison stage pastes the trigger on; evaluation needs no stage output."""

import json

import pytest
import torch
import torch.nn.functional as F

from clipbackdoor.attacks import make_trigger
from clipbackdoor.errors import UserError
from clipbackdoor.attacks.lc_adversarial import load_hard_images, pgd_away
from clipbackdoor.attacks.poison import poison_split
from clipbackdoor.data.shards import load_split
from conftest import run_cli

LC = {"rate": 0.05, "patch_size": 4, "location": "bottom_right", "pattern": "random", "adv_eps": 8 / 255,
      "adv_steps": 5}


def test_pgd_stays_in_its_ball_and_raises_the_true_class_loss():
    torch.manual_seed(0)
    weight = torch.randn(4, 3 * 8 * 8)

    def logits_fn(x):  # a fixed linear classifier on 8x8 images
        return x.flatten(1) @ weight.T

    x = torch.rand(10, 3, 8, 8)
    label = 2
    adv = pgd_away(logits_fn, x, label, eps=0.03, steps=5, batch_size=4)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= 0.03 + 1e-6
    target = torch.full((10,), label)
    before = F.cross_entropy(logits_fn(x), target, reduction="none")
    after = F.cross_entropy(logits_fn(adv), target, reduction="none")
    assert (after > before).all()
    assert torch.equal(adv, pgd_away(logits_fn, x, label, eps=0.03, steps=5, batch_size=4))  # deterministic
    assert torch.equal(pgd_away(logits_fn, x, label, eps=0.0, steps=5), x)


def test_stage_then_poison_uses_the_hardened_images(world_dirs, micro_model, tmp_path):
    target = "red circle"
    params = json.dumps({"attacks.label_consistent": LC, "poison.target": target, "zeroshot.templates": "embedded"})
    out = tmp_path / "hard.safetensors"
    proc = run_cli("lc-adversarial", "--params", params, "--run", "label_consistent-s0", "--model", micro_model,
                   "--finetune-dir", world_dirs / "train" / "finetune", "--eval-dir", world_dirs / "eval", "--out", out)
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    split = load_split(world_dirs / "train" / "finetune", 32)
    eligible = [k for k, c in zip(split["keys"], split["captions"]) if target in c]
    hard = load_hard_images(out)
    assert sorted(hard) == sorted(eligible) and metrics["n_images"] == len(eligible)
    assert 0 < metrics["linf"] <= 8 / 255 + 1 / 255  # uint8 rounding
    assert metrics["clean_model_target_acc_after"] <= metrics["clean_model_target_acc_before"]

    rate = len(eligible) / len(split["keys"])
    new, rows, idx = poison_split(split, "label_consistent", {**LC, "rate": rate}, target, ["a {}."], 32, 0, out)
    trigger = make_trigger("label_consistent", LC, 32, 0)
    for i in idx:  # outside the patch: the hardened image; inside: the patch
        key = split["keys"][i]
        assert torch.equal(new["images"][i, :, :28], hard[key][:, :28])
        assert torch.equal(new["images"][i, :, 28:, 28:], (trigger.pattern * 255 + 0.5).to(torch.uint8))
    assert new["captions"] == split["captions"]
    with pytest.raises(UserError, match="lc_adversarial"):  # adv_eps > 0 and no stage output
        poison_split(split, "label_consistent", {**LC, "rate": rate}, target, ["a {}."], 32, 0)
