"""Parameters: JSON-schema validation with messages that name the key, and typed dataclasses.

``params.yaml`` is validated here (by the CLI) and by Snakemake's ``validate()`` at workflow load, against
the same ``schemas/params.schema.json``. Stage functions receive dataclasses, never raw dicts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from clipbackdoor.errors import UserError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "params.schema.json"


def load_schema() -> dict:
    """schemas/params.schema.json with the blocks of the installed extensions (:mod:`clipbackdoor.extensions`)."""
    from clipbackdoor.extensions import add_to_schema

    if not SCHEMA_PATH.exists():
        raise UserError(f"schema not found at {SCHEMA_PATH}",
                        fix="install clipbackdoor editable from its repository (pip install -e .)")
    return add_to_schema(json.loads(SCHEMA_PATH.read_text()))


# A parameter file is small and plain: these budgets refuse hostile documents before anything expands.
MAX_PARAMS_BYTES = 1 << 20
MAX_YAML_EVENTS = 200_000


def load_yaml(path: str | Path) -> dict:
    """The one loading path of every parameter file (CLI, Snakefile, DVC commands): UTF-8 text of at most
    1 MiB, YAML without aliases (a "billion laughs" document expands exponentially: refused while parsing,
    before anything is built), string keys, a mapping at the top, finite numbers. Anything else is a
    :class:`UserError` naming the file and the position."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found" if not path.exists() else f"{path}: not a file",
                        fix="pass an existing params file (default: params.yaml)")
    raw = path.read_bytes()
    if len(raw) > MAX_PARAMS_BYTES:
        raise UserError(f"{path}: {len(raw):,} bytes; a parameter file is at most {MAX_PARAMS_BYTES:,}",
                        fix="pass the params file, not a data file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
                        fix="pass a YAML params file (start from params.yaml)") from None
    return parse_params_text(text, str(path))


def _yaml_error(exc: yaml.YAMLError, source: str) -> UserError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line
    return UserError(f"{source}:{where} is not valid YAML ({problem})", fix="fix the YAML syntax at that position")


def parse_params_text(text: str, source: str) -> dict:
    """YAML text -> parameter mapping, refusing aliases, oversized documents, non-string keys and non-finite
    numbers (see :func:`load_yaml`)."""
    try:
        for n, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader)):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1
                raise UserError(f"{source}: line {line}: YAML alias *{event.anchor} (parameter files may not "
                                "reuse values by reference)", fix="write the value out where it is used")
            if n > MAX_YAML_EVENTS:
                raise UserError(f"{source}: more than {MAX_YAML_EVENTS:,} YAML nodes",
                                fix="pass the params file, not a data file")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    except (ValueError, TypeError, RecursionError) as exc:  # e.g. a timestamp or key PyYAML cannot construct
        raise UserError(f"{source}: a value YAML cannot read ({type(exc).__name__}: {' '.join(str(exc).split())})",
                        fix="quote the value or fix it") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of parameters at the top level, got {type(data).__name__}",
                        fix="start from params.yaml in the repository")
    check_plain(data, source)
    return data


def check_plain(tree: Any, source: str, prefix: str = "") -> None:
    """String keys and finite numbers everywhere (JSON schema accepts NaN and infinities as numbers)."""
    import math

    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise UserError(f"{source}: key {key!r} under {prefix.rstrip('.') or 'the top level'} is not a "
                                "string", fix="parameter names are words, e.g. `rate:`; quote it if it must be a number")
            check_plain(value, source, f"{prefix}{key}.")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            check_plain(value, source, f"{prefix}{i}.")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise UserError(f"{source}: {prefix.rstrip('.')} = {tree!r} is not a finite number",
                        fix="give a finite value (NaN and infinities have no meaning as parameters)")


def _format_error(err: jsonschema.ValidationError, source: str) -> UserError:
    key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    schema = err.schema if isinstance(err.schema, dict) else {}
    if err.validator == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
        where = key if key != "<top level>" else "top level"
        close = difflib.get_close_matches(str(extra[0]), allowed, n=1) if extra else []
        return UserError(f"{source}: unknown key(s) {', '.join(map(repr, extra))} under {where}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""),
                         fix=f"allowed keys there: {', '.join(allowed)}")
    if err.validator == "enum":
        close = difflib.get_close_matches(str(err.instance), [str(v) for v in err.validator_value], n=1)
        return UserError(f"{source}: {key} = {err.instance!r} is not allowed"
                         + (f" (did you mean {close[0]!r}?)" if close else ""),
                         fix=f"allowed values: {', '.join(map(repr, err.validator_value))}")
    if err.validator == "uniqueItems" and isinstance(err.instance, list):
        seen, dup = set(), None
        for item in err.instance:
            marker = json.dumps(item, sort_keys=True)
            if marker in seen:
                dup = item
                break
            seen.add(marker)
        return UserError(f"{source}: {key} lists {dup!r} twice", fix=f"list each value once in {key}")
    if err.validator == "required":
        return UserError(f"{source}: {err.message} (under {key})", fix="add the key; see params.yaml for an example")
    if err.validator == "type":  # (the schema's description, where it has one, says what is expected)
        return UserError(f"{source}: {key} = {err.instance!r} has the wrong type",
                         fix=f"expected {err.validator_value}" + (f": {schema['description']}" if "description" in schema
                                                                  else ""))
    if err.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        bounds = {k: schema[k] for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if k in schema}
        text = ", ".join(f"{k} {v}" for k, v in bounds.items())
        return UserError(f"{source}: {key} = {err.instance!r} is out of range", fix=f"allowed range: {text}")
    return UserError(f"{source}: {key}: {err.message}", fix="see schemas/params.schema.json")


# repair method -> the parameter section its stage reads (ABD's ablation arms share one section)
REPAIR_SECTIONS = {"cleanclip": "cleanclip", "roclip": "roclip", "abd": "abd", "abd_img_only": "abd",
                   "abd_eda_only": "abd", "finetune_clean": "abd", "uap": "abd"}


def parse_head(name: str) -> tuple[int, int]:
    """"L5H4" -> (5, 4): an attention head named as everywhere in the project (layer and head from 0)."""
    match = re.fullmatch(r"L(\d+)H(\d+)", str(name))
    if match is None:
        raise UserError(f"head {name!r} is not named L{{layer}}H{{head}}", fix="e.g. L5H0: layer 5, head 0 (from 0)")
    return int(match.group(1)), int(match.group(2))


def fixed_head_positions(names, layers: list[int], n_heads: int, where: str = "") -> list[tuple[int, int]]:
    """(position among the inspected ``layers``, head) of each head named in a ``defend.fixed_heads`` set; a head
    outside the inspected layers is refused (at params validation where the model's shape is known, else by
    ``defend``)."""
    positions = []
    for name in names:
        layer, head = parse_head(name)
        if layer not in layers or head >= n_heads:
            raise UserError(f"{where}defend.fixed_heads names {name}, not a head the rule inspects: the model has "
                            f"heads L{layers[0]}H0..L{layers[-1]}H{n_heads - 1} in its last {len(layers)} layer(s) "
                            "(defend.head_layers)", fix=f"name heads L{{layer}}H{{head}} from 0, e.g. L{layers[-1]}H0")
        positions.append((layers.index(layer), head))
    return positions


RESULTS_ROOT = "results"
# results/shared/ pictures shared data/ artifacts (the poisoned sets' trigger previews, the learned triggers, the
# embedded world, the clean text-to-image model's samples): the data stages write them, so they are shared like
# data/ is -- per parameter file, they would make every profile rerun those stages
SHARED_RESULTS = "shared"
DEFAULT_RESULTS = "default"


def results_name(configfiles: list, params: dict | None = None) -> str:
    """The folder under ``results/`` that holds one parameter file's own results (summary, tables, figures,
    analyses), so profiles compared side by side never overwrite each other: the file's ``results`` key when it
    has one (it travels with the file: ``cp configs/abd.yaml params.yaml`` keeps results/abd/, where dvc.yaml and
    ``lock`` look), else the stem of the ``--configfile`` (several: their stems joined by +), else ``default``
    (params.yaml)."""
    if params and params.get("results"):
        name, culprit = params["results"], "its `results` key"
    elif not configfiles or all(_is_params_yaml(f) for f in configfiles):
        return DEFAULT_RESULTS
    else:
        name, culprit = "+".join(Path(str(f)).stem for f in configfiles), "its name"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name) or name == SHARED_RESULTS or \
            (name == DEFAULT_RESULTS and culprit == "its name"):
        raise UserError(f"--configfile {configfiles[-1] if configfiles else 'params.yaml'}: {culprit} {name!r} cannot "
                        f"name a results folder (results/{name}/: letters, digits, _ . + - only; not "
                        f"{SHARED_RESULTS}, and `default` is params.yaml's)",
                        fix="set `results: my_study` in the file (or rename it): its results go to results/my_study/")
    return name


def _is_params_yaml(path) -> bool:
    return Path(str(path)).resolve() == Path("params.yaml").resolve()


def results_dir(configfiles: list, params: dict | None = None) -> str:
    return f"{RESULTS_ROOT}/{results_name(configfiles, params)}"


def moot_settings(params: dict) -> list[str]:
    """Notes on settings that have no effect under the chosen mode (valid, but a user editing them would expect a
    change that never comes)."""
    notes = []
    defend = params.get("defend") or {}
    if defend.get("threshold") == "clean_quantile" and "eps" in defend:
        notes.append(f"defend.eps ({defend['eps']}) has no effect with defend.threshold: clean_quantile (each head's "
                     f"threshold is the defend.quantile of its clean-validation similarities); eps_sweep still runs")
    elif defend.get("threshold") == "fixed" and "quantile" in defend:
        notes.append(f"defend.quantile ({defend['quantile']}) has no effect with defend.threshold: fixed (defend.eps "
                     f"is every head's threshold)")
    return notes


def validate_params(params: dict, source: str = "params.yaml") -> None:
    """Raise :class:`UserError` naming the first offending key (deepest, most specific error first)."""
    if not isinstance(params, dict):
        raise UserError(f"{source}: expected a mapping of parameters at the top level, got {type(params).__name__}",
                        fix="start from params.yaml in the repository")
    check_plain(params, source)
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(params), key=lambda e: (-len(e.absolute_path), e.path))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise _format_error(best, source)
    _check_semantics(params, source)


def _check_semantics(params: dict, source: str) -> None:
    """Cross-key rules JSON schema cannot express."""
    data = params["data"]
    if params["model"]["pretrained"] is None and data["source"] != "embedded":
        raise UserError(f"{source}: model.pretrained is null (train from scratch) but data.source is "
                        f"{data['source']!r}", fix="from-scratch pretraining is only wired for the embedded world; "
                        "set model.pretrained (e.g. 'openai')")
    missing = [a for a in params["poison"]["attacks"] if a not in params["attacks"]]
    if missing:
        raise UserError(f"{source}: poison.attacks lists {missing[0]!r} but attacks.{missing[0]} is not configured",
                        fix=f"add an `attacks.{missing[0]}` block (see params.yaml) or drop it from poison.attacks")
    check_devices(params["finetune"], source)
    for method in params.get("repair", {}).get("methods", []):
        needs = REPAIR_SECTIONS[method]
        if needs not in params:
            raise UserError(f"{source}: repair.methods lists {method!r} but there is no `{needs}` section",
                            fix=f"add the `{needs}` block (see params.yaml / configs/abd.yaml) or drop {method!r}")
    _check_sweep(params, source)
    from clipbackdoor.extensions import check_params

    check_params(params, source)
    t2i = params.get("b2", {}).get("t2i")
    if t2i and t2i["cross_attention_levels"] >= len(t2i["block_out_channels"]):
        raise UserError(f"{source}: b2.t2i.cross_attention_levels = {t2i['cross_attention_levels']} would put "
                        f"attention at the full resolution ({len(t2i['block_out_channels'])} levels)",
                        fix="keep it below the number of block_out_channels: full-resolution attention is the cost")
    target = params["poison"]["target"]
    if isinstance(target, dict):
        from clipbackdoor.pipeline.runs import target_slug

        slugs: dict[str, str] = {}
        for name in dict.fromkeys(target.values()):
            other = slugs.setdefault(target_slug(name), name)
            if other != name:
                raise UserError(f"{source}: poison.target names {other!r} and {name!r}, which give one run name "
                                f"(*-{target_slug(name)}-s*)", fix="spell one target the same way for every eval set")
    if isinstance(target, dict) and set(target) != set(data["eval_sets"]):
        odd = sorted(set(target) ^ set(data["eval_sets"]))[0]
        raise UserError(f"{source}: poison.target names eval set {odd!r} " + (
            "that is not in data.eval_sets" if odd in target else "without a target"),
            fix=f"give one target per eval set: {', '.join(data['eval_sets'])} (or one string for all)")
    _check_sizes(params, source)
    for name, spec in data["eval_sets"].items():
        if (spec["kind"] == "embedded") != (data["source"] == "embedded"):
            raise UserError(f"{source}: data.eval_sets.{name}.kind = {spec['kind']!r} with data.source = "
                            f"{data['source']!r}", fix="embedded eval sets go with the embedded world, "
                            "imagefolder sets with real data (data.source: webdataset)")


def _check_sweep(params: dict, source: str) -> None:
    """A swept attack reuses its run's trigger (and learned trigger asset): it must be a run of the profile.
    (What needs the attack registry -- poisoning tied to one rate -- is rate_sweep.check_sweep_attacks: this
    module stays free of the attacks' imports, which every stage's code dependencies would otherwise include.)"""
    from clipbackdoor.pipeline.runs import rate_tag

    rates = (params.get("sweep") or {}).get("rates", [])
    tags = [rate_tag(r) for r in rates]
    for rate, tag in zip(rates, tags):
        if float(tag) == 0 or tags.count(tag) > 1:
            raise UserError(f"{source}: sweep.rates has {rate}, which its path name data/sweep/RUN/r{tag}/ "
                            + ("rounds to zero" if float(tag) == 0 else "shares with another rate"),
                            fix="use rates of at least 1e-6 that differ in their first six decimals")
    for attack in (params.get("sweep") or {}).get("attacks", []):
        if attack not in params["poison"]["attacks"]:
            raise UserError(f"{source}: sweep.attacks lists {attack!r} but poison.attacks does not (the sweep reuses "
                            "its run's trigger)", fix=f"add {attack!r} to poison.attacks or drop it from sweep.attacks")


def model_geometry(name: str) -> dict | None:
    """{image_size, layers, heads} of an open_clip model config, read from its JSON file (the project's or
    open_clip's own) without importing open_clip; None when the file cannot be found."""
    import importlib.util

    folders = [Path(__file__).parent / "models" / "configs"]
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.submodule_search_locations:
        folders.append(Path(spec.submodule_search_locations[0]) / "model_configs")
    for folder in folders:
        path = folder / f"{name}.json"
        if path.is_file():
            vision = json.loads(path.read_text())["vision_cfg"]
            size = vision.get("image_size", 224)
            return {"image_size": size[0] if isinstance(size, list) else size, "layers": vision["layers"],
                    "heads": vision["width"] // vision.get("head_width", 64)}
    return None


def _check_sizes(params: dict, source: str) -> None:
    """Values valid alone but impossible together, caught at load: sizes the model cannot take, heads and
    layers it does not have, patches larger than the image, a target the embedded world does not have."""
    geo = model_geometry(params["model"]["name"])
    size = params["data"]["image_size"]
    if geo is not None:
        if geo["image_size"] != size:
            raise UserError(f"{source}: data.image_size = {size} but model {params['model']['name']} takes "
                            f"{geo['image_size']}-px images", fix=f"set data.image_size: {geo['image_size']}, or "
                            "pick a model of that input size")
        defend = params.get("defend", {})
        inspected = range(geo["layers"] - min(defend.get("head_layers", 1), geo["layers"]), geo["layers"])
        for group in defend.get("fixed_heads", []):
            fixed_head_positions(group, list(inspected), geo["heads"], f"{source}: ")
        for key in ("head_layers", "mlp_layers"):
            if defend.get(key, 0) > geo["layers"]:
                raise UserError(f"{source}: defend.{key} = {defend[key]} but the model has {geo['layers']} layers",
                                fix=f"at most {geo['layers']}")
    for attack in params["poison"]["attacks"]:
        patch = params["attacks"].get(attack, {}).get("patch_size")
        if patch is not None and patch >= size:
            raise UserError(f"{source}: attacks.{attack}.patch_size = {patch} does not fit a {size}-px image",
                            fix=f"use a patch smaller than {size} px")
    world = params["data"].get("world")
    if params["data"]["source"] == "embedded" and world:
        classes = WorldConfig(**world).class_names()
        for target in dict.fromkeys(eval_targets(params).values()):
            # as the poison stage: exact, or case-blind when that names exactly one class
            if target not in classes and [c.casefold() for c in classes].count(target.casefold()) != 1:
                close = difflib.get_close_matches(target, classes, n=1)
                raise UserError(f"{source}: poison.target = {target!r} is not a class of the embedded world"
                                + (f" (did you mean {close[0]!r}?)" if close else ""),
                                fix=f"one of its colour + shape classes, e.g. {', '.join(map(repr, classes[:4]))}")


def eval_targets(params: dict) -> dict[str, str]:
    """{evaluation set: target class}. ``poison.target`` is one class for every set, or one per set (seed 001,
    Appendix B.1: banana for ImageNet-1K, accordion for Caltech-101, Samoyed for Oxford Pets)."""
    target = params["poison"]["target"]
    sets = list(params["data"]["eval_sets"])
    return {name: target for name in sets} if isinstance(target, str) else {name: target[name] for name in sets}


def stage_target(p: "Params") -> str:
    """The one target class in a stage's ``--params``: rules pass ``poison.target`` (one class for every set) or
    the single ``poison.target.<eval set>`` key of the run they work on."""
    target = p.poison.target
    if isinstance(target, str):
        return target
    values = set(target.values())
    if len(values) != 1:
        raise UserError(f"--params: poison.target holds {len(values)} different targets, a stage needs one",
                        fix="pass the run's own key, poison.target.<eval set> (the rules do)")
    return values.pop()


def check_devices(finetune: "dict | OptimConfig", source: str = "params") -> None:
    """Each data-parallel worker takes an equal slice of the global batch."""
    if isinstance(finetune, OptimConfig):
        finetune = dataclasses.asdict(finetune)
    devices, batch = finetune.get("devices", 1), finetune["batch_size"]
    if batch % devices:
        raise UserError(f"{source}: finetune.batch_size = {batch} is not divisible by finetune.devices = {devices}",
                        fix=f"use a batch size that is a multiple of {devices}")


def names_local_path(value) -> bool:
    """Whether a parameter names a local file or folder (a checkpoint, a Stable Diffusion directory) rather than a
    tag such as `openai`: the workflow makes such a path a rule input."""
    return isinstance(value, str) and ("/" in value or Path(value).exists())


def get_dotted(tree: dict, key: str) -> Any:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"parameter {key!r} not found", fix="check the key against params.yaml")
        node = node[part]
    return node


def nest_dotted(flat: dict) -> dict:
    """{"data.world": w, "seed": 0} -> {"data": {"world": w}, "seed": 0}."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def validate_dotted(key: str, value: Any, source: str) -> None:
    """Validate one dotted key's value against the sub-schema at that path."""
    check_plain(value, source, f"{key}.")
    schema = load_schema()
    for part in key.split("."):
        props = schema.get("properties", {})
        if part in props:
            schema = props[part]
        elif isinstance(schema.get("additionalProperties"), dict):
            schema = schema["additionalProperties"]
        else:
            raise UserError(f"{source}: unknown parameter {key!r}", fix=f"known here: {', '.join(props)}")
    try:
        jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as exc:
        for part in reversed(key.split(".")):
            exc.path.appendleft(part)
        raise _format_error(exc, source) from None


# --------------------------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class WorldConfig:
    seed: int
    n_pretrain: int
    n_finetune: int
    n_eval: int
    shard_size: int
    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    noise_std: float

    def class_names(self) -> list[str]:
        """Zero-shot class names, index = colour_index * n_shapes + shape_index."""
        return [f"{c} {s}" for c in self.colours for s in self.shapes]


@dataclass(frozen=True)
class WebdatasetConfig:
    urls: str
    n_pairs: int
    shard_size: int


@dataclass(frozen=True)
class EvalSetConfig:
    kind: str
    root: str | None = None
    classnames: str | None = None
    max_images: int | None = None


@dataclass(frozen=True)
class DataConfig:
    source: str
    image_size: int
    eval_sets: dict[str, EvalSetConfig]
    world: WorldConfig | None = None
    webdataset: WebdatasetConfig | None = None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    pretrained: str | None


@dataclass(frozen=True)
class OptimConfig:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    betas: tuple[float, float]
    eps: float
    ckpt_every: int = 0
    devices: int = 1  # data-parallel processes (torchrun + DDP); 1 = a single process
    layer_decay: float = 1.0  # image-tower layer-wise lr decay (1.0: off)


@dataclass(frozen=True)
class ZeroShotConfig:
    templates: str
    batch_size: int


@dataclass(frozen=True)
class PoisonConfig:
    target: str | dict[str, str]  # one class for every eval set, or {eval set: class}; see eval_targets
    caption_templates: str
    attacks: tuple[str, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class DecomposeConfig:
    centering: str  # "reference" | "projection"
    normalize: bool
    batch_size: int


@dataclass(frozen=True)
class PrototypeConfig:
    val_fraction: float
    split_seed: int
    split: str = "seeded"  # "seeded": numpy permutation | "official": the official code's random.shuffle


@dataclass(frozen=True)
class DefendConfig:
    rule: str  # "dot" (official code: a.p <= eps) | "cosine" (paper text: cos < eps)
    eps: float
    head_layers: int  # the last k layers whose heads the rule inspects
    mlp_layers: int  # the last m layers whose MLPs are mean-ablated for global triggers
    zeta: int  # Decomp-Det: flag an image when more than zeta heads are infected
    fixed_heads: tuple  # head sets ("L5H0", ...: layer and head from 0) for the fixed-head ablation
    eps_sweep: tuple  # eps values of the Figure 6 sweep
    seed: int  # random-head and random-prototype ablations
    threshold: str = "fixed"  # "fixed": eps | "clean_quantile": per-head quantile of clean-validation similarity
    quantile: float = 0.02  # the quantile for threshold: clean_quantile
    extensions: dict | None = None  # {extension defense: its settings}: the registered defenses that run


@dataclass(frozen=True)
class CleanCLIPConfig:
    optim: OptimConfig
    inmodal_weight: float
    crossmodal_weight: float
    eda_alpha: float
    synonyms: str  # builtin | wordnet
    augment: str  # autoaugment | none
    n_pairs: int | None = None  # the defender's clean pairs: the first N of the fine-tuning split (None: all)


@dataclass(frozen=True)
class RoCLIPConfig:
    optim: OptimConfig
    k_epochs: int  # every k-th epoch pairs each image with its nearest memory-bank caption
    bank_size: int  # captions in the memory bank (a fresh seeded draw per replacement epoch)


@dataclass(frozen=True)
class AbdGeneratorConfig:
    steps: int  # generator updates per perturbation
    batch_size: int
    lr: float  # Adam (generator and discriminator)
    z_dim: int  # the generator's fixed noise input
    patch_fraction: float  # patch variant: share of the image area (AdvCLIP ~3 %)
    location: str  # patch variant: bottom_right (AdvCLIP) | random (a fresh position per image)
    eps: float  # bounded variant: L-inf bound in [0, 1] pixel units (seed 002: 0.03)
    temperature: float  # InfoNCE temperature of the adversarial term and L_bd (0.1)
    adv_weight: float
    text_weight: float  # weight of the image-text term inside the adversarial term (AdvCLIP: 5)
    l2_weight: float
    gan_weight: float  # 0 switches the discriminator off
    lbd_weight: float  # weight of L_bd in the uap_lbd perturbations


@dataclass(frozen=True)
class AbdConfig:
    generator: AbdGeneratorConfig
    perturbation: str  # the kind the ABD fine-tunes use: patch | bounded
    adv_fraction: float  # share of the fine-tuning images that carry the perturbation (seed: all)
    eda_alpha: float
    synonyms: str  # builtin | wordnet
    optim: OptimConfig
    fig2_images: int  # evaluation images of the Fig. 2 similarity table
    n_pairs: int | None = None  # the defender's clean pairs: the first N of the fine-tuning split (None: all)


@dataclass(frozen=True)
class AbdFinetuneConfig:
    """What the ABD fine-tune reads of the ``abd`` section (its rule passes only these keys)."""
    perturbation: str
    location: str
    adv_fraction: float
    eda_alpha: float
    synonyms: str
    optim: OptimConfig
    n_pairs: int | None = None  # the defender's clean pairs: the first N of the fine-tuning split (None: all)

    @classmethod
    def from_abd(cls, abd: "AbdConfig") -> "AbdFinetuneConfig":
        return cls(abd.perturbation, abd.generator.location, abd.adv_fraction, abd.eda_alpha, abd.synonyms,
                   abd.optim, abd.n_pairs)


@dataclass(frozen=True)
class T2IConfig:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_head_dim: int
    cross_attention_levels: int  # the coarsest levels that carry (self + cross) attention
    prediction_type: str  # epsilon | v_prediction
    snr_gamma: float | None  # min-SNR loss weighting; null = plain MSE
    train_timesteps: int
    steps: int
    batch_size: int
    lr: float
    uncond_prob: float  # caption dropout for classifier-free guidance
    sample_steps: int  # DDIM steps
    guidance: float  # classifier-free guidance scale
    eval_per_class: int  # generated images per zero-shot class in the quality check


@dataclass(frozen=True)
class B2Config:
    triggers: tuple[str, ...]  # (size word, position word): B²'s composite trigger
    marker_shape: str  # the bias: a marker object the captions never mention
    marker_colour: str
    n_poison: int
    n_clean: int
    steps: int
    batch_size: int
    lr: float
    uncond_prob: float  # caption dropout of the fine-tune, on the clean pairs only (see b2.run_t2i_backdoor)
    snr_gamma: float | None  # null: plain loss, so the high-noise steps that decide the marker keep their weight
    ema_decay: float | None  # the saved (and evaluated) weights are this EMA of the iterates; null = last iterate
    eval_images: int  # generated images per case for the bias rate


@dataclass(frozen=True)
class B2AuditParams:
    n_prompts: int
    n_images: int
    n_slots: int
    max_steps: int
    tol: float
    lr: float
    reg_weight: float
    candidates: int
    rounds: int
    top_k: int


@dataclass(frozen=True)
class StableDiffusionConfig:
    path: str  # a local diffusers directory (never downloaded by the pipeline)
    auditor: str  # open_clip model name
    auditor_pretrained: str
    colours: tuple[str, ...]  # the B² prompts' vocabulary at real scale ("a photo of a small red car on the left.")
    subjects: tuple[str, ...]


@dataclass(frozen=True)
class B2Params:
    backend: str  # embedded | stable_diffusion
    t2i: T2IConfig
    backdoor: B2Config
    audit: B2AuditParams
    seed: int
    stable_diffusion: StableDiffusionConfig | None = None


@dataclass(frozen=True)
class DetectConfig:
    detectors: tuple[str, ...]  # strip | scaleup | teco
    n_images: int  # test images scored (each clean and triggered)
    strip_n: int  # superimpositions per image
    teco_variants: tuple[str, ...]  # independent | compounding
    seed: int
    extensions: dict | None = None  # {extension detector: its settings} (clipbackdoor.extensions)


@dataclass(frozen=True)
class SweepConfig:
    attacks: tuple[str, ...]  # swept attacks (each a poison.attacks entry)
    rates: tuple[float, ...]  # poisoning rates
    batch_size: int  # evaluation images per forward pass


@dataclass(frozen=True)
class AnalysisConfig:
    mmd_images: int
    textspan_m: int
    textspan_rank: int
    textspan_pool: str  # embedded | a text file
    seed: int


@dataclass(frozen=True)
class RepairConfig:
    methods: tuple[str, ...]  # model-repair defenses applied to every attacked model


@dataclass(frozen=True)
class Params:
    profile: str
    seed: int
    data: DataConfig
    model: ModelConfig
    pretrain: OptimConfig
    zeroshot: ZeroShotConfig
    poison: PoisonConfig
    attacks: dict[str, dict]
    finetune: OptimConfig
    decompose: DecomposeConfig
    prototypes: PrototypeConfig
    defend: DefendConfig
    repair: RepairConfig | None = None
    cleanclip: CleanCLIPConfig | None = None
    roclip: RoCLIPConfig | None = None
    abd: AbdConfig | None = None
    b2: B2Params | None = None
    detect: DetectConfig | None = None
    analysis: AnalysisConfig | None = None
    sweep: SweepConfig | None = None
    results: str | None = None  # the results folder's name (results_name)


def _build(tp: Any, value: Any, partial: bool = False) -> Any:
    """Recursively turn validated plain data into the annotated dataclass/tuple/dict types. ``partial``: a
    dataclass field the data lacks takes its default, or None when it has none (a stage's view of the sections
    its rule passes)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        given = {k: _build(hints[k], v, partial) for k, v in value.items()}
        if partial:
            given.update({f.name: None for f in dataclasses.fields(tp) if f.name not in given
                          and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})
        return tp(**given)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _build(inner[0], value, partial)
    if origin is tuple or tp is tuple:
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if origin is dict:
        _, vt = typing.get_args(tp)
        return {k: _build(vt, v, partial) for k, v in value.items()}
    if tp is dict:
        return dict(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def build(tp: type, value: dict) -> Any:
    return _build(tp, value)


def load_params(path: str | Path = "params.yaml") -> Params:
    raw = load_yaml(path)
    validate_params(raw, str(path))
    return build(Params, raw)


def section(tp: type, value: Any) -> Any:
    """Build one section's dataclass from the JSON a rule passes on the command line."""
    return _build(tp, value)


def stage_view(value: dict) -> Params:
    """A stage's typed parameters: the (validated) keys its rule passes in ``--params``, built into
    :class:`Params` -- every section and key the rule does not pass is None, so a stage reads only what its rule
    declares (and an edit elsewhere in params.yaml never reruns it)."""
    return _build(Params, value, partial=True)

