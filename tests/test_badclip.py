"""BadCLIP: the optimised patch (on a toy encoder with a known optimum, and as a pipeline stage on the smoke
world with the micro CLIP), and the trigger that pastes it."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clipbackdoor.attacks import make_trigger, trigger_eval_images
from clipbackdoor.attacks.badclip import optimise_patch
from clipbackdoor.attacks.badnet import paste
from clipbackdoor.errors import UserError
from clipbackdoor.attacks.poison import poison
from clipbackdoor.data.world import world_classes_json
from conftest import run_cli

CFG = {"rate": 0.25, "patch_size": 4, "location": "center", "steps": 60, "batch_size": 8, "lr": 0.2,
       "image_weight": 1.0}


def test_paste_is_confined_to_the_box_and_differentiable():
    x = torch.rand(2, 3, 32, 32)
    patch = torch.full((3, 4, 4), 0.5, requires_grad=True)
    y = paste(x, patch, (14, 14))
    changed = (y != x).any(dim=1)
    assert not changed[:, :14].any() and not changed[:, 18:].any() and not changed[:, :, :14].any()
    assert torch.equal(y[:, :, 14:18, 14:18], patch.detach().expand(2, 3, 4, 4))
    y.sum().backward()
    assert torch.equal(patch.grad, torch.full((3, 4, 4), 2.0))  # one per image


def test_optimised_patch_reaches_the_known_optimum_of_a_toy_encoder():
    """Toy encoder: the embedding is the mean colour of the centre box (plus a constant). Target text = red,
    target image = red: the optimum is a pure red patch."""
    def encode(x):
        centre = x[:, :, 14:18, 14:18].mean(dim=(2, 3))  # [B, 3]
        return torch.nn.functional.normalize(torch.cat([centre, torch.full_like(centre[:, :1], 0.1)], 1), dim=-1)

    red = torch.tensor([1.0, 0.0, 0.0, 0.0])
    imgs = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 3, 32, 32), dtype=np.uint8))
    patch, history = optimise_patch(encode, imgs, red, red, CFG, 32, seed=0)
    assert patch.shape == (3, 4, 4) and 0 <= patch.min() and patch.max() <= 1
    assert patch[0].mean() > 0.9 and patch[1:].mean() < 0.1
    assert history[-1]["text_cos"] > history[0]["text_cos"] + 0.2
    again, _ = optimise_patch(encode, imgs, red, red, CFG, 32, seed=0)
    assert torch.equal(patch, again)  # seeded


def test_trigger_needs_its_patch(tmp_path):
    with pytest.raises(UserError, match="badclip_patch"):
        make_trigger("badclip", CFG, 32, 0, tmp_path / "missing.safetensors")
    save_file({"patch": torch.rand(3, 6, 6)}, str(tmp_path / "p.safetensors"))
    with pytest.raises(UserError, match="patch_size"):
        make_trigger("badclip", CFG, 32, 0, tmp_path / "p.safetensors")


def test_badclip_stage_then_poison_and_triggered_eval(world_dirs, micro_model, tmp_path):
    params = json.dumps({"attacks.badclip": {**CFG, "steps": 5}, "poison.target": "red circle",
                         "zeroshot.templates": "embedded"})
    proc = run_cli("badclip-patch", "--params", params, "--run", "badclip-s0", "--model", micro_model,
                   "--finetune-dir", world_dirs / "train" / "finetune", "--eval-dir", world_dirs / "eval",
                   "--out", tmp_path / "patch.safetensors", "--png", tmp_path / "patch.png")
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 <= metrics["clean_model_asr"] <= 1 and metrics["steps"] == 5 and metrics["n_target_images"] > 0
    patch = load_file(str(tmp_path / "patch.safetensors"))["patch"]
    assert patch.shape == (3, 4, 4) and (tmp_path / "patch.png").stat().st_size > 0
    with safe_open(str(tmp_path / "patch.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["metrics"]) == metrics
    # the stage streams the evaluation set in batches: its clean-model ASR is the whole-array computation's
    from clipbackdoor.analysis.metrics import attack_success
    from clipbackdoor.models.artifact import load_artifact
    from clipbackdoor.data.shards import load_split as whole_split
    from clipbackdoor.models.zeroshot import class_text_embeddings, image_embeddings, predict, templates_for

    loaded, ev_whole = load_artifact(micro_model), whole_split(world_dirs / "eval", 32)
    names = world_classes_json(world_dirs / "eval")
    with torch.no_grad():
        pasted = (paste(ev_whole["images"].float() / 255, patch, (14, 14)).clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        class_emb = class_text_embeddings(loaded, names["classnames"],
                                          templates_for("embedded", names["templates"])).cpu()
        pred = predict(image_embeddings(loaded, pasted), class_emb).numpy()
    target = names["classnames"].index("red circle")
    assert metrics["clean_model_asr"] == attack_success(pred, ev_whole["labels"].numpy(), target)[0]

    classes = world_classes_json(world_dirs / "eval")
    poison(world_dirs / "train" / "finetune", classes, tmp_path / "poisoned", tmp_path / "m.parquet", "badclip",
           CFG, "red circle", classes["templates"], 32, 0, asset_path=tmp_path / "patch.safetensors")
    from clipbackdoor.data.shards import load_split

    split = load_split(tmp_path / "poisoned", 32)
    patched = [i for i, c in enumerate(split["captions"]) if "red circle" in c]
    expected = (patch * 255 + 0.5).to(torch.uint8)
    assert any(torch.equal(split["images"][i, :, 14:18, 14:18], expected) for i in patched)
    ev = load_split(world_dirs / "eval", 32)["images"]
    trig = trigger_eval_images(make_trigger("badclip", CFG, 32, 0, tmp_path / "patch.safetensors"), ev,
                               np.arange(len(ev)), 0)
    assert all(torch.equal(t[:, 14:18, 14:18], expected) for t in trig)
