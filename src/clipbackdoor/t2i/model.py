"""Stage ``t2i_pretrain``: a miniature text-to-image diffusion model of the embedded world (diffusers).

A ``UNet2DConditionModel`` (channels 32/64/64, one ResNet per level, attention only at the coarsest
``cross_attention_levels`` levels and in the mid block: 8 x 8 by default; attention at 16 x 16 took half the step
time -- 256-token self-attention with 8-dim heads -- and 32 x 32 would cost more than the rest of the UNet) is
trained on a DDPM forward process (1000 steps, cosine schedule), ``prediction_type`` epsilon or v, optionally
min-SNR weighted (``snr_gamma``). Measured: v-prediction + min-SNR 5 on 8 x 8 attention reaches colour 0.99 /
shape 0.28 (guidance 3) in 600 steps at 0.5 s a step; epsilon on 16 x 16 attention reached 0.78 / 0.16 at 1.1 s.
It is conditioned on the token states of the clean CLIP's FROZEN text encoder after ``ln_final`` ([B, ctx,
width], as Stable Diffusion is on CLIP's last hidden states). Captions are dropped (replaced by the empty prompt)
with ``uncond_prob`` for classifier-free guidance. Sampling: DDIM, ``sample_steps`` steps, guidance ``guidance``
(1 = plain conditional sampling, one UNet pass a step), from seeded noise -- deterministic on CPU. The same
training and sampling run in a VAE's latent space (``LatentCodec``) for Stable Diffusion.

Quality is measured the way the issue asks: the clean CLIP's zero-shot class of generated images for the prompt
"a photo of a {colour} {shape}." — colour accuracy and shape accuracy over every class.

Artifacts: ``data/t2i/<name>/`` with the UNet in diffusers' format (``config.json`` +
``diffusion_pytorch_model.safetensors``; never a pickle), ``scheduler.json`` and ``metrics.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipbackdoor.config import Params, T2IConfig
from clipbackdoor.io import atomic_dir, read_json, write_json
from clipbackdoor.logs import progress
from clipbackdoor.models.artifact import LoadedModel
from clipbackdoor.runtime import autocast


def make_unet(cfg: T2IConfig, image_size: int, text_width: int):
    from diffusers import UNet2DConditionModel

    levels = len(cfg.block_out_channels)
    plain = levels - cfg.cross_attention_levels  # the fine levels carry no attention (cost; see the module doc)
    down = ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * cfg.cross_attention_levels
    up = ("CrossAttnUpBlock2D",) * cfg.cross_attention_levels + ("UpBlock2D",) * plain
    return UNet2DConditionModel(sample_size=image_size, in_channels=3, out_channels=3,
                                layers_per_block=cfg.layers_per_block, block_out_channels=tuple(cfg.block_out_channels),
                                down_block_types=down, up_block_types=up, cross_attention_dim=text_width,
                                attention_head_dim=cfg.attention_head_dim, norm_num_groups=8)


def make_schedulers(train_timesteps: int, prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler, DDPMScheduler

    ddpm = DDPMScheduler(num_train_timesteps=train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type=prediction_type)
    return ddpm, DDIMScheduler.from_config(ddpm.config)


class TextConditioner:
    """Frozen CLIP text tower -> token states after ``ln_final``: prompts -> [B, ctx, width]."""

    def __init__(self, clip: LoadedModel):
        self.clip = clip
        clip.model.eval().requires_grad_(False)
        self.width = clip.model.token_embedding.weight.shape[1]

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        from clipbackdoor.models.artifact import text_token_states

        m = self.clip.model
        ids = self.clip.tokenizer(prompts).to(m.token_embedding.weight.device)  # [B, ctx]
        return text_token_states(m, m.token_embedding(ids))


class HFTextConditioner:
    """Stable Diffusion's own frozen CLIP text encoder (transformers): prompts -> last hidden states [B, 77, 768]."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]


class LatentCodec:
    """A diffusers ``AutoencoderKL`` (Stable Diffusion's VAE): images in [-1, 1] [B, 3, H, W] <-> scaled latents
    [B, C, H/f, W/f]. B² fine-tunes SD's UNet in this space; the embedded model has no codec (pixel space)."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.scale = vae.config.scaling_factor

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # the posterior mean, not a draw: reruns stay byte-identical (the draw adds noise the schedule adds anyway)
        return self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist.mean.float() * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((z / self.scale).to(self.vae.device, self.vae.dtype)).sample.float().cpu()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def denoising_loss(unet, ddpm, x0: torch.Tensor, states: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   snr_gamma: float | None) -> torch.Tensor:
    """MSE to the scheduler's target (noise or velocity), min-SNR-gamma weighted per sample when ``snr_gamma``."""
    from diffusers.training_utils import compute_snr

    pred = unet(ddpm.add_noise(x0, noise, t), t, encoder_hidden_states=states).sample  # [B, 3, H, W]
    v = ddpm.config.prediction_type == "v_prediction"
    target = ddpm.get_velocity(x0, noise, t) if v else noise
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))  # [B]
    if snr_gamma is None:
        return per_sample.mean()
    snr = compute_snr(ddpm, t)  # [B]
    # Hang et al. 2023: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v
    weight = snr.clamp(max=snr_gamma) / (snr + 1 if v else snr)
    return (weight * per_sample).mean()


def train_denoiser(unet, ddpm, cond: TextConditioner, images: torch.Tensor, captions: list[str], steps: int,
                   batch_size: int, lr: float, uncond_prob: float, seed: int, desc: str,
                   snr_gamma: float | None = None, ema_decay: float | None = None,
                   codec: LatentCodec | None = None, keep_caption: np.ndarray | None = None) -> list[dict]:
    """Denoising training of ``unet`` in place on uint8 ``images`` [N, 3, H, W] and their captions (in the
    ``codec``'s latent space when given, as Stable Diffusion; else in pixel space). Captions are dropped with
    ``uncond_prob`` except where ``keep_caption`` [N] is True. With
    ``ema_decay`` the weights left in ``unet`` are the exponential moving average (what a sampler should use:
    a conditional decision such as B²'s marker flips between nearby Adam iterates)."""
    from diffusers.training_utils import EMAModel

    from clipbackdoor.training.train import batch_indices

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)))
    device = next(unet.parameters()).device
    empty = cond([""]).to(device)
    ema = EMAModel(unet.parameters(), decay=ema_decay) if ema_decay else None
    unet.train()
    history = []
    for step in progress(range(steps), desc):
        idx = batch_indices(len(images), batch_size, step, seed)
        x0 = to_unit_range(images[idx])
        x0 = (codec.encode(x0) if codec is not None else x0).to(device)  # [B, C, h, w]: pixels or latents
        states = cond([captions[i] for i in idx.tolist()]).to(device)
        # every draw on the CPU generator, then moved: the same seed gives the same run on any device
        drop = torch.rand(len(idx), generator=gen) < uncond_prob
        if keep_caption is not None:
            drop &= ~torch.from_numpy(keep_caption[idx.numpy()])
        drop = drop.to(device)
        states = torch.where(drop[:, None, None], empty.expand_as(states), states)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (len(idx),), generator=gen).to(device)
        with autocast(device):
            loss = denoising_loss(unet, ddpm, x0, states, noise, t, snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(unet.parameters())
        history.append({"step": step + 1, "loss": round(loss.item(), 6)})
    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    return history


@torch.no_grad()
def sample(unet, ddim, cond: TextConditioner, prompts: list[str], n_steps: int, guidance: float, seed: int,
           batch_size: int = 64, codec: LatentCodec | None = None) -> torch.Tensor:
    """DDIM with classifier-free guidance: one uint8 image [3, H, W] per prompt, noise seeded per call (drawn on
    the CPU, so a seed gives the same images on any device); latents are decoded by ``codec`` when given."""
    gen = torch.Generator().manual_seed(seed)
    size, channels = unet.config.sample_size, unet.config.in_channels
    device = next(unet.parameters()).device
    noise = torch.randn(len(prompts), channels, size, size, generator=gen).to(device)
    empty = cond([""]).to(device)
    out = []
    for i in range(0, len(prompts), batch_size):
        x = noise[i:i + batch_size]
        states = cond(prompts[i:i + batch_size]).to(device)
        both = torch.cat([empty.expand_as(states), states])
        ddim.set_timesteps(n_steps)
        for t in ddim.timesteps:
            with autocast(device):  # bf16 UNet on CUDA; the sampler's arithmetic stays fp32
                if guidance == 1.0:  # plain conditional sampling: the unconditional pass would cancel out
                    eps = unet(x, t, encoder_hidden_states=states).sample.float()
                else:
                    eps_uncond, eps_text = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.float().chunk(2)
                    eps = eps_uncond + guidance * (eps_text - eps_uncond)
            x = ddim.step(eps, t, x).prev_sample
        out.append(to_uint8(codec.decode(x) if codec is not None else x.cpu()))
    return torch.cat(out)


@dataclass
class T2IGenerator:
    """One generator as the B² stages use it: prompts + seed -> uint8 images [N, 3, size, size]."""

    unet: object
    ddpm: object  # the training scheduler saved with the UNet (a fine-tune continues on it)
    ddim: object
    cond: object
    steps: int
    guidance: float
    codec: LatentCodec | None = None
    size: int | None = None  # resize to this side (the auditor's input); None: the generator's own

    def __call__(self, prompts: list[str], seed: int) -> torch.Tensor:
        images = sample(self.unet, self.ddim, self.cond, prompts, self.steps, self.guidance, seed,
                        batch_size=64 if self.codec is None else 4, codec=self.codec)
        if self.size is None or images.shape[-1] == self.size:
            return images
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", antialias=True)
        return x.round().clamp(0, 255).to(torch.uint8)


def open_generator(model_dir: str | Path, clip: LoadedModel, steps: int, guidance: float, sd=None,
                   size: int | None = None) -> T2IGenerator:
    """A saved generator: the embedded UNet on the clean CLIP's text encoder, or Stable Diffusion's UNet (from
    ``model_dir``) with SD's own VAE and text encoder (from ``sd.path``), as ``provenance.json`` says."""
    from clipbackdoor.errors import UserError
    from clipbackdoor.runtime import pick_device

    device = pick_device(gpu=True)  # the B² rules hold a GPU (claimed once per process)
    unet, ddpm, ddim = load_t2i(model_dir)
    if "stable_diffusion" not in read_json(Path(model_dir) / "provenance.json", "the t2i stage that wrote it"):
        return T2IGenerator(unet.to(device), ddpm, ddim, TextConditioner(clip), steps, guidance, size=size)
    if sd is None:
        raise UserError(f"{model_dir} is a Stable Diffusion UNet but b2.stable_diffusion is not configured",
                        fix="add b2.stable_diffusion.path (see configs/paper_b2.yaml)")
    pipe = load_stable_diffusion(sd)
    unet, vae, text_encoder = unet.to(device), pipe.vae.to(device), pipe.text_encoder.to(device)
    return T2IGenerator(unet, ddpm, ddim, HFTextConditioner(pipe.tokenizer, text_encoder), steps, guidance,
                        codec=LatentCodec(vae), size=size)


def with_unet(generator: T2IGenerator, model_dir: str | Path) -> T2IGenerator:
    """The same generator (text encoder, VAE, sampling) with another saved UNet: Stable Diffusion's VAE and text
    encoder are loaded once for both the clean and the backdoored model."""
    from dataclasses import replace

    return replace(generator, unet=load_t2i(model_dir)[0].to(next(generator.unet.parameters()).device))


def save_t2i(unet, ddpm, out_dir: str | Path, metrics: dict, provenance: dict) -> None:
    with atomic_dir(out_dir) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
        ddpm.save_config(tmp)
        write_json(Path(tmp) / "metrics.json", metrics)
        write_json(Path(tmp) / "provenance.json", provenance)


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
    from clipbackdoor.models.artifact import normalize

    classes = [(c, s) for c in colours for s in shapes]
    device = clip.model.token_embedding.weight.device
    ids = clip.tokenizer([f"a photo of a {c} {s}." for c, s in classes]).to(device)
    text = F.normalize(clip.model.encode_text(ids), dim=-1)
    img = F.normalize(clip.model.encode_image(normalize(images.to(device), clip.mean, clip.std)), dim=-1)
    pred = [classes[i] for i in (img @ text.T).argmax(-1).tolist()]
    colour = np.mean([p[0] == w[0] for p, w in zip(pred, wanted)])
    shape = np.mean([p[1] == w[1] for p, w in zip(pred, wanted)])
    both = np.mean([p == w for p, w in zip(pred, wanted)])
    return {"colour_acc": float(colour), "shape_acc": float(shape), "class_acc": float(both)}


def load_auditor(clip_dir: str | Path, sd, device):
    """The CLIP that judges generated images: the embedded world's clean CLIP, or -- for Stable Diffusion -- the
    open_clip auditor the profile names (``b2.stable_diffusion.auditor`` / ``auditor_pretrained``)."""
    from clipbackdoor.models.artifact import create, load_artifact

    if sd is None:
        return load_artifact(clip_dir, device)
    auditor = create(sd.auditor, pretrained=sd.auditor_pretrained)
    auditor.model.to(device).eval()
    return auditor


def load_stable_diffusion(sd):
    """Real profile: a local diffusers Stable Diffusion directory (never downloaded here)."""
    from clipbackdoor.errors import UserError

    try:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(sd.path, local_files_only=True, use_safetensors=True)
    except ImportError as exc:  # diffusers' pipelines need transformers for SD's text encoder and tokenizer
        raise UserError(f"Stable Diffusion needs a package that is not installed ({exc})",
                        fix="pip install transformers (the real profile only; the embedded profile never loads SD)") from exc
    except (OSError, ValueError) as exc:
        raise UserError(f"Stable Diffusion not found at {sd.path!r} ({type(exc).__name__})",
                        fix="download a diffusers-format Stable Diffusion (e.g. stable-diffusion-v1-5 with safetensors "
                        "weights) to that directory on a machine with internet access, or run the embedded profile") from exc


def run_t2i_pretrain(clip_dir: str | Path, train_dir: str | Path, out_dir: str | Path, cfg: T2IConfig,
                     colours: list[str], shapes: list[str], seed: int, preview: str | Path | None = None,
                     backend: str = "embedded", sd=None) -> dict:
    """Embedded: train the miniature model. Real profile: take Stable Diffusion's UNet and scheduler as the clean
    generator (B² starts from the public model; nothing is trained)."""
    from clipbackdoor.models.artifact import load_artifact

    from clipbackdoor.runtime import pick_device

    device = pick_device(gpu=True)  # before diffusers' import initialises CUDA: CUDA_VISIBLE_DEVICES must be set
    if backend == "stable_diffusion":
        pipe = load_stable_diffusion(sd)
        # DDPM for training, as the embedded generator; SD's own scheduler config (betas, prediction type) is kept
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
        metrics = {"source": sd.path, "n_params": sum(p.numel() for p in pipe.unet.parameters())}
        save_t2i(pipe.unet, ddpm, out_dir, metrics, {"stage": "t2i_pretrain", "stable_diffusion": sd.path})
        if preview is not None:  # the clean generator's samples, as the embedded branch shows them
            generator = open_generator(out_dir, None, cfg.sample_steps, cfg.guidance, sd)
            prompts = [f"a photo of a {c} {s}." for c in colours for s in shapes][:8 * cfg.eval_per_class]
            save_grid(generator(prompts, seed + 1), preview)
        return metrics
    from clipbackdoor.data.shards import load_split

    clip = load_artifact(clip_dir, device)
    split = load_split(train_dir, clip.image_size)
    cond = TextConditioner(clip)
    torch.manual_seed(seed)
    unet = make_unet(cfg, clip.image_size, cond.width).to(device)
    ddpm, ddim = make_schedulers(cfg.train_timesteps, cfg.prediction_type)
    history = train_denoiser(unet, ddpm, cond, split["images"], split["captions"], cfg.steps, cfg.batch_size, cfg.lr,
                             cfg.uncond_prob, seed, "t2i_pretrain", cfg.snr_gamma)
    wanted = [(c, s) for c in colours for s in shapes for _ in range(cfg.eval_per_class)]
    images = sample(unet, ddim, cond, [f"a photo of a {c} {s}." for c, s in wanted], cfg.sample_steps, cfg.guidance,
                    seed + 1)
    metrics = {"first_loss": history[0]["loss"], "final_loss": history[-1]["loss"], "steps": cfg.steps,
               "n_params": sum(p.numel() for p in unet.parameters()),
               **prompt_accuracy(clip, images, colours, shapes, wanted)}
    save_t2i(unet.cpu(), ddpm, out_dir, metrics, {"stage": "t2i_pretrain", "clip": str(clip_dir), "seed": seed,
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


def b2_world(p: Params):
    """(the b2 section, its Stable Diffusion config or None, colours, subjects) of the B² stages: the embedded
    world's colours and shapes, or the real profile's prompt vocabulary for Stable Diffusion."""
    b2 = p.b2
    if b2.backend == "stable_diffusion":
        return b2, b2.stable_diffusion, list(b2.stable_diffusion.colours), list(b2.stable_diffusion.subjects)
    return b2, b2.stable_diffusion, list(p.data.world.colours), list(p.data.world.shapes)


def t2i_pretrain_stage(args, p: Params) -> None:
    """CLI stage ``t2i-pretrain``."""
    import json

    b2, sd, colours, shapes = b2_world(p)
    print(json.dumps(run_t2i_pretrain(args.clip, args.train, args.out, b2.t2i, colours, shapes, b2.seed,
                                      args.preview, b2.backend, sd)))
