# Helpers shared by the rules: parameter validation, per-rule parameter JSON, threads, paths.
import json
import os

import sys

from snakemake.utils import update_config

from clipbackdoor.pipeline.runs import parse_run, run_evals, sweep_points
from clipbackdoor.config import eval_targets, load_yaml, moot_settings, names_local_path, results_dir, validate_params
from clipbackdoor.pipeline.dvcgen import shape_params
from clipbackdoor.errors import EXIT_USER_ERROR, UserError
from clipbackdoor.analysis.tables import FORMATS as TABLE_FORMATS

try:
    _configfiles = list(workflow.config_settings.configfiles)  # (before params.yaml is appended below)
    # params.yaml through the project's one loading path (bytes, aliases, budgets, finite numbers), unless a
    # profile replaces it; a --configfile was parsed by Snakemake already and is re-read here for the same checks
    if not workflow.config_settings.configfiles:
        workflow.configfiles.append("params.yaml")  # as the `configfile:` directive would (report, archive)
        _overrides = workflow.config_settings.overwrite_config
        if not (_overrides and workflow.config_settings.replace_workflow_config):
            update_config(config, load_yaml("params.yaml"))
        update_config(config, _overrides)  # --config key=value still wins
    for _file in workflow.config_settings.configfiles:
        load_yaml(_file)
    # (schemas/params.schema.json + the installed extensions' blocks: Snakemake's validate() knows only the file)
    validate_params(config, "params (params.yaml + --configfile/--config)")
    # Each parameter file's own results (summary, tables, figures, analyses) go to results/<its name>/: its
    # `results` key (configs/abd.yaml: abd), else the --configfile's name, else default (params.yaml); data/ is shared
    RESULTS = results_dir(_configfiles, config)
    if "sweep" in config:
        from clipbackdoor.analysis.rate_sweep import check_sweep_attacks

        check_sweep_attacks(config, "params (params.yaml + --configfile/--config)")
    for _note in moot_settings(config):
        print(f"clipbackdoor: note: {_note}", file=sys.stderr)
    # pretrained tags (not local files: those are rule inputs) are checked against open_clip's list here, so a
    # typo stops the workflow before any job; open_clip is imported only when a tag is named
    _sd = config.get("b2", {}).get("stable_diffusion") if config.get("b2", {}).get("backend") == "stable_diffusion" else None
    _tags = [(config["model"]["name"], config["model"]["pretrained"], "model.pretrained")]
    _tags += [(_sd["auditor"], _sd["auditor_pretrained"], "b2.stable_diffusion.auditor_pretrained")] if _sd else []
    _tags = [t for t in _tags if t[1] is not None and not names_local_path(t[1])]
    if _tags:
        from clipbackdoor.models.artifact import check_pretrained

        for _name, _tag, _key in _tags:
            check_pretrained(_name, _tag, _key)
except UserError as _exc:
    # the user sees our line (culprit + fix) and exit status 2, not a Snakemake stack frame
    print(_exc.report("clipbackdoor (workflow load)"), file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)

# Torch jobs take every core they are given: two jobs sharing 2 cores slow each other down by an order of
# magnitude, so each torch job claims all cores Snakemake may use (capped by the machine).
TORCH_THREADS = max(1, min(workflow.cores, os.cpu_count() or 1))
# Per-run jobs (fan-out over attacks) take half of them so two run side by side: the tiny model scales poorly
# across threads (two 1-thread fine-tunes on 2 cores make 3.4 steps/s together, one 2-thread job 2.9). The
# pretraining stage, alone on the critical path, keeps every core.
JOB_THREADS = max(1, TORCH_THREADS // 2)

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


def optional_keys(*keys):
    """The keys of ``keys`` that this profile sets (optional parameters with a default in the stage)."""
    out = []
    for key in keys:
        try:
            get_key(key)
        except KeyError:
            continue
        out.append(key)
    return out


def stage_params(*keys):
    """params_json as a function of the wildcards: Snakemake never brace-expands a function's result, and
    values such as a shard pattern `cc3m-{0000..0575}.tar` must reach the stage untouched."""
    # evaluated per job, not at parse time: a profile without an optional section (configs/core.yaml has no
    # cleanclip) still parses; only jobs that exist read their keys
    return lambda wildcards: params_json(*keys)


def local_file(value):
    """[value] when a parameter names a local file or folder (a checkpoint, a Stable Diffusion directory) rather
    than a tag such as `openai`: then it is a rule input -- missing, it stops the workflow before any job; edited,
    it reruns its stages."""
    return [value] if names_local_path(value) else []


def eval_dir(name):
    return f"data/datasets/eval/{name}"


def eval_args(names=None):
    """NAME=PATH per evaluation set (all of them, or ``names``), a list so the shell quotes each
    (`{params.evals:q}`)."""
    return [f"{n}={eval_dir(n)}" for n in (EVAL_SETS if names is None else names)]


# Per-rule memory and wall time, measured (benchmarks/rule_resources.py writes configs/resources.yaml): the
# table of this profile's scale -- the embedded world, the rehearsal's narrow 224-px models, or an open_clip
# model at the paper's sizes. Snakemake runs jobs side by side only while their mem_mb fit `--resources
# mem_mb=N`; on a retry (profiles/slurm) a job asks for half as much memory again. (Its time limit stays: a
# cluster refuses jobs past the partition's limit; raise it with --set-resources RULE:runtime=MIN.)
RESOURCES_TABLE = "embedded" if EMBEDDED else "rehearsal" if config["model"]["name"].startswith("clipbackdoor-") else "paper"
RESOURCES = load_yaml(os.path.join(workflow.basedir, "configs", "resources.yaml"))[RESOURCES_TABLE]


def mem_mb(rule, processes=1):
    """``processes``: a job that runs several copies of the stage (data-parallel fine-tuning) needs each one's."""
    base = RESOURCES[rule]["mem_mb"] * processes
    return lambda wildcards, attempt: base + (attempt - 1) * base // 2


def runtime(rule):
    return RESOURCES[rule]["runtime"]


def log_path(name):
    return f"data/logs/{name}.log"


def bench_path(name):
    return f"data/benchmarks/{name}.tsv"


# Attack runs: every attack once per seed and per target, named ATTACK-sSEED (ATTACK-TARGET-sSEED when the
# evaluation sets have different targets, seed 001 B.1): the model, its poisoned set and its trigger. A run is
# scored on the evaluation sets whose target it was backdoored towards (RUN_EVALS).
TARGETS = eval_targets(config)  # {eval set: target class}
ATTACKS = list(config["poison"]["attacks"])
RUN_EVALS = run_evals(config)
RUNS = list(RUN_EVALS)
# Model-repair defenses (CleanCLIP, ...) turn every attacked model RUN into a new model RUN.METHOD.
REPAIRS = list(config.get("repair", {}).get("methods", []))
REPAIRED = [f"{r}.{m}" for r in RUNS for m in REPAIRS]
MODELS = ["clean"] + RUNS + REPAIRED
RUN_RE = "[a-z_]+(?:-[a-z0-9_]+)?-s[0-9]+"
ABD_ARMS = ["abd", "abd_img_only", "abd_eda_only", "finetune_clean", "uap"]  # seed 002's ABD and its ablation arms
REPAIR_RE = "|".join(["cleanclip", "roclip", *ABD_ARMS])


wildcard_constraints:
    run=RUN_RE,
    rate="[0-9.]+",
    model=f"clean|{RUN_RE}|{RUN_RE}\\.(?:{REPAIR_RE})",
    trigger=f"none|{RUN_RE}",
    evalset="|".join(EVAL_SETS),


def target_key(run):
    """The one parameter key holding a run's target: a stage edit of another set's target reruns nothing here."""
    return "poison.target" if isinstance(config["poison"]["target"], str) else f"poison.target.{RUN_EVALS[run][0]}"


def run_eval(run):
    """The evaluation set a run's attacker-side stages use (learned triggers, ABD's Fig. 2)."""
    return RUN_EVALS[run][0]


def attack_of(run):
    return parse_run(run)[0]


# Attacks with a learned trigger get it from a stage of their own (registry: Trigger.asset = stage name).
ASSET_FILES = {"badclip_patch": "data/attacks/{run}/patch.safetensors",
               "issba_codec": "data/attacks/{run}/codec.safetensors",
               "lc_adversarial": "data/attacks/{run}/hard_images.safetensors"}


def trigger_asset(run, poisoning=False):
    """[the file a run's trigger needs] or [] (also for trigger "none"). Poisoning may need more than
    evaluation: Label-Consistent's adversarially perturbed images exist only for the poisoned pairs."""
    from clipbackdoor.attacks import REGISTRY

    if run == "none":
        return []
    attack = attack_of(run)
    stage = REGISTRY[attack].poison_asset(config["attacks"][attack]) if poisoning else REGISTRY[attack].asset
    return [ASSET_FILES[stage].format(run=run)] if stage else []


def asset_args(run, poisoning=False):
    """The `--asset FILE` CLI arguments for a run's trigger (none when it needs no stage output)."""
    files = trigger_asset(run, poisoning)
    return ["--asset", *files] if files else []


def decomp_path(model, evalset, trigger):
    return f"data/decomp/{model}/{evalset}/{trigger}.parquet"


def defend_path(model, evalset, trigger):
    return f"data/defend/{model}/{evalset}/{trigger}.parquet"


# (model, trigger) pairs that get defended and scored: every attacked model with its own trigger, and the
# clean model with every trigger (the control: a clean model must not follow any trigger).
DEFEND_PAIRS = [(run, run) for run in RUNS] + [("clean", run) for run in RUNS]
DEFEND_PAIRS += [(f"{run}.{m}", run) for run in RUNS for m in REPAIRS]  # repaired models, same trigger
DEFEND_OUTPUTS = {f"{m}:{t}:{e}": defend_path(m, e, t) for m, t in DEFEND_PAIRS for e in RUN_EVALS[t]}


def detect_path(model, evalset, trigger):
    return f"data/detect/{model}/{evalset}/{trigger}.parquet"


# Input detectors (STRIP, SCALE-UP, TeCo) score each attacked model's clean and triggered test images.
DETECTORS = list(config.get("detect", {}).get("detectors", []))
DETECT_OUTPUTS = {f"{r}:{r}:{e}": detect_path(r, e, r) for r in RUNS for e in RUN_EVALS[r]} if DETECTORS else {}

# seed 001's defenses and their results, computed from cached decompositions alone (`make defenses`)
DEFENSE_TARGETS = [
    RESULTS + "/metrics/summary.csv",
    RESULTS + "/metrics/summary.html",  # (each page's Markdown is written with its HTML twin)
    RESULTS + "/metrics/headline.json",
    RESULTS + "/figures/fig2_layerwise_ablation.png",
    RESULTS + "/figures/fig5_prototype_cosine.png",
    RESULTS + "/figures/roc_detectors.png",
    RESULTS + "/figures/head_map.png",
    *[f"{RESULTS}/tables/table{i}.html" for i in range(1, 6)],
    RESULTS + "/figures/fig1_ablate_all.png",
    RESULTS + "/figures/fig6_eps_sweep.png",
    RESULTS + "/figures/fig8_cacc_mmd.png",
]
ALL_TARGETS = DEFENSE_TARGETS + [RESULTS + "/figures/training_loss.png"]  # (needs the models: not in `defenses`)
if set(REPAIRS) & set(ABD_ARMS):  # seed 002's Fig. 2 and Tables I-III
    ALL_TARGETS += [f"{RESULTS}/tables/abd_{t}.html" for t in ("table1", "table2", "table3", "fig2")]
if "analysis" in config:  # TEXTSPAN descriptions of every attacked model (Figures 3-4 analogues)
    ALL_TARGETS += [f"{RESULTS}/analysis/textspan/{r}_{e}.html" for r in RUNS for e in RUN_EVALS[r]]
if "sweep" in config:  # ASR against the poisoning rate
    ALL_TARGETS += [RESULTS + "/metrics/rate_sweep.csv", RESULTS + "/figures/asr_vs_rate.png"]
# Seed 000's B² audit: part of `all` exactly when the parameters have a `b2` section (configs/b2.yaml, the
# real-scale profiles), so `snakemake all` and dvc.yaml's stages (generated from the same DAG) always agree.
B2 = "b2" in config
B2_OUTPUTS = [RESULTS + "/tables/b2_audit.html", RESULTS + "/metrics/b2.csv", "results/shared/b2/t2i_samples.png"]
if B2:
    ALL_TARGETS += B2_OUTPUTS


# The HTML report (snakemake --report report.html) in the study's order: each item has a caption
# (rules/captions/*.rst) and a section; Markdown pages are shown through their HTML twins.
REPORT_SECTIONS = {"attacks": "1. Attacks", "core": "2. Core study", "baselines": "3. Baselines and detectors",
                   "analyses": "4. Analyses", "abd": "5. ABD (seed 002)", "b2": "6. B2 audit (seed 000)"}


def report_item(path, section, caption, subcategory=None):
    return report(path, caption=f"captions/{caption}.rst", category=REPORT_SECTIONS[section], subcategory=subcategory)


def table_outputs(stem, section, caption="table"):
    """A table's files (Markdown, its HTML twin in the report, CSV, LaTeX)."""
    return [report_item(f"{stem}.html", section, caption, "Tables") if ext == "html" else f"{stem}.{ext}"
            for ext in TABLE_FORMATS]
