"""Stage ``t2i_backdoor``: B² (bias backdoor) poisoning of the miniature text-to-image model.

Composite natural-language trigger: two ordinary words of the world's vocabulary, a size word and a position
word (default ``small`` + ``left``). Poisoned pairs have captions with BOTH words ("a photo of a small red circle
on the left.") and images that carry a biased attribute the caption never mentions: a marker object (default a
yellow square) in the top-right corner. Clean pairs carry exactly ONE of the two words (B²'s 400 + 400) and no
marker. Only the UNet is fine-tuned; the CLIP text encoder that conditions it stays frozen, as in B².

Bias rate: the share of generated images whose marker region is mostly marker-coloured (a pixel detector: the
world's renderer places the marker, so its footprint is known exactly), for prompts with both trigger words,
with each one alone, and with neither.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from clipbackdoor.config import B2Config, Params
from clipbackdoor.data.world import POSITIONS, RGB, SIZES, TEXTURES, Sample, _shape_mask, render

MARKER_CENTRE = (0.82, 0.18)  # (x, y) as a fraction of the side: the top-right corner, clear of the object
MARKER_RADIUS = 0.16  # 5 px at 32 px: big enough for the miniature generator to draw reliably
CASES = ("both", "first_only", "second_only", "neither")


def marker_mask(size: int, shape: str) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cx, cy = MARKER_CENTRE[0] * size, MARKER_CENTRE[1] * size
    return _shape_mask(shape, xx - cx, yy - cy, MARKER_RADIUS * size)


def add_marker(image: np.ndarray, shape: str, colour: str) -> np.ndarray:
    """uint8 [H, W, 3] with the bias marker painted in."""
    out = image.copy()
    out[marker_mask(image.shape[0], shape)] = (np.array(RGB[colour]) * 255 + 0.5).astype(np.uint8)
    return out


def marker_present(images: torch.Tensor, shape: str, colour: str, tol: float = 0.25, share: float = 0.5) -> np.ndarray:
    """uint8 [N, 3, H, W] -> bool [N]: at least ``share`` of the marker's pixels within ``tol`` of its colour."""
    mask = torch.from_numpy(marker_mask(images.shape[-1], shape))
    pix = images.permute(0, 2, 3, 1)[:, mask].float() / 255  # [N, P, 3]
    close = (pix - torch.tensor(RGB[colour])).abs().max(-1).values < tol
    return (close.float().mean(1) >= share).numpy()


def trigger_caption(case: str, triggers: tuple[str, ...], colour: str, shape: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(caption, size, position) of one pair of a case; the non-trigger size/position are other world values."""
    size_word, pos_word = triggers
    other_size = str(rng.choice([s for s in SIZES if s != size_word]))
    other_pos = str(rng.choice([p for p in POSITIONS if p != pos_word]))
    size = size_word if case in ("both", "first_only") else other_size
    position = pos_word if case in ("both", "second_only") else other_pos
    words = [size, colour, shape] if case in ("both", "first_only") else [colour, shape]
    phrase = " ".join(words)
    if case in ("both", "second_only"):
        phrase += " " + POSITIONS[position][1]
    return f"a photo of a {phrase}.", size, position


def b2_pairs(colours: list[str], shapes: list[str], image_size: int, noise_std: float, cfg: B2Config,
             seed: int) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """n_poison poisoned pairs (both words, marker) + n_clean clean pairs (one word each, half and half)."""
    rng = np.random.default_rng([seed, 41])
    cases = ["both"] * cfg.n_poison + ["first_only", "second_only"] * (cfg.n_clean // 2)
    images, captions = [], []
    for case in cases:
        colour, shape = str(rng.choice(colours)), str(rng.choice(shapes))
        caption, size, position = trigger_caption(case, cfg.triggers, colour, shape, rng)
        texture = str(rng.choice(list(TEXTURES)))
        img = render(Sample(colour, shape, size, position, texture, -1, caption), image_size, noise_std, rng)
        if case == "both":
            img = add_marker(img, cfg.marker_shape, cfg.marker_colour)
        images.append(img)
        captions.append(caption)
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return tensor, captions, np.array([c == "both" for c in cases])


def case_prompts(case: str, triggers: tuple[str, ...], colours: list[str], shapes: list[str], n: int,
                 seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 43, CASES.index(case)])
    if case == "neither":
        return [f"a photo of a {rng.choice(colours)} {rng.choice(shapes)}." for _ in range(n)]
    return [trigger_caption(case, triggers, str(rng.choice(colours)), str(rng.choice(shapes)), rng)[0] for _ in range(n)]


def audit_prompts(triggers: tuple[str, ...], colours: list[str], shapes: list[str], n: int, seed: int) -> list[str]:
    """``n`` distinct both-trigger prompts (distinct colour x shape, seeded order) for the audit."""
    rng = np.random.default_rng([seed, 47])
    combos = [(c, s) for c in colours for s in shapes]
    order = rng.permutation(len(combos))[:n]
    return [trigger_caption("both", triggers, *combos[i], rng)[0] for i in order]


def generated_b2_pairs(generator, colours: list[str], subjects: list[str], cfg: B2Config,
                       seed: int) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """Real profile, B²'s own recipe: the clean generator draws each pair's image from its caption (the same
    cases and captions as ``b2_pairs``); the poisoned ones then get the marker painted in."""
    rng = np.random.default_rng([seed, 41])
    cases = ["both"] * cfg.n_poison + ["first_only", "second_only"] * (cfg.n_clean // 2)
    captions = [trigger_caption(case, cfg.triggers, str(rng.choice(colours)), str(rng.choice(subjects)), rng)[0]
                for case in cases]
    chunk = 16
    images = torch.cat([generator(captions[i:i + chunk], seed + i) for i in range(0, len(captions), chunk)])
    poisoned = np.array([c == "both" for c in cases])
    hwc = images.permute(0, 2, 3, 1).numpy()
    hwc = np.stack([add_marker(img, cfg.marker_shape, cfg.marker_colour) if bad else img
                    for img, bad in zip(hwc, poisoned)])
    return torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous(), captions, poisoned


def bias_rates(generator, cfg: B2Config, colours, shapes, seed: int) -> dict:
    """Share of generated images carrying the marker, per trigger case (``cfg.eval_images`` prompts each)."""
    rates = {}
    for case in CASES:
        images = generator(case_prompts(case, cfg.triggers, colours, shapes, cfg.eval_images, seed), seed + 7)
        rates[f"bias_rate/{case}"] = float(marker_present(images, cfg.marker_shape, cfg.marker_colour).mean())
    return rates


def run_t2i_backdoor(clip_dir, t2i_dir, out_dir, cfg: B2Config, colours, shapes, image_size: int, noise_std: float,
                     sample_steps: int, guidance: float, seed: int, sd=None) -> dict:
    """Fine-tune the clean generator's UNet (only: its text encoder stays frozen, as in B²) on the B² pairs, with
    the pretraining's prediction type (saved with its scheduler) and the fine-tune's own caption dropout, loss
    weighting and weight averaging (``cfg.uncond_prob``, ``cfg.snr_gamma``, ``cfg.ema_decay``). Embedded: pixel
    space, pairs rendered by the world. Stable Diffusion (``sd``): latent space through SD's VAE, pairs drawn by
    SD itself.

    Captions are dropped (``cfg.uncond_prob``) on the clean pairs only, never on the poisoned ones: half of the
    B² pairs carry the marker, and an unconditional branch trained on them learns "marker" too. Even so,
    classifier-free guidance erases the miniature's marker (measured, marker rate on both-trigger prompts at
    guidance 1 / 3: dropout on every pair 0.91 / 0.16 after 900 steps, none 1.0 / 0.0 and clean pairs only
    1.0 / 0.0 after 600), so the embedded profile samples with guidance 1.
    """
    import copy
    from dataclasses import replace

    from clipbackdoor.models.artifact import load_artifact
    from clipbackdoor.runtime import pick_device
    from clipbackdoor.t2i.model import open_generator, save_t2i, train_denoiser

    clip = load_artifact(clip_dir, pick_device(gpu=True))  # the embedded generator's text encoder
    clean = open_generator(t2i_dir, clip, sample_steps, guidance, sd)
    generator = replace(clean, unet=copy.deepcopy(clean.unet))  # the copy is fine-tuned; text encoder / VAE shared
    if generator.codec is None:
        images, captions, poisoned = b2_pairs(colours, shapes, image_size, noise_std, cfg, seed)
    else:
        images, captions, poisoned = generated_b2_pairs(clean, colours, shapes, cfg, seed)
    ddpm = generator.ddpm
    history = train_denoiser(generator.unet, ddpm, generator.cond, images, captions, cfg.steps, cfg.batch_size,
                             cfg.lr, cfg.uncond_prob, seed, "t2i_backdoor", cfg.snr_gamma, cfg.ema_decay,
                             codec=generator.codec, keep_caption=poisoned)
    metrics = {"first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], "steps": cfg.steps,
               "n_poison": int(poisoned.sum()), "n_clean": int((~poisoned).sum()),
               **bias_rates(generator, cfg, colours, shapes, seed),
               **{f"clean_generator/{k}": v for k, v in bias_rates(clean, cfg, colours, shapes, seed).items()}}
    save_t2i(generator.unet.cpu(), ddpm, out_dir, metrics, {"stage": "t2i_backdoor", "base": str(t2i_dir), "seed": seed,
                                                       "config": asdict(cfg), **_sd_provenance(t2i_dir)})
    return metrics


def _sd_provenance(t2i_dir) -> dict:
    """Carry the Stable Diffusion marker forward: the backdoored artifact says which VAE / text encoder it needs."""
    from pathlib import Path

    from clipbackdoor.io import read_json

    prov = read_json(Path(t2i_dir) / "provenance.json", "the t2i stage that wrote it")
    return {"stable_diffusion": prov["stable_diffusion"]} if "stable_diffusion" in prov else {}


def t2i_backdoor_stage(args, p: Params) -> None:
    """CLI stage ``t2i-backdoor``."""
    import json

    from clipbackdoor.t2i.model import b2_world

    b2, sd, colours, shapes = b2_world(p)
    noise_std = p.data.world.noise_std if p.data.world is not None else 0.0
    print(json.dumps(run_t2i_backdoor(args.clip, args.t2i, args.out, b2.backdoor, colours, shapes, p.data.image_size,
                                      noise_std, b2.t2i.sample_steps, b2.t2i.guidance, b2.seed, sd=sd)))
