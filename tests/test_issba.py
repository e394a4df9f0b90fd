"""ISSBA: the StegaStamp-style codec trained by its own stage on the smoke-profile world, and the trigger."""

import json

import numpy as np
import pytest
import torch
import yaml

from clipbackdoor.attacks import make_trigger
from clipbackdoor.attacks.issba import StegaEncoder, load_codec, secret_bits
from clipbackdoor.config import WorldConfig
from clipbackdoor.errors import UserError
from clipbackdoor.data.shards import load_split
from conftest import ROOT, run_cli

SMOKE = yaml.safe_load((ROOT / "configs/smoke.yaml").read_text())
CFG = SMOKE["attacks"]["issba"]


@pytest.fixture(scope="module")
def smoke_codec(tmp_path_factory):
    from clipbackdoor.data.world import build_world

    root = tmp_path_factory.mktemp("issba")
    world = {**SMOKE["data"]["world"], "n_pretrain": 1}
    build_world(WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in world.items()}), 32,
                root / "train", root / "eval")
    params = json.dumps({"attacks.issba": CFG, "data.image_size": 32})
    proc = run_cli("issba-codec", "--params", params, "--run", "issba-s0",
                   "--finetune-dir", root / "train" / "finetune", "--eval-dir", root / "eval",
                   "--out", root / "codec.safetensors", "--png", root / "codec.png", "--threads", 2)
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


def test_codec_reads_back_the_secret_from_uint8_images(smoke_codec):
    root, metrics = smoke_codec
    assert metrics["bit_accuracy"] >= 0.95  # the bar, on held-out smoke-world images
    assert metrics["psnr_db"] > 20 and (root / "codec.png").stat().st_size > 0
    encoder, decoder, secret, cfg = load_codec(root / "codec.safetensors")
    assert torch.equal(secret, secret_bits(CFG["bits"], 0)) and cfg == CFG


def test_trigger_is_sample_specific_invisible_and_global(smoke_codec):
    root, _ = smoke_codec
    images = load_split(root / "eval", 32)["images"][:16]
    trigger = make_trigger("issba", {**CFG}, 32, 0, root / "codec.safetensors")
    assert trigger.kind == "global"
    out, params = trigger.apply(images, np.random.default_rng(0))
    residual = out.float() - images.float()  # [N, 3, H, W]
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert residual.abs().mean() < 16  # a few grey levels (the smoke codec trains only 300 steps)
    assert (residual[0] - residual[1]).abs().mean() > 0.5  # each image gets its own residual
    assert len(params) == 16 and all(p["mean_abs_residual"] > 0 for p in params)
    again, _ = trigger.apply(images, np.random.default_rng(1))
    assert torch.equal(out, again)  # deterministic


def test_encoder_residual_depends_on_the_secret():
    torch.manual_seed(0)
    enc = StegaEncoder(8, 32, 8)
    x = torch.rand(1, 3, 32, 32)
    a, b = enc(x, torch.zeros(1, 8)), enc(x, torch.ones(1, 8))
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_missing_or_mismatched_codec(tmp_path, smoke_codec):
    with pytest.raises(UserError, match="issba_codec"):
        make_trigger("issba", CFG, 32, 0, tmp_path / "none.safetensors")
    with pytest.raises(UserError, match="bits"):
        make_trigger("issba", {**CFG, "bits": 8}, 32, 0, smoke_codec[0] / "codec.safetensors")
