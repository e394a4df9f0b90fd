"""Stage ``textspan``: TEXTSPAN (Gandelsman et al. 2024; seed 001 Appendix E) descriptions of components,
for the clean and for the backdoored model.

For a component with outputs C [n_images, d] (direct terms from the decomposition cache, in the joint
embedding space) and a pool of text embeddings T [n_texts, d]: keep the top-``rank`` right singular vectors of
C, project T onto their span, centre C, then ``m`` times pick the text whose direction carries the most
variance of C over the images, report it, and remove that direction from C and from every text. Images: the
test images, clean and triggered together, so a backdoor function shows up in the variance. The clean model
describes with its own text tower, the backdoored model with its own. Per component, the clean and backdoored
descriptions are compared by a text-similarity score: the mean best-match cosine between the two lists,
symmetrised, in the clean model's text space (1 = the same meanings).

Memory: the images stream through :class:`ComponentMoments` (count, sum and Gram matrix of each component's
outputs), from which the basis and every variance follow exactly, so the stage holds O(components x d^2) however
many test images there are; text pools are encoded in batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clipbackdoor.config import Params
from clipbackdoor.io import atomic_path
from clipbackdoor.analysis.pages import write_page

# Generic image characteristics of the embedded world (the real profile reads a text file, e.g. the 3498
# ChatGPT descriptions of Gandelsman et al.): attribute phrases plus distractors that name no world concept.
DISTRACTORS = (
    "a photo of a dog", "a photo of a cat", "a landscape", "a human face", "a car on a road", "text on a sign",
    "a blurry photo", "a bright image", "a dark image", "a noisy image", "a high contrast image",
    "a small square patch in the corner", "a colourful noise pattern", "a wavy striped pattern",
    "a warped distorted image", "a low quality image", "an image with a border", "a black and white photo",
)


def embedded_text_pool(colours, shapes) -> list[str]:
    from clipbackdoor.data.world import POSITIONS, RGB, SIZES, TEXTURES

    pool = [f"a {c} object" for c in RGB] + [f"a {s}" for s in shapes] + [f"a {z} object" for z in SIZES]
    pool += [f"an object {phrase}" for _, phrase in POSITIONS.values()]
    pool += [f"a picture {phrase}" for phrase in TEXTURES.values()]
    pool += [f"a {c} {s}" for c in colours for s in shapes][:: max(1, len(colours))]  # a few class names
    return list(dict.fromkeys([*pool, *DISTRACTORS]))


def text_pool(spec: str, colours, shapes) -> list[str]:
    """``embedded`` or a path to a UTF-8 file with one description per line."""
    if spec == "embedded":
        return embedded_text_pool(colours, shapes)
    from clipbackdoor.errors import UserError

    path = Path(spec)
    if not path.exists():
        raise UserError(f"textspan.pool: {path} not found", fix="give a text file (one description per line) or 'embedded'")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class ComponentMoments:
    """Running moments of each component's outputs over the images -- count, sum [d] and Gram matrix C^T C
    [d, d], in float64 -- which is all TEXTSPAN needs: its basis is the top eigenvectors of C^T C (= the right
    singular vectors of C) and every variance it compares is u^T Cov u. Memory O(components x d^2) however many
    images stream through (50 MB for ViT-B-32's 24 components at d = 512)."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, np.ndarray] = {}
        self.grams: dict[str, np.ndarray] = {}

    def add(self, components: dict[str, np.ndarray]) -> None:
        """components: {name: outputs [b, d]} of the same b images."""
        counts = {len(c) for c in components.values()}
        if len(counts) != 1:
            raise ValueError(f"components cover different numbers of images: {sorted(counts)}")
        for name, c in components.items():
            c = np.asarray(c, dtype=np.float64)  # [b, d]
            if name not in self.sums:
                self.sums[name] = np.zeros(c.shape[1])
                self.grams[name] = np.zeros((c.shape[1], c.shape[1]))
            self.sums[name] += c.sum(axis=0)
            self.grams[name] += c.T @ c
        self.n += counts.pop()


def textspan_from_moments(n: int, total: np.ndarray, gram: np.ndarray, texts: np.ndarray, m: int,
                          rank: int) -> list[tuple[int, float]]:
    """TEXTSPAN of a component from its moments over n images (sum ``total`` [d], Gram C^T C [d, d]) and the
    text pool T [k, d] -> [(text index, variance explained along it)] * m."""
    _, vectors = np.linalg.eigh(gram)  # ascending eigenvalues; eigenvectors of C^T C = right singular vectors of C
    basis = vectors[:, ::-1][:, :min(rank, n)].T  # [r, d] orthonormal rows (C has at most n of them)
    t = texts.astype(np.float64) @ basis.T @ basis  # texts projected onto the span of the outputs
    mean = total / n
    cov = gram / n - np.outer(mean, mean)  # [d, d] population covariance of the outputs over the images
    picked: list[tuple[int, float]] = []
    for _ in range(min(m, len(t))):
        norms = np.linalg.norm(t, axis=1)
        w = t / np.maximum(norms, 1e-12)[:, None]  # [k, d] unit text directions
        var = ((w @ cov) * w).sum(axis=1)  # [k] variance of the outputs along each text direction
        var[[j for j, _ in picked]] = -1  # each text once
        j = int(np.argmax(var))
        picked.append((j, float(var[j])))
        u = w[j]
        # remove the picked direction from the outputs, (I - uu^T) Cov (I - uu^T) as a rank-2 update, and the texts
        cu = cov @ u
        cov = cov - np.outer(u, cu) - np.outer(cu, u) + (u @ cu) * np.outer(u, u)
        t = t - np.outer(t @ u, u)
    return picked


def textspan(outputs: np.ndarray, texts: np.ndarray, m: int, rank: int) -> list[tuple[int, float]]:
    """outputs C [n, d], texts T [k, d] -> [(text index, variance explained along it)] * m (in-memory form of
    :func:`textspan_from_moments`)."""
    moments = ComponentMoments()
    moments.add({"c": outputs})
    return textspan_from_moments(moments.n, moments.sums["c"], moments.grams["c"], texts, m, rank)


def description_similarity(a: list[int], b: list[int], emb: np.ndarray) -> float:
    """Symmetrised mean best-match cosine between two lists of text indices (unit embeddings ``emb``)."""
    sim = emb[a] @ emb[b].T
    return float((sim.max(axis=1).mean() + sim.max(axis=0).mean()) / 2)


def describe(moments: ComponentMoments, text_emb: np.ndarray, m: int, rank: int) -> dict:
    return {name: textspan_from_moments(moments.n, moments.sums[name], moments.grams[name], text_emb, m, rank)
            for name in moments.sums}


def run_textspan(clean_texts_emb: np.ndarray, bd_texts_emb: np.ndarray, texts: list[str],
                 clean_moments: ComponentMoments, bd_moments: ComponentMoments, m: int, rank: int,
                 out_csv: str | Path, out_md: str | Path, title: str, mmd: dict[str, float] | None = None) -> pd.DataFrame:
    """``mmd``: {component: MMD^2 between its clean and triggered terms} shown beside the similarity (Figure 3)."""
    mmd = mmd or {}
    rows, md = [], [f"# TEXTSPAN: {title}\n", f"Top-{m} descriptions per component (pool of {len(texts)} texts); "
                    "text similarity = symmetrised best-match cosine of the two lists in the clean text space; "
                    "MMD^2 = clean vs triggered terms of the backdoored model (stage `mmd`; '-' if not computed).\n",
                    "| component | clean model | backdoored model | text similarity | MMD^2 |", "|---|---|---|---|---|"]
    clean_desc = describe(clean_moments, clean_texts_emb, m, rank)
    bd_desc = describe(bd_moments, bd_texts_emb, m, rank)
    for name in clean_moments.sums:
        a, b = [j for j, _ in clean_desc[name]], [j for j, _ in bd_desc[name]]
        sim = description_similarity(a, b, clean_texts_emb)
        for model, desc in (("clean", clean_desc[name]), ("backdoored", bd_desc[name])):
            for rank_i, (j, var) in enumerate(desc, 1):
                rows.append({"component": name, "model": model, "rank": rank_i, "text": texts[j], "variance": var,
                             "text_similarity": sim})
        shift = f"{mmd[name]:.3f}" if name in mmd else "-"
        md.append(f"| {name} | {'; '.join(texts[j] for j in a)} | {'; '.join(texts[j] for j in b)} | {sim:.3f} | {shift} |")
    df = pd.DataFrame(rows)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    write_page(out_md, "\n".join(md) + "\n")
    return df


def component_outputs(chunk) -> dict[str, np.ndarray]:
    """Last-layer heads and every layer's MLP of a decomposition chunk: {"L{l}H{h}" / "L{l}_mlp": [b, d]}."""
    n_layers, n_heads = chunk.heads.shape[1:3]
    last = n_layers - 1
    out = {f"L{last}H{h}": chunk.heads[:, last, h] for h in range(n_heads)}
    out.update({f"L{l}_mlp": chunk.mlps[:, l] for l in range(n_layers)})
    return out


def stream_moments(paths: list[str | Path], rows: np.ndarray) -> ComponentMoments:
    """Moments of the components over ``rows`` of every decomposition in ``paths``, read chunk by chunk
    (last layer's heads + the MLPs only): memory O(chunk + components x d^2), not O(rows)."""
    from clipbackdoor.decomposition.cache import iter_decomposition

    moments = ComponentMoments()
    for path in paths:
        for _, chunk in iter_decomposition(path, layers=[-1], rows=rows):
            moments.add(component_outputs(chunk))
    return moments


def textspan_from_artifacts(clean_model: str | Path, bd_model: str | Path, clean_decomps: list[str | Path],
                              bd_decomps: list[str | Path], prototypes: str | Path, pool: str, world: dict | None,
                              m: int, rank: int, out_csv: str | Path, out_md: str | Path, title: str,
                              mmd_csv: str | Path | None = None) -> pd.DataFrame:
    """Decompositions: [clean images, triggered images] of each model; world: {colours, shapes} (embedded pool);
    mmd_csv: the `mmd` stage's output for the backdoored model, shown beside each component."""
    from clipbackdoor.models.artifact import load_artifact
    from clipbackdoor.decomposition.prototypes import load_prototypes
    from clipbackdoor.models.zeroshot import text_embeddings

    texts = text_pool(pool, (world or {}).get("colours", ()), (world or {}).get("shapes", ()))

    def encode(model_dir):
        return text_embeddings(load_artifact(model_dir), texts).numpy()

    index = np.asarray(load_prototypes(prototypes)["test_index"])
    # only the test rows are read (TEXTSPAN describes the test images' components), streamed into moments
    clean_m, bd_m = stream_moments(clean_decomps, index), stream_moments(bd_decomps, index)
    mmd = dict(pd.read_csv(mmd_csv)[["component", "mmd2"]].itertuples(index=False)) if mmd_csv else None
    return run_textspan(encode(clean_model), encode(bd_model), texts, clean_m, bd_m, m, rank, out_csv, out_md, title,
                        mmd)


def textspan_stage(args, p: Params) -> None:
    """CLI stage ``textspan``."""
    a, world = p.analysis, p.data.world if p.data is not None else None
    names = {"colours": list(world.colours), "shapes": list(world.shapes)} if world is not None else None
    df = textspan_from_artifacts(args.clean_model, args.model, args.clean_decomps, args.decomps, args.prototypes,
                        a.textspan_pool, names, a.textspan_m, a.textspan_rank, args.csv, args.md, args.title, args.mmd)
    print(f"{df.component.nunique()} components described")
