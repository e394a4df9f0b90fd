# Baselines of seed 001: CleanCLIP (model repair; its models flow through decompose -> defend -> metrics like
# any other) and the input detectors STRIP / SCALE-UP / TeCo (scores beside Decomp-Det); RoCLIP (seed 002's
# training-time baseline: the backdoor fine-tune itself, defended).


rule cleanclip:
    input:
        model="data/models/{run}",
        train="data/datasets/train",
    output:
        directory("data/models/{run}.cleanclip"),
    params:
        cfg=stage_params("cleanclip"),
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("cleanclip"),
        runtime=runtime("cleanclip"),
    log:
        log_path("cleanclip_{run}"),
    benchmark:
        bench_path("cleanclip_{run}")
    shell:
        "python -m clipbackdoor cleanclip --params {params.cfg:q} --run {wildcards.run} --model {input.model}"
        " --clean-dir {input.train}/finetune --out {output} --ckpt-dir data/checkpoints/cleanclip_{wildcards.run}"
        " --threads {threads} --log {log}"


rule roclip:
    input:
        model="data/models/clean",
        train="data/poisoned/{run}",
        base="data/datasets/train",  # the poisoned pairs are an overlay of its finetune/ pairs (merged by key)
    output:
        directory("data/models/{run}.roclip"),
    params:
        cfg=stage_params("roclip"),
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("roclip"),
        runtime=runtime("roclip"),
    log:
        log_path("roclip_{run}"),
    benchmark:
        bench_path("roclip_{run}")
    shell:
        "python -m clipbackdoor roclip --params {params.cfg:q} --run {wildcards.run} --model {input.model}"
        " --train {input.train} --out {output} --ckpt-dir data/checkpoints/roclip_{wildcards.run}"
        " --threads {threads} --log {log}"


rule detect:
    input:
        model="data/models/{model}",
        evalset=lambda wc: eval_dir(wc.evalset),
        prototypes="data/prototypes/{model}/{evalset}.safetensors",
        classes="data/decomp/{model}/{evalset}/classes.safetensors",
        asset=lambda wc: trigger_asset(wc.trigger),
    output:
        detect_path("{model}", "{evalset}", "{trigger}"),
    params:
        cfg=lambda wc: params_json("detect", f"attacks.{attack_of(wc.trigger)}", target_key(wc.trigger)),
        asset=lambda wc: asset_args(wc.trigger),
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("detect"),
        runtime=runtime("detect"),
    log:
        log_path("detect_{model}_{evalset}_{trigger}"),
    benchmark:
        bench_path("detect_{model}_{evalset}_{trigger}")
    shell:
        "python -m clipbackdoor detect --params {params.cfg:q} --model {input.model} --eval-dir {input.evalset}"
        " --trigger {wildcards.trigger} --prototypes {input.prototypes} --classes {input.classes} --out {output}"
        " {params.asset:q} --threads {threads} --log {log}"
