"""EDA: each operation keeps its length contract, uses the synonym table, and is seeded."""

import numpy as np
import pytest

from clipbackdoor.defenses.eda import (OPERATIONS, WORLD_SYNONYMS, eda, eda_captions, random_deletion, random_insertion,
                              random_swap, synonym_replacement, synonym_source, words_of)
from clipbackdoor.errors import UserError

CAPTION = "a photo of a small yellow star on the left over stripes."


def test_words_are_lowercased_and_stripped():
    assert words_of("A close-up Photo of a RED circle.") == ["a", "closeup", "photo", "of", "a", "red", "circle"]


def test_synonym_replacement_keeps_length_and_replaces_with_table_words():
    words = words_of(CAPTION)
    out = synonym_replacement(words, 3, np.random.default_rng(0), lambda w: WORLD_SYNONYMS.get(w, []))
    assert len(out) == len(words)
    changed = [(a, b) for a, b in zip(words, out) if a != b]
    assert len(changed) == 3 and all(b in WORLD_SYNONYMS[a] for a, b in changed)


def test_insertion_adds_n_synonyms_swap_permutes_deletion_never_empties():
    words = words_of(CAPTION)
    rng = np.random.default_rng(1)
    ins = random_insertion(words, 2, rng, lambda w: WORLD_SYNONYMS.get(w, []))
    assert len(ins) == len(words) + 2
    extra = list(ins)
    for w in words:
        extra.remove(w)
    assert all(any(e in v for v in WORLD_SYNONYMS.values()) for e in extra)
    sw = random_swap(words, 3, rng)
    assert sorted(sw) == sorted(words) and sw != words
    assert random_deletion(words, 0.0, rng) == words
    assert len(random_deletion(words, 1.0, rng)) == 1  # all deleted -> one word kept
    kept = random_deletion(words, 0.5, np.random.default_rng(2))
    assert 1 <= len(kept) < len(words) and all(w in words for w in kept)
    assert random_insertion(["zzz"], 2, rng, lambda w: []) == ["zzz"]  # nothing to insert


def test_eda_is_seeded_and_uses_every_operation():
    captions = [CAPTION] * 200
    a, b = eda_captions(captions, seed=5), eda_captions(captions, seed=5)
    assert a == b and eda_captions(captions, seed=6) != a
    assert len(set(a)) > 10  # really augmented
    rng = np.random.default_rng(0)
    for op in OPERATIONS:
        out = eda(CAPTION, rng, alpha=0.1, operation=op).split()
        n = len(words_of(CAPTION))
        assert {"synonym_replacement": n, "random_swap": n, "random_insertion": n + 1}.get(op, len(out)) == len(out)


def test_synonym_sources():
    assert synonym_source("builtin")("red") == WORLD_SYNONYMS["red"]
    with pytest.raises(UserError, match="synonym"):
        synonym_source("thesaurus")
    try:
        import nltk  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="nltk"):
            synonym_source("wordnet")
