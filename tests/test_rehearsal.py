"""The rehearsal inputs (clipbackdoor.pipeline.rehearsal) are read by the real loaders: webdataset + convert_webdataset for
the img2dataset CC3M shards, convert_imagefolder for the evaluation sets, open_clip's ``pretrained=`` file path for
the checkpoint, diffusers' from_pretrained (via t2i.load_stable_diffusion) for the Stable Diffusion directory."""

import hashlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from clipbackdoor.pipeline import rehearsal
from clipbackdoor.config import EvalSetConfig, WebdatasetConfig
from clipbackdoor.data.datasets import convert_imagefolder, convert_webdataset
from clipbackdoor.errors import UserError
from clipbackdoor.data.pairs import ShardPairs
from clipbackdoor.data.shards import load_split, resize_center

MICRO = "clipbackdoor-micro-vit-p8"  # the project's smallest open_clip config: a 13 MB checkpoint
SMALL = ["--seed", "0", "--cc3m-pairs", "40", "--cc3m-shards", "4", "--cc3m-without-jpg", "2", "--eval-classes", "3",
         "--eval-images", "3", "--clip-model", MICRO, "--textspan-count", "30"]
N_PAIRS, N_WITHOUT_JPG = 40, 2
CC3M = "cc3m/{00000..00003}.tar"


@pytest.fixture(scope="module")
def rehearsal_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rehearsal") / "r"
    assert rehearsal.main(["--out", str(out), *SMALL]) == 0
    return out


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cc3m_samples(root: Path) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(str(root / CC3M), shardshuffle=False))


# --- CC3M (img2dataset webdataset output) ------------------------------------------------------------------------

def test_cc3m_tars_are_img2dataset_webdataset(rehearsal_dir):
    samples = cc3m_samples(rehearsal_dir)
    assert len(samples) == N_PAIRS + N_WITHOUT_JPG
    fields = ["caption", "url", "key", "status", "error_message", "width", "height", "original_width",
              "original_height", "exif", "sha256"]
    for s in samples:
        key = s["__key__"]
        assert re.fullmatch(r"\d{9}", key) and s["__url__"].endswith(f"/{key[:5]}.tar")  # SSSSS + IIII
        meta = json.loads(s["json"])
        assert list(meta) == fields and meta["key"] == key and meta["status"] == "success"
        assert meta["error_message"] is None and meta["caption"] == s["txt"].decode("utf-8")
        if "jpg" in s:
            assert hashlib.sha256(s["jpg"]).hexdigest() == meta["sha256"]
            with Image.open(io.BytesIO(s["jpg"])) as im:
                assert im.format == "JPEG" and im.size == (meta["width"], meta["height"])
                assert 180 <= min(im.size) <= 300
    assert sum("jpg" not in s for s in samples) == N_WITHOUT_JPG
    assert len({(json.loads(s["json"])["width"], json.loads(s["json"])["height"]) for s in samples}) > 10
    captions = [s["txt"].decode("utf-8") for s in samples]
    for target in rehearsal.TARGETS:  # ~10 % of the captions name each target
        share = np.mean([re.search(rf"\b{target}\b", c) is not None for c in captions])
        assert 0.05 <= share <= 0.2, (target, share)


def test_cc3m_parquet_lists_failed_downloads(rehearsal_dir):
    import pandas as pd

    tar_keys = {s["__key__"] for s in cc3m_samples(rehearsal_dir)}
    frames, failed_total = [], 0
    for shard in range(4):
        name = f"{shard:05d}"
        df = pd.read_parquet(rehearsal_dir / "cc3m" / f"{name}.parquet")
        stats = json.loads((rehearsal_dir / "cc3m" / f"{name}_stats.json").read_text())
        assert stats["count"] == len(df) and stats["successes"] == int((df.status == "success").sum())
        assert stats["failed_to_download"] == int((df.status == "failed_to_download").sum())
        assert sorted(df.key) == [f"{name}{i:04d}" for i in range(len(df))]  # every input row has a key
        frames.append(df)
        failed_total += stats["failed_to_download"]
    df = pd.concat(frames)
    failed = df[df.status == "failed_to_download"]
    assert failed_total >= 1 and len(failed) == failed_total
    assert failed.error_message.notna().all() and failed.sha256.isna().all() and failed.width.isna().all()
    assert set(failed.key).isdisjoint(tar_keys)  # a failed download is a gap in the tar's key sequence
    assert set(df[df.status == "success"].key) == tar_keys


def test_cc3m_converts_and_skips_samples_without_jpg(rehearsal_dir, tmp_path):
    cfg = WebdatasetConfig(urls=str(rehearsal_dir / CC3M), n_pairs=N_PAIRS, shard_size=16)
    assert convert_webdataset(cfg, tmp_path / "out") == N_PAIRS
    split = load_split(tmp_path / "out" / "finetune", 32)
    downloaded = {s["__key__"]: s for s in cc3m_samples(rehearsal_dir) if "jpg" in s}
    assert len(split["keys"]) == N_PAIRS and {m["source_key"] for m in split["meta"]} == set(downloaded)
    # the JPEG bytes are kept as downloaded (no PNG re-encode), and both readers -- the streaming split and the
    # training loader's random access -- decode them to the model's size as CLIP's preprocessing does
    shards = [str(p) for p in sorted((tmp_path / "out" / "finetune").glob("*.tar"))]
    stored = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}
    pairs = ShardPairs(tmp_path / "out" / "finetune", 32)
    assert pairs.keys == split["keys"] and pairs.captions == split["captions"]
    assert torch.equal(pairs[:], split["images"]) and pairs.digest()
    for key, meta, image in zip(split["keys"], split["meta"], split["images"]):
        source = downloaded[meta["source_key"]]
        assert "png" not in stored[key] and stored[key]["jpg"] == source["jpg"]
        with Image.open(io.BytesIO(source["jpg"])) as im:
            assert (meta["width"], meta["height"]) == im.size and im.size != (32, 32)
            assert torch.equal(image, torch.from_numpy(np.array(resize_center(im, 32))).permute(2, 0, 1))
    too_many = WebdatasetConfig(urls=str(rehearsal_dir / CC3M), n_pairs=N_PAIRS + 1, shard_size=16)
    with pytest.raises(UserError, match=f"only {N_PAIRS} pairs"):
        convert_webdataset(too_many, tmp_path / "out2")


# --- evaluation sets (ImageFolder roots) --------------------------------------------------------------------------

@pytest.mark.parametrize("name,target", [("caltech101", "accordion"), ("oxford_pets", "samoyed")])
def test_imagefolder_sets_convert(rehearsal_dir, tmp_path, name, target):
    cfg = EvalSetConfig(kind="imagefolder", root=str(rehearsal_dir / name), classnames="folders")
    assert convert_imagefolder(name, cfg, 32, tmp_path / "out", seed=0, templates=["a photo of a {}."]) == 3 * 3
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())["classnames"]
    assert target in classes and len(classes) == 3
    split = load_split(tmp_path / "out", 32)
    assert sorted(split["labels"].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(not m["source"].endswith(".mat") for m in split["meta"])  # the stray file is not an image


def test_real_folder_and_file_names(rehearsal_dir):
    pets = rehearsal_dir / "oxford_pets"
    assert [p.name for p in pets.glob("*/*.mat")] == ["Abyssinian_100.mat"]
    for f in pets.glob("*/*.jpg"):  # <breed>/<breed>_N.jpg, cats Capitalised, dogs lower case
        assert re.fullmatch(rf"{re.escape(f.parent.name)}_\d+\.jpg", f.name)
    assert (pets / "samoyed").is_dir() and (pets / "Abyssinian").is_dir()
    caltech = sorted(p.name for p in (rehearsal_dir / "caltech101").iterdir())
    assert caltech == ["Motorbikes", "accordion", "airplanes"]
    assert sorted(p.name for p in (rehearsal_dir / "caltech101" / "accordion").iterdir()) == [
        "image_0001.jpg", "image_0002.jpg", "image_0003.jpg"]


def test_imagenet_folders_are_real_wnids(rehearsal_dir):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from clipbackdoor.data.datasets import imagenet_wnids

    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    assert IMAGENET_CLASSNAMES[wnids.index("n07753592")] == "banana"
    val = rehearsal_dir / "imagenet" / "val"
    folders = sorted(p.name for p in val.iterdir())
    assert "n07753592" in folders and set(folders) <= set(wnids)
    files = sorted(val.glob("*/*"))
    assert len(files) == 9 and all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", f.name) for f in files)
    assert len({f.name for f in files}) == 9  # a val image number belongs to one class
    modes = set()
    for f in files:
        with Image.open(f) as im:
            modes.add(im.mode)
            assert im.convert("RGB").size == im.size
    assert modes == {"RGB", "L", "CMYK"}  # ImageNet has grayscale and CMYK JPEGs


# --- weights --------------------------------------------------------------------------------------------------------

def assert_random_checkpoint_loads(path: Path, name: str, seed: int):
    import open_clip

    torch.manual_seed(seed)
    expected = open_clip.create_model(name).state_dict()
    loaded = open_clip.create_model(name, pretrained=str(path)).state_dict()  # open_clip's own file path
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_clip_checkpoint_loads_through_open_clip(rehearsal_dir):
    path = rehearsal_dir / "clip" / f"{MICRO}-random.safetensors"
    assert_random_checkpoint_loads(path, MICRO, seed=0)
    sidecar = json.loads((rehearsal_dir / "clip" / f"{MICRO}-random.json").read_text())
    assert sidecar["seed"] == 0 and sidecar["sha256"] == rehearsal.file_sha256(path)


def test_clip_checkpoint_is_kept_when_it_matches(tmp_path):
    args = ["--out", str(tmp_path), "--parts", "clip", "--clip-model", MICRO]
    rehearsal.main(args)
    path = tmp_path / "clip" / f"{MICRO}-random.safetensors"
    before = path.stat().st_mtime_ns
    assert rehearsal.write_clip(tmp_path / "clip", 0, MICRO) == (path, False)
    assert path.stat().st_mtime_ns == before
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")  # damaged: rewritten
    assert rehearsal.write_clip(tmp_path / "clip", 0, MICRO) == (path, True)
    assert_random_checkpoint_loads(path, MICRO, seed=0)


@pytest.mark.slow
def test_vit_b_32_checkpoint_loads_and_decomposes(tmp_path, rehearsal_dir):
    """The paper profile's real architecture through the real stages: ViT-B-32 from a checkpoint file (open_clip's
    `pretrained=` path, as clean_model runs it), then the decomposition of an ImageFolder set at 224 px; the terms
    sum to the model's own embedding."""
    from clipbackdoor.config import EvalSetConfig, ModelConfig, ZeroShotConfig
    from clipbackdoor.data.datasets import convert_imagefolder
    from clipbackdoor.decomposition.cache import read_decomposition
    from clipbackdoor.decomposition.stage import run_decompose
    from clipbackdoor.training.pretrain import clean_model
    from clipbackdoor.models.zeroshot import templates_for

    rehearsal.main(["--out", str(tmp_path), "--parts", "clip", "--seed", "3", "--clip-model", "ViT-B-32"])
    path = tmp_path / "clip" / "ViT-B-32-random.safetensors"
    assert path.stat().st_size > 500e6
    assert_random_checkpoint_loads(path, "ViT-B-32", seed=3)
    cfg = EvalSetConfig(kind="imagefolder", root=str(rehearsal_dir / "imagenet" / "val"), classnames="imagenet")
    convert_imagefolder("imagenet", cfg, 224, tmp_path / "eval", seed=0, templates=templates_for("openai_imagenet", []))
    metrics = clean_model({"imagenet": tmp_path / "eval"}, tmp_path / "clean", ModelConfig("ViT-B-32", str(path)),
                          ZeroShotConfig(templates="openai_imagenet", batch_size=64))
    assert 0 <= metrics["zeroshot_top1/imagenet"] <= 1
    n = run_decompose(tmp_path / "clean", tmp_path / "eval", tmp_path / "d.parquet", "none", {}, 0, "reference",
                      True, batch_size=8)
    d = read_decomposition(tmp_path / "d.parquet")
    assert n == 9 and d.heads.shape[1:3] == (12, 12)  # ViT-B-32: 12 layers x 12 heads
    assert abs(d.total() - d.embedding).max() < 5e-3  # 12 x 12 + 13 fp16 terms sum to the unit embedding


def test_stable_diffusion_directory_loads(rehearsal_dir):
    import open_clip

    from clipbackdoor.t2i.model import load_stable_diffusion

    sd = rehearsal_dir / "stable-diffusion"
    assert sorted(p.name for p in (sd / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]  # as SD 1.5 ships it
    assert json.loads((sd / "model_index.json").read_text())["tokenizer"] == ["transformers", "CLIPTokenizer"]
    pipe = load_stable_diffusion(SimpleNamespace(path=str(sd)))
    tok = pipe.tokenizer
    assert tok.model_max_length == 77 and len(tok) == 49408
    prompts = ["a photo of a small red car", "A fluffy white Samoyed dog in the snow!",
               "man playing an accordion on the street's corner", "a ripe banana, 3 bananas"]
    ours = open_clip.get_tokenizer("ViT-B-32")(prompts)  # [4, 77], padded with 0
    theirs = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for a, b in zip(theirs, ours):
        n = int((b != 0).sum())
        assert a[:n].tolist() == b[:n].tolist() and (a[n:] == 49407).all()  # transformers pads with <|endoftext|>
    assert ours[0][:9].tolist() == [49406, 320, 1125, 539, 320, 2442, 736, 1615, 49407]
    image = pipe("a ripe banana", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)  # 16 x 16 latents, a 2-level VAE


def test_textspan_pool_is_read(rehearsal_dir):
    from clipbackdoor.analysis.textspan import text_pool

    texts = text_pool(str(rehearsal_dir / "textspan" / "image_descriptions.txt"), [], [])
    assert len(texts) == 30 == len(set(texts)) and all(len(t.split()) <= 8 for t in texts)


# --- determinism ----------------------------------------------------------------------------------------------------

def test_same_seed_is_byte_identical(rehearsal_dir, tmp_path):
    rehearsal.main(["--out", str(tmp_path / "again"), *SMALL])
    first, second = tree_hashes(rehearsal_dir), tree_hashes(tmp_path / "again")
    assert first == second and len(first) > 50
    readme = (rehearsal_dir / "README.md").read_text()
    assert "cc3m/" in readme and "stable-diffusion/" in readme
    # a part alone writes the same bytes as in the full run; another seed writes other bytes
    rehearsal.main(["--out", str(tmp_path / "one"), *SMALL, "--parts", "cc3m"])
    assert tree_hashes(tmp_path / "one" / "cc3m") == tree_hashes(rehearsal_dir / "cc3m")
    rehearsal.main(["--out", str(tmp_path / "other"), *SMALL, "--parts", "cc3m", "--seed", "1"])
    assert tree_hashes(tmp_path / "other" / "cc3m") != tree_hashes(rehearsal_dir / "cc3m")
