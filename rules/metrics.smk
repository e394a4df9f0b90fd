# Results: one summary table over every model, attack, seed and defense setting.


rule summary:
    input:
        models=["data/models/clean"],
        defend=list(DEFEND_OUTPUTS.values()),
        detect=list(DETECT_OUTPUTS.values()),
    output:
        csv=RESULTS + "/metrics/summary.csv",
        md=RESULTS + "/metrics/summary.md",
        html=report_item(RESULTS + "/metrics/summary.html", "core", "summary"),
        headline=RESULTS + "/metrics/headline.json",
    params:
        # + the keys that shape the stage graph: which runs and sets the summary covers (under DVC, an edit of
        # one reaches this stage, which then asks for a regenerated dvc.yaml -- never silently ignored)
        cfg=lambda wc: params_json("seed", "profile", *shape_params(config)),
        models="clean=data/models/clean",
        # the same MODEL:TRIGGER:EVALSET key may name a defend and a detect table: a list keeps both
        defend=[f"{k}={v}" for outputs in (DEFEND_OUTPUTS, DETECT_OUTPUTS) for k, v in outputs.items()],
    resources:
        mem_mb=mem_mb("summary"),
        runtime=runtime("summary"),
    log:
        log_path("summary"),
    benchmark:
        bench_path("summary")
    shell:
        "python -m clipbackdoor summarize --params {params.cfg:q} --models {params.models:q}"
        " --defend {params.defend:q} --csv {output.csv} --md {output.md} --headline {output.headline} --log {log}"


# One seed per attack in Figure 5 keeps it readable; Figure 2 averages over seeds.
FIG_EVAL = EVAL_SETS[0]
FIG5_RUNS = [next(r for r in RUNS if attack_of(r) == a and FIG_EVAL in RUN_EVALS[r]) for a in ATTACKS]


def roc_tables(run):
    """The per-image detection scores of a run on FIG_EVAL: its defend table (Decomp-Det) and detect table."""
    key = f"{run}:{run}:{FIG_EVAL}"
    return [DEFEND_OUTPUTS[key]] + ([DETECT_OUTPUTS[key]] if key in DETECT_OUTPUTS else [])


rule figures:
    input:
        summary=RESULTS + "/metrics/summary.csv",
        decomps=[decomp_path(r, FIG_EVAL, t) for r in FIG5_RUNS for t in ("none", r)],
        prototypes=[f"data/prototypes/{r}/{FIG_EVAL}.safetensors" for r in FIG5_RUNS],
        scores=[p for r in FIG5_RUNS for p in roc_tables(r)],
    output:
        layerwise=report_item(RESULTS + "/figures/fig2_layerwise_ablation.png", "core", "fig_layerwise", "Figures"),
        proto_cosine=report_item(RESULTS + "/figures/fig5_prototype_cosine.png", "core", "fig_proto_cosine", "Figures"),
        roc=report_item(RESULTS + "/figures/roc_detectors.png", "baselines", "fig_roc", "Figures"),
    params:
        runs=[
            f"{r}={decomp_path(r, FIG_EVAL, 'none')},{decomp_path(r, FIG_EVAL, r)},data/prototypes/{r}/{FIG_EVAL}.safetensors"
            for r in FIG5_RUNS
        ],
        scores=[f"{r}={','.join(roc_tables(r))}" for r in FIG5_RUNS],
    resources:
        mem_mb=mem_mb("figures"),
        runtime=runtime("figures"),
    log:
        log_path("figures"),
    benchmark:
        bench_path("figures")
    shell:
        "python -m clipbackdoor figures --summary {input.summary} --runs {params.runs:q} --scores {params.scores:q}"
        " --layerwise {output.layerwise} --proto-cosine {output.proto_cosine} --roc {output.roc} --log {log}"


rule head_map:
    input:
        decomps=[decomp_path(r, FIG_EVAL, t) for r in FIG5_RUNS for t in ("none", r)],
        prototypes=[f"data/prototypes/{r}/{FIG_EVAL}.safetensors" for r in FIG5_RUNS],
        mmd=[mmd_path(r, FIG_EVAL) for r in FIG5_RUNS] if ANALYSIS else [],
    output:
        report_item(RESULTS + "/figures/head_map.png", "analyses", "fig_head_map", "Figures"),
    params:
        cfg=stage_params("defend"),
        runs=[
            f"{r}={decomp_path(r, FIG_EVAL, 'none')},{decomp_path(r, FIG_EVAL, r)},data/prototypes/{r}/{FIG_EVAL}.safetensors"
            for r in FIG5_RUNS
        ],
        mmd=[f"{r}={mmd_path(r, FIG_EVAL)}" for r in FIG5_RUNS] if ANALYSIS else [],
    resources:
        mem_mb=mem_mb("head_map"),
        runtime=runtime("head_map"),
    log:
        log_path("head_map"),
    benchmark:
        bench_path("head_map")
    shell:
        "python -m clipbackdoor head-map --params {params.cfg:q} --runs {params.runs:q} --mmd {params.mmd:q}"
        " --png {output} --log {log}"


rule training_curves:
    input:
        [f"data/models/{m}" for m in MODELS],
    output:
        report_item(RESULTS + "/figures/training_loss.png", "core", "fig_training", "Figures"),
    params:
        models=[f"{m}=data/models/{m}" for m in MODELS],
    resources:
        mem_mb=mem_mb("training_curves"),
        runtime=runtime("training_curves"),
    log:
        log_path("training_curves"),
    benchmark:
        bench_path("training_curves")
    shell:
        "python -m clipbackdoor training-curves --models {params.models:q} --png {output} --log {log}"
