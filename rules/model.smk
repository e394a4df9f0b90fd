# The clean CLIP: trained from scratch on the embedded world, or open_clip pretrained weights.

if FROM_SCRATCH:

    rule pretrain:
        input:
            train="data/datasets/train",
            evals=[eval_dir(n) for n in EVAL_SETS],
        output:
            directory("data/models/clean"),
        params:
            cfg=stage_params("seed", "model", "pretrain", "zeroshot"),
            evals=eval_args(),
        threads: TORCH_THREADS
        resources:
            gpu=1,
            mem_mb=mem_mb("pretrain"),
            runtime=runtime("pretrain"),
        log:
            log_path("pretrain"),
        benchmark:
            bench_path("pretrain")
        shell:
            "python -m clipbackdoor pretrain --params {params.cfg:q} --train {input.train} --eval {params.evals:q}"
            " --out {output} --ckpt-dir data/checkpoints/pretrain --threads {threads} --log {log}"

else:

    rule clean_model:
        input:
            evals=[eval_dir(n) for n in EVAL_SETS],
            weights=local_file(config["model"]["pretrained"]),
        output:
            directory("data/models/clean"),
        params:
            cfg=stage_params("model", "zeroshot"),
            evals=eval_args(),
        threads: TORCH_THREADS
        resources:
            gpu=1,
            mem_mb=mem_mb("clean_model"),
            runtime=runtime("clean_model"),
        log:
            log_path("clean_model"),
        benchmark:
            bench_path("clean_model")
        shell:
            "python -m clipbackdoor clean-model --params {params.cfg:q} --eval {params.evals:q} --out {output}"
            " --threads {threads} --log {log}"
