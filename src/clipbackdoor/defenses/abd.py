"""Stage ``abd_generator``: the adversarial perturbations of seed 002's Adversarial Backdoor Defense (ABD).

An AdvCLIP-style generator G maps one fixed, seeded noise vector z to ONE universal perturbation, trained
against the frozen poisoned CLIP (the defender holds the poisoned model and some clean pairs):

- ``patch``: a square of ``patch_fraction`` of the image area (32 px, 3 %: 6 x 6 = 3.5 %), values in [0, 1]
  (sigmoid), pasted at AdvCLIP's bottom-right corner or at a fresh random position per image;
- ``bounded``: a full-image additive perturbation ``eps * tanh(.)`` (L-inf <= eps; seed 002: 0.03), clamped to
  the valid pixel range.

Generator loss (AdvCLIP, reference weights GAN + 10 adv + L2):
  ``adv = -InfoNCE(f_p(x), f_p(x + d)) - text_weight * InfoNCE(f_p(x + d), g_p(caption))`` at temperature 0.1 —
  minimising it pushes the adversarial image away from its own clean image and its own caption in the
  poisoned model; ``L2`` = mean squared pixel change; ``GAN`` = a small discriminator separates clean from
  adversarial images and G learns to fool it (``gan_weight: 0`` switches it off). The ``uap_lbd`` perturbations
  add ``lbd_weight * L_bd``; ``uap`` (seed Table III's plain AdvCLIP) does not.

The backdoor loss L_bd — which reading of seed 002's eq. (2) this is, and why.
  The seed prints ``L_bd = -log exp(sim(x, x_pd)/t) / sum_j exp(sim(x, x_j)/t)`` with x "the feature of an image
  from the normal model's visual encoder" and x_pd "the feature from the poisoned encoder", and says the loss
  makes the adversarial examples "very similar to backdoor images in the feature space". Read literally (anchor =
  normal feature of the adversarial image, positive = the poisoned feature of the same image), minimising it
  makes the two encoders AGREE on the adversarial image. A backdoor trigger does the opposite: the poisoned
  encoder sends it to the target while the normal encoder still sees the content, so the literal reading would
  steer the perturbation away from backdoor features, against the seed's stated purpose. We implement the reading
  that serves the purpose (and the one the project's issue asks for): the anchor is the POISONED encoder's
  feature of each adversarial image ``p_i = f_p(x_i + d)``; the positive is the backdoor direction
  ``b = normalize(mean_i p_i)`` (stop-gradient: a universal perturbation that fires a backdoor sends every image
  to one point); the contrast set is the NORMAL encoder's features of the same adversarial batch
  ``n_j = f_n(x_j + d)``:  ``L_bd = mean_i -log( e^{p_i.b/t} / (e^{p_i.b/t} + sum_j e^{p_i.n_j/t}) )``.
  The perturbation is thus pushed to a point that is shared by all images in the poisoned encoder and that the
  normal encoder never produces: a feature only the backdoor explains. The normal encoder is the public model
  the attacker fine-tuned from (real profile) or the clean tiny model (embedded profile); both start from the same
  weights as the poisoned one, so their embedding spaces are comparable.

Output: ``data/abd/<run>/perturbations.safetensors`` with ``patch.uap``, ``patch.uap_lbd``, ``bounded.uap``,
``bounded.uap_lbd`` ([3, side, side] patches in [0, 1], [3, H, W] bounded deltas), the loss history in metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipbackdoor.attacks.badnet import paste, patch_origin
from clipbackdoor.training.train import info_nce
from clipbackdoor.config import AbdGeneratorConfig, Params
from clipbackdoor.io import load_safetensors, save_safetensors
from clipbackdoor.models.artifact import LoadedModel, load_artifact, normalize
from clipbackdoor.data.pairs import ShardPairs
from clipbackdoor.runtime import pick_device
from clipbackdoor.training.train import step_loader

KINDS = ("patch", "bounded")
VARIANTS = ("uap", "uap_lbd")


def patch_side(image_size: int, fraction: float) -> int:
    """Side of a square patch covering ``fraction`` of the image area (rounded up: 32 px, 3 % -> 6)."""
    return max(1, math.ceil(image_size * math.sqrt(fraction)))


class PerturbationGenerator(torch.nn.Module):
    """Fixed noise z [1, z_dim] -> one perturbation [3, side, side]: a patch in [0, 1] or a delta in [-eps, eps]."""

    def __init__(self, z_dim: int, side: int, kind: str, eps: float, seed: int):
        super().__init__()
        self.side, self.kind, self.eps = side, kind, eps
        self.register_buffer("z", torch.randn(1, z_dim, generator=torch.Generator().manual_seed(seed)))
        self.fc = torch.nn.Linear(z_dim, 64 * 4 * 4)
        self.up = torch.nn.Sequential(
            torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(64, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(32, 3, 3, padding=1))

    def forward(self) -> torch.Tensor:
        h = self.up(self.fc(self.z).view(1, 64, 4, 4))  # [1, 3, 16, 16]
        h = F.interpolate(h, size=(self.side, self.side), mode="bilinear", align_corners=False)[0]
        return torch.sigmoid(h) if self.kind == "patch" else self.eps * torch.tanh(h)


class Discriminator(torch.nn.Module):
    """Clean vs adversarial image logit: float [B, 3, H, W] in [0, 1] -> [B]."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 4, 2, 1), torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(16, 32, 4, 2, 1),
            torch.nn.LeakyReLU(0.2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)[:, 0]


def apply_perturbation(x: torch.Tensor, delta: torch.Tensor, kind: str, origins: list[tuple[int, int]]) -> torch.Tensor:
    """float images [B, 3, H, W] in [0, 1] -> adversarial images, differentiable in ``delta``. ``origins``: the
    patch's top-left corner, one for the whole batch or one per image (ignored for ``bounded``)."""
    if kind == "bounded":
        return (x + delta).clamp(0, 1)
    if len(origins) == 1:
        return paste(x, delta, origins[0])
    return torch.cat([paste(x[i:i + 1], delta, o) for i, o in enumerate(origins)])


def patch_origins(n: int, image_size: int, side: int, location: str, rng: np.random.Generator) -> list[tuple[int, int]]:
    if location != "random":
        return [patch_origin(location, image_size, side)]
    rc = rng.integers(0, image_size - side + 1, size=(n, 2))
    return [(int(r), int(c)) for r, c in rc]


class PerturbedImages:
    """A seeded ``fraction`` of ``images`` (uint8 [N, 3, H, W]: a tensor or :class:`~clipbackdoor.data.pairs.ShardPairs`)
    carrying the perturbation, applied lazily: ``perturbed[idx]`` perturbs just the batch asked for, so ABD's
    fine-tuning reads its pairs batch by batch. The choice of images and patch positions is drawn once, up front."""

    def __init__(self, images, delta: torch.Tensor, kind: str, location: str, seed: int, fraction: float = 1.0):
        rng = np.random.default_rng([seed, 23])
        n, self.size = len(images), images.shape[-1]
        chosen = np.sort(rng.choice(n, size=round(fraction * n), replace=False)) if fraction < 1 else np.arange(n)
        self.origins = patch_origins(len(chosen), self.size, delta.shape[-1], location, rng)
        self.row = np.full(n, -1, dtype=np.int64)  # [N] -> its row among the chosen, -1 if not chosen
        self.row[chosen] = np.arange(len(chosen))
        self.images, self.delta, self.kind = images, delta, kind
        self.params = (kind, location, seed, fraction)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self):
        return self.images.shape

    def __getitem__(self, idx) -> torch.Tensor:
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx, dtype=np.int64).reshape(-1)
        out = self.images[torch.as_tensor(idx)].clone()
        sel = np.flatnonzero(self.row[idx] >= 0)
        if len(sel):
            rows = self.row[idx[sel]]
            origins = self.origins if len(self.origins) == 1 else [self.origins[r] for r in rows]
            x = out[sel].float() / 255
            out[sel] = (apply_perturbation(x, self.delta.float(), self.kind, origins) * 255).round().clamp(0, 255) \
                .to(torch.uint8)
        return out

    def digest(self) -> str:
        import hashlib

        from clipbackdoor.training.train import data_digest

        h = hashlib.sha256(data_digest(self.images).encode() + repr(self.params).encode())
        h.update(self.delta.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def adversarial_images(images: torch.Tensor, delta: torch.Tensor, kind: str, location: str, seed: int,
                       fraction: float = 1.0) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, H, W]: a seeded ``fraction`` of the images carries the perturbation."""
    return PerturbedImages(images, delta, kind, location, seed, fraction)[:]


def backdoor_loss(poisoned_adv: torch.Tensor, normal_adv: torch.Tensor, direction: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """L_bd (module docstring): unit poisoned features of the adversarial images [B, d] (anchors), unit normal
    features of the same images [B, d] (contrast set), unit backdoor direction [d] (positive) -> scalar."""
    pos = poisoned_adv @ direction / temperature  # [B]
    neg = poisoned_adv @ normal_adv.T / temperature  # [B, B]
    logits = torch.cat([pos[:, None], neg], dim=1)  # the positive is class 0
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def adversarial_loss(clean_emb: torch.Tensor, adv_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float,
                     text_weight: float) -> torch.Tensor:
    """AdvCLIP's adversarial term (unit features [B, d]); lower = farther from own image and caption."""
    scale = torch.tensor(1 / temperature)
    return -info_nce(clean_emb, adv_emb, scale) - text_weight * info_nce(adv_emb, text_emb, scale)


def _encode(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(loaded.model.encode_image(normalize(x, loaded.mean, loaded.std)), dim=-1)


def train_perturbation(poisoned: LoadedModel, normal: LoadedModel | None, images: torch.Tensor, tokens: torch.Tensor,
                       cfg: AbdGeneratorConfig, kind: str, seed: int) -> tuple[torch.Tensor, list[dict]]:
    """Train one universal perturbation on uint8 ``images`` [N, 3, H, W] with caption ``tokens`` [N, ctx];
    ``normal`` given = with L_bd. Returns (the perturbation, its loss history)."""
    for m in (poisoned, normal):
        if m is not None:
            m.model.eval().requires_grad_(False)
    torch.manual_seed(seed)
    # everything trains where the frozen encoders live (the rule's GPU); the images stay on the host and move
    # a batch at a time
    device = next(poisoned.model.parameters()).device
    size = images.shape[-1]
    side = patch_side(size, cfg.patch_fraction) if kind == "patch" else size
    gen = PerturbationGenerator(cfg.z_dim, side, kind, cfg.eps, seed).to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    disc = Discriminator().to(device) if cfg.gan_weight > 0 else None
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.999)) if disc else None
    rng = np.random.default_rng([seed, 29])
    history = []
    # batches are decoded ahead in DataLoader workers when the images are shards (ShardPairs): 312,500 steps of
    # the paper profile would otherwise decode serially on the critical path; batch s is still batch_indices(s)
    for step, (idx, batch) in zip(range(cfg.steps), step_loader(images, cfg.batch_size, seed, 0, cfg.steps, 0, 1,
                                                                 device)):
        x = batch.to(device).float() / 255
        delta = gen()
        x_adv = apply_perturbation(x, delta, kind, patch_origins(1, size, side, cfg.location, rng))
        with torch.no_grad():  # frozen encoders: the clean image's and the caption's features are constants
            clean_emb = _encode(poisoned, x)
            text_emb = F.normalize(poisoned.model.encode_text(tokens[idx].to(x.device)), dim=-1)
        adv_emb = _encode(poisoned, x_adv)
        terms = {"adv": adversarial_loss(clean_emb, adv_emb, text_emb, cfg.temperature, cfg.text_weight),
                 "l2": ((x_adv - x) ** 2).mean()}
        loss = cfg.adv_weight * terms["adv"] + cfg.l2_weight * terms["l2"]
        if normal is not None:
            direction = F.normalize(adv_emb.mean(0), dim=-1).detach()
            terms["lbd"] = backdoor_loss(adv_emb, _encode(normal, x_adv), direction, cfg.temperature)
            loss = loss + cfg.lbd_weight * terms["lbd"]
        if disc is not None:
            terms["gan"] = F.binary_cross_entropy_with_logits(disc(x_adv), torch.ones(len(x), device=device))
            loss = loss + cfg.gan_weight * terms["gan"]
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if disc is not None:  # discriminator step: clean = 1, adversarial = 0
            logits = disc(torch.cat([x, x_adv.detach()]))
            labels = torch.cat([torch.ones(len(x), device=device), torch.zeros(len(x), device=device)])
            opt_d.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(logits, labels).backward()
            opt_d.step()
        history.append({"step": step + 1, "loss": round(loss.item(), 6),
                        **{k: round(v.item(), 6) for k, v in terms.items()}})
    with torch.no_grad():
        return gen().detach().clone(), history


def run_abd_generator(poisoned_dir: str | Path, normal_dir: str | Path, clean_dir: str | Path, out_path: str | Path,
                      cfg: AbdGeneratorConfig, seed: int, n_pairs: int | None = None) -> dict:
    """Every (kind, variant) perturbation for one poisoned model, trained on the defender's clean pairs (the
    first ``n_pairs`` of the split, or all)."""
    device = pick_device(gpu=True)
    poisoned, normal = load_artifact(poisoned_dir, device), load_artifact(normal_dir, device)
    pairs = ShardPairs(clean_dir, poisoned.image_size, limit=n_pairs)  # decoded a batch per step
    tokens = poisoned.tokenizer(pairs.captions)
    tensors, summary = {}, {}
    for kind in KINDS:
        for variant in VARIANTS:
            delta, history = train_perturbation(poisoned, normal if variant == "uap_lbd" else None, pairs,
                                                tokens, cfg, kind, seed)
            tensors[f"{kind}.{variant}"] = delta.cpu().contiguous()
            summary[f"{kind}.{variant}"] = {"first": history[0], "last": history[-1]}
    meta = {"config": json.dumps(asdict(cfg)), "history": json.dumps(summary), "seed": str(seed),
            "poisoned_sha256": poisoned.checkpoint_sha256 or "", "normal_sha256": normal.checkpoint_sha256 or ""}
    save_safetensors(out_path, tensors, meta)
    return summary


def load_perturbations(path: str | Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path, made_by="the abd_generator stage")


def abd_generator_stage(args, p: Params) -> None:
    """CLI stage ``abd-generator``."""
    import json

    from clipbackdoor.pipeline.runs import parse_run

    _, seed = parse_run(args.run)
    print(json.dumps(run_abd_generator(args.model, args.normal, args.clean_dir, args.out, p.abd.generator, seed,
                                       p.abd.n_pairs)))
