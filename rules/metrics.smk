# Results: one summary table over every model the profile produces.


rule summary:
    input:
        models=["data/models/clean"],
    output:
        csv="results/metrics/summary.csv",
        md="results/metrics/summary.md",
        json="results/metrics/summary.json",
    params:
        cfg=stage_params("seed", "profile"),
        models="clean=data/models/clean",
    log:
        log_path("summary"),
    benchmark:
        bench_path("summary")
    shell:
        "python -m clipbackdoor summarize --params {params.cfg:q} --models {params.models}"
        " --csv {output.csv} --md {output.md} --json {output.json} --log {log}"
