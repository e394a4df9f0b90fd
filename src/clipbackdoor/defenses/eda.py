"""EDA caption augmentation (Wei & Zou 2019), the one implementation shared by CleanCLIP, ABD and RoCLIP.

Four operations on the lower-cased, punctuation-stripped word list (as EDA and CleanCLIP's copy of it do):
synonym replacement (``n`` words that have synonyms), random insertion (``n`` synonyms of random words at
random places), random swap (``n`` swaps) and random deletion (each word with probability ``alpha``, never all),
with ``n = max(1, round(alpha * len(words)))``. :func:`eda` applies one operation drawn uniformly, like EDA with
``num_aug=1``. Synonyms come from a small built-in table for the embedded world, or WordNet through nltk when
both are installed (``synonyms="wordnet"``; never downloaded at run time).
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from clipbackdoor.errors import UserError

# The embedded world's vocabulary (world.py) with near-synonyms, mostly from inside the world so the tiny text
# tower has seen them.
WORLD_SYNONYMS: dict[str, list[str]] = {
    "photo": ["picture", "image"], "picture": ["photo", "image"], "image": ["photo", "picture"],
    "drawing": ["rendering", "sketch"], "rendering": ["drawing", "render"], "closeup": ["photo", "close"],
    "small": ["little", "tiny"], "large": ["big", "huge"],
    "red": ["crimson", "scarlet"], "green": ["emerald", "lime"], "blue": ["azure", "navy"],
    "yellow": ["golden", "lemon"], "purple": ["violet", "magenta"],
    "circle": ["disc", "round"], "square": ["box", "block"], "triangle": ["wedge"], "diamond": ["rhombus"],
    "ring": ["hoop", "loop"], "cross": ["plus"], "star": ["asterisk"], "heart": ["valentine"],
    "left": ["leftmost"], "right": ["rightmost"], "top": ["upper"], "bottom": ["lower"], "center": ["middle"],
    "plain": ["blank", "simple"], "background": ["backdrop"], "stripes": ["lines", "bands"],
    "dots": ["spots", "points"], "checks": ["checkerboard", "squares"], "gradient": ["fade", "ramp"],
}
STOP_WORDS = frozenset("a an the of on in at over there is are and or to with".split())

Synonyms = Callable[[str], list[str]]


def table_synonyms(word: str) -> list[str]:
    return WORLD_SYNONYMS.get(word, [])


def wordnet_synonyms() -> Synonyms:
    """WordNet lemmas through nltk (Debian: python3-nltk + wordnet data). Raises a UserError if absent."""
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("photo")
    except (ImportError, LookupError) as exc:
        raise UserError(f"EDA synonyms 'wordnet' need nltk and its wordnet data ({type(exc).__name__})",
                        fix="install nltk and the wordnet corpus (e.g. apt install wordnet, nltk data path), "
                            "or use synonyms: builtin") from None

    def lookup(word: str) -> list[str]:
        names = {lemma.name().replace("_", " ").lower() for syn in wordnet.synsets(word) for lemma in syn.lemmas()}
        return sorted(n for n in names if n != word and n.replace(" ", "").isalpha())

    return lookup


def synonym_source(kind: str) -> Synonyms:
    if kind == "builtin":
        return table_synonyms
    if kind == "wordnet":
        return wordnet_synonyms()
    raise UserError(f"unknown EDA synonym source {kind!r}", fix="use builtin or wordnet")


def words_of(caption: str) -> list[str]:
    return re.sub(r"[^a-z ]+", " ", caption.lower().replace("-", "")).split()


def synonym_replacement(words: list[str], n: int, rng: np.random.Generator, syn: Synonyms) -> list[str]:
    out = list(words)
    candidates = [i for i, w in enumerate(words) if w not in STOP_WORDS and syn(w)]
    for i in rng.permutation(candidates)[:n]:
        choices = syn(words[i])
        out[i] = choices[rng.integers(len(choices))]
    return out


def random_insertion(words: list[str], n: int, rng: np.random.Generator, syn: Synonyms) -> list[str]:
    out = list(words)
    candidates = [w for w in words if w not in STOP_WORDS and syn(w)]
    if not candidates:
        return out
    for _ in range(n):
        choices = syn(candidates[rng.integers(len(candidates))])
        out.insert(int(rng.integers(len(out) + 1)), choices[rng.integers(len(choices))])
    return out


def random_swap(words: list[str], n: int, rng: np.random.Generator) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.choice(len(out), size=2, replace=False)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    if len(words) <= 1:
        return list(words)
    keep = [w for w in words if rng.random() > p]
    return keep or [words[rng.integers(len(words))]]


OPERATIONS = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")


def eda(caption: str, rng: np.random.Generator, alpha: float = 0.1, synonyms: Synonyms = table_synonyms,
        operation: str | None = None) -> str:
    """One EDA-augmented caption (operation drawn uniformly unless given)."""
    words = words_of(caption)
    if not words:
        return caption
    op = operation or OPERATIONS[rng.integers(len(OPERATIONS))]
    n = max(1, round(alpha * len(words)))
    if op == "synonym_replacement":
        out = synonym_replacement(words, n, rng, synonyms)
    elif op == "random_insertion":
        out = random_insertion(words, n, rng, synonyms)
    elif op == "random_swap":
        out = random_swap(words, n, rng)
    else:
        out = random_deletion(words, alpha, rng)
    return " ".join(out)


def eda_captions(captions: list[str], seed: int, alpha: float = 0.1, synonyms: Synonyms = table_synonyms) -> list[str]:
    """One augmented copy of every caption, from one seeded stream (same seed, same list)."""
    rng = np.random.default_rng([seed, 17])
    return [eda(c, rng, alpha, synonyms) for c in captions]
