"""RoCLIP: nearest-neighbour captions from a memory bank, every k-th epoch, and the stage on the smoke world."""

import torch

from clipbackdoor.config import OptimConfig, RoCLIPConfig
from clipbackdoor.defenses.roclip import RoCLIPLoss, nearest_in_bank, run_roclip

OPT = OptimConfig(steps=8, batch_size=8, lr=1e-3, weight_decay=0.1, warmup_steps=1, betas=(0.9, 0.98), eps=1e-6)


def test_nearest_in_a_hand_made_bank():
    bank = torch.eye(3)  # captions pointing along x, y, z
    images = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 1.0], [0.1, 1.0, 0.3]]), dim=-1)
    assert nearest_in_bank(images, bank).tolist() == [0, 2, 1]


def test_replacement_only_in_every_kth_epoch():
    tokens = torch.arange(32).view(16, 2)
    loss = RoCLIPLoss(torch.zeros(16, 3, 4, 4, dtype=torch.uint8), tokens, RoCLIPConfig(OPT, k_epochs=2, bank_size=4), 0)
    calls = []
    loss.neighbour_tokens = lambda loaded, epoch: calls.append(epoch) or tokens.flip(0)
    seen = []
    for step in range(8):  # 16 pairs / batch 8 = 2 steps per epoch: epochs 0..3
        loss.begin_step(None, step)
        seen.append(loss.replaced is not None)
    assert seen == [False, False, True, True, False, False, True, True]
    assert calls == [1, 3]  # once per replacement epoch


def test_stage_trains_with_bank_neighbours(world_dirs, micro_model, tmp_path):
    cfg = RoCLIPConfig(OPT, k_epochs=2, bank_size=8)
    finetune_dir = world_dirs / "train" / "finetune"
    a = run_roclip(micro_model, finetune_dir, tmp_path / "a", cfg, seed=0)
    run_roclip(micro_model, finetune_dir, tmp_path / "b", cfg, seed=0)
    assert a["steps"] == 8 and a["replacement_epochs"] == 1  # 32 pairs / 8 = 4 steps per epoch
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
