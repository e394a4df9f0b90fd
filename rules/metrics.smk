# Results: one summary table over every model, attack, seed and defense setting.


rule summary:
    input:
        models=["data/models/clean"],
        defend=list(DEFEND_OUTPUTS.values()),
        detect=list(DETECT_OUTPUTS.values()),
    output:
        csv="results/metrics/summary.csv",
        md=report("results/metrics/summary.md", category="Results"),
        json="results/metrics/summary.json",
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
        " --defend {params.defend:q} --csv {output.csv} --md {output.md} --json {output.json} --log {log}"


# One seed per attack in Figure 5 keeps it readable; Figure 2 averages over seeds.
FIG_EVAL = EVAL_SETS[0]
FIG5_RUNS = [next(r for r in RUNS if attack_of(r) == a and FIG_EVAL in RUN_EVALS[r]) for a in ATTACKS]


rule figures:
    input:
        summary="results/metrics/summary.csv",
        decomps=[decomp_path(r, FIG_EVAL, t) for r in FIG5_RUNS for t in ("none", r)],
        prototypes=[f"data/prototypes/{r}/{FIG_EVAL}.safetensors" for r in FIG5_RUNS],
    output:
        layerwise=report("results/figures/fig2_layerwise_ablation.png", category="Figures"),
        proto_cosine=report("results/figures/fig5_prototype_cosine.png", category="Figures"),
    params:
        runs=[
            f"{r}={decomp_path(r, FIG_EVAL, 'none')},{decomp_path(r, FIG_EVAL, r)},data/prototypes/{r}/{FIG_EVAL}.safetensors"
            for r in FIG5_RUNS
        ],
    resources:
        mem_mb=mem_mb("figures"),
        runtime=runtime("figures"),
    log:
        log_path("figures"),
    benchmark:
        bench_path("figures")
    shell:
        "python -m clipbackdoor figures --summary {input.summary} --runs {params.runs:q}"
        " --layerwise {output.layerwise} --proto-cosine {output.proto_cosine} --log {log}"
