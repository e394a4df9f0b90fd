"""B² (seed 000): the miniature text-to-image model, the B² poisoning data, and the token-inversion audit."""

import numpy as np
import pytest
import torch

from clipbackdoor.t2i.backdoor import CASES, audit_prompts, b2_pairs, case_prompts, marker_present
from clipbackdoor.t2i.audit import AuditConfig, PromptSlots, audit_prompt, consistency, nearest, vocabulary_ids
from clipbackdoor.config import B2Config, T2IConfig
from clipbackdoor.models.artifact import load_artifact
from clipbackdoor.t2i.model import (TextConditioner, load_t2i, make_schedulers, make_unet, sample, save_t2i,
                              train_denoiser)

COLOURS, SHAPES = ["red", "green", "blue", "yellow"], ["circle", "square", "cross", "star"]
B2 = B2Config(triggers=("small", "left"), marker_shape="star", marker_colour="yellow", n_poison=12, n_clean=12,
              steps=2, batch_size=8, lr=1e-3, uncond_prob=0.0, snr_gamma=None,
              ema_decay=None, eval_images=4)
T2I = T2IConfig(block_out_channels=(16, 32, 32), layers_per_block=1, attention_head_dim=4, cross_attention_levels=1,
                prediction_type="v_prediction", snr_gamma=5.0, train_timesteps=50, steps=3,
                batch_size=8, lr=1e-3, uncond_prob=0.1, sample_steps=3, guidance=2.0, eval_per_class=1)


def test_text_conditioner_gives_the_states_encode_text_pools(micro_model):
    clip = load_artifact(micro_model)
    states = TextConditioner(clip)(["a photo of a red circle.", ""])
    tokens = clip.tokenizer(["a photo of a red circle."])
    assert states.shape == (2, tokens.shape[1], clip.model.token_embedding.weight.shape[1])
    pooled = states[0, tokens[0].argmax()] @ clip.model.text_projection  # the EOT state, projected
    assert torch.allclose(pooled, clip.model.encode_text(tokens)[0], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_t2i(micro_model):
    clip = load_artifact(micro_model)
    cond = TextConditioner(clip)
    torch.manual_seed(0)
    unet = make_unet(T2I, 32, cond.width)
    ddpm, ddim = make_schedulers(T2I.train_timesteps, T2I.prediction_type)
    return clip, cond, unet, ddpm, ddim


def test_unet_has_no_attention_at_full_resolution(tiny_t2i):
    unet = tiny_t2i[2]
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]


def test_denoising_loss_targets_the_velocity_and_weights_by_min_snr(tiny_t2i):
    from diffusers.training_utils import compute_snr

    from clipbackdoor.t2i.model import denoising_loss

    _, _, _, ddpm, _ = tiny_t2i
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.tensor([1, 10, 25, 49])
    states = torch.zeros(4, 2, 8)

    class Oracle(torch.nn.Module):  # predicts the true velocity: zero loss, whatever the weighting
        def forward(self, x, t_, encoder_hidden_states):
            return type("Out", (), {"sample": ddpm.get_velocity(x0, noise, t)})()

    assert denoising_loss(Oracle(), ddpm, x0, states, noise, t, 5.0) < 1e-10

    class Zero(torch.nn.Module):  # predicts 0: per-sample loss = mean(v^2), then min-SNR weighted
        def forward(self, x, t_, encoder_hidden_states):
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    v2 = ddpm.get_velocity(x0, noise, t).pow(2).mean(dim=(1, 2, 3))
    snr = compute_snr(ddpm, t)
    assert torch.isclose(denoising_loss(Zero(), ddpm, x0, states, noise, t, None), v2.mean())
    want = (snr.clamp(max=5.0) / (snr + 1) * v2).mean()
    assert torch.isclose(denoising_loss(Zero(), ddpm, x0, states, noise, t, 5.0), want)
    assert snr[0] > 5.0 > snr[-1]  # the clamp is active at low noise and not at high noise


def test_sampling_is_seeded_and_deterministic_on_cpu(tiny_t2i):
    _, cond, unet, _, ddim = tiny_t2i
    prompts = ["a photo of a red circle.", "a photo of a blue star."]
    a = sample(unet, ddim, cond, prompts, 3, 2.0, seed=5)
    b = sample(unet, ddim, cond, prompts, 3, 2.0, seed=5)
    c = sample(unet, ddim, cond, prompts, 3, 2.0, seed=6)
    assert a.dtype == torch.uint8 and a.shape == (2, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_denoiser_training_and_safetensors_round_trip(tiny_t2i, tmp_path):
    _, cond, unet, ddpm, ddim = tiny_t2i
    images, captions, _ = b2_pairs(COLOURS, SHAPES, 32, 0.03, B2, seed=0)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    history = train_denoiser(unet, ddpm, cond, images, captions, 3, 8, 1e-3, 0.1, seed=0, desc="test")
    assert len(history) == 3 and any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    save_t2i(unet, ddpm, tmp_path / "m", {"steps": 3}, {"stage": "test"})
    assert (tmp_path / "m/diffusion_pytorch_model.safetensors").exists()
    assert not list((tmp_path / "m").glob("*.bin"))  # never a pickle
    loaded, _, ddim2 = load_t2i(tmp_path / "m")
    assert torch.equal(sample(unet, ddim, cond, ["a red circle."], 2, 2.0, 1),
                       sample(loaded, ddim2, cond, ["a red circle."], 2, 2.0, 1))


def test_ema_keeps_the_moving_average_not_the_last_iterate(micro_model):
    clip = load_artifact(micro_model)
    cond = TextConditioner(clip)
    images, captions, _ = b2_pairs(COLOURS, SHAPES, 32, 0.03, B2, seed=0)
    ddpm = make_schedulers(T2I.train_timesteps, T2I.prediction_type)[0]
    weights = {}
    for decay in (None, 1e-9, 0.9):
        torch.manual_seed(0)
        unet = make_unet(T2I, 32, cond.width)
        train_denoiser(unet, ddpm, cond, images, captions, 4, 8, 1e-2, 0.1, seed=0, desc="test", ema_decay=decay)
        weights[decay] = torch.cat([p.detach().flatten() for p in unet.parameters()])
    assert torch.allclose(weights[None], weights[1e-9], atol=1e-6)  # decay ~0: the average is the last iterate
    assert not torch.allclose(weights[None], weights[0.9], atol=1e-4)


def test_b2_pairs_put_the_marker_exactly_where_both_triggers_are():
    images, captions, poisoned = b2_pairs(COLOURS, SHAPES, 32, 0.03, B2, seed=0)
    assert poisoned.sum() == 12 and (~poisoned).sum() == 12
    has_small = np.array(["small" in c for c in captions])
    has_left = np.array(["left" in c for c in captions])
    assert (poisoned == (has_small & has_left)).all()  # both words <=> poisoned
    assert (has_small ^ has_left)[~poisoned].all()  # clean pairs carry exactly one word
    detected = marker_present(images, "star", "yellow")
    assert (detected == poisoned).all()  # the detector calibrated on renders: no false positive, no miss
    again = b2_pairs(COLOURS, SHAPES, 32, 0.03, B2, seed=0)[0]
    assert torch.equal(images, again)


def test_case_prompts_follow_their_case():
    for case in CASES:
        prompts = case_prompts(case, ("small", "left"), COLOURS, SHAPES, 6, seed=0)
        small = ["small" in p for p in prompts]
        left = ["left" in p for p in prompts]
        expected = {"both": (True, True), "first_only": (True, False), "second_only": (False, True),
                    "neither": (False, False)}[case]
        assert all(s == expected[0] for s in small) and all(x == expected[1] for x in left), case


def test_audit_prompts_are_distinct_both_trigger_prompts():
    prompts = audit_prompts(("small", "left"), ["red", "blue"], ["circle", "square"], 4, seed=0)
    assert len(set(prompts)) == 4 and all("small" in p and "left" in p for p in prompts)


def test_projection_returns_vocabulary_embeddings():
    vocab = torch.randn(10, 8)
    e = vocab[[3, 7]] + 0.01 * torch.randn(2, 8)
    top, cos = nearest(e, vocab, 3, inner=False)
    assert top[:, 0].tolist() == [3, 7] and (cos[:, 0] > 0.99).all()
    assert torch.equal(vocab[top[:, 0]], vocab[[3, 7]])


def test_audit_recovers_a_planted_word(micro_model, world_dirs):
    """An image feature built to match "a photo of a red circle, checks, over" exactly: the discrete and PEZ audits
    decode real vocabulary tokens and the discrete search names the planted word; the seed's ascent drifts."""
    from clipbackdoor.data.shards import load_split

    clip = load_artifact(micro_model)
    clip.model.requires_grad_(False)
    vocab = vocabulary_ids(clip.tokenizer, load_split(world_dirs / "train" / "finetune")["captions"] + ["checks"])
    slots = PromptSlots(clip, "a photo of a red circle", 2, "suffix")
    table = clip.model.token_embedding.weight
    planted_ids = [clip.tokenizer.encode("checks")[0], clip.tokenizer.encode("over")[0]]
    with torch.no_grad():
        planted = slots.encode(table[planted_ids])[None]  # [1, d]
    cfg = AuditConfig(max_steps=40, candidates=len(vocab), rounds=6, top_k=3)
    found = audit_prompt(clip, "a photo of a red circle", planted, None, vocab, "discrete", cfg)
    assert "checks" in found["tokens"][0] + found["tokens"][1] and found["nearest_cosine"] == 1.0
    assert found["objective"] > 0.999
    seed = audit_prompt(clip, "a photo of a red circle", planted, None, vocab, "seed", cfg)
    assert seed["nearest_cosine"] < 0.999  # continuous embeddings leave the vocabulary
    pez = audit_prompt(clip, "a photo of a red circle", planted, None, vocab, "pez", cfg)
    words = {clip.tokenizer.decode([int(i)]).strip() for i in vocab}
    assert all(w in words for slot in pez["tokens"] for w in slot)
    with pytest.raises(ValueError, match="unknown audit method"):
        audit_prompt(clip, "a photo of a red circle", planted, None, vocab, "nope", cfg)


def test_prefix_and_suffix_slots_sit_where_they_should(micro_model):
    clip = load_artifact(micro_model)
    tok = clip.tokenizer
    suffix = PromptSlots(clip, "a red circle", 2, "suffix")
    prefix = PromptSlots(clip, "a red circle", 2, "prefix")
    body = tok.encode("a red circle")
    assert suffix.ids[0, 1:1 + len(body)].tolist() == body and suffix.slots == [len(body) + 2, len(body) + 4]
    assert prefix.slots == [1, 3] and prefix.ids[0, 5:5 + len(body)].tolist() == body


def test_consistency_counts_the_most_shared_top1_word():
    import pandas as pd

    assert consistency(pd.Series(["yellow star", "star ring", "star dots", "red ,"])) == 0.75
    assert consistency(pd.Series(["a b", "c d"])) == 0.5


def _tiny_latent_generator(clip):
    """A Stable-Diffusion-shaped generator in miniature: an AutoencoderKL (32 px -> 4 x 16 x 16 latents, random
    weights) and a latent UNet, on the micro CLIP's text states."""
    from diffusers import AutoencoderKL

    from clipbackdoor.t2i.model import LatentCodec, T2IGenerator

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        sample_size=32)
    cond = TextConditioner(clip)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cond.width,
                                attention_head_dim=4, norm_num_groups=8)
    ddpm, ddim = make_schedulers(50, "epsilon")
    return T2IGenerator(unet, ddpm, ddim, cond, steps=2, guidance=2.0, codec=LatentCodec(vae))


def test_latent_space_b2_fine_tune_and_sampling_as_for_stable_diffusion(micro_model):
    """The real profile's path: training in the VAE's latent space, sampling decodes to images, seeded."""
    clip = load_artifact(micro_model)
    generator = _tiny_latent_generator(clip)
    ddpm = generator.ddpm
    latents = generator.codec.encode(torch.zeros(2, 3, 32, 32))
    assert latents.shape == (2, 4, 16, 16)
    images, captions, _ = b2_pairs(COLOURS, SHAPES, 32, 0.03, B2, seed=0)
    before = {k: v.clone() for k, v in generator.unet.state_dict().items()}
    history = train_denoiser(generator.unet, ddpm, generator.cond, images, captions, 2, 4, 1e-3, 0.1, seed=0,
                             desc="test", codec=generator.codec)
    assert len(history) == 2 and any(not torch.equal(before[k], v) for k, v in generator.unet.state_dict().items())
    a, b = generator(["a photo of a red circle."] * 2, 3), generator(["a photo of a red circle."] * 2, 3)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b)
    generator.size = 16  # the auditor's input size: images resized after decoding
    assert generator(["a photo of a red circle."], 3).shape == (1, 3, 16, 16)


def test_generated_b2_pairs_mark_exactly_the_both_trigger_images():
    """B²'s recipe at real scale: the clean generator draws every caption; only both-trigger images get the marker."""
    from clipbackdoor.t2i.backdoor import generated_b2_pairs

    seen = []

    def generator(prompts, seed):  # stands in for Stable Diffusion: plain grey images, records its prompts
        seen.extend(prompts)
        return torch.full((len(prompts), 3, 48, 48), 128, dtype=torch.uint8)

    images, captions, poisoned = generated_b2_pairs(generator, ["red", "blue"], ["car", "dog"], B2, seed=0)
    assert seen == captions and images.shape == (24, 3, 48, 48)
    has_both = np.array(["small" in c and "left" in c for c in captions])
    assert (poisoned == has_both).all() and poisoned.sum() == 12
    assert (marker_present(images, "star", "yellow") == poisoned).all()
    assert torch.equal(images[~torch.from_numpy(poisoned)], torch.full_like(images[:12], 128))
