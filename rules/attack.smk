# Poisoning and backdoor fine-tuning, one job per attack run (ATTACK-sSEED).


rule badclip_patch:
    input:
        model="data/models/clean",
        train="data/datasets/train",
        evalset=lambda wc: eval_dir(run_eval(wc.run)),
    output:
        patch=ASSET_FILES["badclip_patch"],
        png="results/shared/attacks/{run}_patch.png",
    wildcard_constraints:
        run="badclip(?:-[a-z0-9_]+)?-s[0-9]+",
    params:
        cfg=lambda wc: params_json(f"attacks.{attack_of(wc.run)}", target_key(wc.run), "zeroshot.templates"),
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("badclip_patch"),
        runtime=runtime("badclip_patch"),
    log:
        log_path("badclip_patch_{run}"),
    benchmark:
        bench_path("badclip_patch_{run}")
    shell:
        "python -m clipbackdoor badclip-patch --params {params.cfg:q} --run {wildcards.run} --model {input.model}"
        " --finetune-dir {input.train}/finetune --eval-dir {input.evalset} --out {output.patch} --png {output.png}"
        " --threads {threads} --log {log}"


rule issba_codec:
    input:
        train="data/datasets/train",
        evalset=lambda wc: eval_dir(run_eval(wc.run)),
    output:
        codec=ASSET_FILES["issba_codec"],
        png="results/shared/attacks/{run}_codec.png",
    wildcard_constraints:
        run="issba(?:-[a-z0-9_]+)?-s[0-9]+",
    params:
        cfg=lambda wc: params_json(f"attacks.{attack_of(wc.run)}", "data.image_size"),
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("issba_codec"),
        runtime=runtime("issba_codec"),
    log:
        log_path("issba_codec_{run}"),
    benchmark:
        bench_path("issba_codec_{run}")
    shell:
        "python -m clipbackdoor issba-codec --params {params.cfg:q} --run {wildcards.run}"
        " --finetune-dir {input.train}/finetune --eval-dir {input.evalset} --out {output.codec} --png {output.png}"
        " --threads {threads} --log {log}"


rule lc_adversarial:
    input:
        model="data/models/clean",
        train="data/datasets/train",
        evalset=lambda wc: eval_dir(run_eval(wc.run)),
    output:
        images=ASSET_FILES["lc_adversarial"],
    wildcard_constraints:
        run="label_consistent(?:-[a-z0-9_]+)?-s[0-9]+",
    params:
        cfg=lambda wc: params_json(f"attacks.{attack_of(wc.run)}", target_key(wc.run), "zeroshot.templates"),
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("lc_adversarial"),
        runtime=runtime("lc_adversarial"),
    log:
        log_path("lc_adversarial_{run}"),
    benchmark:
        bench_path("lc_adversarial_{run}")
    shell:
        "python -m clipbackdoor lc-adversarial --params {params.cfg:q} --run {wildcards.run} --model {input.model}"
        " --finetune-dir {input.train}/finetune --eval-dir {input.evalset} --out {output.images}"
        " --threads {threads} --log {log}"


rule poison:
    input:
        train="data/datasets/train",
        evals=lambda wc: [eval_dir(n) for n in RUN_EVALS[wc.run]],
        asset=lambda wc: trigger_asset(wc.run, poisoning=True),
    output:
        shards=directory("data/poisoned/{run}"),
        manifest="data/poisoned/{run}.manifest.parquet",
        preview=report_item("results/shared/attacks/{run}.png", "attacks", "attack_preview", "Trigger previews"),
    params:
        cfg=lambda wc: params_json(f"attacks.{attack_of(wc.run)}", target_key(wc.run), "poison.caption_templates",
                                    "data.image_size"),
        evals=lambda wc: eval_args(RUN_EVALS[wc.run]),
        asset=lambda wc: asset_args(wc.run, poisoning=True),
    resources:
        mem_mb=mem_mb("poison"),
        runtime=runtime("poison"),
    log:
        log_path("poison_{run}"),
    benchmark:
        bench_path("poison_{run}")
    shell:
        "python -m clipbackdoor poison --params {params.cfg:q} --run {wildcards.run}"
        " --finetune-dir {input.train}/finetune --eval {params.evals:q} --out {output.shards}"
        " --manifest {output.manifest} --preview {output.preview} {params.asset:q} --log {log}"


rule finetune:
    input:
        model="data/models/clean",
        train="data/poisoned/{run}",
        base="data/datasets/train",  # the poisoned pairs are an overlay of its finetune/ pairs (merged by key)
    output:
        directory("data/models/{run}"),
    params:
        cfg=stage_params("finetune"),
    threads: JOB_THREADS
    resources:
        gpu=config["finetune"].get("devices", 1),  # one per data-parallel worker
        mem_mb=mem_mb("finetune", config["finetune"].get("devices", 1)),
        runtime=runtime("finetune"),
    log:
        log_path("finetune_{run}"),
    benchmark:
        bench_path("finetune_{run}")
    shell:
        "python -m clipbackdoor finetune --params {params.cfg:q} --run {wildcards.run} --model {input.model}"
        " --train {input.train} --out {output} --ckpt-dir data/checkpoints/finetune_{wildcards.run}"
        " --threads {threads} --log {log}"
