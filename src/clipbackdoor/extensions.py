"""Extensions: a new attack, a new defense on cached decompositions or a new input-level detector, one module each.

An extension module defines one object -- an :class:`Attack`, a :class:`Defense` or a :class:`Detector` -- that
names itself, carries the JSON schema of its parameter block, and says what it is. Registered, it reaches every
place the built-ins do with no other edit: the parameter schema (its block is collected into
schemas/params.schema.json's at load time), the poisoning / defend / detect stages, ``summary.csv``, the report and
the tables. A score gets an AUROC because its defense or detector *declares* itself a detector
(:func:`detection_kind`), never because of its name.

Where the parameters go:

- an attack: ``attacks.<name>`` (its schema; a ``rate`` is required as for every attack) and, to run it, its name
  in ``poison.attacks``;
- a defense: ``defend.extensions.<name>`` (its settings; present = it runs on every attacked model's cached
  decompositions, after the built-in settings);
- a detector: its name in ``detect.detectors`` and its settings in ``detect.extensions.<name>`` (optional when
  its schema requires nothing).

Registering from your own package, without forking: an entry point in the group ``clipbackdoor.extensions`` that
names the object, e.g. in your ``pyproject.toml``::

    [project.entry-points."clipbackdoor.extensions"]
    my_patch = "my_pkg.my_patch:ATTACK"

The entry point's name must be the object's ``name``. Installed (``pip install -e .``) in the environment that
runs the workflow, the extension is found by every stage and by Snakemake at workflow load. (dvc.yaml records the
package's own modules as each stage's code dependencies, not an outside extension's: after editing one, rerun the
stages it touches with ``dvc repro --force-downstream`` or Snakemake's ``--forcerun``.)
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable

from clipbackdoor.errors import UserError

ENTRY_POINT_GROUP = "clipbackdoor.extensions"
# an extension's name becomes a run name's first part (ATTACK-sSEED), a summary.csv `defense` value and a
# parameter key: lower-case words, no hyphen
NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class Attack:
    """A poisoning attack: ``trigger`` is a :class:`clipbackdoor.attacks.base.Trigger` subclass (``kind``
    local / global decides Decomp-Rep's automatic mode). ``schema``: JSON schema of ``attacks.<name>``. Learned
    triggers (an asset made by a stage of their own, as BadCLIP's patch) need a rule and are not extensions."""

    name: str
    trigger: type
    schema: dict
    title: str = ""  # its column header in the tables (default: the name)


@dataclass(frozen=True)
class Defense:
    """A defense on cached decompositions. ``settings(split, protos, class_emb, params, kind)`` yields
    ``(variant, pred [N] int, score [N] float or None)`` for one chunk of one split's test images: ``split`` is a
    :class:`clipbackdoor.defenses.defend.TestSplit` (its ``heads`` [N, L, H, d], ``mlps`` [N, L, d], ``total`` [N, d],
    ``labels`` [N]), ``protos`` the run's prototypes (``heads`` [L, H, d], ``mlps`` [L, d]), ``class_emb`` [C, d],
    ``params`` its ``defend.extensions.<name>`` block, ``kind`` the attack's (local / global).
    ``detector=True`` declares ``score`` a detection score (higher = more suspicious) and ``pred`` a hard
    decision (1 = flagged): its rows get AUROC, TPR and FPR instead of ASR and CACC."""

    name: str
    settings: Callable[..., Iterable[tuple[str, Any, Any]]]
    schema: dict = field(default_factory=lambda: {"type": "object"})
    detector: bool = False
    title: str = ""


@dataclass(frozen=True)
class Detector:
    """An input-level detector (as STRIP, SCALE-UP, TeCo). ``scores(proba, images, pool, detect, params)`` returns
    ``[(variant, scores [N])]``: ``proba`` maps float images [B, 3, H, W] in [0, 1] to zero-shot class
    probabilities [B, C]; ``images`` [N, 3, H, W] float in [0, 1] (clean, then triggered: called once per split);
    ``pool`` the defender's clean validation images, uint8 [M, 3, H, W]; ``detect`` the
    :class:`clipbackdoor.config.DetectConfig` (its ``seed``); ``params`` its ``detect.extensions.<name>`` block.
    Higher score = more suspicious; every detector is scored by AUROC."""

    name: str
    scores: Callable[..., list[tuple[str, Any]]]
    schema: dict = field(default_factory=lambda: {"type": "object"})
    title: str = ""


KINDS = {Attack: "attack", Defense: "defense", Detector: "detector"}


@lru_cache(maxsize=1)
def registered() -> tuple:
    """Every extension installed in this environment (entry-point group ``clipbackdoor.extensions``), in a stable
    order (by name). A broken entry point is a :class:`UserError` naming it."""
    found = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        where = f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP}" + \
            (f", package {ep.dist.name})" if getattr(ep, "dist", None) else ")")
        try:
            obj = ep.load()
        except Exception as exc:  # whatever the extension raises on import: one line naming it
            raise UserError(f"{where} does not load ({type(exc).__name__}: {exc})",
                            fix="fix or uninstall the package that declares it") from None
        if type(obj) not in KINDS:
            raise UserError(f"{where} is a {type(obj).__name__}, not a clipbackdoor.extensions Attack, Defense or "
                            "Detector", fix="point the entry point at the extension object (module:OBJECT)")
        if obj.name != ep.name or not NAME.fullmatch(obj.name):
            raise UserError(f"{where} names an extension {obj.name!r}",
                            fix="give the entry point the object's name, lower-case letters, digits and _")
        if obj.name in {e.name for e in found}:  # (two packages may declare the same entry point name)
            raise UserError(f"{where}: another installed package registers an extension {obj.name!r} too",
                            fix="uninstall one of them or rename one extension")
        found.append(obj)
    return tuple(found)


def of_kind(kind: type) -> dict:
    """{name: extension} of one kind."""
    return {e.name: e for e in registered() if isinstance(e, kind)}


def check_unique(kind: type, builtin: Iterable[str]) -> None:
    clash = sorted(set(of_kind(kind)) & set(builtin))
    if clash:
        raise UserError(f"extension {KINDS[kind]} {clash[0]!r} ({ENTRY_POINT_GROUP}) has the name of a built-in "
                        "attack, defense, detector or repair", fix="rename the extension")


def add_to_schema(schema: dict) -> dict:
    """The parameter schema with every extension's block and name added (in place; returned). An extension that
    takes a built-in's name (the file's attacks, detectors and repair methods, the defend settings) is refused."""
    props = schema["properties"]
    builtin_detectors = props["detect"]["properties"]["detectors"]["items"]["enum"]
    check_unique(Attack, props["attacks"]["properties"])  # (the file's blocks are the built-in attacks)
    check_unique(Detector, builtin_detectors)
    # a defense's rows share summary.csv's `defense` / `method` columns with these
    check_unique(Defense, [*BUILTIN_DEFENSES, *builtin_detectors, *props["repair"]["properties"]["methods"]["items"]
                           ["enum"]])
    for name, ext in of_kind(Attack).items():
        for listing in (props["poison"], props["sweep"]):  # (an extension attack can be swept too)
            listing["properties"]["attacks"]["items"]["enum"].append(name)
        block = copy.deepcopy(ext.schema)
        block["required"] = sorted({"rate", *block.get("required", [])})
        block.setdefault("properties", {}).setdefault("rate", props["attacks"]["properties"]["badnet"]
                                                      ["properties"]["rate"])
        props["attacks"]["properties"][name] = block
    for section, kind in (("defend", Defense), ("detect", Detector)):
        found = of_kind(kind)
        props[section]["properties"]["extensions"] = {
            "type": "object", "additionalProperties": False,
            "properties": {n: copy.deepcopy(e.schema) for n, e in found.items()},
            "description": f"settings of the {KINDS[kind]}s that extensions register (clipbackdoor.extensions)"}
    props["detect"]["properties"]["detectors"]["items"]["enum"] += list(of_kind(Detector))
    return schema


def check_params(params: dict, source: str) -> None:
    """What the schema cannot say: a detector listed in ``detect.detectors`` whose settings have required keys
    needs its ``detect.extensions`` block."""
    detect = params.get("detect") or {}
    for name in detect.get("detectors", []):
        ext = of_kind(Detector).get(name)
        required = ext.schema.get("required", []) if ext else []
        if required and name not in (detect.get("extensions") or {}):
            raise UserError(f"{source}: detect.detectors lists {name!r} but detect.extensions.{name} is missing",
                            fix=f"add its settings, e.g. detect.extensions.{name}: {{{', '.join(required)}: ...}}")


# The defense names the defend stage's built-in settings write (an extension may not take one).
BUILTIN_DEFENSES = ("none", "base_decomp", "decomp_rep", "decomp_rep_heads", "decomp_rep_mlp", "decomp_det",
                    "decomp_det_score", "decomp_rep_sweep", "decomp_det_sweep", "abandon", "random_prototypes",
                    "random_prototypes_official", "random_heads", "fixed_heads", "ablate_all_heads",
                    "ablate_all_mlps", "decomp_reverse",
                    *(f"ablate_{p}_{d}" for p in ("heads", "mlps") for d in ("forward", "backward", "separate")))

# Built-in detection outputs: the defend settings that flag images (pred = the hard decision, score = the
# detection score) and the input-level detectors of the detect stage (scores only).
BUILTIN_DETECTION = {"decomp_det": "decisions", "decomp_det_score": "decisions", "decomp_det_sweep": "decisions",
                     "strip": "scores", "scaleup": "scores", "teco": "scores"}


def detection_kind(defense: str) -> str | None:
    """How a defend / detect output row is scored: ``"decisions"`` (AUROC of the score + TPR / FPR of the hard
    decision), ``"scores"`` (AUROC only), or None (a repair: ASR and CACC). Declared, never inferred from names."""
    if defense in BUILTIN_DETECTION:
        return BUILTIN_DETECTION[defense]
    ext = of_kind(Defense).get(defense) or of_kind(Detector).get(defense)
    if isinstance(ext, Detector):
        return "scores"
    return "decisions" if isinstance(ext, Defense) and ext.detector else None


def titles() -> dict[str, str]:
    """{name: title} of every extension that gives one (tables and figures)."""
    return {e.name: e.title or e.name for e in registered()}
