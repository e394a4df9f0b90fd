"""Stage ``t2i_pretrain``: a miniature text-to-image diffusion model of the embedded world (diffusers).

A ``UNet2DConditionModel`` (channels 32/64, one ResNet per level, cross-attention only at 16 x 16 and in the
mid block: the 32 x 32 level has none, it is the expensive one) predicts the noise of a DDPM forward process
(1000 steps, cosine schedule). It is conditioned on the token states of the clean CLIP's FROZEN text encoder
after ``ln_final`` ([B, ctx, width], as Stable Diffusion is on CLIP's last hidden states). Captions are dropped
(replaced by the empty prompt) with ``uncond_prob`` for classifier-free guidance. Sampling: DDIM, ``sample_steps``
steps, guidance ``guidance``, from seeded noise — deterministic on CPU.

Quality is measured the way the issue asks: the clean CLIP's zero-shot class of generated images for the prompt
"a photo of a {colour} {shape}." — colour accuracy and shape accuracy over every class.

Artifacts: ``data/t2i/<name>/`` with the UNet in diffusers' format (``config.json`` +
``diffusion_pytorch_model.safetensors``; never a pickle), ``scheduler.json`` and ``metrics.json``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipbackdoor.config import T2IConfig
from clipbackdoor.io import atomic_dir, write_json
from clipbackdoor.models import LoadedModel


def make_unet(cfg: T2IConfig, image_size: int, text_width: int):
    from diffusers import UNet2DConditionModel

    levels = len(cfg.block_out_channels)
    # attention only below the full resolution: 32 x 32 cross-attention costs more than the rest of the UNet
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(sample_size=image_size, in_channels=3, out_channels=3,
                                layers_per_block=cfg.layers_per_block, block_out_channels=tuple(cfg.block_out_channels),
                                down_block_types=down, up_block_types=up, cross_attention_dim=text_width,
                                attention_head_dim=cfg.attention_head_dim, norm_num_groups=8)


def make_schedulers(train_timesteps: int):
    from diffusers import DDIMScheduler, DDPMScheduler

    ddpm = DDPMScheduler(num_train_timesteps=train_timesteps, beta_schedule="squaredcos_cap_v2")
    return ddpm, DDIMScheduler.from_config(ddpm.config)


class TextConditioner:
    """Frozen CLIP text tower -> token states after ``ln_final``: prompts -> [B, ctx, width]."""

    def __init__(self, clip: LoadedModel):
        self.clip = clip
        clip.model.eval().requires_grad_(False)
        self.width = clip.model.token_embedding.weight.shape[1]

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        from clipbackdoor.models import text_token_states

        m = self.clip.model
        return text_token_states(m, m.token_embedding(self.clip.tokenizer(prompts)))


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def train_denoiser(unet, ddpm, cond: TextConditioner, images: torch.Tensor, captions: list[str], steps: int,
                   batch_size: int, lr: float, uncond_prob: float, seed: int, desc: str) -> list[dict]:
    """Noise-prediction training of ``unet`` in place on uint8 ``images`` [N, 3, H, W] and their captions."""
    from clipbackdoor.train import batch_indices

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)))
    empty = cond([""])
    unet.train()
    history = []
    for step in tqdm(range(steps), desc=desc, mininterval=10, file=sys.stderr):
        idx = batch_indices(len(images), batch_size, step, seed)
        x0 = to_unit_range(images[idx])
        states = cond([captions[i] for i in idx.tolist()])
        drop = torch.rand(len(idx), generator=gen) < uncond_prob
        states = torch.where(drop[:, None, None], empty.expand_as(states), states)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(ddpm.add_noise(x0, noise, t), t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append({"step": step + 1, "loss": round(loss.item(), 6)})
    unet.eval()
    return history


@torch.no_grad()
def sample(unet, ddim, cond: TextConditioner, prompts: list[str], n_steps: int, guidance: float, seed: int,
           batch_size: int = 64) -> torch.Tensor:
    """DDIM with classifier-free guidance: one uint8 image [3, H, W] per prompt, noise seeded per call."""
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    noise = torch.randn(len(prompts), 3, size, size, generator=gen)
    empty = cond([""])
    out = []
    for i in range(0, len(prompts), batch_size):
        x = noise[i:i + batch_size]
        states = cond(prompts[i:i + batch_size])
        both = torch.cat([empty.expand_as(states), states])
        ddim.set_timesteps(n_steps)
        for t in ddim.timesteps:
            eps_uncond, eps_text = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
            eps = eps_uncond + guidance * (eps_text - eps_uncond)
            x = ddim.step(eps, t, x).prev_sample
        out.append(to_uint8(x))
    return torch.cat(out)


def save_t2i(unet, ddpm, out_dir: str | Path, metrics: dict, provenance: dict) -> None:
    with atomic_dir(out_dir) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
        ddpm.save_config(tmp)
        write_json(Path(tmp) / "metrics.json", metrics)
        write_json(Path(tmp) / "provenance.json", provenance)


def require_embedded(model_dir: str | Path) -> None:
    """The B² fine-tune and audit run on the miniature pixel-space model; Stable Diffusion's latent UNet (VAE,
    its own text encoder) is loaded and checked by ``t2i_pretrain`` but its fine-tune is not written yet."""
    import json

    from clipbackdoor.errors import UserError

    prov = json.loads((Path(model_dir) / "provenance.json").read_text())
    if "stable_diffusion" in prov:
        raise UserError("the B² fine-tune / audit of Stable Diffusion (latent space) is not implemented",
                        fix="run the embedded profile's B² branch (snakemake b2); the real profile is validated by a dry run")


def load_t2i(model_dir: str | Path):
    """The UNet (safetensors only) and its DDPM / DDIM schedulers."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, use_safetensors=True).eval()
    ddpm = DDPMScheduler.from_pretrained(model_dir)
    return unet, ddpm, DDIMScheduler.from_config(ddpm.config)


@torch.no_grad()
def prompt_accuracy(clip: LoadedModel, images: torch.Tensor, colours: list[str], shapes: list[str],
                    wanted: list[tuple[str, str]]) -> dict:
    """Clean-CLIP zero-shot of generated images over every colour x shape class: colour / shape / class accuracy."""
    from clipbackdoor.models import normalize

    classes = [(c, s) for c in colours for s in shapes]
    text = F.normalize(clip.model.encode_text(clip.tokenizer([f"a photo of a {c} {s}." for c, s in classes])), dim=-1)
    img = F.normalize(clip.model.encode_image(normalize(images, clip.mean, clip.std)), dim=-1)
    pred = [classes[i] for i in (img @ text.T).argmax(-1).tolist()]
    colour = np.mean([p[0] == w[0] for p, w in zip(pred, wanted)])
    shape = np.mean([p[1] == w[1] for p, w in zip(pred, wanted)])
    both = np.mean([p == w for p, w in zip(pred, wanted)])
    return {"colour_acc": float(colour), "shape_acc": float(shape), "class_acc": float(both)}


def load_stable_diffusion(sd):
    """Real profile: a local diffusers Stable Diffusion directory (never downloaded here)."""
    from clipbackdoor.errors import UserError

    try:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(sd.path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"Stable Diffusion not found at {sd.path!r} ({type(exc).__name__})",
                        fix="download a diffusers-format Stable Diffusion (e.g. stable-diffusion-v1-5 with safetensors "
                        "weights) to that directory on a machine with internet access, or run the embedded profile") from exc


def run_t2i_pretrain(clip_dir: str | Path, train_dir: str | Path, out_dir: str | Path, cfg: T2IConfig,
                     colours: list[str], shapes: list[str], seed: int, preview: str | Path | None = None,
                     backend: str = "embedded", sd=None) -> dict:
    """Embedded: train the miniature model. Real profile: take Stable Diffusion's UNet and scheduler as the clean
    generator (B² starts from the public model; nothing is trained)."""
    from clipbackdoor.models import load_artifact

    if backend == "stable_diffusion":
        pipe = load_stable_diffusion(sd)
        save_t2i(pipe.unet, pipe.scheduler, out_dir, {"source": sd.path},
                 {"stage": "t2i_pretrain", "stable_diffusion": sd.path})
        return {"source": sd.path}
    from clipbackdoor.shards import load_split

    clip = load_artifact(clip_dir)
    split = load_split(train_dir, clip.image_size)
    cond = TextConditioner(clip)
    torch.manual_seed(seed)
    unet = make_unet(cfg, clip.image_size, cond.width)
    ddpm, ddim = make_schedulers(cfg.train_timesteps)
    history = train_denoiser(unet, ddpm, cond, split["images"], split["captions"], cfg.steps, cfg.batch_size, cfg.lr,
                             cfg.uncond_prob, seed, "t2i_pretrain")
    wanted = [(c, s) for c in colours for s in shapes for _ in range(cfg.eval_per_class)]
    images = sample(unet, ddim, cond, [f"a photo of a {c} {s}." for c, s in wanted], cfg.sample_steps, cfg.guidance,
                    seed + 1)
    metrics = {"first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], "steps": cfg.steps,
               "n_params": sum(p.numel() for p in unet.parameters()),
               **prompt_accuracy(clip, images, colours, shapes, wanted)}
    save_t2i(unet, ddpm, out_dir, metrics, {"stage": "t2i_pretrain", "clip": str(clip_dir), "seed": seed,
                                             "clip_sha256": clip.checkpoint_sha256, "config": asdict(cfg)})
    if preview is not None:
        save_grid(images[::cfg.eval_per_class][:40], preview)
    return metrics


def save_grid(images: torch.Tensor, png: str | Path, cols: int = 8) -> None:
    """uint8 [N, 3, H, W] -> one PNG grid (written atomically)."""
    from PIL import Image

    from clipbackdoor.io import atomic_path

    n, _, h, w = images.shape
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    with atomic_path(png) as tmp:
        Image.fromarray(grid).resize((cols * w * 2, rows * h * 2), Image.NEAREST).save(tmp, format="PNG")

