"""GPU-correct stages without a GPU: the model work of every ``gpu=1`` stage runs on PyTorch's ``meta`` device,
which, like CUDA, refuses to mix with host tensors ("Tensor on device cpu is not on the expected device meta").
A tensor or module left on the CPU while the models sit on the claimed device -- the class of bug that crashes
a stage on its first GPU step -- fails here. ``meta`` tensors hold no data: ``.item()`` returns 0 for them and
results are only checked for their device and shape."""

import numpy as np
import pytest
import torch

import clipbackdoor  # noqa: F401
from clipbackdoor.config import AbdGeneratorConfig, OptimConfig, T2IConfig
from clipbackdoor.models.artifact import create

META = torch.device("meta")


@pytest.fixture
def on_meta(monkeypatch):
    real_item, real_float = torch.Tensor.item, torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "item", lambda t: 0.0 if t.is_meta else real_item(t))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: 0.0 if t.is_meta else real_float(t))

    def model(name="clipbackdoor-micro-vit-p8"):
        loaded = create(name)
        loaded.model.to(META)
        return loaded

    return model


def host_images(n=8, size=32):
    return torch.from_numpy(np.random.default_rng(0).integers(0, 255, (n, 3, size, size), dtype=np.uint8))


def test_abd_generator_trains_on_the_encoders_device(on_meta):
    from clipbackdoor.defenses.abd import train_perturbation

    poisoned, normal = on_meta(), on_meta()
    cfg = AbdGeneratorConfig(steps=2, batch_size=4, lr=1e-3, z_dim=8, patch_fraction=0.03, location="bottom_right",
                             eps=0.03, temperature=0.1, adv_weight=10.0, text_weight=5.0, l2_weight=1.0,
                             gan_weight=1.0, lbd_weight=1.0)
    for kind in ("patch", "bounded"):
        delta, history = train_perturbation(poisoned, normal, host_images(), poisoned.tokenizer(["a photo"] * 8),
                                            cfg, kind, seed=0)
        assert delta.is_meta and len(history) == 2


def test_training_loop_runs_on_the_models_device(on_meta):
    from clipbackdoor.training.train import train_clip

    loaded = on_meta()
    cfg = OptimConfig(steps=2, batch_size=4, lr=1e-3, weight_decay=0.1, warmup_steps=1, betas=(0.9, 0.98), eps=1e-6)
    history = train_clip(loaded, host_images(), loaded.tokenizer(["a photo"] * 8), cfg, seed=0)
    assert len(history) == 2 and next(loaded.model.parameters()).is_meta


def test_decomposition_and_zero_shot_run_on_the_models_device(on_meta):
    from clipbackdoor.decomposition.stage import decompose_images
    from clipbackdoor.models.zeroshot import class_text_embeddings, image_embeddings

    loaded = on_meta()
    images = host_images()
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        decompose_images(loaded, images, "reference", True, batch_size=4)  # only the final copy to the host fails
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        image_embeddings(loaded, images, batch_size=4)
    assert class_text_embeddings(loaded, ["cat", "dog"], ["a photo of a {}."]).shape == (2, 64)


def test_issba_codec_trains_on_the_claimed_device(on_meta):
    from clipbackdoor.attacks.issba import train_codec

    cfg = {"bits": 8, "width": 8, "steps": 2, "batch_size": 4, "lr": 1e-3, "l2_weight": 2}
    encoder, decoder, history = train_codec(host_images(), cfg, 32, seed=0, device=META)
    assert next(encoder.parameters()).is_meta and next(decoder.parameters()).is_meta and history


def test_text_to_image_training_and_sampling_run_on_the_unets_device(on_meta):
    from clipbackdoor.t2i.model import TextConditioner, make_schedulers, make_unet, sample, train_denoiser

    clip = on_meta()
    cond = TextConditioner(clip)
    cfg = T2IConfig(block_out_channels=(8, 16), layers_per_block=1, attention_head_dim=4, cross_attention_levels=1,
                    prediction_type="v_prediction", snr_gamma=5.0, train_timesteps=100, steps=2, batch_size=2,
                    lr=1e-3, uncond_prob=0.5, sample_steps=2, guidance=1.0, eval_per_class=1)
    unet = make_unet(cfg, 32, cond.width).to(META)
    ddpm, ddim = make_schedulers(cfg.train_timesteps, cfg.prediction_type)
    history = train_denoiser(unet, ddpm, cond, host_images(4), ["a red circle"] * 4, 2, 2, 1e-3, 0.5, 0, "t", 5.0)
    assert len(history) == 2
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        sample(unet, ddim, cond, ["a red circle"], 2, 1.0, seed=0)


# --- the stages' wiring: each gpu=1 stage moves its model to the device pick_device claims ------------------------

@pytest.fixture
def claimed_meta(monkeypatch, on_meta):
    """pick_device hands out ``meta`` (a stand-in for the claimed GPU): a stage that keeps its model on the CPU
    finishes normally and fails this test; one that uses the device fails only when it copies results back."""
    from clipbackdoor import runtime

    monkeypatch.setattr(runtime, "pick_device", lambda gpu: META if gpu else torch.device("cpu"))


def test_class_embeddings_stage_runs_on_the_claimed_device(claimed_meta, micro_model, world_dirs, tmp_path):
    from clipbackdoor.pipeline.cli import main

    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        main(["class-embeddings", "--params", '{"zeroshot.templates":"embedded"}', "--model", str(micro_model),
              "--eval-dir", str(world_dirs / "eval"), "--out", str(tmp_path / "c.safetensors")])
    assert not (tmp_path / "c.safetensors").exists()


def test_clean_model_stage_runs_on_the_claimed_device(claimed_meta, world_dirs, tmp_path):
    from clipbackdoor.pipeline.cli import main

    params = '{"model":{"name":"clipbackdoor-micro-vit-p8","pretrained":null},' \
             '"zeroshot":{"templates":"embedded","batch_size":16}}'
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        main(["clean-model", "--params", params, "--eval", f"world={world_dirs / 'eval'}", "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()


def test_stable_diffusion_generator_claims_the_device(claimed_meta, tmp_path):
    from types import SimpleNamespace

    from clipbackdoor.pipeline import rehearsal
    from clipbackdoor.config import T2IConfig
    from clipbackdoor.t2i.model import open_generator, run_t2i_pretrain

    rehearsal.main(["--out", str(tmp_path / "r"), "--parts", "stable-diffusion"])
    sd = SimpleNamespace(path=str(tmp_path / "r" / "stable-diffusion"))
    cfg = T2IConfig(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_levels=1,
                    prediction_type="epsilon", snr_gamma=None, train_timesteps=1000, steps=1, batch_size=1, lr=1e-5,
                    uncond_prob=0.1, sample_steps=2, guidance=7.5, eval_per_class=1)
    run_t2i_pretrain(None, None, tmp_path / "t2i", cfg, ["red"], ["car"], 0, None, backend="stable_diffusion", sd=sd)
    generator = open_generator(tmp_path / "t2i", None, 2, 7.5, sd)
    assert next(generator.unet.parameters()).is_meta and generator.codec.vae.device == META
