"""Time of each TeCo corruption (imagecorruptions, 15 corruptions x 5 severities) per 224-px image, and of the
library's own glass blur against the one TeCo runs (clipbackdoor.compat: same output, same random draws).

    python benchmarks/corruption_speed.py [--images 4] [--size 224]

One process, one thread (as a detect job's corruption loop runs). Prints a table and writes
benchmarks/results/corruption_speed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def per_image_seconds(fn, images: list[np.ndarray]) -> float:
    from PIL import Image

    start = time.perf_counter()
    for img in images:
        for severity in range(1, 6):
            np.random.seed(severity)
            fn(Image.fromarray(img), severity)
    return (time.perf_counter() - start) / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "corruption_speed.json"))
    args = ap.parse_args()
    from clipbackdoor.compat import import_imagecorruptions

    ic = import_imagecorruptions()  # (first: it shims what the library needs to import)
    from imagecorruptions import corruptions
    rng = np.random.default_rng(0)
    # a smooth field plus noise: real-image-like local structure (the blurs' cost does not depend on content)
    base = np.kron(rng.integers(0, 256, (args.size // 16, args.size // 16, 3)), np.ones((16, 16, 1)))
    images = [np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8) for _ in range(args.images)]
    rows = {name: per_image_seconds(ic.corruption_dict[name], images) for name in ic.get_corruption_names("common")}
    rows["glass_blur (library)"] = per_image_seconds(corruptions.glass_blur, images)
    total = sum(v for k, v in rows.items() if "library" not in k)
    library_total = total - rows["glass_blur"] + rows["glass_blur (library)"]
    print(f"{args.size}-px images, 5 severities each, seconds per image")
    for name, sec in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"{name:24s} {sec:8.3f}")
    print(f"{'all 15 (TeCo, ours)':24s} {total:8.3f}")
    print(f"{'all 15 (library)':24s} {library_total:8.3f}   glass blur {rows['glass_blur (library)'] / rows['glass_blur']:.1f}x faster")
    out = Path(args.out)
    out.write_text(json.dumps({"size": args.size, "images": args.images, "seconds_per_image": rows,
                               "teco_all_15": total, "teco_all_15_library": library_total,
                               "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d")},
                              indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    main()
