"""A toy detecting defense: an image's score is how far its last-layer head terms lie from their prototypes (sum
of Euclidean distances); it is flagged above ``threshold``. It declares itself a detector, so its rows get an
AUROC (and TPR / FPR) although its name says nothing of detection."""

import numpy as np

from clipbackdoor.extensions import Defense


def settings(split, protos, class_emb, params, kind):
    last = split.heads[:, -1]  # [N, H, d]
    score = np.linalg.norm(last - protos["heads"][-1][None], axis=-1).sum(axis=-1)  # [N]
    yield f"threshold={params['threshold']:g}", (score > params["threshold"]).astype(np.int32), score


DEFENSE = Defense(
    name="toy_flag",
    settings=settings,
    detector=True,
    title="Toy distance flag",
    schema={"type": "object", "additionalProperties": False, "required": ["threshold"],
            "properties": {"threshold": {"type": "number"}}},
)
