# Datasets: the embedded world (default) or the real CC3M / ImageFolder sets, all in one shard layout.

if EMBEDDED:

    rule world:
        output:
            train=directory("data/datasets/train"),
            eval=directory(eval_dir("world")),
            preview=report_item("results/shared/world/preview.png", "attacks", "world_preview"),
        params:
            cfg=stage_params("data.world", "data.image_size"),
        resources:
            mem_mb=mem_mb("world"),
            runtime=runtime("world"),
        log:
            log_path("world"),
        benchmark:
            bench_path("world")
        shell:
            "python -m clipbackdoor world --params {params.cfg:q} --train-out {output.train}"
            " --eval-out {output.eval} --preview {output.preview} --log {log}"

else:

    rule cc3m:
        output:
            directory("data/datasets/train"),
        params:
            cfg=stage_params("data.webdataset"),  # images kept as downloaded: not data.image_size
        resources:
            mem_mb=mem_mb("cc3m"),
            runtime=runtime("cc3m"),
        log:
            log_path("cc3m"),
        benchmark:
            bench_path("cc3m")
        shell:
            "python -m clipbackdoor cc3m --params {params.cfg:q} --out {output} --log {log}"

    rule eval_data:
        output:
            directory(eval_dir("{evalset}")),
        wildcard_constraints:
            evalset="|".join(EVAL_SETS),
        params:
            cfg=lambda wc: params_json(f"data.eval_sets.{wc.evalset}", "data.image_size", "zeroshot.templates", "seed"),
        resources:
            mem_mb=mem_mb("eval_data"),
            runtime=runtime("eval_data"),
        log:
            log_path("eval_data_{evalset}"),
        benchmark:
            bench_path("eval_data_{evalset}")
        shell:
            "python -m clipbackdoor eval-data --params {params.cfg:q} --name {wildcards.evalset}"
            " --out {output} --log {log}"
