import json

import open_clip
import pytest
import torch

from clipbackdoor.errors import UserError
from clipbackdoor.models.artifact import PROJECT_MODELS, create, load_artifact, save_artifact


def test_project_configs_are_registered_with_open_clip():
    assert {"clipbackdoor-tiny-vit-p8", "clipbackdoor-micro-vit-p8"} <= set(open_clip.list_models())
    tiny = create("clipbackdoor-tiny-vit-p8")
    visual = tiny.model.visual
    assert len(visual.transformer.resblocks) == 6
    assert visual.transformer.resblocks[0].attn.num_heads == 8
    assert tiny.image_size == 32 and tiny.tokenizer(["a red circle"]).shape == (1, 24)
    assert set(PROJECT_MODELS) == {"clipbackdoor-tiny-vit-p8", "clipbackdoor-micro-vit-p8", "clipbackdoor-narrow-vit-b32"}


def test_artifact_round_trip(tmp_path):
    a = create("clipbackdoor-micro-vit-p8")
    save_artifact(a, tmp_path / "m", {"zeroshot_top1/world": 0.5})
    b = load_artifact(tmp_path / "m")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert json.loads((tmp_path / "m" / "metrics.json").read_text()) == {"zeroshot_top1/world": 0.5}
    assert len(b.checkpoint_sha256) == 64
    assert not list((tmp_path / "m").glob(".*tmp"))  # no temporaries left behind


def test_checkpoint_from_another_config_is_rejected(tmp_path):
    save_artifact(create("clipbackdoor-micro-vit-p8"), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["name"] = "clipbackdoor-tiny-vit-p8"
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not fit model 'clipbackdoor-tiny-vit-p8'"):
        load_artifact(tmp_path / "m")


def test_unknown_model_and_offline_pretrained_fail_clearly(monkeypatch):
    with pytest.raises(UserError, match="not an open_clip model"):
        create("ViT-Z-99")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        create("ViT-B-32", pretrained="openai")  # a real tag, but this machine is offline
    assert "no internet" in info.value.fix


def test_unknown_pretrained_tag_lists_the_valid_ones(tmp_path):
    with pytest.raises(UserError) as info:
        create("ViT-B-32", pretrained="opneai")
    assert "not a pretrained tag of ViT-B-32" in info.value.problem and "openai" in info.value.fix
    assert "local open_clip checkpoint file" in info.value.fix
    with pytest.raises(UserError, match="is not a file"):
        create("ViT-B-32", pretrained=str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not an open_clip checkpoint of clipbackdoor-micro-vit-p8"):
        create("clipbackdoor-micro-vit-p8", pretrained=str(tmp_path / "junk.safetensors"))
