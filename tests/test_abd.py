"""ABD (seed 002): the perturbation generator's bounds, L_bd, the fine-tune arms, Fig. 2 and Tables I-III."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from clipbackdoor.defenses.abd import (PerturbationGenerator, adversarial_images, backdoor_loss, patch_side,
                              run_abd_generator, train_perturbation)
from clipbackdoor.defenses.abd_finetune import run_abd_finetune
from clipbackdoor.defenses.abd_similarity import similarity_row
from clipbackdoor.config import AbdFinetuneConfig, AbdGeneratorConfig, OptimConfig
from clipbackdoor.models.artifact import load_artifact
from clipbackdoor.analysis.report import summary_frame
from clipbackdoor.data.shards import load_split
from clipbackdoor.analysis.tables import write_abd_tables

GEN = AbdGeneratorConfig(steps=6, batch_size=8, lr=1e-2, z_dim=8, patch_fraction=0.03, location="bottom_right",
                         eps=0.03, temperature=0.1, adv_weight=10.0, text_weight=5.0, l2_weight=1.0, gan_weight=1.0,
                         lbd_weight=1.0)
OPT = OptimConfig(steps=4, batch_size=8, lr=1e-3, weight_decay=0.1, warmup_steps=1, betas=(0.9, 0.98), eps=1e-6)


def test_patch_covers_about_three_percent_and_values_stay_in_range():
    assert patch_side(32, 0.03) == 6 and patch_side(224, 0.03) == 39  # 3.5 % and 3.03 % of the area
    torch.manual_seed(0)
    gen = PerturbationGenerator(8, 6, "patch", 0.03, seed=0)
    with torch.no_grad():
        gen.fc.weight.mul_(100)  # saturate: the sigmoid still keeps the patch inside [0, 1]
        patch = gen()
    assert patch.shape == (3, 6, 6) and 0 <= patch.min() and patch.max() <= 1


def test_bounded_perturbation_respects_eps_after_quantisation():
    gen = PerturbationGenerator(8, 32, "bounded", 0.03, seed=0)
    with torch.no_grad():
        gen.fc.weight.mul_(100)
        delta = gen()
    assert delta.abs().max() <= 0.03 + 1e-7 and delta.abs().max() > 0.029  # saturated at the bound, never above
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    adv = adversarial_images(images, delta, "bounded", "bottom_right", seed=0)
    assert (adv.int() - images.int()).abs().max() <= round(0.03 * 255) + 1  # 8 levels incl. rounding


def test_patch_touches_only_its_corner_or_a_seeded_random_square():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    patch = torch.rand(3, 6, 6)
    adv = adversarial_images(images, patch, "patch", "bottom_right", seed=0)
    changed = (adv != images).any(1)  # [N, H, W]
    assert not changed[:, :26, :].any() and not changed[:, :, :26].any()
    assert torch.equal(adv[:, :, 26:, 26:], (patch * 255).round().to(torch.uint8).expand(6, -1, -1, -1))
    rand = adversarial_images(images, patch, "patch", "random", seed=0)
    assert torch.equal(rand, adversarial_images(images, patch, "patch", "random", seed=0))  # seeded
    assert all(((rand[i] != images[i]).any(0)).sum() <= 36 for i in range(6))
    assert len({tuple((rand[i] != images[i]).any(0).nonzero()[0].tolist()) for i in range(6)}) > 1  # positions vary
    half = adversarial_images(images, patch, "patch", "bottom_right", seed=0, fraction=0.5)
    assert sum(bool((half[i] != images[i]).any()) for i in range(6)) == 3


def test_backdoor_loss_is_lowest_when_the_adversarial_feature_is_the_backdoor_direction():
    torch.manual_seed(0)
    normal = F.normalize(torch.randn(8, 16), dim=-1)
    direction = F.normalize(torch.randn(16), dim=-1)
    at_direction = backdoor_loss(direction.expand(8, -1), normal, direction, 0.1)
    like_normal = backdoor_loss(normal, normal, direction, 0.1)  # the poisoned encoder sees what the normal one sees
    random = backdoor_loss(F.normalize(torch.randn(8, 16), dim=-1), normal, direction, 0.1)
    assert at_direction < random < like_normal
    assert at_direction < 0.05  # the positive wins by a margin of ~1/t against 8 near-orthogonal negatives


def test_generator_training_is_seeded_bounded_and_uses_lbd(world_dirs, micro_model):
    loaded = load_artifact(micro_model)
    normal = load_artifact(micro_model)
    split = load_split(world_dirs / "train" / "finetune", loaded.image_size)
    tokens = loaded.tokenizer(split["captions"])
    a, hist = train_perturbation(loaded, normal, split["images"], tokens, GEN, "bounded", seed=0)
    b, _ = train_perturbation(loaded, normal, split["images"], tokens, GEN, "bounded", seed=0)
    plain, plain_hist = train_perturbation(loaded, None, split["images"], tokens, GEN, "bounded", seed=0)
    assert torch.equal(a, b) and a.abs().max() <= 0.03 + 1e-7
    from clipbackdoor.data.pairs import ShardPairs  # the stage's path: a batch decoded per step from the shards

    streamed, _ = train_perturbation(loaded, normal, ShardPairs(world_dirs / "train" / "finetune", 32), tokens, GEN,
                                     "bounded", seed=0)
    assert torch.equal(streamed, a)
    assert "lbd" in hist[0] and "gan" in hist[0] and "lbd" not in plain_hist[0]
    assert not torch.equal(a, plain)  # L_bd changes the perturbation
    no_gan, h = train_perturbation(loaded, None, split["images"], tokens,
                                   AbdGeneratorConfig(**{**GEN.__dict__, "gan_weight": 0.0}), "patch", seed=0)
    assert "gan" not in h[0] and no_gan.shape == (3, 6, 6)


def test_generator_stage_writes_every_kind_and_variant(world_dirs, micro_model, tmp_path):
    from safetensors.torch import load_file

    run_abd_generator(micro_model, micro_model, world_dirs / "train" / "finetune", tmp_path / "p.safetensors",
                      AbdGeneratorConfig(**{**GEN.__dict__, "steps": 2}), seed=0)
    out = load_file(tmp_path / "p.safetensors")
    assert set(out) == {"patch.uap", "patch.uap_lbd", "bounded.uap", "bounded.uap_lbd"}
    assert out["patch.uap"].shape == (3, 6, 6) and out["bounded.uap_lbd"].shape == (3, 32, 32)


@pytest.fixture(scope="module")
def perturbations(world_dirs, micro_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("abd") / "p.safetensors"
    run_abd_generator(micro_model, micro_model, world_dirs / "train" / "finetune", path,
                      AbdGeneratorConfig(**{**GEN.__dict__, "steps": 2}), seed=0)
    return path


def test_finetune_arms_train_on_what_their_switches_say(world_dirs, micro_model, perturbations, tmp_path):
    cfg = AbdFinetuneConfig("patch", "bottom_right", 1.0, 0.3, "builtin", OPT)
    data = world_dirs / "train" / "finetune"
    out = {arm: run_abd_finetune(micro_model, data, tmp_path / arm, arm, cfg, 0, perturbations)
           for arm in ("finetune_clean", "abd_eda_only", "abd_img_only", "abd", "uap")}
    captions = load_split(data)["captions"]
    assert out["finetune_clean"]["caption_example"] == out["abd_img_only"]["caption_example"] == captions[0]
    assert out["abd"]["caption_example"] == out["abd_eda_only"]["caption_example"] != captions[0]  # EDA copy
    weights = {arm: (tmp_path / arm / "model.safetensors").read_bytes() for arm in out}
    assert len(set(weights.values())) == 5  # every switch changes the training data
    again = run_abd_finetune(micro_model, data, tmp_path / "again", "abd", cfg, 0, perturbations)
    assert again == out["abd"] and (tmp_path / "again/model.safetensors").read_bytes() == weights["abd"]
    with pytest.raises(ValueError, match="perturbations"):
        run_abd_finetune(micro_model, data, tmp_path / "x", "uap", cfg, 0, None)


def test_similarity_row_on_hand_made_features():
    e = torch.eye(4)  # class c's caption = axis c; target = 3
    clean = e[[0, 1]]  # each image on its own class
    triggered = e[[3, 3]]  # the trigger moves both to the target
    adv = torch.tensor([[0.8, 0, 0, 0.6], [0, 0, 0, 1]])  # image 0 leans to its class, image 1 is the target
    row = similarity_row(clean, triggered, adv, torch.tensor([0, 1]), e, target=3)
    assert row["clean_img/own_caption"] == pytest.approx(100) and row["triggered_img/target_caption"] == pytest.approx(100)
    assert row["adv_img/own_caption"] == pytest.approx(40)  # (80 + 0) / 2
    assert row["adv_img/target_caption"] == pytest.approx(80)  # (60 + 100) / 2
    assert row["adv_img/unrelated_caption"] == pytest.approx(0)
    assert row["adv_target_rate"] == pytest.approx(0.5)
    assert row["cos_adv_triggered"] == pytest.approx(0.8)  # (0.6 + 1) / 2


def test_abd_tables_and_claim_checks(tmp_path):
    rows = [("badnet", "none", 0.97, 0.96), ("badnet", "cleanclip", 0.16, 0.95), ("badnet", "abd", 0.05, 0.94),
            ("badnet", "roclip", 0.83, 0.93), ("badnet", "uap", 0.30, 0.95), ("badnet", "uap_lbd", 0.10, 0.95),
            ("badnet", "abd_img_only", 0.10, 0.95), ("badnet", "finetune_clean", 0.90, 0.96),
            ("blended", "none", 0.87, 0.97), ("blended", "cleanclip", 0.07, 0.96), ("blended", "abd", 0.09, 0.96),
            ("blended", "uap", 0.20, 0.96), ("blended", "uap_lbd", 0.25, 0.96)]
    summary_frame([{"attack": a, "repair": "-" if d == "none" else d, "defense": "none", "variant": "-", "seed": 0,
                    "eval_set": "world", "asr": asr, "cacc": c} for a, d, asr, c in rows]).to_csv(tmp_path / "s.csv",
                                                                                                 index=False)
    sim = tmp_path / "sim.csv"
    pd.DataFrame([{"run": "badnet-s0", "encoder": "poisoned", "perturbation": "patch.uap_lbd", "n_images": 4,
                   "clean_img/own_caption": 25.0, "triggered_img/target_caption": 28.5, "adv_img/own_caption": 19.8,
                   "adv_img/target_caption": 16.0, "adv_img/unrelated_caption": 5.0, "adv_target_rate": 0.5,
                   "cos_adv_triggered": 0.9}]).to_csv(sim, index=False)
    paths = write_abd_tables(tmp_path / "s.csv", [str(sim)], tmp_path / "t")
    assert [p.name for p in paths] == [f"abd_{t}.{ext}" for t in ("table1", "table2", "table3", "fig2")
                                       for ext in ("md", "html", "csv", "tex")]
    t1 = (tmp_path / "t/abd_table1.md").read_text()
    assert "| Ours (ABD) | 5.00 | 94.00 | 9.00 | 96.00 |" in t1 and "| RoCLIP | 83.00 | 93.00 | - | - |" in t1
    assert "BadNet: ABD ASR 5.00 vs CleanCLIP 16.00" in t1 and t1.count("**yes**") == 2  # BadNet ABD, BadNet L_bd
    assert "Blended: ABD ASR 9.00 vs CleanCLIP 7.00" in t1 and t1.count("**no**") == 2  # Blended ABD, Blended L_bd
    assert "| UAP (L_bd) | 10.00 | 95.00 | 25.00 | 96.00 |" in (tmp_path / "t/abd_table3.md").read_text()
    assert "| FT | 90.00 | 96.00 | - | - |" in (tmp_path / "t/abd_table2.md").read_text()
    assert "| badnet-s0 | poisoned | patch.uap_lbd | 25.00 | 28.50 | 19.80 | 16.00 | 5.00 | 0.50 | 0.90 |" in (
        tmp_path / "t/abd_fig2.md").read_text()
