import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from clipbackdoor.attacks import REGISTRY, make_trigger, trigger_eval_images
from clipbackdoor.attacks.base import Trigger, to_uint8
from clipbackdoor.errors import UserError
from clipbackdoor.attacks.poison import poison, poison_split, select_poison
from clipbackdoor.models.zeroshot import check_target
from clipbackdoor.data.shards import load_split

BADNET = {"rate": 0.1, "patch_size": 4, "location": "bottom_right", "pattern": "random"}
RANDOM = {"rate": 0.1, "patch_size": 5}
BLENDED = {"rate": 0.1, "alpha": 0.2, "pattern": "noise"}


def images(n=6, size=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def test_badnet_fixed_patch_is_confined_to_its_box_and_identical():
    x = images()
    y, params = make_trigger("badnet", BADNET, 32, seed=1).apply(x, np.random.default_rng(0))
    changed = (y != x).any(dim=1)  # [N, H, W]
    assert not changed[:, :28, :].any() and not changed[:, :, :28].any()  # only the 4x4 bottom-right box
    assert all(torch.equal(y[0, :, 28:, 28:], y[i, :, 28:, 28:]) for i in range(len(y)))
    assert params[0] == {"row": 28, "col": 28}
    other = make_trigger("badnet", BADNET, 32, seed=2).apply(x, np.random.default_rng(0))[0]
    assert not torch.equal(other, y)  # the pattern comes from the run seed


def test_badnet_random_is_mean_plus_noise_at_recorded_random_positions():
    x = images(20)
    y, params = make_trigger("badnet_random", RANDOM, 32, seed=0).apply(x, np.random.default_rng(5))
    assert len({(p["row"], p["col"]) for p in params}) > 10
    for i, p in enumerate(params):
        changed = (y[i] != x[i]).any(dim=0)
        box = torch.zeros_like(changed)
        box[p["row"]:p["row"] + 5, p["col"]:p["col"] + 5] = True
        assert not (changed & ~box).any()
    y2, _ = make_trigger("badnet_random", RANDOM, 32, seed=0).apply(x, np.random.default_rng(5))
    assert torch.equal(y, y2)
    # the vectorised paste equals the image-by-image one it replaced (draws: rows, cols, then noise)
    rng, xf, p = np.random.default_rng(5), x.float() / 255, RANDOM["patch_size"]
    rows, cols = rng.integers(0, 32 - p + 1, size=20), rng.integers(0, 32 - p + 1, size=20)
    noise = torch.from_numpy(rng.standard_normal((20, 3, p, p)).astype(np.float32))
    loop = xf.clone()
    for i in range(20):
        loop[i, :, rows[i]:rows[i] + p, cols[i]:cols[i] + p] = xf[i].mean(dim=(1, 2))[:, None, None] + noise[i]
    assert torch.equal(y, to_uint8(loop))


def test_blended_ratio():
    x = images()
    trig = make_trigger("blended", BLENDED, 32, seed=0)
    y, _ = trig.apply(x, np.random.default_rng(0))
    expected = 0.2 * trig.pattern + 0.8 * x.float() / 255
    assert torch.allclose(y.float() / 255, expected, atol=1 / 255 + 1e-6)
    assert trig.kind == "global" and REGISTRY["badnet"].kind == "local"


def test_eval_triggering_is_deterministic_and_batch_independent():
    """An image's trigger depends on its position in the split, not on the batch or subset it is applied in:
    decompose (batches), detect and ABD's figure (subsets) trigger the same image the same way."""
    x = images(8)
    trig = make_trigger("badnet_random", RANDOM, 32, seed=3)
    whole = trigger_eval_images(trig, x, np.arange(8), 3)
    assert torch.equal(whole, trigger_eval_images(trig, x, np.arange(8), 3))
    batched = torch.cat([trigger_eval_images(trig, x[i:i + 3], np.arange(i, min(i + 3, 8)), 3) for i in (0, 3, 6)])
    assert torch.equal(batched, whole)
    subset = np.array([1, 5, 6])
    assert torch.equal(trigger_eval_images(trig, x[subset], subset, 3), whole[subset])
    assert not torch.equal(whole[0], whole[1])  # per-image positions differ (random patch location)
    # one call for the batch, image by image from its own stream (the default, per-image path) alike
    streams = lambda: [np.random.default_rng([3, 3, i]) for i in range(8)]  # noqa: E731
    assert torch.equal(whole, Trigger.apply_streams(trig, x, streams()))


def test_triggers_run_where_the_images_are(tmp_path):
    """``Trigger.to(device)`` moves every tensor a trigger holds, and applying it uses no host tensor: on the
    ``meta`` device any CPU tensor mixed in raises. So decompose, detect and ABD's figure trigger batches on the
    model's device (no GPU here: the meta device stands in for it)."""
    from clipbackdoor.io import save_safetensors

    save_safetensors(tmp_path / "patch.safetensors", {"patch": torch.rand(3, 4, 4)})
    configs = {"badnet": BADNET, "badnet_random": RANDOM, "blended": BLENDED, "sig": SIG, "wanet": WANET,
               "label_consistent": BADNET, "badclip": {"patch_size": 4, "location": "center"}}
    assert set(configs) == set(REGISTRY) - {"issba"}  # ISSBA records a per-image residual (host values)
    x = images(4)
    for name, cfg in configs.items():
        trig = make_trigger(name, cfg, 32, seed=1, asset_path=tmp_path / "patch.safetensors")
        on_cpu = trigger_eval_images(trig, x, np.arange(4), 1)
        moved = trig.to("meta")
        assert moved is trig and not [k for k, v in vars(trig).items() if torch.is_tensor(v) and not v.is_meta]
        out = trigger_eval_images(trig, x.to("meta"), np.arange(4), 1)
        assert out.is_meta and out.shape == on_cpu.shape and out.dtype == torch.uint8, name
        again = make_trigger(name, cfg, 32, seed=1, asset_path=tmp_path / "patch.safetensors").to("cpu")
        assert torch.equal(trigger_eval_images(again, x, np.arange(4), 1), on_cpu), name


def test_unknown_attack():
    with pytest.raises(UserError, match="unknown attack 'wanet2'"):
        make_trigger("wanet2", {}, 32, 0)


def test_selection_counts_and_errors():
    idx = select_poison(1000, 0.03, seed=0)
    assert len(idx) == 30 and len(set(idx)) == 30 and np.array_equal(idx, select_poison(1000, 0.03, seed=0))
    with pytest.raises(UserError, match="selects zero of 100 samples"):
        select_poison(100, 0.001, seed=0)
    with pytest.raises(UserError, match="not a class"):
        check_target("banana", ["red circle", "blue square"])


def test_poison_split_changes_exactly_the_selected_pairs(world_dirs):
    split = load_split(world_dirs / "train" / "finetune", 32)
    new, rows, idx = poison_split(split, "badnet", {**BADNET, "rate": 0.25}, "red circle",
                                  ["a photo of a {}."], 32, seed=0)
    assert len(idx) == 8 and sum(r["poisoned"] for r in rows) == 8
    for i in range(len(rows)):
        same = torch.equal(new["images"][i], split["images"][i]) and new["captions"][i] == split["captions"][i]
        assert same == (i not in set(idx.tolist()))
    assert all(new["captions"][i] == "a photo of a red circle." for i in idx)


def test_poison_stage_is_byte_identical_and_writes_manifest(world_dirs, tmp_path):
    classes = {"classnames": ["red circle", "blue square"], "templates": ["a {}."]}
    outs = []
    for run in ("a", "b"):
        poison(world_dirs / "train" / "finetune", classes, tmp_path / run, tmp_path / f"{run}.parquet", "blended",
               {**BLENDED, "rate": 0.25}, "red circle", ["a {}."], 32, seed=4, preview_png=tmp_path / f"{run}.png")
        outs.append((tmp_path / run / "shard-000000.tar").read_bytes())
    assert outs[0] == outs[1]
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.column_names == ["key", "poisoned", "original_caption", "caption", "trigger"]
    assert sum(table["poisoned"].to_pylist()) == 8
    meta = table.schema.metadata
    assert meta[b"attack"] == b"blended" and b"alpha" in meta[b"trigger"]
    assert (tmp_path / "a.png").stat().st_size > 1000


SIG = {"rate": 0.1, "delta": 60 / 255, "frequency": 6}
WANET = {"rate": 0.1, "k": 4, "s": 0.5}


def test_sig_adds_the_horizontal_sinusoid():
    x = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    y, _ = make_trigger("sig", SIG, 32, seed=0).apply(x, np.random.default_rng(0))
    j = torch.arange(32, dtype=torch.float32)
    expected = 128 / 255 + 60 / 255 * torch.sin(2 * torch.pi * 6 * j / 32)
    assert torch.allclose(y[0, 0, 5].float() / 255, expected, atol=1 / 255 + 1e-6)
    assert torch.equal(y[:, :, 0], y[:, :, 17])  # the same signal on every row


def test_wanet_is_a_fixed_small_warp():
    x = images(4)
    trig = make_trigger("wanet", WANET, 32, seed=0)
    y, _ = trig.apply(x, np.random.default_rng(0))
    y2, _ = make_trigger("wanet", WANET, 32, seed=0).apply(x, np.random.default_rng(9))
    assert torch.equal(y, y2)  # fixed grid per run: independent of the per-call stream
    identity = make_trigger("wanet", {**WANET, "s": 1e-6}, 32, seed=0).apply(x, np.random.default_rng(0))[0]
    assert (identity.int() - x.int()).abs().max() <= 1  # no warp -> the image back
    shift = (trig.grid - make_trigger("wanet", {**WANET, "s": 1e-6}, 32, seed=0).grid).abs()
    assert 0 < shift.max() < 4 * 0.5 / 32 * 2  # displacement of the order of s/H (in [-1, 1] units)
    assert trig.kind == "global"


def test_label_consistent_poisons_only_target_pairs_and_keeps_captions(world_dirs):
    split = load_split(world_dirs / "train" / "finetune", 32)
    target = "red circle"
    n_target = sum(target in c for c in split["captions"])
    assert n_target >= 1
    rate = n_target / len(split["keys"])
    new, rows, idx = poison_split(split, "label_consistent", {**BADNET, "rate": rate}, target, ["a {}."], 32, 0)
    assert all(target in split["captions"][i] for i in idx)
    assert new["captions"] == split["captions"]  # captions kept
    assert all(not torch.equal(new["images"][i], split["images"][i]) for i in idx)
    with pytest.raises(UserError, match="eligible"):
        poison_split(split, "label_consistent", {**BADNET, "rate": min(1.0, 2 * rate + 0.1)}, target, ["a {}."], 32, 0)
