"""Direct-effect decomposition of a CLIP ViT image embedding (Gandelsman et al. 2024; seed 001, eq. 3-4).

The residual stream at the class token after the last block is a sum of direct contributions:
``embed`` (ln_pre output at CLS), per layer l and head h the attention output ``L{l}H{h}`` (summed over
source tokens), the attention output bias, and per layer the MLP output ``L{l}_mlp``. ``ln_post`` is made
linear with the image's own statistics of the final residual (mean mu, std sigma), so each term c maps to
the joint space and the mapped terms sum *exactly* to the model's image embedding:

- ``centering: reference`` (clip_text_span ``prs_hook.py``): with K = 2L+1 terms, a term c becomes
  ``(gamma * (c - mu/K) / sigma + beta/K) @ proj``; inside an attention term mu/K, beta/K and the out-proj
  bias b_O are split evenly over its H heads. ``bias`` is then zero.
- ``centering: projection``: LayerNorm's centring is a linear projection, applied to each term exactly:
  ``gamma * (c - mean(c)) / sigma @ proj``; heads carry no bias and ``bias`` holds every b_O plus beta.

With ``normalize`` every term is divided by the norm of the final embedding (as the reference does), so the
terms sum to the unit embedding that zero-shot classification uses.

Only the CLS row of each head's output is projected: the full attention is computed once (it is needed to
continue the forward pass) and no [batch, tokens, heads, width] tensor is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Decomposition:
    """Direct terms in the joint embedding space (batch B, layers L, heads H, embedding dim d)."""

    embed: torch.Tensor  # [B, d]
    heads: torch.Tensor  # [B, L, H, d]
    mlps: torch.Tensor  # [B, L, d]
    bias: torch.Tensor  # [B, d]
    embedding: torch.Tensor  # [B, d] the model's embedding (ln_post(z_cls) @ proj), same normalisation
    norm: torch.Tensor  # [B] norm of the unnormalised embedding

    def total(self) -> torch.Tensor:
        return self.embed + self.heads.sum(dim=(1, 2)) + self.mlps.sum(dim=1) + self.bias


def _check_supported(visual: nn.Module) -> None:
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise NotImplementedError("decomposition needs class-token pooling (no attentional pooler)")
    for blk in visual.transformer.resblocks:
        scaled_attn = not isinstance(getattr(blk, "ln_attn", nn.Identity()), nn.Identity)
        if not isinstance(blk.attn, nn.MultiheadAttention) or scaled_attn:
            raise NotImplementedError("decomposition supports open_clip ViT blocks with nn.MultiheadAttention")


def _layer_scale(module: nn.Module) -> torch.Tensor | float:
    return module.gamma if hasattr(module, "gamma") else 1.0


@torch.no_grad()
def decompose(visual: nn.Module, images: torch.Tensor, centering: str = "reference",
              normalize: bool = True) -> Decomposition:
    """images: normalised float [B, 3, H, W] -> :class:`Decomposition` of ``visual(images)``."""
    _check_supported(visual)
    x = visual._embeds(images)  # [B, T, W] residual stream after ln_pre
    embed = x[:, 0]  # [B, W]
    heads, mlps, attn_biases = [], [], []
    for blk in visual.transformer.resblocks:
        attn: nn.MultiheadAttention = blk.attn
        n_heads, width = attn.num_heads, attn.embed_dim
        hd = width // n_heads
        b, t, _ = x.shape
        q, k, v = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, n_heads, hd).transpose(1, 2) for z in (q, k, v))  # [B, H, T, hd]
        o = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, hd]
        w_o = attn.out_proj.weight  # [W, H*hd]
        ls1 = _layer_scale(blk.ls_1)
        out = F.linear(o.transpose(1, 2).reshape(b, t, width), w_o, attn.out_proj.bias)  # [B, T, W]
        # per-head CLS rows only: [B, H, hd] x [H, hd, W] -> [B, H, W]
        heads.append(torch.einsum("bhd,hdw->bhw", o[:, :, 0], w_o.T.reshape(n_heads, hd, width)) * ls1)
        attn_biases.append(attn.out_proj.bias * ls1)  # [W]
        x = x + out * ls1
        m = blk.mlp(blk.ln_2(x)) * _layer_scale(blk.ls_2)
        mlps.append(m[:, 0])
        x = x + m

    heads_t = torch.stack(heads, dim=1)  # [B, L, H, W]
    mlps_t = torch.stack(mlps, dim=1)  # [B, L, W]
    b_o = torch.stack(attn_biases)  # [L, W]
    n_layers, n_heads = heads_t.shape[1], heads_t.shape[2]
    z = x[:, 0]  # [B, W]
    ln = visual.ln_post
    mu = z.mean(dim=-1, keepdim=True)  # [B, 1]
    sigma = torch.sqrt(z.var(dim=-1, unbiased=False, keepdim=True) + ln.eps)  # [B, 1]
    gamma, beta, proj = ln.weight, ln.bias, visual.proj  # [W], [W], [W, d]

    def linear_map(c, mu_share, beta_share):
        """[B, ..., W] residual-space term -> [B, ..., d] joint-space term."""
        shape = (c.shape[0],) + (1,) * (c.dim() - 2) + (1,)
        return ((gamma * (c - mu_share) / sigma.view(shape)) + beta_share) @ proj

    if centering == "reference":
        k_terms = 2 * n_layers + 1
        mu_b = mu.view(-1, 1, 1, 1)
        heads_r = heads_t + (b_o / n_heads)[None, :, None, :]
        out_heads = linear_map(heads_r, mu_b / (k_terms * n_heads), beta / (k_terms * n_heads))
        out_embed = linear_map(embed, mu / k_terms, beta / k_terms)
        out_mlps = linear_map(mlps_t, mu.view(-1, 1, 1) / k_terms, beta / k_terms)
        out_bias = torch.zeros_like(out_embed)
    elif centering == "projection":
        def centred(c):
            return linear_map(c, c.mean(dim=-1, keepdim=True), 0.0)

        out_heads, out_embed, out_mlps = centred(heads_t), centred(embed), centred(mlps_t)
        bias_res = b_o.sum(dim=0).expand_as(embed)  # [B, W]
        out_bias = centred(bias_res) + beta @ proj
    else:
        raise ValueError(f"unknown centering {centering!r}")

    embedding = ln(z) @ proj  # [B, d] the model's own output path
    norm = embedding.norm(dim=-1)  # [B]
    scale = norm.view(-1, 1) if normalize else torch.ones_like(norm).view(-1, 1)
    return Decomposition(embed=out_embed / scale, heads=out_heads / scale.view(-1, 1, 1, 1),
                         mlps=out_mlps / scale.view(-1, 1, 1), bias=out_bias / scale,
                         embedding=embedding / scale, norm=norm)


def component_names(n_layers: int, n_heads: int) -> list[str]:
    """TransformerLens-style labels in storage order."""
    return (["embed"] + [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]
            + [f"L{l}_mlp" for l in range(n_layers)] + ["bias"])
