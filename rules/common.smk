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


def stage_params(*keys):
    """The exact parameters a rule reads, as canonical JSON keyed by dotted path.

    Passed to the stage CLI with --params, so Snakemake's params rerun trigger sees every value the stage
    uses and nothing else; the dvc.yaml generator turns the same keys into the stage's `params:`."""
    return json.dumps({k: get_key(k) for k in keys}, sort_keys=True, separators=(",", ":"))


def eval_dir(name):
    return f"data/datasets/eval/{name}"


def eval_args(wildcards=None):
    return " ".join(f"{n}={eval_dir(n)}" for n in EVAL_SETS)


def log_path(name):
    return f"data/logs/{name}.log"


def bench_path(name):
    return f"data/benchmarks/{name}.tsv"


ALL_TARGETS = ["results/metrics/summary.csv", "results/metrics/summary.md", "results/metrics/summary.json"]
