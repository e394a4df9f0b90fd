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

    return imagecorruptions


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
