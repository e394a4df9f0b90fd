# Poisoning and backdoor fine-tuning, one job per attack run (ATTACK-sSEED).


rule poison:
    input:
        train="data/datasets/train",
        evals=[eval_dir(n) for n in EVAL_SETS],
    output:
        shards=directory("data/poisoned/{run}"),
        manifest="data/poisoned/{run}.manifest.parquet",
        preview="results/attacks/{run}.png",
    params:
        cfg=lambda wc: params_json(f"attacks.{attack_of(wc.run)}", "poison.target", "poison.caption_templates",
                                    "data.image_size"),
        evals=eval_args(),
    log:
        log_path("poison_{run}"),
    benchmark:
        bench_path("poison_{run}")
    shell:
        "python -m clipbackdoor poison --params {params.cfg:q} --run {wildcards.run}"
        " --finetune-dir {input.train}/finetune --eval {params.evals:q} --out {output.shards}"
        " --manifest {output.manifest} --preview {output.preview} --log {log}"


rule finetune:
    input:
        model="data/models/clean",
        train="data/poisoned/{run}",
    output:
        directory("data/models/{run}"),
    params:
        cfg=stage_params("finetune"),
    threads: TORCH_THREADS
    resources:
        gpu=config["finetune"].get("devices", 1),  # one per data-parallel worker
    log:
        log_path("finetune_{run}"),
    benchmark:
        bench_path("finetune_{run}")
    shell:
        "python -m clipbackdoor finetune --params {params.cfg:q} --run {wildcards.run} --model {input.model}"
        " --train {input.train} --out {output} --ckpt-dir data/checkpoints/finetune_{wildcards.run}"
        " --threads {threads} --log {log}"
