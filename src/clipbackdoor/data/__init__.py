"""Data: the embedded world, image-text shards and pairs, evaluation sets (ImageFolder, the world)."""
