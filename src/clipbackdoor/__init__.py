"""clipbackdoor: backdoor attacks on CLIP, decomposition defenses, and a cached pipeline around them."""

from clipbackdoor.compat import ensure_torchvision as _ensure_torchvision

# Must run before open_clip (and so torchvision) is imported anywhere in the process.
_ensure_torchvision()

__version__ = "0.1.0"
