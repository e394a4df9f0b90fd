"""Training-loader throughput at 224 px against a bare PIL decode loop over the same images on the same cores.

The loader is what training runs (``clipbackdoor.training.train.step_loader``): ``ShardPairs`` random access into the tar
shards, one batch per step decoded (and resized) in DataLoader worker processes, then normalised (float, CLIP
mean/std) in the training process. The bare loop reads the same image members' bytes into memory first and
decodes them with PIL (``Image.open(...).convert("RGB")`` to a uint8 array) in a ``multiprocessing`` pool of as
many processes, nothing else. Target: loader >= 0.8x bare. A second bare pool does the loader's whole per-image
work (decode, resize + centre crop, float normalisation) and nothing else: the loader against it is the cost of
the loader's own machinery (tar random access, batching, worker IPC), against the decode-only pool the cost of
the preprocessing CLIP needs as well.

    python benchmarks/loader_throughput.py [--n 2048] [--batch 64] [--workers 2]

Two corpora of n pairs:
- ``jpeg_as_downloaded``: what the ``cc3m`` stage keeps -- web JPEGs (quality 90) of 180-300 px on the shorter
  side and aspect 0.6-1.8 (clipbackdoor.pipeline.rehearsal's image generator), stored unchanged; the loader decodes,
  resizes and centre-crops them to 224 px.
- ``png_224``: the embedded and evaluation splits' format, 224-px PNGs (benchmarks/memory_scaling.py's inputs).
Each is timed as the loader with 0 and ``--workers`` workers, and the loader without normalisation (uint8 out,
as on a GPU, where normalising is the device's work). Prints a table, writes benchmarks/results/loader_throughput.json.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def decode(data: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).shape[0]


MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)  # CLIP's
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def decode_resize_normalise(data: bytes) -> int:
    """The loader's per-image work with none of its machinery: decode, CLIP's resize + centre crop, float
    normalisation."""
    from PIL import Image

    from clipbackdoor.data.shards import resize_center

    with Image.open(io.BytesIO(data)) as im:
        x = (resize_center(im, 224).astype(np.float32) / 255 - MEAN) / STD
    return x.shape[0]


def bare(folder: Path, workers: int, work=decode) -> tuple[int, float]:
    blobs = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            blobs += [tar.extractfile(m).read() for m in tar if m.name.endswith((".png", ".jpg"))]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(work, blobs, chunksize=16)
    return len(blobs), time.perf_counter() - start


def loader(folder: Path, batch: int, workers: int, normalise: bool = True) -> tuple[int, float]:
    import torch

    from clipbackdoor.models.artifact import normalize
    from clipbackdoor.data.pairs import ShardPairs
    from clipbackdoor.training.train import step_loader

    os.environ["CLIPBACKDOOR_LOADER_WORKERS"] = str(workers)
    pairs = ShardPairs(folder, 224)
    steps = len(pairs) // batch  # one epoch, drop-last (as training)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    start = time.perf_counter()
    n = 0
    for _, images in step_loader(pairs, batch, 0, 0, steps, 0, 1, "cpu"):
        x = normalize(images, mean, std) if normalise else images
        n += len(x)
    assert x.dtype == (torch.float32 if normalise else torch.uint8) and x.shape[-2:] == (224, 224)
    return n, time.perf_counter() - start


def components(folder: Path, n: int = 256) -> dict[str, float]:
    """Milliseconds per image on one core (one thread) of the loader's parts: decode, decode + CLIP's resize and
    centre crop (what a worker does), normalise (what the training process or the device does)."""
    import torch

    from clipbackdoor.models.artifact import normalize
    from clipbackdoor.data.shards import resize_center

    from PIL import Image

    torch.set_num_threads(1)
    blobs = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            blobs += [tar.extractfile(m).read() for m in tar if m.name.endswith((".png", ".jpg"))]
    blobs = blobs[:n]

    def per_image(fn) -> float:
        start = time.perf_counter()
        for b in blobs:
            with Image.open(io.BytesIO(b)) as im:
                fn(im)
        return round((time.perf_counter() - start) / len(blobs) * 1000, 3)

    out = {"decode_ms": per_image(lambda im: np.asarray(im.convert("RGB"))),
           "decode_resize_ms": per_image(lambda im: resize_center(im, 224))}
    batch = torch.zeros((64, 3, 224, 224), dtype=torch.uint8)
    start = time.perf_counter()
    for _ in range(8):
        normalize(batch, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    out["normalise_ms"] = round((time.perf_counter() - start) / (8 * 64) * 1000, 3)
    out["decode_share"] = round(out["decode_ms"] / (out["decode_resize_ms"] + out["normalise_ms"]), 3)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return out


def write_jpeg_corpus(folder: Path, n: int, seed: int = 0) -> None:
    """n web-like JPEG pairs kept as downloaded (the cc3m stage's layout): sizes vary, no resize at writing."""
    from clipbackdoor.pipeline import rehearsal
    from clipbackdoor.data.shards import Encoded, write_shards

    rng = np.random.default_rng(seed)

    def samples():
        for i in range(n):
            concept = rehearsal.ALL_CONCEPTS[i % len(rehearsal.ALL_CONCEPTS)]
            width, height = rehearsal.image_size(rng)
            jpg = rehearsal.encode_jpeg(rehearsal.draw_image(rng, concept, width, height))
            yield f"cc3m-{i:08d}", Encoded("jpg", jpg), f"a photo of a {concept}.", {}

    write_shards(folder, samples(), shard_size=512, as_downloaded=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loader_throughput.json"))
    args = ap.parse_args()
    import memory_scaling

    work = Path(ROOT / "benchmarks" / "results" / "memory_scaling_work")
    corpora = {"jpeg_as_downloaded": work / f"jpeg_{args.n}", "png_224": work / f"train_{args.n}" / "finetune"}
    if not (corpora["png_224"] / "index.json").is_file():
        from clipbackdoor.data.shards import write_shards

        write_shards(corpora["png_224"], memory_scaling.train_pairs(args.n), shard_size=512)
    if not (corpora["jpeg_as_downloaded"] / "index.json").is_file():
        write_jpeg_corpus(corpora["jpeg_as_downloaded"], args.n)
    results = {}
    print(f"{args.n} pairs to 224 px, {args.workers} cores, batch {args.batch}")
    print(f"{'corpus':19s} {'path':24s} {'images':>7s} {'s':>7s} {'images/s':>9s} {'x bare':>7s}")
    for corpus, folder in corpora.items():
        n_bare, t_bare = bare(folder, args.workers)
        rows = {"bare_pil": {"images": n_bare, "seconds": round(t_bare, 3), "images_per_s": round(n_bare / t_bare, 1)}}
        n_same, t_same = bare(folder, args.workers, decode_resize_normalise)
        rows["bare_same_work"] = {"images": n_same, "seconds": round(t_same, 3),
                                  "images_per_s": round(n_same / t_same, 1)}
        for workers in sorted({0, args.workers}):
            n, t = loader(folder, args.batch, workers)
            rows[f"loader_{workers}_workers"] = {"images": n, "seconds": round(t, 3), "images_per_s": round(n / t, 1)}
        n, t = loader(folder, args.batch, args.workers, normalise=False)
        rows[f"loader_{args.workers}_workers_uint8"] = {"images": n, "seconds": round(t, 3),
                                                        "images_per_s": round(n / t, 1)}
        for r in rows.values():
            r["x_bare"] = round(r["images_per_s"] / rows["bare_pil"]["images_per_s"], 3)
        best = max(v["x_bare"] for k, v in rows.items() if k.startswith("loader") and not k.endswith("uint8"))
        overhead = round(best * rows["bare_pil"]["images_per_s"] / rows["bare_same_work"]["images_per_s"], 3)
        parts = components(folder)
        results[corpus] = {"rows": rows, "ratio": best, "ratio_same_work": overhead, "per_image_one_core": parts}
        for name, r in rows.items():
            print(f"{corpus:19s} {name:24s} {r['images']:7d} {r['seconds']:7.2f} {r['images_per_s']:9.1f} "
                  f"{r['x_bare']:7.2f}")
        print(f"{corpus}: loader (normalised) / bare PIL decode: {best:.2f}x (target >= 0.8); / the same per-image "
              f"work in a bare pool: {overhead:.2f}x (the loader's own overhead)")
        print(f"{corpus}: one core, per image: decode {parts['decode_ms']} ms, decode + resize/crop "
              f"{parts['decode_resize_ms']} ms, normalise {parts['normalise_ms']} ms: decode alone is "
              f"{parts['decode_share']:.2f}x of the loader's work (its bound against the bare loop)")
    out = Path(args.out)
    out.write_text(json.dumps({"n": args.n, "batch": args.batch, "workers": args.workers, "corpora": results,
                               "command": " ".join(["python", *sys.argv]),
                               "date": time.strftime("%Y-%m-%d")}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
