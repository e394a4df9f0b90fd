"""The stage registry: every stage (and command) of ``python -m clipbackdoor``, declared once.

A :class:`Stage` names its typed function (``module:function``, loaded only when the stage runs, so ``--help``
imports no torch), its inputs, outputs and options, whether it reads ``--params`` (the function then receives the
typed :class:`clipbackdoor.config.Params` view of the keys its rule passes, never a raw dict), whether it takes
``--threads`` and whether it runs on a GPU when there is one (its rule then holds ``resources: gpu=1``). The CLI
is built from this table (:func:`clipbackdoor.pipeline.cli.build_parser`); dvc.yaml takes each stage's code
dependencies from its function's module (:func:`clipbackdoor.pipeline.dvcgen.stage_modules`); tests check every
rule's command against it. The Snakemake rules stay the DAG's one source of truth and call stages by name.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any, Callable

PACKAGE = "clipbackdoor"


@dataclass(frozen=True)
class Arg:
    """One command-line argument. ``role``: ``input`` (a file or folder the stage reads), ``output`` (one it
    writes), ``option`` (a setting). Inputs and outputs are required unless said otherwise."""

    flag: str  # "--model", or a positional name
    role: str = "option"
    help: str | None = None  # None: the shared help of that flag (COMMON_HELP)
    required: bool | None = None
    nargs: Any = None
    metavar: Any = None
    type: Callable | None = None
    default: Any = None
    choices: tuple | None = None
    action: str | None = None

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kw: dict[str, Any] = {"help": self.help if self.help is not None else COMMON_HELP.get(self.flag)}
        if self.action:
            kw["action"] = self.action
        else:
            kw.update({k: v for k, v in (("nargs", self.nargs), ("metavar", self.metavar), ("type", self.type),
                                         ("choices", self.choices)) if v is not None})
            kw["default"] = self.default
        if self.flag.startswith("--"):
            kw["required"] = self.required if self.required is not None else self.role in ("input", "output")
        parser.add_argument(self.flag, **kw)


def In(flag: str, **kw) -> Arg:  # noqa: N802 (reads as a declaration)
    return Arg(flag, "input", **kw)


def Out(flag: str, **kw) -> Arg:  # noqa: N802
    return Arg(flag, "output", **kw)


def Opt(flag: str, **kw) -> Arg:  # noqa: N802
    return Arg(flag, "option", **kw)


@dataclass(frozen=True)
class Stage:
    name: str  # the subcommand (its rule: the name with _ for -)
    help: str
    function: str  # "package.module:function", called as function(args, params or None)
    args: tuple[Arg, ...] = ()
    params: bool = True  # reads --params: its typed view (clipbackdoor.config.stage_view) is passed
    threads: bool = False  # --threads: torch CPU threads (the rule passes the cores it holds)
    gpu: bool = False  # runs on a GPU when there is one (its rule: resources gpu=1)
    pipeline: bool = True  # a pipeline stage (a rule calls it); False: a command people run

    @property
    def module(self) -> str:
        return self.function.partition(":")[0]

    def load(self) -> Callable:
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)


def _rate(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a poisoning rate is a fraction in (0, 1]")
    return value


RUN = Opt("--run", required=True, help="ATTACK-sSEED")
TRIGGER = Opt("--trigger", required=True, help="the attack run whose trigger is applied (ATTACK-sSEED)")
CKPT = Out("--ckpt-dir", required=False)
ASSET = In("--asset", required=False)
EVALS = In("--eval", nargs="+", metavar="NAME=DIR")


def _learned_trigger(name: str, help_: str, function: str, model: bool) -> Stage:
    """A stage that makes an attack's trigger (BadCLIP's patch, ISSBA's codec, Label-Consistent's images)."""
    return Stage(name, help_, function, threads=True, gpu=True, args=(
        RUN, *([In("--model", help="the clean model the trigger is optimised on")] if model else []),
        In("--finetune-dir"), In("--eval-dir", help="held-out images (and class names) for its report"), Out("--out"),
        Out("--png", required=False)))


STAGES: tuple[Stage, ...] = (
    # data
    Stage("world", "generate the embedded image-caption world as webdataset shards", f"{PACKAGE}.data.world:world_stage",
          (Out("--train-out"), Out("--eval-out"), Out("--preview", required=False))),
    Stage("cc3m", "select CC3M-style webdataset pairs into the training layout",
          f"{PACKAGE}.data.datasets:cc3m_stage", (Out("--out"),)),
    Stage("eval-data", "convert an ImageFolder evaluation set to labelled shards",
          f"{PACKAGE}.data.datasets:eval_data_stage", (Opt("--name", required=True), Out("--out"))),
    # models
    Stage("pretrain", "train the clean CLIP from scratch (embedded profile)", f"{PACKAGE}.training.pretrain:pretrain_stage",
          (In("--train"), EVALS, Out("--out"), CKPT), threads=True, gpu=True),
    Stage("clean-model", "fetch open_clip pretrained weights (real profile)",
          f"{PACKAGE}.training.pretrain:clean_model_stage", (EVALS, Out("--out")), threads=True, gpu=True),
    # attacks
    Stage("poison", "poison the fine-tuning pairs with one attack", f"{PACKAGE}.attacks.poison:poison_stage",
          (RUN, In("--finetune-dir"), In("--eval", nargs="+", metavar="NAME=DIR", help="eval sets (target check)"),
           Out("--out"), Out("--manifest"), Out("--preview", required=False), ASSET,
           Opt("--rate", type=_rate, help="poison this fraction of the pairs instead of attacks.ATTACK.rate "
                                          "(the rate sweep)"))),
    _learned_trigger("badclip-patch", "optimise BadCLIP's patch on the clean model",
                     f"{PACKAGE}.attacks.badclip_patch:badclip_patch_stage", True),
    _learned_trigger("issba-codec", "train ISSBA's steganographic encoder/decoder",
                     f"{PACKAGE}.attacks.issba_codec:issba_codec_stage", False),
    _learned_trigger("lc-adversarial", "Label-Consistent: PGD-harden the target-class images on the clean model",
                     f"{PACKAGE}.attacks.lc_adversarial:lc_adversarial_stage", True),
    # backdoor fine-tuning
    Stage("finetune", "backdoor fine-tuning of the clean model", f"{PACKAGE}.training.finetune:finetune_stage",
          (RUN, In("--model"), In("--train"), Out("--out"), CKPT), threads=True, gpu=True),
    # decomposition and prototypes
    Stage("decompose", "cache per-head / per-MLP direct terms as Parquet",
          f"{PACKAGE}.decomposition.stage:decompose_stage",
          (In("--model"), In("--eval-dir"), Opt("--trigger", required=True, help="none or ATTACK-sSEED"), Out("--out"),
           ASSET), threads=True, gpu=True),
    Stage("class-embeddings", "zero-shot class embeddings of a model",
          f"{PACKAGE}.decomposition.stage:class_embeddings_stage", (In("--model"), In("--eval-dir"), Out("--out")),
          threads=True, gpu=True),
    Stage("prototypes", "val/test split and head/MLP prototypes",
          f"{PACKAGE}.decomposition.prototypes:prototypes_stage", (In("--decomp"), Out("--out"))),
    # defenses
    Stage("defend", "Decomp-Rep / Det / ablations (and extension defenses) from cached terms",
          f"{PACKAGE}.defenses.defend:defend_stage",
          (In("--clean"), In("--triggered"), Opt("--trigger", required=True, help="ATTACK-sSEED of the triggered "
                                                 "decomposition"), In("--prototypes"), In("--classes"), Out("--out"))),
    Stage("cleanclip", "CleanCLIP: repair a backdoored model on clean pairs", f"{PACKAGE}.defenses.cleanclip:cleanclip_stage",
          (Opt("--run", required=True, help="ATTACK-sSEED of the model being repaired"), In("--model"),
           In("--clean-dir", help="clean image-caption shards"), Out("--out"), CKPT), threads=True, gpu=True),
    Stage("roclip", "RoCLIP: the backdoor fine-tune with memory-bank captions", f"{PACKAGE}.defenses.roclip:roclip_stage",
          (Opt("--run", required=True, help="ATTACK-sSEED whose poisoned pairs are trained on"),
           In("--model", help="the clean model"), In("--train", help="the poisoned pairs"), Out("--out"), CKPT),
          threads=True, gpu=True),
    Stage("abd-generator", "ABD: universal adversarial perturbations (UAP, UAP + L_bd)",
          f"{PACKAGE}.defenses.abd:abd_generator_stage",
          (Opt("--run", required=True, help="ATTACK-sSEED of the poisoned model"), In("--model", help="the poisoned model"),
           In("--normal", help="the normal (clean) model of L_bd"),
           In("--clean-dir", help="the defender's clean image-caption shards"), Out("--out")), threads=True, gpu=True),
    Stage("abd-finetune", "ABD fine-tune of the poisoned model (and its ablation arms)",
          f"{PACKAGE}.defenses.abd_finetune:abd_finetune_stage",
          (Opt("--run", required=True, help="ATTACK-sSEED of the poisoned model"),
           Opt("--arm", required=True, choices=("abd", "abd_img_only", "abd_eda_only", "finetune_clean", "uap")),
           In("--model"), In("--clean-dir"),
           In("--perturbations", required=False, help="abd-generator output (arms with adversarial images)"),
           Out("--out"), CKPT), threads=True, gpu=True),
    # detectors
    Stage("detect", "STRIP / SCALE-UP / TeCo (and extension detectors) on clean and triggered test images",
          f"{PACKAGE}.detectors.detect:detect_stage",
          (In("--model"), In("--eval-dir"), Opt("--trigger", required=True, help="ATTACK-sSEED"),
           In("--prototypes", help="the test split (and STRIP's clean pool) come from here"), In("--classes"),
           Out("--out"), ASSET), threads=True, gpu=True),
    # metrics, tables, figures, analyses
    Stage("summarize", "collect every model's metrics into the results table",
          f"{PACKAGE}.analysis.report:summarize_stage",
          (In("--models", nargs="+", metavar="NAME=DIR"), Out("--csv"), Out("--md"),
           Out("--headline", help="the headline metrics JSON (dvc metrics)"),
           In("--defend", required=False, nargs="*", metavar="MODEL:TRIGGER:EVALSET=PARQUET"))),
    Stage("tables", "seed 001's Tables 1-5 and Figures 1, 6, 8 from artifacts", f"{PACKAGE}.analysis.tables:tables_stage",
          (In("--summary"), In("--mmd", required=False, nargs="*", metavar="RUN=CSV"), Out("--out-dir"), Out("--fig1"),
           Out("--fig6"), Out("--fig8"))),
    Stage("figures", "Figure 2 and Figure 5 analogues and the detection ROC curves from artifacts",
          f"{PACKAGE}.analysis.figures:figures_stage",
          (In("--summary", help="results/NAME/metrics/summary.csv"),
           In("--runs", nargs="+", metavar="RUN=CLEAN,TRIGGERED,PROTOTYPES",
              help="per attack run: its clean and triggered decompositions and prototypes (Figure 5)"),
           In("--scores", nargs="+", metavar="RUN=DEFEND[,DETECT]",
              help="per attack run: its defend table and, if detectors ran, its detect table (ROC)"),
           Out("--layerwise", help="Figure 2 PNG"), Out("--proto-cosine", help="Figure 5 PNG"),
           Out("--roc", help="ROC curves PNG")), params=False),
    Stage("head-map", "layer x head heatmaps per attack run: how often the infected-head rule flags each head, and "
                      "its MMD^2", f"{PACKAGE}.analysis.figures:head_map_stage",
          (In("--runs", nargs="+", metavar="RUN=CLEAN,TRIGGERED,PROTOTYPES",
              help="per attack run: its clean and triggered decompositions and prototypes"),
           In("--mmd", required=False, nargs="*", default=[], metavar="RUN=CSV", help="per attack run: its `mmd` table"),
           Out("--png", help="the figure to write"))),
    Stage("training-curves", "training loss per step of every trained model",
          f"{PACKAGE}.analysis.figures:training_curves_stage",
          (In("--models", nargs="+", metavar="NAME=DIR",
              help="model artifacts (their history.csv; pretrained ones have none and are skipped)"),
           Out("--png", help="the figure to write")), params=False),
    Stage("mmd", "MMD between clean and triggered terms per component", f"{PACKAGE}.analysis.mmd:mmd_stage",
          (In("--clean", help="decomposition of the clean test images"),
           In("--triggered", help="decomposition of the triggered test images"),
           In("--prototypes", help="its test split"), Out("--out"))),
    Stage("textspan", "TEXTSPAN descriptions of components, clean vs backdoored",
          f"{PACKAGE}.analysis.textspan:textspan_stage",
          (In("--clean-model"), In("--model", help="the backdoored model"),
           In("--clean-decomps", nargs=2, metavar=("CLEAN_IMAGES", "TRIGGERED_IMAGES")),
           In("--decomps", nargs=2, metavar=("CLEAN_IMAGES", "TRIGGERED_IMAGES")),
           In("--prototypes", help="the test split"), Out("--csv"), Out("--md"), Opt("--title", default=""),
           In("--mmd", required=False, help="the model's `mmd` CSV, shown beside each component"))),
    Stage("backdoor-eval", "zero-shot ASR and CACC counts of one model on every image of an evaluation set (the rate "
                           "sweep)", f"{PACKAGE}.analysis.backdoor_eval:backdoor_eval_stage",
          (In("--model", help="the model artifact"), In("--eval-dir", help="the evaluation set's shards"), TRIGGER,
           ASSET, Out("--out", help="the JSON of counts to write")), threads=True, gpu=True),
    Stage("rate-sweep", "ASR and CACC against the poisoning rate: CSV and figure",
          f"{PACKAGE}.analysis.rate_sweep:rate_sweep_stage",
          (In("--points", nargs="+", metavar="RUN:EVALSET:RATE=EVAL_JSON,MANIFEST",
              help="per sweep point: its backdoor-eval counts and the poisoned set's manifest"),
           Out("--csv", help="the table to write"), Out("--png", help="the figure to write"))),
    # seed 002 (ABD) analyses
    Stage("abd-similarity", "seed 002 Fig. 2: image-caption similarities",
          f"{PACKAGE}.defenses.abd_similarity:abd_similarity_stage",
          (Opt("--trigger", required=True, help="ATTACK-sSEED"), In("--model"), In("--classes"), In("--clean-model"),
           In("--clean-classes"), In("--eval-dir"), In("--perturbations"), ASSET, Out("--out")),
          threads=True, gpu=True),
    Stage("abd-tables", "seed 002's Fig. 2 and Tables I-III as Markdown", f"{PACKAGE}.analysis.tables:abd_tables_stage",
          (In("--summary"), In("--similarity", required=False, nargs="*", default=[]), Out("--out-dir")), params=False),
    # seed 000 (B²)
    Stage("t2i-pretrain", "train the miniature text-to-image model (B² branch)", f"{PACKAGE}.t2i.model:t2i_pretrain_stage",
          (In("--clip", help="the clean CLIP whose frozen text encoder conditions the UNet"),
           In("--train", help="image-caption shards"), Out("--out"), Out("--preview", required=False)),
          threads=True, gpu=True),
    Stage("t2i-backdoor", "B² poisoning: fine-tune the UNet on trigger/bias pairs",
          f"{PACKAGE}.t2i.backdoor:t2i_backdoor_stage",
          (In("--clip"), In("--t2i", help="the clean text-to-image model"), Out("--out")), threads=True, gpu=True),
    Stage("b2-audit", "CLIP token-inversion audit of the backdoored generator", f"{PACKAGE}.t2i.audit:b2_audit_stage",
          (In("--clip", help="the auditor CLIP"), In("--backdoored"),
           In("--clean", help="the clean generator (contrast and control)"),
           In("--vocab", help="caption shards whose tokens form the decoding vocabulary"), Out("--csv"), Out("--md")),
          threads=True, gpu=True),
    # commands people run
    Stage("validate", "validate a params file against schemas/params.schema.json",
          f"{PACKAGE}.pipeline.commands:validate_command", (In("file", nargs="?", default="params.yaml"),),
          params=False, pipeline=False),
    Stage("report", "print the results table", f"{PACKAGE}.analysis.report:report_command",
          (In("files", nargs="*", help="summary CSVs to print (default: the --results folder's summary.csv)"),
           Opt("--results", default="default",
               help="a parameter file's results folder: default (params.yaml), abd (configs/abd.yaml), ...")),
          params=False, pipeline=False),
    Stage("dvc-yaml", "generate dvc.yaml from the Snakemake rules", f"{PACKAGE}.pipeline.commands:dvc_yaml_command",
          (Opt("--check", action="store_true", help="fail if the committed dvc.yaml is stale"), Opt("--root", default=".")),
          params=False, pipeline=False),
    Stage("lock", "after a Snakemake run: record the stages it completed in dvc.lock (dvc commit), so `dvc status` is "
                  "clean and `dvc push` sends every output", f"{PACKAGE}.pipeline.commands:lock_command",
          (Opt("--root", default="."),), params=False, pipeline=False),
    Stage("pull-decomp", "dvc pull what the defenses need from a pushed run, without model weights (then: make "
                         "defenses)", f"{PACKAGE}.pipeline.commands:pull_decomp_command", (Opt("--root", default="."),),
          params=False, pipeline=False),
    Stage("report-screenshot", "a PNG of the Snakemake HTML report with one item open (headless Chromium)",
          f"{PACKAGE}.analysis.screenshot:report_screenshot_command",
          (In("--report", required=False, default="report.html",
              help="made by: snakemake --report report.html --cores 1"),
           Out("--out", required=False, default="report.png", help="the PNG to write"),
           Opt("--path", nargs="+", default=["2. Core study", "Tables", "results/default/tables/table1.html"],
               help="section, subsection(s) and the item to open, as the report names them")),
          params=False, pipeline=False),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    return BY_NAME[name]


# What an argument means wherever a stage takes it without a help of its own (the rules pass the same kinds of
# paths to many stages); a test checks every argument of every subcommand has a help.
COMMON_HELP = {
    "--out": "the output file or folder to write (written atomically: nothing is left behind on failure)",
    "--model": "a model artifact folder (model.safetensors + model.json)",
    "--clean-model": "the clean model's artifact folder",
    "--ckpt-dir": "folder for resumable training checkpoints (safetensors; none: no checkpoints)",
    "--eval-dir": "an evaluation set's shards (data/datasets/eval/NAME)",
    "--eval": "evaluation sets as NAME=DIR",
    "--train": "image-caption training shards (a dataset folder, or a poisoned overlay of one)",
    "--finetune-dir": "the fine-tuning pairs' shards (data/datasets/train/finetune)",
    "--clean-dir": "the clean fine-tuning pairs' shards",
    "--preview": "a PNG preview to write (optional)",
    "--png": "the figure to write (PNG)",
    "--md": "the Markdown page to write (its HTML twin is written beside it)",
    "--csv": "the CSV table to write",
    "--classes": "zero-shot class embeddings (the class_embeddings stage's safetensors)",
    "--clean-classes": "the clean model's class embeddings",
    "--prototypes": "per-head and per-MLP prototypes (the prototypes stage's safetensors)",
    "--decomp": "a cached decomposition (Parquet)",
    "--decomps": "cached decompositions of the model (Parquet): clean, then triggered images",
    "--clean-decomps": "the clean model's cached decompositions (Parquet): clean, then triggered images",
    "--clean": "the clean images' decomposition (Parquet)",
    "--triggered": "the triggered images' decomposition (Parquet)",
    "--asset": "the trigger's learned asset (e.g. BadCLIP's patch), if the attack has one",
    "--manifest": "the poisoned set's manifest to write (Parquet: key, poisoned, captions, trigger parameters)",
    "--summary": "a results folder's summary table (results/NAME/metrics/summary.csv)",
    "--out-dir": "the folder for the tables (Markdown, HTML, CSV, LaTeX)",
    "--models": "model artifacts as NAME=DIR",
    "--runs": "per attack run: RUN=CLEAN,TRIGGERED,PROTOTYPES (its decompositions and prototypes)",
    "--clip": "the clean CLIP model artifact (text encoder, or auditor)",
    "--backdoored": "the backdoored text-to-image model (diffusers layout)",
    "--perturbations": "ABD's generated perturbations (safetensors)",
    "--similarity": "ABD similarity tables (the abd_similarity stage's CSVs)",
    "--defend": "per-image tables as MODEL:TRIGGER:EVALSET=PARQUET (defend and detect outputs)",
    "--mmd": "per attack run: RUN=CSV (the mmd stage's table)",
    "--title": "the page's title",
    "--train-out": "the training splits' folder to write (pretrain/ and finetune/ shards)",
    "--eval-out": "the evaluation set's folder to write (shards + classes.json)",
    "--name": "the evaluation set's name (a key of data.eval_sets)",
    "--arm": "the ABD arm to fine-tune",
    "--fig1": "Figure 1 PNG (all-MLP / all-head ablation)",
    "--fig6": "Figure 6 PNG (eps sweep)",
    "--fig8": "Figure 8 PNG (layer-wise CACC and MMD)",
    "--root": "the repository (default: the current folder)",
    "file": "the parameter file to check (default: params.yaml)",
}
