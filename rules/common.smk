# Helpers shared by the rules: parameter validation, per-rule parameter JSON, threads, paths.
import json
import os

from snakemake.utils import validate

from clipbackdoor.config import validate_params
from clipbackdoor.errors import UserError

try:
    # Clear one-line message naming the key; then Snakemake's own validate() on the same schema.
    validate_params(config, "params (params.yaml + --configfile/--config)")
except UserError as _exc:
    raise ValueError(str(_exc)) from None
validate(config, schema="../schemas/params.schema.json")

# Torch jobs take every core they are given: two jobs sharing 2 cores slow each other down by an order of
# magnitude, so each torch job claims all cores Snakemake may use (capped by the machine).
TORCH_THREADS = max(1, min(workflow.cores, os.cpu_count() or 1))

EVAL_SETS = list(config["data"]["eval_sets"])
EMBEDDED = config["data"]["source"] == "embedded"
FROM_SCRATCH = config["model"]["pretrained"] is None


def get_key(dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def params_json(*keys):
    """The exact parameters a rule reads, as canonical JSON keyed by dotted path.

    Passed to the stage CLI with --params, so Snakemake's params rerun trigger sees every value the stage
    uses and nothing else; the dvc.yaml generator turns the same keys into the stage's `params:`."""
    return json.dumps({k: get_key(k) for k in keys}, sort_keys=True, separators=(",", ":"))


def stage_params(*keys):
    """params_json as a function of the wildcards: Snakemake never brace-expands a function's result, and
    values such as a shard pattern `cc3m-{0000..0575}.tar` must reach the stage untouched."""
    text = params_json(*keys)
    return lambda wildcards: text


def eval_dir(name):
    return f"data/datasets/eval/{name}"


def eval_args(wildcards=None):
    """NAME=PATH per evaluation set, a list so the shell quotes each (`{params.evals:q}`)."""
    return [f"{n}={eval_dir(n)}" for n in EVAL_SETS]


def log_path(name):
    return f"data/logs/{name}.log"


def bench_path(name):
    return f"data/benchmarks/{name}.tsv"


# Attack runs: every attack once per seed, named ATTACK-sSEED (the model, its poisoned set and its trigger).
ATTACKS = list(config["poison"]["attacks"])
RUNS = [f"{a}-s{s}" for a in ATTACKS for s in config["poison"]["seeds"]]
MODELS = ["clean"] + RUNS
RUN_RE = "[a-z_]+-s[0-9]+"


wildcard_constraints:
    run=RUN_RE,
    model=f"clean|{RUN_RE}",
    trigger=f"none|{RUN_RE}",
    evalset="|".join(EVAL_SETS),


def attack_of(run):
    return run.rpartition("-s")[0]


# Attacks with a learned trigger get it from a stage of their own (registry: Trigger.asset = stage name).
ASSET_FILES = {"badclip_patch": "data/attacks/{run}/patch.safetensors",
               "issba_codec": "data/attacks/{run}/codec.safetensors"}


def trigger_asset(run):
    """[the learned-trigger file a run's trigger needs] or [] (also for trigger "none")."""
    from clipbackdoor.attacks import REGISTRY

    stage = REGISTRY[attack_of(run)].asset if run != "none" else None
    return [ASSET_FILES[stage].format(run=run)] if stage else []


def asset_args(run):
    """The `--asset FILE` CLI arguments for a run's trigger (none when it has no learned trigger)."""
    return ["--asset", *trigger_asset(run)] if trigger_asset(run) else []


def decomp_path(model, evalset, trigger):
    return f"data/decomp/{model}/{evalset}/{trigger}.parquet"


def defend_path(model, evalset, trigger):
    return f"data/defend/{model}/{evalset}/{trigger}.parquet"


# (model, trigger) pairs that get defended and scored: every attacked model with its own trigger, and the
# clean model with every trigger (the control: a clean model must not follow any trigger).
DEFEND_PAIRS = [(run, run) for run in RUNS] + [("clean", run) for run in RUNS]
DEFEND_OUTPUTS = {f"{m}:{t}:{e}": defend_path(m, e, t) for m, t in DEFEND_PAIRS for e in EVAL_SETS}

ALL_TARGETS = [
    "results/metrics/summary.csv",
    "results/metrics/summary.md",
    "results/metrics/summary.json",
    "results/figures/fig2_layerwise_ablation.png",
    "results/figures/fig5_prototype_cosine.png",
]
