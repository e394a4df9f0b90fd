import hashlib
import tarfile

import numpy as np
import pytest

from clipbackdoor.errors import UserError
from clipbackdoor.data.shards import iter_shards, load_split, shard_paths, write_shards
from clipbackdoor.data.world import build_world, class_names, generate_split, world_classes_json
from conftest import small_world


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_world_is_byte_identical_for_the_same_seed(tmp_path, world_dirs):
    build_world(small_world(), 32, tmp_path / "train", tmp_path / "eval")
    assert _digest(tmp_path / "train") == _digest(world_dirs / "train")
    assert _digest(tmp_path / "eval") == _digest(world_dirs / "eval")


def test_other_seed_gives_other_world():
    a = next(generate_split(small_world(seed=1), "eval", 32))
    b = next(generate_split(small_world(seed=2), "eval", 32))
    assert not np.array_equal(a[1], b[1])


def test_splits_are_independent_streams():
    """Growing the pretraining split must not change the evaluation images."""
    a = [s[1] for s in generate_split(small_world(n_pretrain=10), "eval", 32)]
    b = [s[1] for s in generate_split(small_world(n_pretrain=500), "eval", 32)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_shard_round_trip_and_labels(world_dirs):
    split = load_split(world_dirs / "eval", 32)
    cfg = small_world()
    names = class_names(cfg)
    assert split["images"].shape == (cfg.n_eval, 3, 32, 32) and split["images"].dtype.is_floating_point is False
    assert len(shard_paths(world_dirs / "eval")) == 1
    for caption, label, meta in zip(split["captions"], split["labels"].tolist(), split["meta"]):
        colour, shape = names[label].split()
        assert meta["colour"] == colour and meta["shape"] == shape
        assert f"{colour} {shape}" in caption  # every caption names its class
    classes = world_classes_json(world_dirs / "eval")
    assert classes["classnames"] == names and classes["templates"]


def test_object_has_its_colour(world_dirs):
    """The rendered object really carries the named colour: the dominant channel matches."""
    from clipbackdoor.data.world import RGB

    split = load_split(world_dirs / "eval", 32)
    hits = 0
    for img, meta in zip(split["images"].float() / 255, split["meta"]):
        target = np.array(RGB[meta["colour"]])
        dist = ((img.permute(1, 2, 0).numpy() - target) ** 2).sum(-1)
        hits += int((dist < 0.05).sum() > 10)
    assert hits / len(split["meta"]) > 0.95


def test_all_splits_written(world_dirs):
    for split, n in (("pretrain", 96), ("finetune", 32)):
        assert sum(1 for _ in iter_shards(world_dirs / "train" / split)) == n


def test_truncated_shard_is_reported(tmp_path, world_dirs):
    shard = shard_paths(world_dirs / "eval")[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / shard.name).write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    with pytest.raises(UserError, match="truncated or corrupt tar shard"):
        load_split(bad)


def test_corrupt_image_is_reported(tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    write_shards(tmp_path / "s", [("k0", img, "a red circle.", {"cls": 0})], 10)
    shard = shard_paths(tmp_path / "s")[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    import io

    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.endswith(".png"):
                data = b"not a png at all"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(UserError, match="cannot be decoded"):
        load_split(tmp_path / "s")


def test_wrong_image_size_is_reported(world_dirs):
    with pytest.raises(UserError, match="expected 64x64"):
        load_split(world_dirs / "eval", 64)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_split(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .tar shards"):
        load_split(tmp_path / "empty")


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_image_of_another_mode_is_read_as_rgb(tmp_path, mode):
    import io

    from PIL import Image

    img = np.zeros((32, 32, 3), np.uint8)
    write_shards(tmp_path / "s", [("k0", img, "a red circle.", {"cls": 0})], 10)
    shard = shard_paths(tmp_path / "s")[0]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    other = io.BytesIO()
    Image.new(mode, (32, 32), color=200 if mode != "RGBA" else (200, 200, 200, 128)).save(other, format="PNG")
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.endswith(".png"):
                data = other.getvalue()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    split = load_split(tmp_path / "s", 32)
    assert tuple(split["images"].shape) == (1, 3, 32, 32)
    assert int(split["images"].float().std()) == 0 and int(split["images"][0, 0, 0, 0]) > 0
