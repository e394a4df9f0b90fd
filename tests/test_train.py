import dataclasses

import pytest
import torch

from clipbackdoor.config import OptimConfig
from clipbackdoor.models.artifact import create
from clipbackdoor.data.shards import load_split
from clipbackdoor.training.train import LOGIT_SCALE_MAX, batch_indices, make_optimizer, param_groups, train_clip

OPT = OptimConfig(steps=12, batch_size=32, lr=2e-3, weight_decay=0.1, warmup_steps=2, betas=(0.9, 0.98), eps=1e-6)


def _data(world_dirs):
    split = load_split(world_dirs / "train" / "pretrain", 32)
    loaded = create("clipbackdoor-micro-vit-p8")
    return loaded, split["images"], loaded.tokenizer(split["captions"])


def test_a_few_steps_decrease_the_loss(world_dirs):
    torch.manual_seed(0)
    loaded, images, tokens = _data(world_dirs)
    history = train_clip(loaded, images, tokens, OPT, seed=0)
    first = sum(h["loss"] for h in history[:3]) / 3
    last = sum(h["loss"] for h in history[-3:]) / 3
    assert last < first - 0.1
    assert 0 <= float(loaded.model.logit_scale) <= LOGIT_SCALE_MAX


def test_a_trained_model_artifact_keeps_its_loss_history(world_dirs, tmp_path):
    """save_trained writes history.csv (step, loss, lr per step) beside the weights: the training-curve figure."""
    import pandas as pd

    from clipbackdoor.training.train import save_trained

    loaded, images, tokens = _data(world_dirs)
    history = train_clip(loaded, images, tokens, OPT, seed=0)
    save_trained(loaded, tmp_path / "model", history, len(tokens), "finetune", "base", 0)
    table = pd.read_csv(tmp_path / "model" / "history.csv")
    assert list(table.columns) == ["step", "loss", "lr"] and table.step.tolist() == list(range(1, OPT.steps + 1))
    assert table.loss.tolist() == pytest.approx([h["loss"] for h in history], rel=1e-5)
    assert table.lr.iloc[0] < table.lr.max()  # the warm-up


def test_no_decay_on_norms_biases_and_logit_scale():
    model = create("clipbackdoor-micro-vit-p8").model
    no_decay, decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in nd and any("ln_" in n for n in nd) and any(n.endswith("bias") for n in nd)
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1


def test_layer_decay_scales_the_image_tower_learning_rates():
    model = create("clipbackdoor-micro-vit-p8").model
    n = len(model.visual.transformer.resblocks)
    assert len(param_groups(model, 0.1, 1.0)) == 2  # off: the plain two groups
    cfg = dataclasses.replace(OPT, lr=1e-3, layer_decay=0.5)
    opt, _ = make_optimizer(model, cfg)
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # before warm-up
    named = dict(model.named_parameters())
    assert lr_of[id(named[f"visual.transformer.resblocks.{n - 1}.attn.in_proj_weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["visual.transformer.resblocks.0.mlp.c_fc.weight"])] == pytest.approx(1e-3 * 0.5 ** (n - 1))
    assert lr_of[id(named["visual.conv1.weight"])] == pytest.approx(1e-3 * 0.5 ** n)
    assert lr_of[id(named["visual.proj"])] == lr_of[id(named["transformer.resblocks.0.attn.in_proj_weight"])] == 1e-3
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(named["visual.conv1.weight"])] == 0.1 and decay_of[id(named["logit_scale"])] == 0.0


def test_batch_order_is_a_function_of_seed_and_step():
    a = batch_indices(100, 32, 5, seed=1)
    assert torch.equal(a, batch_indices(100, 32, 5, seed=1))
    assert not torch.equal(a, batch_indices(100, 32, 5, seed=2))
    epoch = torch.cat([batch_indices(100, 32, s, seed=1) for s in range(3)])
    assert len(set(epoch.tolist())) == 96  # no repeats inside an epoch


def test_resume_after_interruption_gives_identical_weights(world_dirs, tmp_path):
    torch.manual_seed(0)
    ref, images, tokens = _data(world_dirs)
    init = {k: v.clone() for k, v in ref.model.state_dict().items()}
    train_clip(ref, images, tokens, OPT, seed=0)

    interrupted = create("clipbackdoor-micro-vit-p8")
    interrupted.model.load_state_dict(init)
    train_clip(interrupted, images, tokens, OPT, seed=0, ckpt_dir=tmp_path, ckpt_every=5, stop_after=7)
    resumed = create("clipbackdoor-micro-vit-p8")
    resumed.model.load_state_dict(init)  # a fresh process would start from the same init
    history = train_clip(resumed, images, tokens, OPT, seed=0, ckpt_dir=tmp_path, ckpt_every=5)
    assert history[0]["step"] == 1 and len(history) == OPT.steps
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_checkpoint_of_another_run_is_not_resumed(world_dirs, tmp_path):
    loaded, images, tokens = _data(world_dirs)
    train_clip(loaded, images, tokens, OPT, seed=0, ckpt_dir=tmp_path, ckpt_every=4, stop_after=4)
    other = create("clipbackdoor-micro-vit-p8")
    history = train_clip(other, images, tokens, OPT, seed=1, ckpt_dir=tmp_path, ckpt_every=4, stop_after=2)
    assert history[0]["step"] == 1  # started fresh: different seed = different run


def test_checkpoint_is_not_resumed_on_other_data(world_dirs, tmp_path):
    """Regression: re-poisoned data of the same size must start a fresh run, not reuse the old weights."""
    loaded, images, tokens = _data(world_dirs)
    train_clip(loaded, images, tokens, OPT, seed=0, ckpt_dir=tmp_path, ckpt_every=4, stop_after=4)
    changed = images.clone()
    changed[0, :, :4, :4] = 255
    history = train_clip(create("clipbackdoor-micro-vit-p8"), changed, tokens, OPT, seed=0, ckpt_dir=tmp_path,
                         ckpt_every=4, stop_after=2)
    assert history[0]["step"] == 1


PRETRAIN_SCRIPT = """
import hashlib, sys
from pathlib import Path
import torch
import clipbackdoor
from clipbackdoor.config import ModelConfig, OptimConfig, ZeroShotConfig
from clipbackdoor.training.pretrain import pretrain
torch.set_num_threads(1)
root = Path(sys.argv[1])
pretrain(root / "train", {"world": root / "eval"}, Path(sys.argv[2]), ModelConfig("clipbackdoor-micro-vit-p8", None),
         OptimConfig(3, 16, 1e-3, 0.1, 1, (0.9, 0.98), 1e-6), ZeroShotConfig("embedded", 64), seed=5)
print(hashlib.sha256((Path(sys.argv[2]) / "model.safetensors").read_bytes()).hexdigest())
"""


def test_pretraining_is_byte_identical_across_processes(world_dirs, tmp_path):
    """torch seeds itself randomly per process; the model init must come from params.seed."""
    import subprocess
    import sys

    digests = [subprocess.run([sys.executable, "-c", PRETRAIN_SCRIPT, str(world_dirs), str(tmp_path / f"m{i}")],
                              capture_output=True, text=True, check=True).stdout.split()[-1] for i in range(2)]
    assert digests[0] == digests[1]
