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
import os
import sys
import time
from pathlib import Path

from clipbackdoor.errors import EXIT_USER_ERROR, UserError


def parse_params(value: str) -> dict:
    """``--params`` -> nested dict holding just the rule's keys, each validated against its sub-schema.

    Keys are dotted paths into params.yaml ("data.world", "seed"): the JSON form maps each to its value,
    the ``@FILE:key,key`` form reads them from FILE (validated as a whole first)."""
    from clipbackdoor.config import get_dotted, load_yaml, nest_dotted, validate_dotted, validate_params

    if value.startswith("@"):
        path, _, names = value[1:].partition(":")
        full = load_yaml(path)
        validate_params(full, path)
        from clipbackdoor.dvcgen import check_graph_shape

        check_graph_shape(full, Path(path).parent / "dvc.yaml")  # the form dvc.yaml's commands use
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


def _name_paths(pairs: list[str]) -> dict[str, Path]:
    """NAME=PATH arguments -> {name: path}."""
    out = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        out[name] = Path(path)
    return out


def _run_decomps(specs: list[str]) -> list[tuple[str, Path, Path, Path]]:
    """RUN=CLEAN,TRIGGERED,PROTOTYPES arguments -> (run, clean decomposition, triggered decomposition, prototypes)."""
    out = []
    for spec in specs:
        run, _, paths = spec.partition("=")
        clean, trig, protos = paths.split(",")
        out.append((run, Path(clean), Path(trig), Path(protos)))
    return out


# ------------------------------------------------------------------------------------------------ stages


def cmd_validate(args) -> None:
    from clipbackdoor.config import load_params, load_yaml
    from clipbackdoor.rate_sweep import check_sweep_attacks

    params = load_params(args.file)
    check_sweep_attacks(load_yaml(args.file), args.file)
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
    print(convert_webdataset(section(WebdatasetConfig, p["data"]["webdataset"]), args.out))


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
    metrics = pretrain(args.train, _name_paths(args.eval), args.out, section(ModelConfig, p["model"]),
                       section(OptimConfig, p["pretrain"]), section(ZeroShotConfig, p["zeroshot"]), p["seed"],
                       ckpt_dir=args.ckpt_dir, ckpt_every=p["pretrain"]["ckpt_every"],
                       device=pick_device(gpu=True))
    print(json.dumps(metrics, indent=1))


def cmd_clean_model(args) -> None:
    from clipbackdoor.config import ModelConfig, ZeroShotConfig, section
    from clipbackdoor.pretrain import clean_model
    from clipbackdoor.runtime import pick_device, set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    print(json.dumps(clean_model(_name_paths(args.eval), args.out, section(ModelConfig, p["model"]),
                                 section(ZeroShotConfig, p["zeroshot"]), device=pick_device(gpu=True)), indent=1))


def cmd_poison(args) -> None:
    from clipbackdoor.config import stage_target
    from clipbackdoor.poison import check_target, poison
    from clipbackdoor.attacks import parse_run
    from clipbackdoor.world import world_classes_json
    from clipbackdoor.zeroshot import templates_for

    p = parse_params(args.params)
    attack, seed = parse_run(args.run)
    classes = [world_classes_json(d) for d in _name_paths(args.eval).values()]
    for c in classes[1:]:
        check_target(stage_target(p), c["classnames"])
    templates = templates_for(p["poison"]["caption_templates"], classes[0]["templates"])
    attack_cfg = p["attacks"][attack] if args.rate is None else {**p["attacks"][attack], "rate": args.rate}
    print(poison(args.finetune_dir, classes[0], args.out, args.manifest, attack, attack_cfg,
                 stage_target(p), templates, p["data"]["image_size"], seed, args.preview, args.asset))


def cmd_badclip_patch(args) -> None:
    from clipbackdoor.config import stage_target
    from clipbackdoor.attacks import parse_run
    from clipbackdoor.badclip_patch import run_badclip_patch
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    attack, seed = parse_run(args.run)
    print(json.dumps(run_badclip_patch(args.model, args.finetune_dir, args.eval_dir, args.out, args.png,
                                       p["attacks"][attack], stage_target(p), p["zeroshot"]["templates"], seed)))


def cmd_issba_codec(args) -> None:
    from clipbackdoor.attacks import parse_run
    from clipbackdoor.issba_codec import run_issba_codec
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    attack, seed = parse_run(args.run)
    print(json.dumps(run_issba_codec(args.finetune_dir, args.eval_dir, args.out, args.png, p["attacks"][attack],
                                     p["data"]["image_size"], seed)))


def cmd_lc_adversarial(args) -> None:
    from clipbackdoor.config import stage_target
    from clipbackdoor.attacks import parse_run
    from clipbackdoor.lc_adversarial import run_lc_adversarial
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    attack, _ = parse_run(args.run)
    print(json.dumps(run_lc_adversarial(args.model, args.finetune_dir, args.eval_dir, args.out, p["attacks"][attack],
                                        stage_target(p), p["zeroshot"]["templates"])))


def cmd_finetune(args) -> None:
    from clipbackdoor.config import OptimConfig, check_devices, section
    from clipbackdoor.distributed import is_main, launch
    from clipbackdoor.finetune import finetune
    from clipbackdoor.attacks import parse_run
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    check_devices(p["finetune"], "--params")
    devices = p["finetune"].get("devices", 1)
    if devices > 1 and not os.environ.get("LOCAL_RANK"):
        from clipbackdoor.runtime import claim_gpu

        claim_gpu(count=devices)  # the workers inherit CUDA_VISIBLE_DEVICES = the claimed ids (none: gloo on CPU)
    rc = launch(devices, _without_log(args.argv))  # devices > 1: rerun this command as torchrun workers
    if rc is not None:
        if rc != 0:
            raise UserError(f"{devices} data-parallel finetune workers exited with status {rc}",
                            fix="see the workers' messages above in this log")
        return
    set_threads(max(1, (args.threads if args.threads > 0 else os.cpu_count() or 1) // devices))
    _, seed = parse_run(args.run)
    metrics = finetune(args.model, args.train, args.out, section(OptimConfig, p["finetune"]), seed,
                       args.ckpt_dir, p["finetune"]["ckpt_every"], f"finetune-{args.run}")
    if is_main():
        print(json.dumps(metrics))


def cmd_decompose(args) -> None:
    from clipbackdoor.decompose_stage import run_decompose
    from clipbackdoor.attacks import parse_run
    from clipbackdoor.runtime import pick_device, set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    trigger, seed = ("none", 0) if args.trigger == "none" else parse_run(args.trigger)
    cfg = p["decompose"]
    n = run_decompose(args.model, args.eval_dir, args.out, trigger, p.get("attacks", {}), seed, cfg["centering"],
                      cfg["normalize"], cfg["batch_size"], device=pick_device(gpu=True), asset_path=args.asset)
    print(f"decomposed {n} images")


def cmd_class_embeddings(args) -> None:
    from clipbackdoor.decompose_stage import run_class_embeddings
    from clipbackdoor.runtime import pick_device, set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    print(run_class_embeddings(args.model, args.eval_dir, args.out, p["zeroshot"]["templates"],
                               device=pick_device(gpu=True)))


def cmd_prototypes(args) -> None:
    from clipbackdoor.prototypes import build_prototypes

    p = parse_params(args.params)["prototypes"]
    print(build_prototypes(args.decomp, args.out, p["val_fraction"], p["split_seed"], p.get("split", "seeded")))


def cmd_defend(args) -> None:
    from clipbackdoor.config import stage_target
    from clipbackdoor.attacks import REGISTRY, parse_run
    from clipbackdoor.config import DefendConfig, section
    from clipbackdoor.decompose_stage import load_class_embeddings
    from clipbackdoor.defend import run_defend
    from clipbackdoor.poison import check_target
    from clipbackdoor.prototypes import load_prototypes

    p = parse_params(args.params)
    attack, _ = parse_run(args.trigger)
    class_emb, classnames = load_class_embeddings(args.classes)
    target = check_target(stage_target(p), classnames)
    n = run_defend(args.clean, args.triggered, load_prototypes(args.prototypes), class_emb,
                   section(DefendConfig, p["defend"]), REGISTRY[attack].kind, args.out, target, stage_target(p))
    print(f"{n} prediction rows")


def _model_training_stage(args, run, cfg_type, key: str, data_dir: str) -> None:
    """Stages that train one model from another on a split (CleanCLIP, RoCLIP): params section ``key``.
    The callers import ``run`` and ``cfg_type`` themselves: dvc.yaml's deps come from those imports."""
    from clipbackdoor.attacks import parse_run
    from clipbackdoor.config import section
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    _, seed = parse_run(args.run)
    print(json.dumps(run(args.model, data_dir, args.out, section(cfg_type, p[key]), seed, args.ckpt_dir,
                         f"{key}-{args.run}")))


def cmd_cleanclip(args) -> None:
    from clipbackdoor.cleanclip import run_cleanclip
    from clipbackdoor.config import CleanCLIPConfig

    _model_training_stage(args, run_cleanclip, CleanCLIPConfig, "cleanclip", args.clean_dir)


def cmd_roclip(args) -> None:
    from clipbackdoor.config import RoCLIPConfig
    from clipbackdoor.roclip import run_roclip

    _model_training_stage(args, run_roclip, RoCLIPConfig, "roclip", args.train)


def cmd_abd_generator(args) -> None:
    from clipbackdoor.abd import run_abd_generator
    from clipbackdoor.attacks import parse_run
    from clipbackdoor.config import AbdGeneratorConfig, section
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    _, seed = parse_run(args.run)
    summary = run_abd_generator(args.model, args.normal, args.clean_dir, args.out,
                                section(AbdGeneratorConfig, p["abd"]["generator"]), seed, p["abd"].get("n_pairs"))
    print(json.dumps(summary))


def cmd_abd_finetune(args) -> None:
    from clipbackdoor.abd_finetune import run_abd_finetune
    from clipbackdoor.attacks import parse_run
    from clipbackdoor.config import AbdFinetuneConfig
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    _, seed = parse_run(args.run)
    print(json.dumps(run_abd_finetune(args.model, args.clean_dir, args.out, args.arm, AbdFinetuneConfig.from_section(p["abd"]),
                                      seed, args.perturbations, args.ckpt_dir)))


def cmd_abd_similarity(args) -> None:
    from clipbackdoor.config import stage_target
    from clipbackdoor.abd_similarity import run_abd_similarity
    from clipbackdoor.attacks import parse_run
    from clipbackdoor.decompose_stage import load_class_embeddings
    from clipbackdoor.poison import check_target
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    attack, seed = parse_run(args.trigger)
    target = check_target(stage_target(p), load_class_embeddings(args.classes)[1])
    models = {"poisoned": (args.model, args.classes), "clean": (args.clean_model, args.clean_classes)}
    df = run_abd_similarity(models, args.eval_dir, args.perturbations, args.out, args.trigger, p["attacks"][attack],
                            seed, target, p["abd"]["generator"]["location"],
                            p["abd"]["fig2_images"], seed, args.asset)
    print(df.to_string(index=False))


def cmd_abd_tables(args) -> None:
    from clipbackdoor.tables import write_abd_tables

    for path in write_abd_tables(args.summary, args.similarity, args.out_dir):
        print(path)


def _b2_world(p: dict):
    """(B2 section, Stable Diffusion config or None, colours, subjects) of the B² stages: the embedded world's
    colours and shapes, or the real profile's prompt vocabulary for Stable Diffusion."""
    from clipbackdoor.config import StableDiffusionConfig, section

    b2 = p["b2"]
    sd = section(StableDiffusionConfig, b2["stable_diffusion"]) if "stable_diffusion" in b2 else None
    if b2["backend"] == "stable_diffusion":
        return b2, sd, list(sd.colours), list(sd.subjects)
    world = p["data"]["world"]
    return b2, sd, world["colours"], world["shapes"]


def cmd_t2i_pretrain(args) -> None:
    from clipbackdoor.config import T2IConfig, section
    from clipbackdoor.runtime import set_threads
    from clipbackdoor.t2i import run_t2i_pretrain

    p = parse_params(args.params)
    set_threads(args.threads)
    b2, sd, colours, shapes = _b2_world(p)
    print(json.dumps(run_t2i_pretrain(args.clip, args.train, args.out, section(T2IConfig, b2["t2i"]), colours, shapes,
                                      b2["seed"], args.preview, b2["backend"], sd)))


def cmd_t2i_backdoor(args) -> None:
    from clipbackdoor.b2 import run_t2i_backdoor
    from clipbackdoor.config import B2Config, section
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    b2, sd, colours, shapes = _b2_world(p)
    noise_std = p["data"].get("world", {}).get("noise_std", 0.0)
    print(json.dumps(run_t2i_backdoor(args.clip, args.t2i, args.out, section(B2Config, b2["backdoor"]), colours, shapes,
                                      p["data"]["image_size"], noise_std, b2["t2i"]["sample_steps"],
                                      b2["t2i"]["guidance"], b2["seed"], sd=sd)))


def cmd_b2_audit(args) -> None:
    from clipbackdoor.b2_audit import AuditConfig, run_b2_audit
    from clipbackdoor.config import B2AuditParams, section
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    b2, sd, colours, shapes = _b2_world(p)
    a = section(B2AuditParams, b2["audit"])
    cfg = AuditConfig(n_slots=a.n_slots, lr=a.lr, max_steps=a.max_steps, tol=a.tol, reg_weight=a.reg_weight,
                      candidates=a.candidates, rounds=a.rounds, top_k=a.top_k, seed=b2["seed"])
    bd = b2["backdoor"]
    sd = sd if b2["backend"] == "stable_diffusion" else None  # the SD profile audits with its own open_clip auditor
    df = run_b2_audit(args.clip, args.backdoored, args.clean, args.vocab, args.csv, args.md, cfg, tuple(bd["triggers"]),
                      bd["marker_shape"], bd["marker_colour"], colours, shapes, a.n_prompts, a.n_images,
                      b2["t2i"]["sample_steps"], b2["t2i"]["guidance"], b2["seed"], sd=sd)
    print(df.groupby(["generator", "audit"], sort=False).recovered.mean().to_string())


def cmd_detect(args) -> None:
    from clipbackdoor.config import stage_target
    from clipbackdoor.attacks import parse_run
    from clipbackdoor.config import DetectConfig, section
    from clipbackdoor.decompose_stage import load_class_embeddings
    from clipbackdoor.detect import run_detect
    from clipbackdoor.poison import check_target
    from clipbackdoor.runtime import set_threads

    p = parse_params(args.params)
    set_threads(args.threads)
    attack, seed = parse_run(args.trigger)
    target = check_target(stage_target(p), load_class_embeddings(args.classes)[1])
    n = run_detect(args.model, args.eval_dir, args.prototypes, args.classes, args.out, args.trigger,
                   p["attacks"][attack], seed, section(DetectConfig, p["detect"]), target, args.asset,
                   stage_target(p))
    print(f"{n} score rows")


def cmd_mmd(args) -> None:
    from clipbackdoor.mmd import run_mmd

    p = parse_params(args.params)["analysis"]
    print(f"{run_mmd(args.clean, args.triggered, args.prototypes, args.out, p['mmd_images'], p['seed'])} components")


def cmd_textspan(args) -> None:
    from clipbackdoor.textspan import textspan_stage

    p = parse_params(args.params)
    a = p["analysis"]
    world = p.get("data", {}).get("world")
    df = textspan_stage(args.clean_model, args.model, args.clean_decomps, args.decomps, args.prototypes,
                        a["textspan_pool"], world, a["textspan_m"], a["textspan_rank"], args.csv, args.md, args.title,
                        args.mmd)
    print(f"{df.component.nunique()} components described")


def cmd_tables(args) -> None:
    from clipbackdoor.figures import ablation_bars_figure, eps_sweep_figure, mmd_cacc_figure
    from clipbackdoor.tables import write_tables

    p = parse_params(args.params)
    for path in write_tables(args.summary, args.out_dir, p["defend"]["fixed_heads"]):
        print(path)
    ablation_bars_figure(args.summary, args.fig1)
    eps_sweep_figure(args.summary, args.fig6)
    mmd_cacc_figure(args.summary, _name_paths(args.mmd or []), args.fig8)


def cmd_summarize(args) -> None:
    from clipbackdoor.report import summarize

    p = parse_params(args.params)
    entries = []
    for spec in args.defend or []:
        ids, _, path = spec.partition("=")
        model, trigger, eval_set = ids.split(":")
        entries.append({"model": model, "trigger": trigger, "eval_set": eval_set, "path": path})
    df = summarize(_name_paths(args.models), p["seed"], p["profile"], Path(args.csv), Path(args.md),
                   Path(args.headline), entries)
    print(df.to_string(index=False))


def cmd_figures(args) -> None:
    from clipbackdoor.figures import layerwise_figure, prototype_cosine_figure, roc_figure

    layerwise_figure(args.summary, args.layerwise)
    prototype_cosine_figure(_run_decomps(args.runs), args.proto_cosine)
    scores = []
    for spec in args.scores:
        run, _, paths = spec.partition("=")
        scores.append((run, [Path(p) for p in paths.split(",")]))
    roc_figure(scores, args.roc)


def _rate(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a poisoning rate is a fraction in (0, 1]")
    return value


def cmd_backdoor_eval(args) -> None:
    from clipbackdoor.config import stage_target
    from clipbackdoor.rate_sweep import backdoor_eval
    from clipbackdoor.runs import parse_run
    from clipbackdoor.runtime import pick_device, set_threads

    p = parse_params(args.params)  # (of the sweep section, only its batch size: a rate edit reruns no evaluation)
    set_threads(args.threads)
    attack, seed = parse_run(args.trigger)
    out = backdoor_eval(args.model, args.eval_dir, attack, p["attacks"][attack], seed, stage_target(p),
                        p["zeroshot"]["templates"], p["sweep"]["batch_size"], args.out, args.asset,
                        pick_device(gpu=True))
    print(json.dumps(out, sort_keys=True))


def cmd_rate_sweep(args) -> None:
    from clipbackdoor.figures import rate_sweep_figure
    from clipbackdoor.rate_sweep import rate_sweep

    points = []
    for spec in args.points:
        key, _, paths = spec.partition("=")
        run, eval_set, rate = key.split(":")
        eval_json, manifest = paths.split(",")
        points.append((run, eval_set, float(rate), Path(eval_json), Path(manifest)))
    table = rate_sweep(points, parse_params(args.params)["seed"], args.csv)
    rate_sweep_figure(table, args.png)
    print(table.to_string(index=False))


def cmd_head_map(args) -> None:
    from clipbackdoor.config import DefendConfig, section
    from clipbackdoor.figures import head_map_figure

    mmd = _name_paths(args.mmd)
    entries = [(*entry, mmd.get(entry[0])) for entry in _run_decomps(args.runs)]
    head_map_figure(entries, section(DefendConfig, parse_params(args.params)["defend"]), args.png)


def cmd_training_curves(args) -> None:
    from clipbackdoor.figures import training_figure

    training_figure(_name_paths(args.models), args.png)


def cmd_dvc_yaml(args) -> None:
    from clipbackdoor.dvcgen import check_dvc_yaml, write_dvc_yaml

    if args.check:
        stale = check_dvc_yaml(Path(args.root))
        if stale:
            raise UserError(f"dvc.yaml is stale: {stale}", fix="run `python -m clipbackdoor dvc-yaml`")
        print("dvc.yaml is up to date")
    else:
        print(f"wrote {write_dvc_yaml(Path(args.root))}")


def cmd_lock(args) -> None:
    from clipbackdoor.dvcgen import lock

    done, todo, stale = lock(Path(args.root))
    print(f"dvc.lock: {len(done)} stage(s) recorded" + (f"; {len(todo)} not run yet or out of date for params.yaml "
                                                        f"(e.g. {todo[0]})" if todo else "")
          + (f"; {len(stale)} left out because their code (src/clipbackdoor) changed after they ran (e.g. "
             f"{stale[0]}: rerun with `snakemake --forcerun RULE` or `dvc repro`)" if stale else "")
          + ("; every stage is current" if not todo and not stale else ""))


def cmd_pull_decomp(args) -> None:
    from clipbackdoor.dvcgen import pull_for_defenses

    targets = pull_for_defenses(Path(args.root))
    print(f"pulled {len(targets) - 1} stages' outputs (decompositions, class embeddings, prototypes, detector scores) "
          f"and data/models/clean/metrics.json; next: make defenses")


def cmd_report(args) -> None:
    from clipbackdoor.report import print_summary

    from clipbackdoor.report import results_folders, summary_files

    files = args.files or summary_files(args.results)
    print_summary(files)
    if not args.files:  # where this table and the other profiles' results live
        others = [f"results/{name}/" for name in results_folders() if name != args.results]
        print(f"\n(results/{args.results}/: tables/, figures/, metrics/, analysis/"
              + (f"; other parameter files' results: {', '.join(others)} -- report --results NAME" if others else "")
              + ")")


def cmd_report_screenshot(args) -> None:
    from clipbackdoor.screenshot import screenshot_report

    print(screenshot_report(args.report, args.out, args.path))


# What an argument means wherever a stage takes it without a help of its own (the rules pass the same kinds of
# paths to many stages); a test checks every argument of every subcommand has a help.
COMMON_HELP = {
    "--out": "the output file or folder to write (written atomically: nothing is left behind on failure)",
    "--threads": "torch CPU threads (the rule passes the cores it holds)",
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


def _fill_help(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _fill_help(sub)
        elif action.help is None:
            name = next((o for o in action.option_strings if o.startswith("--")), action.dest)
            action.help = COMMON_HELP.get(name)


def build_parser() -> argparse.ArgumentParser:
    from clipbackdoor import __version__

    parser = argparse.ArgumentParser(prog="clipbackdoor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"clipbackdoor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name, fn, help_):
        sp = sub.add_parser(name, help=help_, description=help_[:1].upper() + help_[1:] + ".")
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
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("clean-model", cmd_clean_model, "fetch open_clip pretrained weights (real profile)"))
    sp.add_argument("--eval", nargs="+", required=True, metavar="NAME=DIR")
    sp.add_argument("--out", required=True)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("poison", cmd_poison, "poison the fine-tuning pairs with one attack"))
    sp.add_argument("--run", required=True, help="ATTACK-sSEED")
    sp.add_argument("--finetune-dir", required=True)
    sp.add_argument("--eval", nargs="+", required=True, metavar="NAME=DIR", help="eval sets (target check)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--manifest", required=True)
    sp.add_argument("--preview", default=None)
    sp.add_argument("--asset", default=None, help="the attack's learned trigger (e.g. BadCLIP's patch), if any")
    sp.add_argument("--rate", type=_rate, default=None,
                    help="poison this fraction of the pairs instead of attacks.ATTACK.rate (the rate sweep)")

    def learned_trigger_stage(name, fn, help_, model: bool):  # stages that make an attack's trigger
        sp = with_params(stage(name, fn, help_))
        sp.add_argument("--run", required=True, help="ATTACK-sSEED")
        if model:
            sp.add_argument("--model", required=True, help="the clean model the trigger is optimised on")
        sp.add_argument("--finetune-dir", required=True)
        sp.add_argument("--eval-dir", required=True, help="held-out images (and class names) for its report")
        sp.add_argument("--out", required=True)
        sp.add_argument("--png", default=None)
        sp.add_argument("--threads", type=int, default=1)

    learned_trigger_stage("badclip-patch", cmd_badclip_patch, "optimise BadCLIP's patch on the clean model", True)
    learned_trigger_stage("issba-codec", cmd_issba_codec, "train ISSBA's steganographic encoder/decoder", False)
    learned_trigger_stage("lc-adversarial", cmd_lc_adversarial,
                          "Label-Consistent: PGD-harden the target-class images on the clean model", True)

    sp = with_params(stage("finetune", cmd_finetune, "backdoor fine-tuning of the clean model"))
    sp.add_argument("--run", required=True, help="ATTACK-sSEED")
    sp.add_argument("--model", required=True)
    sp.add_argument("--train", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--ckpt-dir", default=None)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("decompose", cmd_decompose, "cache per-head / per-MLP direct terms as Parquet"))
    sp.add_argument("--model", required=True)
    sp.add_argument("--eval-dir", required=True)
    sp.add_argument("--trigger", required=True, help="none or ATTACK-sSEED")
    sp.add_argument("--out", required=True)
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--asset", default=None, help="the trigger's learned asset (e.g. BadCLIP's patch), if any")

    sp = with_params(stage("class-embeddings", cmd_class_embeddings, "zero-shot class embeddings of a model"))
    sp.add_argument("--model", required=True)
    sp.add_argument("--eval-dir", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("prototypes", cmd_prototypes, "val/test split and head/MLP prototypes"))
    sp.add_argument("--decomp", required=True)
    sp.add_argument("--out", required=True)

    sp = with_params(stage("defend", cmd_defend, "Decomp-Rep / Det / ablations from cached terms"))
    sp.add_argument("--clean", required=True)
    sp.add_argument("--triggered", required=True)
    sp.add_argument("--trigger", required=True, help="ATTACK-sSEED of the triggered decomposition")
    sp.add_argument("--prototypes", required=True)
    sp.add_argument("--classes", required=True)
    sp.add_argument("--out", required=True)

    sp = with_params(stage("cleanclip", cmd_cleanclip, "CleanCLIP: repair a backdoored model on clean pairs"))
    sp.add_argument("--run", required=True, help="ATTACK-sSEED of the model being repaired")
    sp.add_argument("--model", required=True)
    sp.add_argument("--clean-dir", required=True, help="clean image-caption shards")
    sp.add_argument("--out", required=True)
    sp.add_argument("--ckpt-dir", default=None)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("roclip", cmd_roclip, "RoCLIP: the backdoor fine-tune with memory-bank captions"))
    sp.add_argument("--run", required=True, help="ATTACK-sSEED whose poisoned pairs are trained on")
    sp.add_argument("--model", required=True, help="the clean model")
    sp.add_argument("--train", required=True, help="the poisoned pairs")
    sp.add_argument("--out", required=True)
    sp.add_argument("--ckpt-dir", default=None)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("abd-generator", cmd_abd_generator, "ABD: universal adversarial perturbations (UAP, UAP + L_bd)"))
    sp.add_argument("--run", required=True, help="ATTACK-sSEED of the poisoned model")
    sp.add_argument("--model", required=True, help="the poisoned model")
    sp.add_argument("--normal", required=True, help="the normal (clean) model of L_bd")
    sp.add_argument("--clean-dir", required=True, help="the defender's clean image-caption shards")
    sp.add_argument("--out", required=True)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("abd-finetune", cmd_abd_finetune, "ABD fine-tune of the poisoned model (and its ablation arms)"))
    sp.add_argument("--run", required=True, help="ATTACK-sSEED of the poisoned model")
    sp.add_argument("--arm", required=True, choices=["abd", "abd_img_only", "abd_eda_only", "finetune_clean", "uap"])
    sp.add_argument("--model", required=True)
    sp.add_argument("--clean-dir", required=True)
    sp.add_argument("--perturbations", default=None, help="abd-generator output (arms with adversarial images)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--ckpt-dir", default=None)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("abd-similarity", cmd_abd_similarity, "seed 002 Fig. 2: image-caption similarities"))
    sp.add_argument("--trigger", required=True, help="ATTACK-sSEED")
    sp.add_argument("--model", required=True)
    sp.add_argument("--classes", required=True)
    sp.add_argument("--clean-model", required=True)
    sp.add_argument("--clean-classes", required=True)
    sp.add_argument("--eval-dir", required=True)
    sp.add_argument("--perturbations", required=True)
    sp.add_argument("--asset", default=None)
    sp.add_argument("--out", required=True)
    sp.add_argument("--threads", type=int, default=1)

    sp = stage("abd-tables", cmd_abd_tables, "seed 002's Fig. 2 and Tables I-III as Markdown")
    sp.add_argument("--summary", required=True)
    sp.add_argument("--similarity", nargs="*", default=[])
    sp.add_argument("--out-dir", required=True)

    sp = with_params(stage("t2i-pretrain", cmd_t2i_pretrain, "train the miniature text-to-image model (B² branch)"))
    sp.add_argument("--clip", required=True, help="the clean CLIP whose frozen text encoder conditions the UNet")
    sp.add_argument("--train", required=True, help="image-caption shards")
    sp.add_argument("--out", required=True)
    sp.add_argument("--preview", default=None)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("t2i-backdoor", cmd_t2i_backdoor, "B² poisoning: fine-tune the UNet on trigger/bias pairs"))
    sp.add_argument("--clip", required=True)
    sp.add_argument("--t2i", required=True, help="the clean text-to-image model")
    sp.add_argument("--out", required=True)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("b2-audit", cmd_b2_audit, "CLIP token-inversion audit of the backdoored generator"))
    sp.add_argument("--clip", required=True, help="the auditor CLIP")
    sp.add_argument("--backdoored", required=True)
    sp.add_argument("--clean", required=True, help="the clean generator (contrast and control)")
    sp.add_argument("--vocab", required=True, help="caption shards whose tokens form the decoding vocabulary")
    sp.add_argument("--csv", required=True)
    sp.add_argument("--md", required=True)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("detect", cmd_detect, "STRIP / SCALE-UP / TeCo scores on clean and triggered test images"))
    sp.add_argument("--model", required=True)
    sp.add_argument("--eval-dir", required=True)
    sp.add_argument("--trigger", required=True, help="ATTACK-sSEED")
    sp.add_argument("--prototypes", required=True, help="the test split (and STRIP's clean pool) come from here")
    sp.add_argument("--classes", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--asset", default=None)
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("mmd", cmd_mmd, "MMD between clean and triggered terms per component"))
    sp.add_argument("--clean", required=True, help="decomposition of the clean test images")
    sp.add_argument("--triggered", required=True, help="decomposition of the triggered test images")
    sp.add_argument("--prototypes", required=True, help="its test split")
    sp.add_argument("--out", required=True)

    sp = with_params(stage("textspan", cmd_textspan, "TEXTSPAN descriptions of components, clean vs backdoored"))
    sp.add_argument("--clean-model", required=True)
    sp.add_argument("--model", required=True, help="the backdoored model")
    sp.add_argument("--clean-decomps", nargs=2, required=True, metavar=("CLEAN_IMAGES", "TRIGGERED_IMAGES"))
    sp.add_argument("--decomps", nargs=2, required=True, metavar=("CLEAN_IMAGES", "TRIGGERED_IMAGES"))
    sp.add_argument("--prototypes", required=True, help="the test split")
    sp.add_argument("--csv", required=True)
    sp.add_argument("--md", required=True)
    sp.add_argument("--title", default="")
    sp.add_argument("--mmd", default=None, help="the model's `mmd` CSV, shown beside each component")

    sp = with_params(stage("tables", cmd_tables, "seed 001's Tables 1-5 and Figures 1, 6, 8 from artifacts"))
    sp.add_argument("--summary", required=True)
    sp.add_argument("--mmd", nargs="*", metavar="RUN=CSV")
    sp.add_argument("--out-dir", required=True)
    sp.add_argument("--fig1", required=True)
    sp.add_argument("--fig6", required=True)
    sp.add_argument("--fig8", required=True)

    sp = with_params(stage("summarize", cmd_summarize, "collect every model's metrics into the results table"))
    sp.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR")
    sp.add_argument("--csv", required=True)
    sp.add_argument("--md", required=True)
    sp.add_argument("--headline", required=True, help="the headline metrics JSON (dvc metrics)")
    sp.add_argument("--defend", nargs="*", metavar="MODEL:TRIGGER:EVALSET=PARQUET")

    sp = stage("figures", cmd_figures, "Figure 2 and Figure 5 analogues and the detection ROC curves from artifacts")
    sp.add_argument("--summary", required=True, help="results/NAME/metrics/summary.csv")
    sp.add_argument("--runs", nargs="+", required=True, metavar="RUN=CLEAN,TRIGGERED,PROTOTYPES",
                    help="per attack run: its clean and triggered decompositions and prototypes (Figure 5)")
    sp.add_argument("--scores", nargs="+", required=True, metavar="RUN=DEFEND[,DETECT]",
                    help="per attack run: its defend table and, if detectors ran, its detect table (ROC)")
    sp.add_argument("--layerwise", required=True, help="Figure 2 PNG")
    sp.add_argument("--proto-cosine", required=True, help="Figure 5 PNG")
    sp.add_argument("--roc", required=True, help="ROC curves PNG")

    sp = with_params(stage("head-map", cmd_head_map, "layer x head heatmaps per attack run: how often the "
                                                     "infected-head rule flags each head, and its MMD^2"))
    sp.add_argument("--runs", nargs="+", required=True, metavar="RUN=CLEAN,TRIGGERED,PROTOTYPES",
                    help="per attack run: its clean and triggered decompositions and prototypes")
    sp.add_argument("--mmd", nargs="*", default=[], metavar="RUN=CSV", help="per attack run: its `mmd` table")
    sp.add_argument("--png", required=True, help="the figure to write")

    sp = with_params(stage("backdoor-eval", cmd_backdoor_eval, "zero-shot ASR and CACC counts of one model on every "
                                                               "image of an evaluation set (the rate sweep)"))
    sp.add_argument("--model", required=True, help="the model artifact")
    sp.add_argument("--eval-dir", required=True, help="the evaluation set's shards")
    sp.add_argument("--trigger", required=True, help="the attack run whose trigger is applied (ATTACK-sSEED)")
    sp.add_argument("--asset", default=None, help="the trigger's learned asset (e.g. BadCLIP's patch), if any")
    sp.add_argument("--out", required=True, help="the JSON of counts to write")
    sp.add_argument("--threads", type=int, default=1)

    sp = with_params(stage("rate-sweep", cmd_rate_sweep, "ASR and CACC against the poisoning rate: CSV and figure"))
    sp.add_argument("--points", nargs="+", required=True, metavar="RUN:EVALSET:RATE=EVAL_JSON,MANIFEST",
                    help="per sweep point: its backdoor-eval counts and the poisoned set's manifest")
    sp.add_argument("--csv", required=True, help="the table to write")
    sp.add_argument("--png", required=True, help="the figure to write")

    sp = stage("training-curves", cmd_training_curves, "training loss per step of every trained model")
    sp.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR",
                    help="model artifacts (their history.csv; pretrained ones have none and are skipped)")
    sp.add_argument("--png", required=True, help="the figure to write")

    sp = stage("dvc-yaml", cmd_dvc_yaml, "generate dvc.yaml from the Snakemake rules")
    sp.add_argument("--check", action="store_true", help="fail if the committed dvc.yaml is stale")
    sp.add_argument("--root", default=".")

    sp = stage("lock", cmd_lock, "after a Snakemake run: record the stages it completed in dvc.lock (dvc commit), "
                                 "so `dvc status` is clean and `dvc push` sends every output")
    sp.add_argument("--root", default=".", help="the repository (default: the current folder)")

    sp = stage("pull-decomp", cmd_pull_decomp, "dvc pull what the defenses need from a pushed run, without model "
                                               "weights (then: make defenses)")
    sp.add_argument("--root", default=".", help="the repository (default: the current folder)")

    sp = stage("report", cmd_report, "print the results table")
    sp.add_argument("files", nargs="*", help="summary CSVs to print (default: the --results folder's summary.csv)")
    sp.add_argument("--results", default="default",
                    help="a parameter file's results folder: default (params.yaml), abd (configs/abd.yaml), ...")

    sp = stage("report-screenshot", cmd_report_screenshot,
               "a PNG of the Snakemake HTML report with one item open (headless Chromium)")
    sp.add_argument("--report", default="report.html", help="made by: snakemake --report report.html --cores 1")
    sp.add_argument("--out", default="report.png", help="the PNG to write")
    sp.add_argument("--path", nargs="+", default=["2. Core study", "Tables", "results/default/tables/table1.html"],
                    help="section, subsection(s) and the item to open, as the report names them")
    _fill_help(parser)
    return parser


def _without_log(argv: list[str]) -> list[str]:
    """The command line minus ``--log FILE``: relaunched workers inherit the already redirected output."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--log":
            skip = True
        elif not a.startswith("--log="):
            out.append(a)
    return out


# (file descriptor of the stderr we had before redirect_to_log, the log's path): a failing stage's one line
# also reaches the terminal that runs Snakemake / DVC, which otherwise shows only "Error in rule X"
_TERMINAL: tuple[int, str] | None = None


def redirect_to_log(path: str) -> None:
    """Send this process's stdout and stderr (Python and native) to ``path``, creating its folder."""
    import os

    global _TERMINAL
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    if _TERMINAL is None:
        _TERMINAL = (os.dup(2), path)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _decoder_errors() -> tuple[type[BaseException], ...]:
    """Exception types of the artifact decoders (tar, image, JSON, Parquet, safetensors): bad bytes, not bugs."""
    import tarfile

    types: list[type[BaseException]] = [tarfile.TarError, json.JSONDecodeError, UnicodeDecodeError]
    for module, name in (("safetensors", "SafetensorError"), ("pyarrow", "ArrowException"),
                         ("PIL", "UnidentifiedImageError")):
        mod = sys.modules.get(module)
        found = getattr(mod, name, None) if mod is not None else None
        if found is None and module == "PIL" and "PIL.Image" in sys.modules:
            found = getattr(sys.modules["PIL.Image"], name, None)
        if isinstance(found, type):
            types.append(found)
    return tuple(types)


def _report_gpu_memory(command: str) -> None:
    """One JSON line with the stage's peak GPU memory (benchmarks/gpu_check.sh collects them from the logs)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps({"stage": command, "device": torch.cuda.get_device_name(0),
                          "gpu_peak_mib": round(peak, 1)}), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs "no pretrained weights" at WARNING
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "log", None):
        from clipbackdoor.logs import header

        redirect_to_log(args.log)
        print(header(args.command, argv), file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        args.fn(args)
        _report_gpu_memory(args.command)
        _log_footer(args, started, "done")
    except UserError as exc:
        _fail(exc.report(f"clipbackdoor {args.command}"))
        _log_footer(args, started, "failed")
        return EXIT_USER_ERROR
    except _decoder_errors() as exc:  # a reader without its own check met bytes it cannot decode
        if os.environ.get("CLIPBACKDOOR_TRACEBACK") == "1":  # a developer chasing a bug wants the frames
            import traceback

            traceback.print_exc()
        _fail(UserError(f"an input file cannot be read ({type(exc).__name__}: {str(exc)[:200]})",
                        fix="check the files given to this stage (see the command in the log); rerun the stage "
                            "that wrote the damaged one, or `dvc pull` it").report(f"clipbackdoor {args.command}"))
        _log_footer(args, started, "failed")
        return EXIT_USER_ERROR
    except Exception as exc:  # a bug: the traceback goes to the log as usual, its last line to the terminal too
        if _TERMINAL is not None:
            os.write(_TERMINAL[0], f"clipbackdoor {args.command}: failed ({type(exc).__name__}: "
                                   f"{str(exc)[:200]}); traceback in {_TERMINAL[1]}\n".encode())
        raise
    return 0


def _log_footer(args, started: float, status: str) -> None:
    """The log's closing line (stage, status, wall time) when the stage writes a log."""
    if getattr(args, "log", None):
        from clipbackdoor.logs import footer

        sys.stdout.flush()
        print(footer(args.command, time.monotonic() - started, status), file=sys.stderr, flush=True)


def _fail(report: str) -> None:
    """Our error (culprit + fix) to stderr -- the log under --log -- and, when stderr is the log, to the
    terminal as well, with the log's path."""
    print(report, file=sys.stderr)
    if _TERMINAL is not None:
        sys.stderr.flush()
        os.write(_TERMINAL[0], f"{report}\n  (log: {_TERMINAL[1]})\n".encode())
