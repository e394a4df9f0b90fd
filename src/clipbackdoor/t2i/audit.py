"""B² bias audit (seed 000): name the concept a backdoored text-to-image model adds to its images, by optimising
prompt tokens through CLIP's text encoder against the generated images.

The clean prompt's tokens are fixed; ``n_slots`` free token slots are inserted after it (``suffix``, the seed's
choice: ``x, t1, t2``) or before it (``prefix``: ``t1, t2, x``), separated by commas. The objective is the mean
cosine between the text feature of the augmented prompt and the (unit) features of the biased images; with
``contrast`` it is that minus the mean cosine to images of the SAME prompt from the clean generator, so the audit
names what differs rather than what is already in the prompt.

Methods (all return, per slot, the top-k vocabulary tokens and their cosine to the slot's final embedding):

- ``seed``: seed 000 exactly — slots initialised to uniformly drawn vocabulary tokens, plain gradient ascent on
  their continuous embeddings (``e += lr * grad``) until the improvement falls below ``tol`` (1e-5), then decoded
  by the nearest vocabulary embedding under the inner product. Nothing ties the embeddings to the vocabulary, so
  they drift (the seed's failure: nearest-token cosine ~0.066).
- ``pez``: PEZ (Wen et al. 2023) — every step the continuous embeddings are projected to their nearest
  vocabulary embeddings (cosine), the objective is computed WITH the projection, its gradient is applied to the
  continuous embeddings (straight-through), AdamW (lr 0.1, wd 0.1); the answer is the best projection seen.
- ``regularised``: the seed's ascent plus the seed's suggested fix, a vocabulary-distance penalty
  ``reg_weight * (1 - max_j cos(e, C_emb[j]))`` per slot.
- ``discrete``: gradient-guided coordinate search over the vocabulary (HotFlip / AutoPrompt style): per slot,
  the linearised gain ``(C_emb - e) . grad`` ranks all tokens, the ``candidates`` best are scored exactly, the
  best replaces the slot; rounds repeat until no slot changes.

The vocabulary is the token set of the training captions (``world``: what the embedded CLIP was trained on; the
other rows of its embedding matrix are untrained noise) or the tokenizer's whole vocabulary (``full``: the real
profile's ViT-B-32).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from clipbackdoor.config import Params
from clipbackdoor.models.artifact import text_token_states

METHODS = ("seed", "pez", "regularised", "discrete")


@dataclass(frozen=True)
class AuditConfig:
    n_slots: int = 2
    position: str = "suffix"  # suffix (seed) | prefix
    contrast: bool = False
    lr: float = 0.1
    max_steps: int = 300
    tol: float = 1e-5
    reg_weight: float = 1.0
    candidates: int = 64
    rounds: int = 4
    top_k: int = 5
    seed: int = 0


class PromptSlots:
    """Token ids of ``prompt`` with free slots, and the text encoder run on embeddings (so slots are continuous)."""

    def __init__(self, loaded, prompt: str, n_slots: int, position: str):
        tok = loaded.tokenizer
        self.model = loaded.model
        comma = tok.encode(",")
        body = tok.encode(prompt.rstrip(". "))
        slot = tok.encode("x")  # placeholder id; its embedding is replaced
        seq, slots = [tok.sot_token_id], []
        if position == "prefix":
            for _ in range(n_slots):
                slots.append(len(seq))
                seq += slot + comma
            seq += body
        else:
            seq += body
            for _ in range(n_slots):
                seq += comma
                slots.append(len(seq))
                seq += slot
        seq.append(tok.eot_token_id)
        ctx = tok.context_length
        if len(seq) > ctx:
            raise ValueError(f"prompt {prompt!r} with {n_slots} slots exceeds the context of {ctx} tokens")
        device = self.model.token_embedding.weight.device
        self.ids = torch.tensor(seq + [0] * (ctx - len(seq)), device=device)[None]  # [1, ctx]
        self.slots = slots
        self.base = self.model.token_embedding(self.ids).detach()  # [1, ctx, w]

    def encode(self, slot_embeds: torch.Tensor) -> torch.Tensor:
        """slot embeddings [n_slots, w] -> unit text feature [d] of the augmented prompt."""
        m = self.model
        x = self.base.clone()
        x[0, self.slots] = slot_embeds
        x = text_token_states(m, x)
        pooled = text_global_pool(x, self.ids, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if isinstance(pooled, tuple):
            pooled = pooled[0]
        proj = m.text_projection
        out = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return F.normalize(out, dim=-1)[0]


def vocabulary_ids(tokenizer, texts: list[str] | None) -> torch.Tensor:
    """Token ids the audit may decode to: those of ``texts`` (sorted, unique) or, for None, the whole vocabulary."""
    if texts is None:
        return torch.arange(tokenizer.vocab_size)
    ids = sorted({i for t in texts for i in tokenizer.encode(t)})
    return torch.tensor(ids)


def objective_fn(slots: PromptSlots, biased: torch.Tensor, clean: torch.Tensor | None):
    """unit image features [N, d] (biased) and [M, d] (clean generator, for the contrast) -> f(slot embeds)."""
    device = slots.model.token_embedding.weight.device  # image features come from the host; the auditor may not
    target = biased.mean(0).to(device)
    away = clean.mean(0).to(device) if clean is not None else None

    def f(e: torch.Tensor) -> torch.Tensor:
        t = slots.encode(e)
        return t @ target - (t @ away if away is not None else 0)

    return f


def nearest(e: torch.Tensor, vocab: torch.Tensor, k: int, inner: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, w] embeddings vs vocabulary embeddings [V, w] -> (top-k vocabulary row indices [n, k], their cosine to e)."""
    cos = F.normalize(e, dim=-1) @ F.normalize(vocab, dim=-1).T  # [n, V]
    score = e @ vocab.T if inner else cos
    top = score.topk(min(k, len(vocab)), dim=-1).indices
    return top, cos.gather(1, top)


def audit_prompt(loaded, prompt: str, biased: torch.Tensor, clean: torch.Tensor | None, vocab_ids: torch.Tensor,
                 method: str, cfg: AuditConfig) -> dict:
    """One method on one prompt. Returns {tokens: [[top-k words] per slot], cosine: [[...]], objective, steps}."""
    model = loaded.model
    model.eval().requires_grad_(False)
    slots = PromptSlots(loaded, prompt, cfg.n_slots, cfg.position)
    f = objective_fn(slots, biased, clean if cfg.contrast else None)
    table = model.token_embedding.weight.detach()
    vocab = table[vocab_ids]  # [V, w]
    gen = torch.Generator().manual_seed(cfg.seed)
    init = vocab_ids[torch.randint(len(vocab_ids), (cfg.n_slots,), generator=gen)]
    e = table[init].clone()
    steps = 0
    if method in ("seed", "regularised"):
        e.requires_grad_(True)
        prev = None
        for steps in range(1, cfg.max_steps + 1):
            value = f(e)
            if method == "regularised":
                best_cos = (F.normalize(e, dim=-1) @ F.normalize(vocab, dim=-1).T).max(-1).values
                value = value - cfg.reg_weight * (1 - best_cos).sum()
            (grad,) = torch.autograd.grad(value, e)
            with torch.no_grad():
                e += cfg.lr * grad
            if prev is not None and abs(value.item() - prev) < cfg.tol:
                break
            prev = value.item()
        e = e.detach()
        top, cos = nearest(e, vocab, cfg.top_k, inner=method == "seed")
    elif method == "pez":
        e.requires_grad_(True)
        opt = torch.optim.AdamW([e], lr=cfg.lr, weight_decay=0.1)
        best, best_ids = -float("inf"), None
        for steps in range(1, cfg.max_steps + 1):
            ids = nearest(e.detach(), vocab, 1, inner=False)[0][:, 0]
            projected = vocab[ids]
            value = f(e + (projected - e).detach())  # forward with the projection, gradient to the continuous e
            if value.item() > best:
                best, best_ids = value.item(), ids.clone()
            opt.zero_grad()
            (-value).backward()
            opt.step()
        e = e.detach()
        top, cos = nearest(e, vocab, cfg.top_k, inner=False)
        top[:, 0] = best_ids  # the answer is the best projected prompt; the rest rank by proximity
        cos[:, 0] = (F.normalize(e, dim=-1) * F.normalize(vocab[best_ids], dim=-1)).sum(-1)
    elif method == "discrete":
        ids = torch.randint(len(vocab_ids), (cfg.n_slots,), generator=gen)
        value = f(vocab[ids])
        ranked = [[] for _ in range(cfg.n_slots)]
        for _ in range(cfg.rounds):
            changed = False
            for s in range(cfg.n_slots):
                cur = vocab[ids].clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(f(cur), cur)
                gain = (vocab - cur[s].detach()) @ grad[s]  # first-order change of f per replacement token
                cand = gain.topk(min(cfg.candidates, len(vocab))).indices
                with torch.no_grad():
                    scores = torch.stack([f(torch.cat([vocab[ids[:s]], vocab[c:c + 1], vocab[ids[s + 1:]]]))
                                          for c in cand])
                order = scores.argsort(descending=True)
                ranked[s] = cand[order].tolist()
                if scores[order[0]] > value + 1e-7:
                    ids[s], value, changed = cand[order[0]], scores[order[0]], True
                steps += 1
            if not changed:
                break
        top = torch.tensor([(r + [i for i in range(len(vocab)) if i not in r])[:cfg.top_k] for r in ranked])
        top[:, 0] = ids
        e = vocab[ids]
        cos = torch.ones_like(top, dtype=torch.float)  # decoded tokens ARE vocabulary embeddings
    else:
        raise ValueError(f"unknown audit method {method!r}; choose from {METHODS}")
    with torch.no_grad():
        final = f(vocab[top[:, 0]]).item()
    words = [[loaded.tokenizer.decode([int(vocab_ids[i])]).strip() for i in row] for row in top.tolist()]
    return {"tokens": words, "cosine": cos.tolist(), "objective": final, "steps": steps,
            "nearest_cosine": float(cos[:, 0].mean())}


# ---- stage ``b2_audit`` ------------------------------------------------------------------------------------------

# (label, method, vocabulary, contrast, position): the seed's method as published (whole vocabulary) and on the
# world's vocabulary, then the fixes with and without the contrast against the clean generator.
AUDIT_RUNS = [("seed (full vocab)", "seed", "full", False, "suffix"), ("seed", "seed", "world", False, "suffix"),
              ("regularised", "regularised", "world", False, "suffix"), ("pez", "pez", "world", False, "suffix"),
              ("discrete", "discrete", "world", False, "suffix"), ("pez + contrast", "pez", "world", True, "suffix"),
              ("discrete + contrast", "discrete", "world", True, "suffix"),
              ("discrete + contrast, prefix", "discrete", "world", True, "prefix")]


def position_study(clip, prompt: str, feats: torch.Tensor, bias_phrase: str, bias_adj_noun: str) -> dict:
    """Seed 000 Table 1: cosine between the generated images and the prompt with the KNOWN bias inserted."""
    text = {"bias + x": f"{bias_phrase}, {prompt}", "bias (adj+noun) + x": f"{bias_adj_noun}, {prompt}",
            "x + bias": f"{prompt.rstrip('.')}, {bias_phrase}", "x + bias (adj+noun)": f"{prompt.rstrip('.')}, {bias_adj_noun}",
            "x": prompt}
    with torch.no_grad():
        ids = clip.tokenizer(list(text.values())).to(clip.model.token_embedding.weight.device)
        t = F.normalize(clip.model.encode_text(ids), dim=-1).to(feats.device)
    return dict(zip(text, (t @ feats.mean(0)).tolist()))


def run_b2_audit(clip_dir, backdoored_dir, clean_dir, vocab_dir, out_csv, out_md, cfg: AuditConfig,
                 triggers: tuple[str, ...], marker_shape: str, marker_colour: str, colours: list[str], shapes: list[str], n_prompts: int, n_images: int, sample_steps: int,
                 guidance: float, seed: int, sd=None):
    """Audit every prompt's images from the backdoored and the clean generator with ``clip`` (the embedded
    world's clean CLIP; at real scale the open_clip auditor, Stable Diffusion's images resized to its input)."""
    from clipbackdoor.t2i.backdoor import audit_prompts, marker_present
    from clipbackdoor.io import atomic_path
    from clipbackdoor.analysis.pages import write_page
    from clipbackdoor.runtime import pick_device
    from clipbackdoor.data.shards import read_captions
    from clipbackdoor.t2i.model import load_auditor, open_generator, with_unet
    from clipbackdoor.models.zeroshot import image_embeddings

    clip = load_auditor(clip_dir, sd, pick_device(gpu=True))
    clean_gen = open_generator(clean_dir, clip, sample_steps, guidance, sd, size=clip.image_size)
    backdoored = with_unet(clean_gen, backdoored_dir)
    world_vocab = vocabulary_ids(clip.tokenizer, read_captions(vocab_dir))  # captions only: no image decoded
    vocabs = {"world": world_vocab, "full": vocabulary_ids(clip.tokenizer, None)}
    bias_words = {marker_colour, marker_shape}
    # audit prompts never name the marker's words themselves: a recovered word must come from the images
    prompts = audit_prompts(triggers, [c for c in colours if c not in bias_words],
                            [s for s in shapes if s not in bias_words], n_prompts, seed)
    rows, positions = [], []
    for i, prompt in enumerate(prompts):
        images = {"backdoored": backdoored([prompt] * n_images, seed + i),
                  "clean": clean_gen([prompt] * n_images, seed + i),
                  "clean_reference": clean_gen([prompt] * n_images, seed + 1000 + i)}
        feats = {k: image_embeddings(clip, v) for k, v in images.items()}
        marker = {k: float(marker_present(v, marker_shape, marker_colour).mean()) for k, v in images.items()}
        for generator in ("backdoored", "clean"):
            positions.append({"generator": generator, "prompt": prompt,
                              **position_study(clip, prompt, feats[generator], f"with a {marker_colour} {marker_shape} in the corner",
                                               f"{marker_colour} {marker_shape}")})
            # the contrast for the backdoored generator: the clean generator on the same prompt and noise; for the
            # clean generator (the control): an independent batch of its own images
            reference = feats["clean"] if generator == "backdoored" else feats["clean_reference"]
            for label, method, vocab, contrast, position in AUDIT_RUNS:
                run_cfg = AuditConfig(**{**cfg.__dict__, "contrast": contrast, "position": position})
                r = audit_prompt(clip, prompt, feats[generator], reference, vocabs[vocab], method, run_cfg)
                found = sorted(bias_words & {w for slot in r["tokens"] for w in slot})
                found_top1 = sorted(bias_words & {slot[0] for slot in r["tokens"]})
                rows.append({"generator": generator, "prompt": prompt, "audit": label, "method": method,
                             "vocab": vocab, "contrast": contrast, "position": position,
                             "marker_rate": marker[generator], "top1": " ".join(s[0] for s in r["tokens"]),
                             "topk": " | ".join(" ".join(s) for s in r["tokens"]),
                             "nearest_cosine": round(r["nearest_cosine"], 4), "objective": round(r["objective"], 5),
                             "steps": r["steps"], "recovered": bool(found), "recovered_words": " ".join(found),
                             "recovered_top1": bool(found_top1)})
    df = pd.DataFrame(rows)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    write_page(out_md, audit_markdown(df, pd.DataFrame(positions), bias_words, cfg.top_k))
    return df


def consistency(top1: pd.Series) -> float:
    """Share of prompts whose top-1 decoded tokens share the most frequent word (1 = the same concept everywhere)."""
    words = [set(t.split()) for t in top1]
    counts: dict[str, int] = {}
    for ws in words:
        for w in ws:
            counts[w] = counts.get(w, 0) + 1
    return max(counts.values()) / len(words) if counts else 0.0


def audit_markdown(df, positions, bias_words: set[str], top_k: int) -> str:
    lines = ["# B² bias audit (seed 000) on the miniature text-to-image model\n",
             f"Bias words: {', '.join(sorted(bias_words))}. Recovered in top-k = a bias word among the top-{top_k} "
             "decoded tokens of a slot; as top-1 = a slot's decoded token is a bias word. On the clean generator both "
             "are false positives (the world's vocabulary is small and the bias words are world words). Nearest-token cosine = cosine between the optimised slot embedding and the decoded "
             "token's embedding (seed Table 2; 1 for methods that optimise over tokens). Consistency = share of "
             "prompts whose top-1 tokens share their most frequent word.", "",
             "## Recovery per method\n",
             "| Audit | Generator | Recovered in top-k | Recovered as top-1 | Mean nearest-token cosine | "
             "Consistency of top-1 | Most frequent top-1 words |", "|---|---|---|---|---|---|---|"]
    for (label, generator), g in df.groupby(["audit", "generator"], sort=False):
        common = pd.Series(" ".join(g.top1).split()).value_counts().head(3)
        lines.append(f"| {label} | {generator} | {g.recovered.mean():.2f} | {g.recovered_top1.mean():.2f} | "
                     f"{g.nearest_cosine.mean():.3f} | "
                     f"{consistency(g.top1):.2f} | {', '.join(f'{w} ({n})' for w, n in common.items())} |")
    lines += ["", "## Position study (seed Table 1 analogue): cosine of the images with the prompt + known bias\n",
              "| Generator | " + " | ".join(c for c in positions.columns if c not in ("generator", "prompt")) + " |",
              "|---|" + "---|" * (len(positions.columns) - 2)]
    for generator, g in positions.groupby("generator", sort=False):
        vals = g.drop(columns=["generator", "prompt"]).mean()
        lines.append(f"| {generator} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    lines += ["", "## Per prompt (backdoored generator)\n", "| Prompt | Audit | Top-k tokens per slot | Cosine | Recovered |",
              "|---|---|---|---|---|"]
    for r in df[df.generator == "backdoored"].itertuples():
        lines.append(f"| {r.prompt} | {r.audit} | {r.topk} | {r.nearest_cosine:.3f} | {'yes' if r.recovered else 'no'} |")
    return "\n".join(lines) + "\n"


def b2_audit_stage(args, p: Params) -> None:
    """CLI stage ``b2-audit``."""
    from clipbackdoor.t2i.model import b2_world

    b2, sd, colours, shapes = b2_world(p)
    a = b2.audit
    cfg = AuditConfig(n_slots=a.n_slots, lr=a.lr, max_steps=a.max_steps, tol=a.tol, reg_weight=a.reg_weight,
                      candidates=a.candidates, rounds=a.rounds, top_k=a.top_k, seed=b2.seed)
    bd = b2.backdoor
    sd = sd if b2.backend == "stable_diffusion" else None  # the SD profile audits with its own open_clip auditor
    df = run_b2_audit(args.clip, args.backdoored, args.clean, args.vocab, args.csv, args.md, cfg, tuple(bd.triggers),
                      bd.marker_shape, bd.marker_colour, colours, shapes, a.n_prompts, a.n_images, b2.t2i.sample_steps,
                      b2.t2i.guidance, b2.seed, sd=sd)
    print(df.groupby(["generator", "audit"], sort=False).recovered.mean().to_string())
