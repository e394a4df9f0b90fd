"""Defenses and metrics on synthetic decompositions where the answer is known."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from clipbackdoor.config import DefendConfig
from clipbackdoor.decomposition.cache import write_decomposition
from clipbackdoor.decomposition.decompose import Decomposition
from clipbackdoor.defenses.defend import head_similarity, infected_mask, run_defend
from clipbackdoor.analysis.metrics import attack_success, clean_accuracy, detection_auroc, setting_rows
from clipbackdoor.decomposition.prototypes import build_prototypes, load_prototypes, split_indices

N, L, H, D, C = 200, 3, 4, 16, 4
TARGET = 3


def synthetic(trigger: bool, seed=0, noisy_head=False):
    """Class c is direction e_c, carried by head L0H0 and L1H1; every head also has a stable prototype-like
    component. With the trigger, head L2H3 (last layer) writes a strong target direction e_TARGET.
    ``noisy_head``: clean head L2H0 is mostly noise, so its cosine to its prototype is low on clean images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % C
    eye = torch.eye(D)
    heads = 0.02 * torch.randn(N, L, H, D, generator=g)
    heads += 0.3 * torch.eye(D)[8 + torch.arange(H)][None, None]  # per-head stable direction (prototype)
    heads[:, 0, 0] += eye[labels]
    heads[:, 1, 1] += eye[labels]
    if noisy_head:
        heads[:, 2, 0] += 0.3 * torch.randn(N, D, generator=g)
    if trigger:
        heads[:, 2, 3] = 3.0 * eye[TARGET] + 0.02 * torch.randn(N, D, generator=g)
    mlps = 0.01 * torch.randn(N, L, D, generator=g)
    zeros = torch.zeros(N, D)
    d = Decomposition(embed=zeros, heads=heads, mlps=mlps, bias=zeros, embedding=zeros, norm=torch.ones(N))
    d.embedding = d.total()
    return d, labels.numpy()


def _cache(tmp_path, noisy_head=False):
    keys = [f"k{i}" for i in range(N)]
    for name, trig in (("clean", False), ("trig", True)):
        d, labels = synthetic(trig, noisy_head=noisy_head)
        write_decomposition(tmp_path / f"{name}.parquet", keys, labels, trig, d, {"trigger": name})
    build_prototypes(tmp_path / "clean.parquet", tmp_path / "protos.safetensors", 0.2, 123)
    return tmp_path


@pytest.fixture
def cached(tmp_path):
    return _cache(tmp_path)


CFG = DefendConfig(rule="cosine", eps=0.5, head_layers=1, mlp_layers=1, zeta=0, fixed_heads=(("L2H0",), ("L2H3",)),
                   eps_sweep=(0.2,), seed=0)


def results(cached, cfg=CFG, kind="local"):
    out = cached / "defend.parquet"
    run_defend(cached / "clean.parquet", cached / "trig.parquet", load_prototypes(cached / "protos.safetensors"),
               np.eye(D, dtype=np.float32)[:C], cfg, kind, out, TARGET)
    return {(r["defense"], r["variant"]): r for r in setting_rows(pd.read_parquet(out), TARGET)}


def test_split_is_seeded_and_disjoint():
    val, test = split_indices(100, 0.2, 123)
    assert len(val) == 20 and len(test) == 80 and not set(val) & set(test)
    assert np.array_equal(val, split_indices(100, 0.2, 123)[0])


def test_prototypes_are_clean_validation_means(cached):
    p = load_prototypes(cached / "protos.safetensors")
    d, _ = synthetic(False)
    assert np.allclose(p["heads"], d.heads.numpy()[p["val_index"]].mean(0), atol=2e-3)
    assert p["heads"].shape == (L, H, D) and p["mlps"].shape == (L, D)


def test_planted_backdoor_is_repaired_and_detected(cached):
    r = results(cached)
    assert r[("none", "-")]["asr"] == 1.0 and r[("none", "-")]["cacc"] == 1.0
    rep = r[("decomp_rep_heads", "rule=cosine,eps=0.5,layers=1")]
    assert rep["asr"] == 0.0 and rep["cacc"] == 1.0  # the infected head is replaced by its prototype
    det = r[("decomp_det", "rule=cosine,eps=0.5,layers=1,zeta=0")]
    assert det["auroc"] == 1.0 and det["tpr"] == 1.0 and det["fpr"] == 0.0
    # mean-ablating the MLPs does nothing against a head backdoor; ablating all heads removes it
    assert r[("ablate_all_mlps", "-")]["asr"] == 1.0 and r[("ablate_all_heads", "-")]["asr"] < 0.5
    assert r[("ablate_heads_separate", "layer=2")]["asr"] == 0.0
    assert r[("ablate_heads_separate", "layer=0")]["asr"] == 1.0
    # fixed heads: only the set containing L2H3 (the planted head) helps
    assert r[("fixed_heads", "heads=L2H3")]["asr"] == 0.0 and r[("fixed_heads", "heads=L2H0")]["asr"] == 1.0
    # Decomp-Reverse: the flagged heads carry the backdoor into clean images
    assert r[("decomp_reverse", "rule=cosine,eps=0.5,layers=1")]["asr"] == 1.0
    # zero instead of prototype also removes this backdoor
    assert r[("abandon", "rule=cosine,eps=0.5,layers=1")]["asr"] == 0.0


def test_validation_similarities_are_stored_with_the_prototypes(cached):
    p = load_prototypes(cached / "protos.safetensors")
    d, _ = synthetic(False)
    val_heads = d.heads.numpy()[p["val_index"]]
    assert p["val_cosine"].shape == (len(p["val_index"]), L, H)
    assert np.allclose(p["val_cosine"], head_similarity(val_heads, p["heads"], "cosine"), atol=1e-3)
    assert np.allclose(p["val_dot"], head_similarity(val_heads, p["heads"], "dot"), atol=1e-3)


def test_per_head_clean_quantile_threshold_where_a_fixed_eps_fails(tmp_path):
    """A clean head whose cosine to its prototype is naturally low: one fixed eps flags it on every clean
    image (false alarms); a per-head threshold from the clean validation split does not."""
    cached = _cache(tmp_path, noisy_head=True)
    fixed = results(cached)[("decomp_det", "rule=cosine,eps=0.5,layers=1,zeta=0")]
    assert fixed["fpr"] > 0.5
    assert results(cached)[("decomp_det_sweep", "rule=cosine,eps=0.2,layers=1,zeta=0")]["fpr"] > 0.3  # the sweep too
    cfg = dataclasses.replace(CFG, threshold="clean_quantile", quantile=0.01)
    r = results(cached, cfg)
    det = r[("decomp_det", "rule=cosine,q=0.01,layers=1,zeta=0")]
    assert det["tpr"] == 1.0 and det["fpr"] < 0.1 and det["auroc"] > 0.95
    rep = r[("decomp_rep_heads", "rule=cosine,q=0.01,layers=1")]
    assert rep["asr"] == 0.0 and rep["cacc"] == 1.0


def test_algorithm_1_picks_mlps_for_global_triggers(cached):
    r = results(cached, kind="global")
    auto = [k for k in r if k[0] == "decomp_rep"]
    assert auto == [("decomp_rep", "auto:mlp,last=1")] and r[auto[0]]["asr"] == 1.0


def test_dot_rule_uses_le_and_cosine_rule_uses_lt():
    sim = np.array([0.1, 0.2, 0.3])
    assert infected_mask(sim, "dot", 0.2).tolist() == [True, True, False]
    assert infected_mask(sim, "cosine", 0.2).tolist() == [True, False, False]
    a = np.ones((1, 1, 1, 4), np.float32)
    p = 2 * np.ones((1, 1, 4), np.float32)
    assert head_similarity(a, p, "dot")[0, 0, 0] == 8.0 and np.isclose(head_similarity(a, p, "cosine")[0, 0, 0], 1)


def test_asr_definitions_on_a_hand_made_case():
    labels = np.array([0, 1, 2, 3, 3])
    pred = np.array([3, 3, 2, 3, 1])  # target 3
    asr, asr_all = attack_success(pred, labels, target=3)
    assert asr == pytest.approx(2 / 3)  # non-target images 0, 1, 2: two flipped to the target
    assert asr_all == pytest.approx(3 / 5)  # all triggered images predicted as target
    assert clean_accuracy(pred, labels) == pytest.approx(2 / 5)
    assert detection_auroc(np.array([0.1, 0.2]), np.array([0.3, 0.15])) == pytest.approx(0.75)


def test_bootstrap_auroc_draws_are_the_resampled_roc_aucs_and_intervals_are_seeded():
    from sklearn.metrics import roc_auc_score

    from clipbackdoor.analysis.metrics import auroc_draws, bootstrap_auroc, bootstrap_rate, row_rng

    rng = np.random.default_rng(0)
    neg, pos = rng.integers(0, 6, 40).astype(float), rng.integers(2, 9, 30).astype(float)  # many ties
    draws = auroc_draws(neg, pos, np.random.default_rng(5), draws=7, chunk=3)
    replay = np.random.default_rng(5)
    expected = []
    for b in (3, 3, 1):  # the same picks, chunk by chunk, scored by scikit-learn
        i0, i1 = replay.integers(0, 40, (b, 40)), replay.integers(0, 30, (b, 30))
        expected += [roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[neg[a], pos[c]]) for a, c in zip(i0, i1)]
    assert np.allclose(draws, expected, atol=1e-12)
    lo, hi = bootstrap_auroc(neg, pos, row_rng(0, "x"))
    assert lo < detection_auroc(neg, pos) < hi and hi - lo < 0.4
    assert (lo, hi) == bootstrap_auroc(neg, pos, row_rng(0, "x")) != bootstrap_auroc(neg, pos, row_rng(1, "x"))
    # a proportion's interval narrows as 1/sqrt(n)
    small, large = bootstrap_rate(30, 100, row_rng(0, "r")), bootstrap_rate(3000, 10000, row_rng(0, "r"))
    assert small[0] < 0.3 < small[1] and large[0] < 0.3 < large[1]
    assert 7 < (small[1] - small[0]) / (large[1] - large[0]) < 13


def test_official_split_is_the_official_codes_shuffle():
    import random

    from clipbackdoor.decomposition.prototypes import split_indices

    n = 103
    idx = list(range(n))
    random.seed(123)
    random.shuffle(idx)  # the official code, verbatim in spirit: seed, shuffle, the first int(0.2 n)
    val, test = split_indices(n, 0.2, 123, "official")
    assert val.tolist() == sorted(idx[:int(0.2 * n)]) and test.tolist() == sorted(idx[int(0.2 * n):])
    seeded_val, _ = split_indices(n, 0.2, 123)
    assert len(seeded_val) == round(0.2 * n) == 21 != len(val) == 20  # the two procedures differ, by design
    with pytest.raises(ValueError, match="unknown split procedure"):
        split_indices(n, 0.2, 123, "other")


def test_flag_rates_map_the_planted_head_on_every_layer(tmp_path):
    """The head map's flag rates: on triggered images only the planted head L2H3 is flagged (rate 1); on clean
    images the per-head clean-quantile threshold flags about q of them; the last layer's rates are exactly
    Decomp-Rep's flags (head_rule) averaged over the test images."""
    from clipbackdoor.defenses.defend import flag_rates, head_rule
    from clipbackdoor.decomposition.cache import read_decomposition

    cached = _cache(tmp_path, noisy_head=True)
    protos = load_prototypes(cached / "protos.safetensors")
    cfg = dataclasses.replace(CFG, threshold="clean_quantile", quantile=0.05)
    trig = flag_rates(cached / "trig.parquet", protos, cfg)
    clean = flag_rates(cached / "clean.parquet", protos, cfg)
    assert trig.shape == clean.shape == (L, H)
    assert trig[2, 3] == 1.0 and np.delete(trig.ravel(), 2 * H + 3).max() < 0.2
    assert clean.max() < 0.2 and clean.mean() > 0  # the false-alarm floor, not zero
    d = read_decomposition(cached / "trig.parquet", rows=np.asarray(protos["test_index"]))
    _, _, infected, _ = head_rule(d.heads, protos, cfg)  # [N, 1, H] on the last layer
    assert np.allclose(trig[2], infected[:, 0].mean(axis=0))
    fixed = flag_rates(cached / "clean.parquet", protos, CFG)  # eps 0.5 fixed: the noisy clean head L2H0 flagged
    assert fixed[2, 0] > 0.5 > clean[2, 0]


def test_head_map_figure_draws_one_row_per_run(tmp_path):
    from clipbackdoor.analysis.figures import head_map_figure
    from clipbackdoor.analysis.mmd import run_mmd

    cached = _cache(tmp_path)
    run_mmd(cached / "clean.parquet", cached / "trig.parquet", cached / "protos.safetensors", cached / "mmd.csv",
            100, 0)
    mmd = pd.read_csv(cached / "mmd.csv")
    heads = mmd[mmd.kind == "head"]
    assert len(heads) == L * H and set(heads.component) == {f"L{l}H{h}" for l in range(L) for h in range(H)}
    assert heads.loc[heads.mmd2.idxmax(), "component"] == "L2H3"  # the planted head moved most
    entry = ("badnet-s0", cached / "clean.parquet", cached / "trig.parquet", cached / "protos.safetensors")
    head_map_figure([(*entry, cached / "mmd.csv"), (*entry, None)], CFG, tmp_path / "map.png")
    from PIL import Image

    width, height = Image.open(tmp_path / "map.png").size
    assert width > 1200 and height > 600  # 3 columns x 2 rows
