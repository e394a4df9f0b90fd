"""Command line: ``python -m clipbackdoor <stage> ...``. It only parses arguments and calls the library.

Stage parameters arrive with ``--params``: either the JSON a Snakemake rule passes (exactly the sections
the rule declares in ``params:``), or ``@FILE:section,section`` (what dvc.yaml uses, so `dvc repro` reads
the current params.yaml). Both are validated against the schema before any work starts. User errors
print one line naming the culprit and the fix, and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from clipbackdoor.errors import UserError


def parse_params(value: str) -> dict:
    """``--params`` -> nested dict holding just the rule's keys, each validated against its sub-schema.

    Keys are dotted paths into params.yaml ("data.world", "seed"): the JSON form maps each to its value,
    the ``@FILE:key,key`` form reads them from FILE (validated as a whole first)."""
    from clipbackdoor.config import get_dotted, load_yaml, nest_dotted, validate_dotted, validate_params

    if value.startswith("@"):
        path, _, names = value[1:].partition(":")
        full = load_yaml(path)
        validate_params(full, path)
        flat = {key: get_dotted(full, key) for key in names.split(",") if key}
    else:
        try:
            flat = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"--params is neither JSON nor @FILE:keys ({exc})",
                            fix="see `python -m clipbackdoor <stage> --help`") from None
        for key, val in flat.items():
            validate_dotted(key, val, "--params")
    return nest_dotted(flat)


def _eval_dirs(pairs: list[str]) -> dict[str, Path]:
    out = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        out[name] = Path(path)
    return out


# ------------------------------------------------------------------------------------------------ stages


def cmd_validate(args) -> None:
    from clipbackdoor.config import load_params

    params = load_params(args.file)
    print(f"{args.file}: valid ({params.profile} profile)")


def cmd_world(args) -> None:
    from clipbackdoor.config import WorldConfig, section
    from clipbackdoor.world import build_world

    p = parse_params(args.params)
    counts = build_world(section(WorldConfig, p["data"]["world"]), p["data"]["image_size"], args.train_out,
                         args.eval_out, args.preview)
    print(json.dumps(counts))


def cmd_cc3m(args) -> None:
    from clipbackdoor.config import WebdatasetConfig, section
    from clipbackdoor.datasets import convert_webdataset

    p = parse_params(args.params)
    print(convert_webdataset(section(WebdatasetConfig, p["data"]["webdataset"]), p["data"]["image_size"], args.out))


def cmd_eval_data(args) -> None:
    from clipbackdoor.config import EvalSetConfig, section
    from clipbackdoor.datasets import convert_imagefolder
    from clipbackdoor.zeroshot import templates_for

    p = parse_params(args.params)
    cfg = section(EvalSetConfig, p["data"]["eval_sets"][args.name])
    templates = templates_for(p["zeroshot"]["templates"], [])
    print(convert_imagefolder(args.name, cfg, p["data"]["image_size"], args.out, p["seed"], templates))


def cmd_pretrain(args) -> None:
    from clipbackdoor.config import ModelConfig, OptimConfig, ZeroShotConfig, section
    from clipbackdoor.pretrain import pretrain
    from clipbackdoor.runtime import pick_device, set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    pick_device(gpu=True)  # the tiny model trains on CPU; a claimed slot keeps GPU jobs apart on a GPU box
    metrics = pretrain(args.train, _eval_dirs(args.eval), args.out, section(ModelConfig, p["model"]),
                       section(OptimConfig, p["pretrain"]), section(ZeroShotConfig, p["zeroshot"]), p["seed"],
                       ckpt_dir=args.ckpt_dir, ckpt_every=args.ckpt_every)
    print(json.dumps(metrics, indent=1))


def cmd_clean_model(args) -> None:
    from clipbackdoor.config import ModelConfig, ZeroShotConfig, section
    from clipbackdoor.pretrain import clean_model
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    print(json.dumps(clean_model(_eval_dirs(args.eval), args.out, section(ModelConfig, p["model"]),
                                 section(ZeroShotConfig, p["zeroshot"])), indent=1))


def cmd_summarize(args) -> None:
    from clipbackdoor.report import summarize

    p = parse_params(args.params)
    df = summarize(_eval_dirs(args.models), p["seed"], p["profile"], Path(args.csv), Path(args.md),
                   Path(args.json))
    print(df.to_string(index=False))


def cmd_dvc_yaml(args) -> None:
    from clipbackdoor.dvcgen import check_dvc_yaml, write_dvc_yaml

    if args.check:
        stale = check_dvc_yaml(Path(args.root))
        if stale:
            raise UserError(f"dvc.yaml is stale: {stale}", fix="run `python -m clipbackdoor dvc-yaml`")
        print("dvc.yaml is up to date")
    else:
        print(f"wrote {write_dvc_yaml(Path(args.root))}")


def cmd_report(args) -> None:
    from clipbackdoor.report import print_summary

    print_summary(args.files)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipbackdoor", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(fn=fn)
        sp.add_argument("--log", default=None, help="write stdout and stderr to this file")
        return sp

    def with_params(sp):
        sp.add_argument("--params", required=True, help="JSON of the rule's param sections, or @FILE:sec,sec")
        return sp

    sp = stage("validate", cmd_validate, "validate a params file against schemas/params.schema.json")
    sp.add_argument("file", nargs="?", default="params.yaml")

    sp = with_params(stage("world", cmd_world, "generate the embedded image-caption world as webdataset shards"))
    sp.add_argument("--train-out", required=True)
    sp.add_argument("--eval-out", required=True)
    sp.add_argument("--preview", default=None)

    sp = with_params(stage("cc3m", cmd_cc3m, "select CC3M-style webdataset pairs into the training layout"))
    sp.add_argument("--out", required=True)

    sp = with_params(stage("eval-data", cmd_eval_data, "convert an ImageFolder evaluation set to labelled shards"))
    sp.add_argument("--name", required=True)
    sp.add_argument("--out", required=True)

    sp = with_params(stage("pretrain", cmd_pretrain, "train the clean CLIP from scratch (embedded profile)"))
    sp.add_argument("--train", required=True)
    sp.add_argument("--eval", nargs="+", required=True, metavar="NAME=DIR")
    sp.add_argument("--out", required=True)
    sp.add_argument("--ckpt-dir", default=None)
    sp.add_argument("--ckpt-every", type=int, default=100)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("clean-model", cmd_clean_model, "fetch open_clip pretrained weights (real profile)"))
    sp.add_argument("--eval", nargs="+", required=True, metavar="NAME=DIR")
    sp.add_argument("--out", required=True)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("summarize", cmd_summarize, "collect every model's metrics into the results table"))
    sp.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR")
    sp.add_argument("--csv", required=True)
    sp.add_argument("--md", required=True)
    sp.add_argument("--json", required=True)

    sp = stage("dvc-yaml", cmd_dvc_yaml, "generate dvc.yaml from the Snakemake rules")
    sp.add_argument("--check", action="store_true", help="fail if the committed dvc.yaml is stale")
    sp.add_argument("--root", default=".")

    sp = stage("report", cmd_report, "print the results table")
    sp.add_argument("files", nargs="*", default=["results/metrics/summary.csv"])
    return parser


def redirect_to_log(path: str) -> None:
    """Send this process's stdout and stderr (Python and native) to ``path``, creating its folder."""
    import os

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs "no pretrained weights" at WARNING
    args = build_parser().parse_args(argv)
    if getattr(args, "log", None):
        redirect_to_log(args.log)
    try:
        args.fn(args)
    except UserError as exc:
        print(f"clipbackdoor {args.command}: error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2
    return 0
