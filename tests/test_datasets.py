import numpy as np
import pytest
import torch
from PIL import Image

from clipbackdoor.config import EvalSetConfig, WebdatasetConfig
from clipbackdoor.data.datasets import convert_imagefolder, convert_webdataset
from clipbackdoor.errors import UserError
from clipbackdoor.data.shards import load_split, resize_center, write_shards
from clipbackdoor.data.world import world_classes_json


def _fake_imagefolder(root, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.jpg")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_imagefolder_to_labelled_shards(tmp_path):
    _fake_imagefolder(tmp_path / "val")
    cfg = EvalSetConfig(kind="imagefolder", root=str(tmp_path / "val"), classnames="folders")
    n = convert_imagefolder("pets", cfg, 32, tmp_path / "out", seed=0, templates=["a photo of a {}."])
    split = load_split(tmp_path / "out", 32)
    assert n == 6 and split["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    assert world_classes_json(tmp_path / "out")["classnames"] == ["cat", "dog"]


def test_imagefolder_subsample_is_seeded(tmp_path):
    _fake_imagefolder(tmp_path / "val", per_class=5)
    cfg = EvalSetConfig(kind="imagefolder", root=str(tmp_path / "val"), classnames="folders", max_images=4)
    convert_imagefolder("x", cfg, 32, tmp_path / "a", seed=1, templates=[])
    convert_imagefolder("x", cfg, 32, tmp_path / "b", seed=1, templates=[])
    a, b = load_split(tmp_path / "a"), load_split(tmp_path / "b")
    assert len(a["keys"]) == 4 and [m["source"] for m in a["meta"]] == [m["source"] for m in b["meta"]]


def test_missing_imagefolder_says_what_to_download(tmp_path):
    cfg = EvalSetConfig(kind="imagefolder", root=str(tmp_path / "imagenet"), classnames="imagenet")
    with pytest.raises(UserError) as info:
        convert_imagefolder("imagenet", cfg, 224, tmp_path / "out", seed=0, templates=[])
    assert "does not exist" in info.value.problem and "ImageNet-1K val" in info.value.fix
    assert not (tmp_path / "out").exists()


def test_imagenet_classnames_need_wordnet_folders(tmp_path):
    _fake_imagefolder(tmp_path / "val")
    cfg = EvalSetConfig(kind="imagefolder", root=str(tmp_path / "val"), classnames="imagenet")
    with pytest.raises(UserError, match="folder 'cat' is not an ImageNet-1K WordNet id"):
        convert_imagefolder("imagenet", cfg, 32, tmp_path / "out", seed=0, templates=[])
    assert not (tmp_path / "out").exists()


def test_imagenet_synset_folders_get_open_clip_names(tmp_path):
    """ROOT/<wnid>/ folders (a subset is allowed) map to open_clip's class names in ImageNet's index order."""
    _fake_imagefolder(tmp_path / "val", classes=("n07753592", "n01440764", "dog"))
    (tmp_path / "val" / "dog" / "notes.txt").rename(tmp_path / "val" / "n07753592" / "notes.txt")
    for f in (tmp_path / "val" / "dog").iterdir():
        f.unlink()
    (tmp_path / "val" / "dog").rmdir()
    cfg = EvalSetConfig(kind="imagefolder", root=str(tmp_path / "val"), classnames="imagenet")
    convert_imagefolder("imagenet", cfg, 32, tmp_path / "out", seed=0, templates=[])
    assert world_classes_json(tmp_path / "out")["classnames"] == ["tench", "banana"]  # sorted wnids


def test_cc3m_style_shards_are_selected(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(f"s{i}", rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), f"caption {i}", {}) for i in range(7)]
    write_shards(tmp_path / "cc3m", samples, shard_size=3)
    cfg = WebdatasetConfig(urls=str(tmp_path / "cc3m" / "shard-{000000..000002}.tar"), n_pairs=5, shard_size=4)
    assert convert_webdataset(cfg, tmp_path / "out") == 5
    split = load_split(tmp_path / "out" / "finetune", 32)
    assert split["captions"] == [f"caption {i}" for i in range(5)]
    # kept as downloaded (64x48 PNGs), brought to 32x32 on reading by CLIP's resize + centre crop
    assert split["images"].shape == (5, 3, 32, 32)
    expected = [resize_center(Image.fromarray(img), 32) for _, img, _, _ in samples[:5]]
    assert torch.equal(split["images"], torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2))


def test_cc3m_missing_shards_fail_clearly(tmp_path):
    cfg = WebdatasetConfig(urls=str(tmp_path / "cc3m-{0000..0003}.tar"), n_pairs=5, shard_size=4)
    with pytest.raises(UserError, match="4 shard\\(s\\) missing"):
        convert_webdataset(cfg, tmp_path / "out")
