"""STRIP, SCALE-UP and TeCo on a toy classifier whose answer is known: it returns the target class whenever the
4x4 bottom-right corner is (nearly) white (a patch backdoor) and otherwise a class set by the image's mean
brightness, so superimposing, scaling or corrupting a clean image changes its prediction."""

import numpy as np
import torch

from clipbackdoor.compat import import_imagecorruptions
from clipbackdoor.detectors.scores import corruption_names, scaleup_scores, strip_scores, teco_scores
from clipbackdoor.analysis.metrics import detection_auroc

C, TARGET = 10, 7


def toy_proba(x):
    """A confident target on the patch; otherwise a soft vote over brightness bins (an uncertain clean model)."""
    patch = x[:, :, -4:, -4:].mean(dim=(1, 2, 3)) > 0.95
    level = x.mean(dim=(1, 2, 3))[:, None] * C  # [B, 1]
    soft = torch.softmax(-(level - torch.arange(C) - 0.5).abs() * 2, dim=-1)
    sharp = torch.nn.functional.one_hot(torch.full((len(x),), TARGET), C).float() * 0.9 + 0.01
    return torch.where(patch[:, None], sharp, soft)


def images(n, seed, patched):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.9
    if patched:
        x[:, :, -4:, -4:] = 1.0
    return x


def test_every_corruption_runs_on_small_images():
    ic = import_imagecorruptions()
    x = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    assert len(corruption_names()) == 15
    for name in corruption_names():
        out = np.asarray(ic.corrupt(x, corruption_name=name, severity=3))
        assert out.shape == x.shape, name


def test_fast_glass_blur_equals_the_library_and_leaves_the_same_random_state():
    """TeCo's glass blur runs our fast walk; for every severity it gives the library's exact output (its copy-not-swap
    included) and consumes the same NumPy random draws, so the corruptions after it are unchanged too."""
    from PIL import Image
    from imagecorruptions import corruptions

    ic = import_imagecorruptions()
    assert ic.corruption_dict["glass_blur"] is not corruptions.glass_blur
    assert "glass_blur" in ic.get_corruption_names("common")
    img = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)  # not square
    for severity in range(1, 6):
        np.random.seed(severity)
        library, after_library = corruptions.glass_blur(Image.fromarray(img), severity), np.random.randint(2**31)
        np.random.seed(severity)
        ours, after_ours = ic.corruption_dict["glass_blur"](Image.fromarray(img), severity), np.random.randint(2**31)
        assert np.array_equal(ours, library) and after_ours == after_library, severity
        assert not np.array_equal(np.uint8(ours), img)


def test_strip_gives_a_backdoor_low_entropy():
    clean, trig, pool = images(20, 0, False), images(20, 1, True), images(30, 2, False)
    s_clean, s_trig = strip_scores(toy_proba, clean, pool, 8, 0), strip_scores(toy_proba, trig, pool, 8, 0)
    assert np.allclose(s_trig, s_trig.max())  # always the target: the minimum entropy
    assert detection_auroc(s_clean, s_trig) > 0.95
    assert np.array_equal(s_clean, strip_scores(toy_proba, clean, pool, 8, 0))  # seeded


def test_scaleup_spc_is_one_for_the_backdoor():
    clean, trig = images(20, 0, False), images(20, 1, True)
    spc_clean, spc_trig = scaleup_scores(toy_proba, clean), scaleup_scores(toy_proba, trig)
    assert np.all(spc_trig == 1.0)
    assert spc_clean.mean() < 0.5 and detection_auroc(spc_clean, spc_trig) > 0.95


def test_teco_first_flips_and_variants():
    x = images(6, 3, True)
    score, first = teco_scores(toy_proba, x, compounding=False, seed=0)
    assert first.shape == (6, 15) and first.min() >= 1 and first.max() <= 6
    assert np.allclose(score, first.std(axis=1))
    again, _ = teco_scores(toy_proba, x, compounding=False, seed=0)
    assert np.array_equal(score, again)  # noise corruptions are seeded
    _, first_c = teco_scores(toy_proba, x, compounding=True, seed=0)
    assert (first_c <= first).mean() > 0.9  # compounding corrupts at least as hard
    const = lambda z: torch.full((len(z), C), 1.0 / C)  # noqa: E731  never changes its mind
    s0, f0 = teco_scores(const, x, compounding=False, seed=0)
    assert np.all(f0 == 6) and np.all(s0 == 0)


def test_detect_stage_scores_the_test_split_and_feeds_the_metrics(world_dirs, micro_model, tmp_path):
    import pandas as pd

    from clipbackdoor.config import DetectConfig
    from clipbackdoor.decomposition.stage import run_class_embeddings, run_decompose
    from clipbackdoor.detectors.detect import run_detect
    from clipbackdoor.analysis.metrics import setting_rows
    from clipbackdoor.decomposition.prototypes import build_prototypes, load_prototypes

    ev = world_dirs / "eval"
    run_decompose(micro_model, ev, tmp_path / "none.parquet", "none", {}, 0, "reference", True, 64)
    build_prototypes(tmp_path / "none.parquet", tmp_path / "p.safetensors", 0.2, 0)
    run_class_embeddings(micro_model, ev, tmp_path / "c.safetensors", "embedded")
    cfg = DetectConfig(detectors=("strip", "scaleup", "teco"), n_images=6, strip_n=2,
                       teco_variants=("independent", "compounding"), seed=0)
    badnet = {"rate": 0.1, "patch_size": 4, "location": "bottom_right", "pattern": "random"}
    run_detect(micro_model, ev, tmp_path / "p.safetensors", tmp_path / "c.safetensors", tmp_path / "d.parquet",
               "badnet-s0", badnet, 0, cfg, target=0)
    table = pd.read_parquet(tmp_path / "d.parquet")
    test_index = set(load_prototypes(tmp_path / "p.safetensors")["test_index"].tolist())
    assert set(table["index"]) <= test_index and table["index"].nunique() == 6
    assert sorted(table.defense.unique()) == ["scaleup", "strip", "teco"]
    assert set(table.variant[table.defense == "teco"].str.split(",").str[0]) == {"independent", "compounding"}
    assert (table.groupby(["defense", "variant", "split"]).size() == 6).all()
    rows = setting_rows(table, 0)
    assert len(rows) == 4 and all(0 <= r["auroc"] <= 1 and "tpr" not in r for r in rows)
