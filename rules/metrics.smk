# Results: one summary table over every model, attack, seed and defense setting.


rule summary:
    input:
        models=["data/models/clean"],
        defend=list(DEFEND_OUTPUTS.values()),
    output:
        csv="results/metrics/summary.csv",
        md="results/metrics/summary.md",
        json="results/metrics/summary.json",
    params:
        cfg=stage_params("seed", "profile"),
        models="clean=data/models/clean",
        defend=" ".join(f"{k}={v}" for k, v in DEFEND_OUTPUTS.items()),
    log:
        log_path("summary"),
    benchmark:
        bench_path("summary")
    shell:
        "python -m clipbackdoor summarize --params {params.cfg:q} --models {params.models}"
        " --defend {params.defend} --csv {output.csv} --md {output.md} --json {output.json} --log {log}"
