"""Make ``import torchvision`` work when its native library cannot load.

The torchvision 0.28.0 wheel on PyPI is a CUDA build. Next to a CPU-only torch 2.13.0 its ``_C``
library fails to load; torchvision then still registers fake (meta) kernels for ``torchvision::nms``
and ``torchvision::qnms`` at import time, which raises ``operator torchvision::nms does not exist``.
open_clip imports torchvision for its transforms, so the whole stack breaks.

:func:`ensure_torchvision` runs before anything imports torchvision. It tries to load the native
library exactly as torchvision would; only when that fails does it *define* the two missing operator
schemas (no kernels), so the import succeeds and the transforms work. Detection ops then raise when
called, as they would anyway. A working (CUDA or matching CPU) install is left untouched.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# The op schemas torchvision's _meta_registrations.py needs to exist at import time.
_MISSING_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None  # keeps the torch.library.Library alive for the process lifetime
STATUS = "not-checked"  # "native" | "schemas-defined" | "already-imported" | "absent"


def _native_library_path() -> str | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    folder = os.path.dirname(spec.origin)
    for name in sorted(os.listdir(folder)):
        if name.startswith("_C") and name.endswith((".so", ".pyd", ".dylib")):
            return os.path.join(folder, name)
    return None


def ensure_torchvision() -> str:
    """Prepare the process so ``import torchvision`` succeeds; returns what was done."""
    global _LIBRARY, STATUS
    if STATUS != "not-checked":
        return STATUS
    if "torchvision" in sys.modules:
        STATUS = "already-imported"
        return STATUS
    import torch

    path = _native_library_path()
    if path is None:
        STATUS = "absent"
        return STATUS
    try:
        torch.ops.load_library(path)
        STATUS = "native"
    except OSError:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name, schema in _MISSING_SCHEMAS.items():
            if not torch._C._dispatch_has_kernel(f"torchvision::{name}") and not _schema_exists(name):
                lib.define(schema)
        _LIBRARY = lib
        STATUS = "schemas-defined"
    return STATUS


def _schema_exists(name: str) -> bool:
    import torch

    try:
        torch._C._get_schema(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def import_imagecorruptions():
    """``imagecorruptions`` 1.1.2 (its last release) predates setuptools 81, NumPy 2 and scikit-image 0.19:
    it imports ``pkg_resources`` (for the frost textures), calls ``np.float_`` (fog) and passes
    ``multichannel=`` to ``skimage.filters.gaussian`` (glass blur). Give it those three things, then import it.
    Its impulse noise draws from scikit-image's own unseeded generator; route it through NumPy's global one,
    which seeds every other corruption, so a seeded run is reproducible. All 15 corruptions then run
    (tests/test_detectors.py checks each one)."""
    import numpy as np

    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import types
        from importlib.resources import files

        def resource_filename(module: str, name: str) -> str:  # the module's package folder, like setuptools
            package = module if importlib.util.find_spec(module).submodule_search_locations else module.rpartition(".")[0]
            return str(files(package).joinpath(name))

        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = resource_filename
        sys.modules["pkg_resources"] = shim
    if "float_" not in np.__dict__:
        np.float_ = np.float64
    from imagecorruptions import corruptions

    gaussian = corruptions.gaussian
    if getattr(gaussian, "__name__", "") != "gaussian_channel_axis":
        def gaussian_channel_axis(image, *args, multichannel=None, **kwargs):
            if multichannel is not None:
                kwargs.setdefault("channel_axis", -1 if multichannel else None)
            return gaussian(image, *args, **kwargs)

        corruptions.gaussian = gaussian_channel_axis
    if not isinstance(corruptions.sk, _SeededSkimage):
        corruptions.sk = _SeededSkimage(corruptions.sk)
    import imagecorruptions

    if imagecorruptions.corruption_dict["glass_blur"] is corruptions.glass_blur:  # (once)
        fast = _glass_blur(corruptions)
        imagecorruptions.corruption_dict["glass_blur"] = fast
        imagecorruptions.corruption_tuple = tuple(fast if f is corruptions.glass_blur else f
                                                  for f in imagecorruptions.corruption_tuple)
    return imagecorruptions


GLASS_BLUR = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)]  # (sigma, max shift, iterations)


def _glass_blur(corruptions):
    """imagecorruptions' glass blur with the same output for the same NumPy random state, vectorised.

    The library walks the pixels in Python (rows then columns, from the far corner) and "swaps" each with a random
    neighbour through NumPy row views -- which copies the neighbour onto the pixel and leaves the neighbour as it
    was (the second assignment reads the already-overwritten view). TeCo spent most of its time there (seconds
    per 224-px image). The walk is a chain of copies: a pixel gets its source's value as of its turn -- the
    source's new value if the walk passed the source before, else its old one. Those chains are resolved here by
    pointer jumping (O(log length) array passes), with the moves drawn in one ``randint`` call per pass (the same
    stream as the library's per-pixel calls)."""
    import numpy as np

    def walk(x: np.ndarray, delta: int) -> np.ndarray:
        """One pass over uint8 [H, W, 3]."""
        height, width = x.shape[:2]
        rows, cols = np.arange(height - delta, delta, -1), np.arange(width - delta, delta, -1)
        flat = x.reshape(height * width, -1)  # [P, 3]
        if not len(rows) or not len(cols):
            return x
        visited = (rows[:, None] * width + cols[None, :]).ravel()  # pixel ids in walk order
        moves = np.random.randint(-delta, delta, size=(len(visited), 2))  # (dx, dy) per visited pixel
        source = visited + moves[:, 1] * width + moves[:, 0]
        turn = np.full(height * width, len(visited), dtype=np.int64)  # unvisited pixels: never written
        turn[visited] = np.arange(len(visited))
        value = np.arange(height * width)  # the pixel whose OLD value each pixel ends with, once resolved
        done = np.ones(height * width, dtype=bool)
        follows = turn[source] < turn[visited]  # the source was written earlier in the walk: take its new value
        value[visited] = source
        done[visited[follows]] = False
        target = np.arange(height * width)
        target[visited] = source
        pending = visited[follows]
        while len(pending):
            t = target[pending]
            ready = done[t]
            value[pending[ready]] = value[t[ready]]
            done[pending[ready]] = True
            target[pending[~ready]] = target[t[~ready]]  # jump: the source's source
            pending = pending[~ready]
        return flat[value].reshape(x.shape)

    def glass_blur(x, severity=1):
        sigma, delta, iterations = GLASS_BLUR[severity - 1]
        x = np.uint8(corruptions.gaussian(np.array(x) / 255., sigma=sigma, multichannel=True) * 255)  # [H, W, 3]
        for _ in range(iterations):
            x = walk(x, delta)
        return np.clip(corruptions.gaussian(x / 255., sigma=sigma, multichannel=True), 0, 1) * 255

    return glass_blur


class _SeededSkimage:
    """``skimage`` as imagecorruptions sees it, with ``util.random_noise`` seeded from NumPy's global RNG."""

    def __init__(self, skimage):
        import types

        import numpy as np

        self._skimage = skimage
        random_noise = skimage.util.random_noise

        def seeded_random_noise(image, *args, **kwargs):
            kwargs.setdefault("rng", int(np.random.randint(2**31 - 1)))
            return random_noise(image, *args, **kwargs)

        self.util = types.SimpleNamespace(**{k: getattr(skimage.util, k) for k in dir(skimage.util)
                                             if not k.startswith("__")})
        self.util.random_noise = seeded_random_noise

    def __getattr__(self, name):
        return getattr(self._skimage, name)
