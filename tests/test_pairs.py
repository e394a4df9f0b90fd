"""Training pairs by random access into shards, poisoning as an overlay, and the streaming training loader."""

import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from clipbackdoor.defenses.abd import PerturbedImages, adversarial_images
from clipbackdoor.config import OptimConfig
from clipbackdoor.errors import UserError
from clipbackdoor.models.artifact import create
from clipbackdoor.data.pairs import OVERLAY_FILE, ShardPairs
from clipbackdoor.attacks.poison import poison, poison_split
from clipbackdoor.data.shards import load_split
from clipbackdoor.training.train import train_clip

CLASSES = {"classnames": ["red circle", "blue square"], "templates": ["a {}."]}
BADNET = {"rate": 0.25, "patch_size": 4, "location": "bottom_right", "pattern": "random"}


def test_shard_pairs_read_what_the_whole_split_holds(world_dirs):
    folder = world_dirs / "train" / "finetune"
    split, pairs = load_split(folder, 32), ShardPairs(folder, 32)
    assert len(pairs) == len(split["keys"]) and pairs.keys == split["keys"] and pairs.captions == split["captions"]
    idx = torch.tensor([5, 0, len(pairs) - 1, 5])
    assert torch.equal(pairs[idx], split["images"][idx])
    assert torch.equal(pairs[2:9:3], split["images"][2:9:3]) and torch.equal(pairs[:], split["images"])
    assert pairs.shape == tuple(split["images"].shape)
    assert len(ShardPairs(folder, 32, limit=7)) == 7
    mask = torch.zeros(len(pairs), dtype=torch.bool)
    mask[[1, 4]] = True  # a boolean mask selects, as on a tensor (not positions 0/1)
    assert torch.equal(pairs[mask], split["images"][mask]) and pairs.select(mask.numpy()).keys == [pairs.keys[1],
                                                                                                   pairs.keys[4]]
    view = pairs.select([9, 2, 2, 0])  # the attack stages' "non-target images": a view, decoded when indexed
    assert view.keys == [split["keys"][i] for i in (9, 2, 2, 0)] and len(view) == 4 and len(pairs) > 4
    assert torch.equal(view[:], split["images"][[9, 2, 2, 0]]) and torch.equal(view[[3, 0]], split["images"][[0, 9]])
    with pytest.raises(UserError, match="is 32x32, expected 64x64"):
        ShardPairs(folder, 64)[[0]]


@pytest.fixture(scope="module")
def poisoned(world_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("overlay")
    poison(world_dirs / "train" / "finetune", CLASSES, out / "run", out / "run.parquet", "badnet", BADNET,
           "red circle", ["a {}."], 32, seed=4, preview_png=out / "run.png")
    return out


def test_poison_writes_only_the_poisoned_pairs_and_the_loader_merges_them_by_key(world_dirs, poisoned):
    base = world_dirs / "train" / "finetune"
    split = load_split(base, 32)
    expected, rows, idx = poison_split(split, "badnet", BADNET, "red circle", ["a {}."], 32, seed=4)
    overlay = json.loads((poisoned / "run" / OVERLAY_FILE).read_text())
    assert overlay["keys"] == [split["keys"][i] for i in idx]  # only the changed pairs are written
    with tarfile.open(poisoned / "run" / "shard-000000.tar") as tar:
        assert len({m.name.partition(".")[0] for m in tar}) == len(idx) < len(split["keys"])
    merged = ShardPairs(poisoned / "run", 32)
    assert merged.keys == split["keys"]  # the base's order
    assert merged.captions == expected["captions"] and torch.equal(merged[:], expected["images"])
    manifest = pq.read_table(poisoned / "run.parquet").to_pylist()
    assert [r["key"] for r in manifest if r["poisoned"]] == overlay["keys"]
    assert [r["caption"] for r in manifest] == merged.captions
    assert torch.equal(load_split(poisoned / "run", 32)["images"], expected["images"])  # load_split merges too


def test_a_corpus_kept_as_downloaded_is_resized_on_reading_and_poisoned_as_an_overlay(world_dirs, tmp_path):
    """The cc3m layout: JPEG bytes of any size, unchanged; every reader brings them to the model's size the same
    way, and poisoning it writes 32-px PNGs of the changed pairs only."""
    import io

    from PIL import Image

    from clipbackdoor.data.shards import Encoded, resize_center, write_shards

    clean = load_split(world_dirs / "train" / "finetune", 32, limit=24)
    samples, expected = [], []
    for j, (key, img, cap) in enumerate(zip(clean["keys"], clean["images"], clean["captions"])):
        big = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((40 + 3 * j, 36), Image.BILINEAR)
        buf = io.BytesIO()
        big.save(buf, format="JPEG", quality=90)
        samples.append((key, Encoded("jpg", buf.getvalue()), cap, {}))
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            expected.append(np.array(resize_center(im, 32)))
    write_shards(tmp_path / "base", samples, shard_size=10, as_downloaded=True)
    expected = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2)
    split = load_split(tmp_path / "base", 32)
    assert torch.equal(split["images"], expected) and torch.equal(ShardPairs(tmp_path / "base", 32)[:], expected)
    ShardPairs(tmp_path / "base", 32).digest()  # any size is accepted as downloaded (header checked)
    poison(tmp_path / "base", CLASSES, tmp_path / "run", tmp_path / "run.parquet", "badnet", BADNET, "red circle",
           ["a {}."], 32, seed=4, preview_png=tmp_path / "run.png")
    poisoned, _, idx = poison_split(split, "badnet", BADNET, "red circle", ["a {}."], 32, seed=4)
    merged = ShardPairs(tmp_path / "run", 32)
    assert len(idx) and torch.equal(merged[:], poisoned["images"]) and merged.captions == poisoned["captions"]
    with tarfile.open(tmp_path / "run" / "shard-000000.tar") as tar:
        assert {m.name.partition(".")[2] for m in tar} == {"png", "txt", "json"}
    with pytest.raises(UserError, match="kept as downloaded .* no image size was given"):
        ShardPairs(tmp_path / "base")
    with pytest.raises(UserError, match="different sizes .* no image size was given"):
        load_split(tmp_path / "base")
    with pytest.raises(UserError, match="is 32x32, expected 40x40"):  # the overlay's own images are held to size
        ShardPairs(tmp_path / "run", 40)[idx]
    with pytest.raises(UserError, match="is 40x36, expected 32x32"):  # a folder not marked keeps exact sizes
        write_shards(tmp_path / "plain", samples[:1], shard_size=10)
        ShardPairs(tmp_path / "plain", 32)[[0]]


def test_an_overlay_that_disagrees_with_its_list_or_its_base_is_refused(world_dirs, poisoned, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(poisoned / "run", bad)
    overlay = json.loads((bad / OVERLAY_FILE).read_text())
    overlay["base"] = os.path.relpath(world_dirs / "train" / "finetune", bad)
    (bad / OVERLAY_FILE).write_text(json.dumps({**overlay, "keys": overlay["keys"] + ["finetune-9999999"]}))
    with pytest.raises(UserError, match="disagree on the replaced keys .e.g. 'finetune-9999999'"):
        ShardPairs(bad, 32)
    (bad / OVERLAY_FILE).write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(UserError, match="not an overlay description"):
        ShardPairs(bad, 32)
    other_base = os.path.relpath(world_dirs / "train" / "pretrain", bad)  # keys of another split
    (bad / OVERLAY_FILE).write_text(json.dumps({**overlay, "base": other_base}))
    with pytest.raises(UserError, match="overlay key .* is not in its base"):
        ShardPairs(bad, 32)


def test_streamed_training_equals_in_memory_training_for_any_worker_count(world_dirs, monkeypatch):
    """The loader decodes batch s from the shards (in worker processes when asked): the same batches as indexing
    the in-memory tensor, so the weights are bit-identical (CPU) whatever the number of workers."""
    opt = OptimConfig(steps=6, batch_size=16, lr=2e-3, weight_decay=0.1, warmup_steps=1, betas=(0.9, 0.98), eps=1e-6)
    folder = world_dirs / "train" / "pretrain"
    split = load_split(folder, 32)
    results = {}
    for name, workers in (("tensor", "0"), ("shards", "0"), ("shards_2_workers", "2")):
        monkeypatch.setenv("CLIPBACKDOOR_LOADER_WORKERS", workers)
        torch.manual_seed(0)
        loaded = create("clipbackdoor-micro-vit-p8")
        images = split["images"] if name == "tensor" else ShardPairs(folder, 32)
        history = train_clip(loaded, images, loaded.tokenizer(split["captions"]), opt, seed=1)
        results[name] = (history, loaded.model.state_dict())
    for name in ("shards", "shards_2_workers"):
        assert results[name][0] == results["tensor"][0]
        assert all(torch.equal(results[name][1][k], v) for k, v in results["tensor"][1].items())


def test_lazily_perturbed_batches_equal_the_whole_array(world_dirs):
    folder = world_dirs / "train" / "finetune"
    images = load_split(folder, 32)["images"]
    delta = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(0))
    whole = adversarial_images(images, delta, "patch", "random", seed=3, fraction=0.5)
    lazy = PerturbedImages(ShardPairs(folder, 32), delta, "patch", "random", seed=3, fraction=0.5)
    idx = np.array([3, 0, 17, 4])
    assert torch.equal(lazy[idx], whole[idx]) and torch.equal(lazy[:], whole)
    assert (whole != images).any(dim=(1, 2, 3)).sum() == round(0.5 * len(images))


def test_resume_with_a_randomised_loss_reads_the_same_random_stream(world_dirs, tmp_path):
    """A loss that draws from the global torch generator (CleanCLIP's augmentations do) must see the same draws
    after a resume: the loader must not consume that generator (a DataLoader does unless given its own)."""
    from clipbackdoor.training.train import clip_loss_fn

    opt = OptimConfig(steps=6, batch_size=16, lr=2e-3, weight_decay=0.1, warmup_steps=1, betas=(0.9, 0.98), eps=1e-6)
    folder = world_dirs / "train" / "pretrain"
    pairs = ShardPairs(folder, 32)
    tokens = create("clipbackdoor-micro-vit-p8").tokenizer(pairs.captions)
    clip = clip_loss_fn()

    def noisy(loaded, images, toks, idx):  # a random brightness jitter per image, from the global generator
        jitter = (torch.rand(len(images), 1, 1, 1) * 40).to(torch.uint8)
        return clip(loaded, images.clamp(max=215) + jitter, toks, idx)

    torch.manual_seed(0)
    ref = create("clipbackdoor-micro-vit-p8")
    init = {k: v.clone() for k, v in ref.model.state_dict().items()}
    train_clip(ref, pairs, tokens, opt, seed=0, loss_fn=noisy)
    runs = []
    for stop in (4, None):
        model = create("clipbackdoor-micro-vit-p8")
        model.model.load_state_dict(init)
        runs.append(train_clip(model, pairs, tokens, opt, seed=0, loss_fn=noisy, ckpt_dir=tmp_path, ckpt_every=2,
                               stop_after=stop))
    assert runs[1][0]["step"] == 1 and len(runs[1]) == opt.steps  # resumed at step 4, history carried over
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in ref.model.state_dict().items())


def test_a_corrupt_training_image_stops_the_stage_before_training(world_dirs, tmp_path, monkeypatch):
    from clipbackdoor.data.shards import write_shards

    split = load_split(world_dirs / "train" / "pretrain", 32)
    samples = [(k, img.permute(1, 2, 0).numpy(), c, {}) for k, img, c in
               zip(split["keys"][:20], split["images"][:20], split["captions"][:20])]
    write_shards(tmp_path / "pairs", iter(samples), shard_size=64)
    pairs = ShardPairs(tmp_path / "pairs", 32)
    f_id, offset, size = pairs.where[7].tolist()
    with open(pairs.files[f_id], "r+b") as fh:  # damage the image's PNG header in place
        fh.seek(offset)
        fh.write(b"\0" * 16)
    with pytest.raises(UserError, match=f"image of sample '{split['keys'][7]}' cannot be read"):
        ShardPairs(tmp_path / "pairs", 32).digest()
    # met inside a loader worker process, the error reaches the trainer as the same one-line UserError
    from clipbackdoor.training.train import step_loader

    monkeypatch.setenv("CLIPBACKDOOR_LOADER_WORKERS", "1")
    with pytest.raises(UserError, match=f"image of sample '{split['keys'][7]}' cannot be decoded") as err:
        list(step_loader(ShardPairs(tmp_path / "pairs", 32), 20, 0, 0, 1, 0, 1, "cpu"))
    assert "Traceback" not in str(err.value) and err.value.fix.startswith("regenerate the shard")
