"""Models: CLIP artifacts (create, load, save: safetensors + config), zero-shot heads."""
