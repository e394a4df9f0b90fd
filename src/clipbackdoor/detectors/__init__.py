"""Input-level detectors (STRIP, SCALE-UP, TeCo, extensions) and the detect stage."""
