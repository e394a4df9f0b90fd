"""MMD is ~0 for one distribution and large for shifted ones; TEXTSPAN recovers planted directions."""

import numpy as np

from clipbackdoor.analysis.mmd import rbf_mmd2
from clipbackdoor.analysis.textspan import description_similarity, textspan


def test_mmd_zero_for_same_distribution_large_for_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    same, s = rbf_mmd2(x, y)
    assert abs(same) < 0.01 and s > 0
    shifted, _ = rbf_mmd2(x, y + 1.5)
    assert shifted > 0.3 and shifted > 30 * abs(same)
    assert rbf_mmd2(x, y + 3.0)[0] > shifted  # further apart, larger


def test_textspan_recovers_planted_directions_in_order():
    rng = np.random.default_rng(1)
    d, k = 16, 30
    texts = rng.normal(size=(k, d))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    # outputs vary strongly along text 7, less along text 3, plus small isotropic noise
    outputs = (rng.normal(size=(500, 1)) * 3 * texts[7] + rng.normal(size=(500, 1)) * 1.5 * texts[3]
               + rng.normal(size=(500, d)) * 0.05 + 2.0)
    picked = textspan(outputs, texts, m=2, rank=d)
    assert [j for j, _ in picked] == [7, 3]
    assert picked[0][1] > picked[1][1]


def test_description_similarity():
    emb = np.eye(4)
    assert description_similarity([0, 1], [1, 0], emb) == 1.0
    assert description_similarity([0, 1], [2, 3], emb) == 0.0
