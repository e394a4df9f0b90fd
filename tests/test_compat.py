import subprocess
import sys

import clipbackdoor.compat as compat


def test_torchvision_imports_and_transforms_work():
    import torch
    import torchvision
    from torchvision import transforms

    assert compat.STATUS in {"native", "schemas-defined", "already-imported"}
    out = transforms.Resize(8)(torch.rand(3, 16, 16))
    assert out.shape == (3, 8, 8)
    assert torchvision.__version__.startswith("0.28")


def test_compat_is_needed_exactly_when_native_library_fails():
    """Without the compat step a bare `import torchvision` fails iff the native library cannot load."""
    bare = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if compat.STATUS == "schemas-defined":
        assert bare.returncode != 0 and "torchvision::nms does not exist" in bare.stderr
    else:
        assert bare.returncode == 0, bare.stderr


def test_open_clip_imports_through_package():
    proc = subprocess.run([sys.executable, "-c", "import clipbackdoor, open_clip; print(open_clip.__version__)"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("3.3")
