"""Stage ``defend``: Decomp-Rep, Decomp-Det, mean-ablation and the paper's ablations, from cached terms only.

Every setting edits a few direct terms and re-classifies: ``rep' = total - sum(old terms) + sum(new terms)``,
normalised, against the zero-shot class embeddings. Output: one long Parquet table of per-image
predictions (and detection scores) for the clean and the triggered test images, one row per
(setting, image); the ``metrics`` stage turns it into ASR / CACC / AUROC.

Infected-head rule (REFERENCE.md): the official code flags head h of an image when the raw dot product
``a_h . p_h <= eps`` (terms normalised by the embedding norm); the paper text says ``cos(a_h, p_h) < eps``.
Both are implemented (``rule: dot | cosine``) and every row records the rule it used.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa

from clipbackdoor.defenses.predictions import PREDICTIONS_SCHEMA
from clipbackdoor.config import DefendConfig, Params, fixed_head_positions
from clipbackdoor.decomposition.cache import ROW_GROUP_SIZE, CachedDecomposition, iter_decomposition, read_meta
from clipbackdoor.errors import UserError
from clipbackdoor.io import parquet_stream
from clipbackdoor.decomposition.prototypes import head_similarity



def infected_mask(sim: np.ndarray, rule: str, eps: float | np.ndarray) -> np.ndarray:
    """The code's rule is ``<= eps`` on the dot product; the paper's is ``< eps`` on the cosine."""
    return sim <= eps if rule == "dot" else sim < eps


def classify(reps: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """reps [N, d] (any norm) -> predicted class [N]."""
    unit = reps / np.maximum(np.linalg.norm(reps, axis=-1, keepdims=True), 1e-12)
    return (unit @ class_emb.T).argmax(axis=-1).astype(np.int32)


def head_rule(heads: np.ndarray, protos: dict, cfg: DefendConfig):
    """The infected-head rule on the last k layers: (layers, similarity [N, k, H], infected [N, k, H], tag).

    ``threshold: fixed`` uses the single ``eps`` of the paper; ``clean_quantile`` gives every head its own
    threshold, the ``quantile`` of its similarities on the clean validation split (no triggered data is
    used), which transfers across model sizes where a fixed eps does not."""
    n_layers = heads.shape[1]
    k = min(cfg.head_layers, n_layers)
    layers = list(range(n_layers - k, n_layers))
    sim = head_similarity(heads[:, layers], protos["heads"][layers], cfg.rule)
    eps, tag = head_thresholds(protos, cfg, layers)
    return layers, sim, infected_mask(sim, cfg.rule, eps), f"{tag},layers={k}"


def head_thresholds(protos: dict, cfg: DefendConfig, layers: list[int]) -> tuple[float | np.ndarray, str]:
    """(each head's threshold on ``layers``: eps, or [k, H] clean-validation quantiles; the setting's tag)."""
    if cfg.threshold == "clean_quantile":
        eps = np.quantile(protos[f"val_{cfg.rule}"][:, layers], cfg.quantile, axis=0)  # [k, H]
        return eps, f"rule={cfg.rule},q={cfg.quantile:g}"
    return cfg.eps, f"rule={cfg.rule},eps={cfg.eps:g}"


def flag_rates(path: str | Path, protos: dict, cfg: DefendConfig) -> np.ndarray:
    """The share of a decomposition's test images whose head is flagged infected, for every layer and head:
    [L, H] (the head map figure; Decomp-Rep itself flags only the last ``head_layers`` layers). Streamed: the
    head columns a chunk at a time, no MLP column read."""
    n_layers = protos["heads"].shape[0]
    layers = list(range(n_layers))
    eps, _ = head_thresholds(protos, cfg, layers)
    flagged, n = np.zeros(protos["heads"].shape[:2]), 0
    for _, d in iter_decomposition(path, with_mlps=False, rows=np.asarray(protos["test_index"])):
        sim = head_similarity(d.heads, protos["heads"], cfg.rule)  # [B, L, H]
        flagged += infected_mask(sim, cfg.rule, eps).sum(axis=0)
        n += len(sim)
    return flagged / max(n, 1)


class TestSplit:
    """One chunk of a split's (clean or triggered) test images with everything the defenses need."""

    def __init__(self, d: CachedDecomposition, index: np.ndarray):
        self.index = index  # [N] positions in the evaluation set
        self.labels = d.labels
        self.embedding = d.embedding  # [N, d]
        self.heads = d.heads  # [N, L, H, d]
        self.mlps = d.mlps  # [N, L, d]
        self.total = d.total()  # [N, d] sum of all terms
        self.head_sum = self.heads.sum(axis=2)  # [N, L, d]


def random_prototypes(protos: dict, cfg: DefendConfig, rng: np.random.Generator) -> np.ndarray:
    """Table 5's random replacement of the last-k-layer prototypes [k, H, d]: one seeded draw per split, scaled
    by each prototype's std (drawn before any chunk, so chunking leaves the split's random stream unchanged)."""
    p_heads = protos["heads"]
    k = min(cfg.head_layers, p_heads.shape[0])
    protos_k = p_heads[p_heads.shape[0] - k:]
    return rng.standard_normal(protos_k.shape).astype(np.float32) * protos_k.std(axis=-1, keepdims=True)


def _settings(split: TestSplit, protos: dict, cfg: DefendConfig, kind: str, class_emb: np.ndarray,
              rng: np.random.Generator, random_protos: np.ndarray, official_rng: np.random.Generator):
    """Yield (defense, variant, pred [N], score [N] or None) for every setting on one chunk of a split. ``rng``
    is the split's stream, carried from chunk to chunk (random heads are drawn image after image);
    ``official_rng`` another one, for the official random prototypes (drawn image after image too)."""
    n_layers, n_heads = split.heads.shape[1:3]
    p_heads, p_mlps = protos["heads"], protos["mlps"]  # [L, H, d], [L, d]
    p_head_sum = p_heads.sum(axis=1)  # [L, d]
    layers, sim, infected, tag = head_rule(split.heads, protos, cfg)  # sim, infected: [N, k, H]
    heads_k, protos_k = split.heads[:, layers], p_heads[layers]  # [N, k, H, d], [k, H, d]

    def replace(mask, new):  # mask [N, k, H]; new [N or 1, k, H, d] -> classify edited reps
        delta = (mask[..., None] * (new - heads_k)).sum(axis=(1, 2))
        return classify(split.total + delta, class_emb)

    def mlp_ablate(mlp_layers):
        delta = (p_mlps[mlp_layers][None] - split.mlps[:, mlp_layers]).sum(axis=1)
        return classify(split.total + delta, class_emb)

    yield "none", "-", classify(split.embedding, class_emb), None
    yield "base_decomp", "-", classify(split.total, class_emb), None

    count = infected.sum(axis=(1, 2))
    late_mlps = list(range(max(0, n_layers - cfg.mlp_layers), n_layers))
    rep_heads = replace(infected, protos_k[None])
    rep_mlp = mlp_ablate(late_mlps)
    # Algorithm 1: late-MLP ablation for global triggers, head repair for local ones
    auto = rep_mlp if kind == "global" else rep_heads
    yield "decomp_rep", f"auto:{'mlp,last=' + str(len(late_mlps)) if kind == 'global' else 'heads,' + tag}", auto, None
    yield "decomp_rep_heads", tag, rep_heads, None
    yield "decomp_rep_mlp", f"last={len(late_mlps)}", rep_mlp, None
    yield "decomp_det", f"{tag},zeta={cfg.zeta}", (count > cfg.zeta).astype(np.int32), count.astype(np.float32)
    yield "decomp_det_score", tag, (count > cfg.zeta).astype(np.int32), (-sim.sum(axis=(1, 2))).astype(np.float32)
    for eps in cfg.eps_sweep:  # Figure 6: the paper's single fixed eps, for repair and for detection
        mask = infected_mask(sim, cfg.rule, eps)
        variant = f"rule={cfg.rule},eps={eps:g},layers={len(layers)}"
        yield "decomp_rep_sweep", variant, replace(mask, protos_k[None]), None
        n_infected = mask.sum(axis=(1, 2))
        yield "decomp_det_sweep", f"{variant},zeta={cfg.zeta}", (n_infected > cfg.zeta).astype(np.int32), \
            n_infected.astype(np.float32)

    # Tables 3 and 5: what replaces the infected heads, and which heads
    yield "abandon", tag, replace(infected, np.zeros_like(protos_k)[None]), None
    yield "random_prototypes", tag, replace(infected, random_protos[None]), None
    # the paper's and the official code's: a fresh standard normal vector per image and head
    fresh = official_rng.standard_normal(heads_k.shape).astype(np.float32)  # [N, k, H, d]
    yield "random_prototypes_official", tag, replace(infected, fresh), None
    random_mask = np.zeros_like(infected)
    flat = random_mask.reshape(len(count), -1)
    for i, c in enumerate(count):
        flat[i, rng.choice(flat.shape[1], size=int(c), replace=False)] = True
    yield "random_heads", tag, replace(random_mask, protos_k[None]), None
    for head_set in cfg.fixed_heads:
        mask = np.zeros_like(infected)  # [N, k, H] over the inspected layers
        for position, head in fixed_head_positions(head_set, layers, n_heads):
            mask[:, position, head] = True
        yield "fixed_heads", "heads=" + "-".join(head_set), replace(mask, protos_k[None]), None

    # Figure 1: mean-ablate all heads / all MLPs; Figure 2: per-layer forward / backward / separate
    all_layers = list(range(n_layers))

    def ablate_heads(ls):
        delta = (p_head_sum[ls][None] - split.head_sum[:, ls]).sum(axis=1)
        return classify(split.total + delta, class_emb)

    yield "ablate_all_heads", "-", ablate_heads(all_layers), None
    yield "ablate_all_mlps", "-", mlp_ablate(all_layers), None
    for l in all_layers:
        for part, fn in (("heads", ablate_heads), ("mlps", mlp_ablate)):
            yield f"ablate_{part}_forward", f"layer={l}", fn(list(range(0, l + 1))), None
            yield f"ablate_{part}_backward", f"layer={l}", fn(list(range(l, n_layers))), None
            yield f"ablate_{part}_separate", f"layer={l}", fn([l]), None

    # the defenses that extensions register (clipbackdoor.extensions), those configured under defend.extensions
    for name, ext in extension_defenses(cfg).items():
        for variant, pred, score in ext.settings(split, protos, class_emb, cfg.extensions[name], kind):
            yield name, variant, pred, score


def extension_defenses(cfg: DefendConfig) -> dict:
    """{name: Defense} of the registered extension defenses that ``defend.extensions`` configures."""
    from clipbackdoor.extensions import Defense, of_kind

    registered = of_kind(Defense)
    for name in cfg.extensions or {}:
        if name not in registered:  # (params validation refuses it first; a stage run by hand lands here)
            raise UserError(f"defend.extensions.{name}: no such defense is registered",
                            fix=f"install the extension that provides it (registered: {', '.join(registered) or 'none'})")
    return {name: registered[name] for name in cfg.extensions or {}}


def decomp_reverse(clean: TestSplit, trig: TestSplit, protos: dict, cfg: DefendConfig, class_emb: np.ndarray):
    """Decomp-Reverse: paste the heads flagged infected in each triggered image into its clean twin.
    Returns (tag, predictions)."""
    layers, _, mask, tag = head_rule(trig.heads, protos, cfg)
    delta = (mask[..., None] * (trig.heads[:, layers] - clean.heads[:, layers])).sum(axis=(1, 2))
    return tag, classify(clean.total + delta, class_emb)


def run_defend(clean_path: str | Path, triggered_path: str | Path, protos: dict, class_emb: np.ndarray,
               cfg: DefendConfig, kind: str, out_path: str | Path, target: int, target_name: str = "",
               chunk_rows: int = ROW_GROUP_SIZE) -> int:
    """Every setting on the test images, streamed ``chunk_rows`` images at a time from both decompositions in
    lockstep (memory O(chunk x settings)); each chunk's rows become one row group of the output."""
    test_index = np.asarray(protos["test_index"])
    rngs = {name: np.random.default_rng([cfg.seed, i]) for i, name in enumerate(("clean", "triggered"))}
    randoms = {name: random_prototypes(protos, cfg, rng) for name, rng in rngs.items()}
    # (a stream of its own: the other settings' draws stay what they were)
    official_rngs = {name: np.random.default_rng([cfg.seed, i, 1]) for i, name in enumerate(("clean", "triggered"))}
    read_meta(clean_path)  # both files are refused up front (missing, foreign) before any work
    trig_meta = read_meta(triggered_path)
    meta = {"target": str(target), "target_name": target_name, "kind": kind, "rule": cfg.rule, "eps": str(cfg.eps),
            "checkpoint_sha256": trig_meta.get("checkpoint_sha256", ""), "trigger": trig_meta.get("trigger", "")}
    chunks = itertools.zip_longest(iter_decomposition(clean_path, rows=test_index, batch_rows=chunk_rows),
                                   iter_decomposition(triggered_path, rows=test_index, batch_rows=chunk_rows))
    with parquet_stream(out_path, PREDICTIONS_SCHEMA.with_metadata(meta)) as out:
        for clean_chunk, trig_chunk in chunks:
            if clean_chunk is None or trig_chunk is None or clean_chunk[1].keys != trig_chunk[1].keys:
                raise UserError(f"{clean_path} and {triggered_path} do not list the same images in the same order",
                                fix="rerun `decompose` for both from the same evaluation set")
            splits = {"clean": TestSplit(clean_chunk[1], clean_chunk[0]),
                      "triggered": TestSplit(trig_chunk[1], trig_chunk[0])}
            rows = _Rows()
            for name, split in splits.items():
                for defense, variant, pred, score in _settings(split, protos, cfg, kind, class_emb, rngs[name],
                                                               randoms[name], official_rngs[name]):
                    rows.add(defense, variant, name, split, pred, score)
            tag, reverse = decomp_reverse(splits["clean"], splits["triggered"], protos, cfg, class_emb)
            rows.add("decomp_reverse", tag, "clean", splits["clean"], reverse, None)
            out.write(rows.table())
        return out.num_rows


class _Rows:
    """One chunk's output rows, gathered per setting as arrays."""

    def __init__(self):
        self.cols: dict[str, list] = {name: [] for name in PREDICTIONS_SCHEMA.names}

    def add(self, defense: str, variant: str, split_name: str, split: TestSplit, pred: np.ndarray, score) -> None:
        n = len(pred)
        self.cols["defense"].append(pa.array([defense] * n, pa.string()))
        self.cols["variant"].append(pa.array([variant] * n, pa.string()))
        self.cols["split"].append(pa.array([split_name] * n, pa.string()))
        self.cols["index"].append(pa.array(split.index.astype(np.int32)))
        self.cols["label"].append(pa.array(split.labels.astype(np.int32)))
        self.cols["pred"].append(pa.array(np.asarray(pred, np.int32)))
        self.cols["score"].append(pa.nulls(n, pa.float32()) if score is None else
                                  pa.array(np.asarray(score, np.float32)))

    def table(self) -> pa.Table:
        return pa.Table.from_arrays([pa.concat_arrays(self.cols[f.name]) for f in PREDICTIONS_SCHEMA],
                                    schema=PREDICTIONS_SCHEMA)


def prototype_cosines(path: str | Path, protos: dict, layer: int = -1) -> np.ndarray:
    """Cosine of each test image's layer-``layer`` head terms to their prototypes: [N, H] (Figure 5), streamed
    (only that layer's head columns are read, a chunk at a time)."""
    out = []
    for _, d in iter_decomposition(path, layers=[layer], with_mlps=False, rows=np.asarray(protos["test_index"])):
        heads = d.heads[:, layer][:, None]  # [B, 1, H, d]
        out.append(head_similarity(heads, protos["heads"][layer][None], "cosine")[:, 0])
    return np.concatenate(out)


def defend_stage(args, p: Params) -> None:
    """CLI stage ``defend``."""
    from clipbackdoor.attacks import REGISTRY
    from clipbackdoor.models.zeroshot import check_target
    from clipbackdoor.config import stage_target
    from clipbackdoor.decomposition.prototypes import load_prototypes
    from clipbackdoor.decomposition.stage import load_class_embeddings
    from clipbackdoor.pipeline.runs import parse_run

    attack, _ = parse_run(args.trigger)
    class_emb, classnames = load_class_embeddings(args.classes)
    target = check_target(stage_target(p), classnames)
    n = run_defend(args.clean, args.triggered, load_prototypes(args.prototypes), class_emb, p.defend,
                   REGISTRY[attack].kind, args.out, target, stage_target(p))
    print(f"{n} prediction rows")
