"""The per-image predictions table every defense (defend stage) and detector (detect stage) writes and the
metrics read: one row per (setting, split, image); ``pred`` = the predicted class, or the hard decision of a
detecting defense (-1: scores only); ``score`` = its detection score (higher = more suspicious), null for a
repair. A leaf module: what writes the table depends on nothing else for it."""

import pyarrow as pa

PREDICTIONS_SCHEMA = pa.schema([("defense", pa.string()), ("variant", pa.string()), ("split", pa.string()),
                                ("index", pa.int32()), ("label", pa.int32()), ("pred", pa.int32()),
                                ("score", pa.float32())])
