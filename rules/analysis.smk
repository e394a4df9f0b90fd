# Analyses of seed 001 on cached artifacts: MMD and TEXTSPAN per attacked model, then the paper's tables and
# the figures not made by `figures` (1, 6, 8).

ANALYSIS = "analysis" in config


def mmd_path(run, evalset):
    return f"{RESULTS}/analysis/mmd/{run}_{evalset}.csv"


rule mmd:
    input:
        clean=decomp_path("{run}", "{evalset}", "none"),
        triggered=decomp_path("{run}", "{evalset}", "{run}"),
        prototypes="data/prototypes/{run}/{evalset}.safetensors",
    output:
        mmd_path("{run}", "{evalset}"),
    params:
        cfg=stage_params("analysis"),
    resources:
        mem_mb=mem_mb("mmd"),
        runtime=runtime("mmd"),
    log:
        log_path("mmd_{run}_{evalset}"),
    benchmark:
        bench_path("mmd_{run}_{evalset}")
    shell:
        "python -m clipbackdoor mmd --params {params.cfg:q} --clean {input.clean} --triggered {input.triggered}"
        " --prototypes {input.prototypes} --out {output} --log {log}"


rule textspan:
    input:
        clean_model="data/models/clean",
        model="data/models/{run}",
        clean_decomps=[decomp_path("clean", "{evalset}", "none"), decomp_path("clean", "{evalset}", "{run}")],
        decomps=[decomp_path("{run}", "{evalset}", "none"), decomp_path("{run}", "{evalset}", "{run}")],
        prototypes="data/prototypes/{run}/{evalset}.safetensors",
        mmd=mmd_path("{run}", "{evalset}"),
        # a pool file is an input: a missing file fails before any job, an edit reruns TEXTSPAN
        pool=lambda wc: [] if config["analysis"]["textspan_pool"] == "embedded" else [config["analysis"]["textspan_pool"]],
    output:
        csv=RESULTS + "/analysis/textspan/{run}_{evalset}.csv",
        md=RESULTS + "/analysis/textspan/{run}_{evalset}.md",
        html=report_item(RESULTS + "/analysis/textspan/{run}_{evalset}.html", "analyses", "textspan", "TEXTSPAN"),
    params:
        cfg=lambda wc: params_json("analysis", *(["data.world"] if EMBEDDED else [])),
    threads: JOB_THREADS
    resources:
        mem_mb=mem_mb("textspan"),
        runtime=runtime("textspan"),
    log:
        log_path("textspan_{run}_{evalset}"),
    benchmark:
        bench_path("textspan_{run}_{evalset}")
    shell:
        "python -m clipbackdoor textspan --params {params.cfg:q} --clean-model {input.clean_model}"
        " --model {input.model} --clean-decomps {input.clean_decomps} --decomps {input.decomps}"
        " --prototypes {input.prototypes} --mmd {input.mmd} --csv {output.csv} --md {output.md}"
        " --title {wildcards.run:q} --log {log}"


rule tables:
    input:
        summary=RESULTS + "/metrics/summary.csv",
        mmd=[mmd_path(r, run_eval(r)) for r in RUNS] if ANALYSIS else [],
    output:
        tables=[f for i in range(1, 6) for f in table_outputs(f"{RESULTS}/tables/table{i}", "baselines" if i == 2 else "core")],
        fig1=report_item(RESULTS + "/figures/fig1_ablate_all.png", "core", "fig_ablate_all", "Figures"),
        fig6=report_item(RESULTS + "/figures/fig6_eps_sweep.png", "core", "fig_eps_sweep", "Figures"),
        fig8=report_item(RESULTS + "/figures/fig8_cacc_mmd.png", "analyses", "fig_mmd", "MMD"),
    params:
        cfg=stage_params("defend.fixed_heads"),
        mmd=[f"{r}={mmd_path(r, run_eval(r))}" for r in RUNS] if ANALYSIS else [],
        out_dir=RESULTS + "/tables",
    resources:
        mem_mb=mem_mb("tables"),
        runtime=runtime("tables"),
    log:
        log_path("tables"),
    benchmark:
        bench_path("tables")
    shell:
        "python -m clipbackdoor tables --params {params.cfg:q} --summary {input.summary} --mmd {params.mmd:q}"
        " --out-dir {params.out_dir:q} --fig1 {output.fig1} --fig6 {output.fig6} --fig8 {output.fig8} --log {log}"
