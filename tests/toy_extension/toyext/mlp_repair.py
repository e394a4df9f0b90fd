"""A toy defense on cached decompositions: every image's last ``layers`` MLP terms replaced by their prototypes
(mean-ablation of late MLPs, as Decomp-Rep does for global triggers), then re-classified."""

import numpy as np

from clipbackdoor.extensions import Defense


def settings(split, protos, class_emb, params, kind):
    layers = list(range(split.mlps.shape[1] - params["layers"], split.mlps.shape[1]))
    reps = split.total + (protos["mlps"][layers][None] - split.mlps[:, layers]).sum(axis=1)  # [N, d]
    pred = (reps @ class_emb.T).argmax(axis=-1).astype(np.int32)  # (argmax: the norm does not change it)
    yield f"last={params['layers']}", pred, None


DEFENSE = Defense(
    name="toy_mlp",
    settings=settings,
    title="Toy MLP repair",
    schema={"type": "object", "additionalProperties": False, "required": ["layers"],
            "properties": {"layers": {"type": "integer", "minimum": 1}}},
)
