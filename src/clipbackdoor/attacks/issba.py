"""ISSBA (Li et al. 2021): sample-specific invisible triggers from a StegaStamp-style encoder.

The encoder takes an image and a bit string and outputs a small residual that depends on both; a decoder
learns to read the bits back from the encoded image. Trained (stage ``issba_codec``) with *random* bit strings
so the code is general; the attack then encodes every poisoned image with one fixed secret, so each image gets
its own invisible residual that carries the same message. Training recipe (scaled down from StegaStamp):
loss = BCE(decoder(encoded), bits) + w(t) * mean(residual^2), with w = 0 for the first third of training and
ramped up linearly over the second, so the code is found before it is made invisible (ramped from the start,
the L2 term erased the residual before any code formed); uniform noise of one grey level between encoder and
decoder stands in for the uint8 rounding the poisoned images go through. No perceptual (LPIPS) or GAN term.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from clipbackdoor.io import load_safetensors
from clipbackdoor.attacks.base import Trigger, to_float, to_uint8
from clipbackdoor.errors import UserError


class StegaEncoder(nn.Module):
    """(image [B, 3, H, W] in [0, 1], bits [B, n]) -> residual [B, 3, H, W]."""

    def __init__(self, n_bits: int, image_size: int, width: int = 32):
        super().__init__()
        self.grid = image_size // 4
        self.secret = nn.Linear(n_bits, 3 * self.grid * self.grid)  # the bits as a coarse 3-channel map
        self.down = nn.Sequential(nn.Conv2d(6, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(width + 6, 3, 1)

    def forward(self, image: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        b, _, h, w = image.shape
        secret = F.relu(self.secret(bits * 2 - 1)).view(b, 3, self.grid, self.grid)
        inp = torch.cat([image - 0.5, F.interpolate(secret, size=(h, w), mode="nearest")], dim=1)  # [B, 6, H, W]
        feat = self.up(self.mid(self.down(inp)))
        return self.out(torch.cat([feat, inp], dim=1))


class StegaDecoder(nn.Module):
    """image [B, 3, H, W] in [0, 1] -> bit logits [B, n]."""

    def __init__(self, n_bits: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, n_bits))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image - 0.5)


def encode(encoder: StegaEncoder, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float images [B, 3, H, W] in [0, 1] -> encoded images, clamped to [0, 1]."""
    return (images + encoder(images, bits)).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) of float images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def secret_bits(n_bits: int, seed: int) -> torch.Tensor:
    """The attack's fixed secret, from the run seed."""
    return torch.from_numpy(np.random.default_rng([seed, 11]).integers(0, 2, n_bits).astype(np.float32))


def train_codec(images: torch.Tensor, cfg: dict, image_size: int, seed: int, device: torch.device | str = "cpu"):
    """Train encoder + decoder on ``device`` from host uint8 images [N, 3, H, W] with random secrets (drawn on
    the CPU generator, so a seed gives the same draws on any device). Returns (encoder, decoder, history)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n_bits, width, steps = int(cfg["bits"]), int(cfg["width"]), int(cfg["steps"])
    encoder = StegaEncoder(n_bits, image_size, width).to(device)
    decoder = StegaDecoder(n_bits, width).to(device)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=float(cfg["lr"]))
    history = []
    for step in range(steps):
        idx = torch.randint(len(images), (int(cfg["batch_size"]),), generator=gen)
        x = to_float(images[idx]).to(device)
        bits = torch.randint(0, 2, (len(idx), n_bits), generator=gen).float().to(device)
        residual = encoder(x, bits)
        encoded = (x + residual).clamp(0, 1)
        noisy = encoded + (torch.rand(encoded.shape, generator=gen).to(device) - 0.5) / 255  # stands in for uint8 rounding
        logits = decoder(noisy)
        ramp = min(1.0, max(0.0, (step - steps / 3) / (steps / 3)))  # 0 for the first third, then up to 1
        bit_loss = F.binary_cross_entropy_with_logits(logits, bits)
        loss = bit_loss + float(cfg["l2_weight"]) * ramp * (residual ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            acc = ((logits > 0).float() == bits).float().mean().item()
            history.append({"step": step + 1, "bit_loss": round(bit_loss.item(), 6), "bit_acc": round(acc, 4),
                            "psnr": round(psnr(encoded.detach(), x), 3)})
    return encoder.eval(), decoder.eval(), history


@torch.no_grad()
def evaluate_codec(encoder: StegaEncoder, decoder: StegaDecoder, images: torch.Tensor, secret: torch.Tensor,
                   batch_size: int = 256) -> dict:
    """Bit accuracy of the fixed secret read back from uint8-rounded encoded images, and their PSNR."""
    accs, psnrs = [], []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size])
        bits = secret.expand(len(x), -1)
        stored = to_float(to_uint8(encode(encoder, x, bits)))  # what a poisoned shard holds
        accs.append(((decoder(stored) > 0).float() == bits).float().mean(dim=1))
        psnrs.append(psnr(stored, x) * len(x))
    return {"bit_accuracy": float(torch.cat(accs).mean()), "psnr_db": sum(psnrs) / len(images)}


def load_codec(path: str | Path | None) -> tuple[StegaEncoder, StegaDecoder, torch.Tensor, dict]:
    """(encoder, decoder, secret bits, config) from a codec artifact (safetensors; nothing unpickled)."""
    import json

    if not path or not Path(path).exists():
        raise UserError(f"issba: codec {path} not found",
                        fix="run the `issba_codec` stage first (Snakemake/DVC do this for issba runs)")
    tensors, meta = load_safetensors(path, made_by="the `issba_codec` stage", with_metadata=True)
    cfg, image_size = json.loads(meta["config"]), int(meta["image_size"])
    encoder = StegaEncoder(int(cfg["bits"]), image_size, int(cfg["width"]))
    decoder = StegaDecoder(int(cfg["bits"]), int(cfg["width"]))
    encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")})
    decoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("decoder.")})
    return encoder.eval(), decoder.eval(), tensors["secret"], cfg


class ISSBA(Trigger):
    kind = "global"  # an invisible residual over the whole image (the paper mean-ablates late MLPs)
    asset = "issba_codec"

    def __init__(self, cfg: dict, image_size: int, seed: int, asset_path=None):
        super().__init__(cfg, image_size, seed, asset_path)
        self.encoder, _, self.secret, codec_cfg = load_codec(asset_path)
        if int(codec_cfg["bits"]) != int(cfg["bits"]):
            raise UserError(f"issba: the codec encodes {codec_cfg['bits']} bits, attacks.issba.bits is {cfg['bits']}",
                            fix="rerun the `issba_codec` stage")

    @torch.no_grad()
    def apply(self, images, rng):
        out = []
        for i in range(0, len(images), 256):
            x = to_float(images[i:i + 256])
            out.append(to_uint8(encode(self.encoder, x, self.secret.expand(len(x), -1))))
        triggered = torch.cat(out) if out else images.clone()
        diff = (triggered.float() - images.float()).abs().flatten(1).mean(dim=1)
        return triggered, [{"mean_abs_residual": round(d, 3)} for d in diff.tolist()]  # (one device sync)
