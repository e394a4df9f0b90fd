"""A toy input-level detector: the zero-shot classifier's top probability (a backdoor makes triggered images
confidently the target's), after an optional temperature."""

from clipbackdoor.extensions import Detector


def scores(proba, images, pool, detect, params):
    p = proba(images)  # [N, C]
    t = params.get("temperature", 1.0)
    return [(f"temperature={t:g}", (p.log() / t).softmax(-1).max(-1).values.numpy())]


DETECTOR = Detector(
    name="toy_conf",
    scores=scores,
    title="Toy confidence",
    schema={"type": "object", "additionalProperties": False,
            "properties": {"temperature": {"type": "number", "exclusiveMinimum": 0}}},
)
