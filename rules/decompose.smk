# Decomposition cache (Parquet), class embeddings and prototypes, per model and evaluation set.


rule decompose:
    input:
        model="data/models/{model}",
        evalset=lambda wc: eval_dir(wc.evalset),
        asset=lambda wc: trigger_asset(wc.trigger),
    output:
        decomp_path("{model}", "{evalset}", "{trigger}"),
    params:
        cfg=lambda wc: params_json("decompose", *([] if wc.trigger == "none" else [f"attacks.{attack_of(wc.trigger)}"])),
        asset=lambda wc: asset_args(wc.trigger),
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("decompose"),
        runtime=runtime("decompose"),
    log:
        log_path("decompose_{model}_{evalset}_{trigger}"),
    benchmark:
        bench_path("decompose_{model}_{evalset}_{trigger}")
    shell:
        "python -m clipbackdoor decompose --params {params.cfg:q} --model {input.model} --eval-dir {input.evalset}"
        " --trigger {wildcards.trigger} --out {output} {params.asset:q} --threads {threads} --log {log}"


rule class_embeddings:
    input:
        model="data/models/{model}",
        evalset=lambda wc: eval_dir(wc.evalset),
    output:
        "data/decomp/{model}/{evalset}/classes.safetensors",
    params:
        cfg=stage_params("zeroshot.templates"),
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("class_embeddings"),
        runtime=runtime("class_embeddings"),
    log:
        log_path("class_embeddings_{model}_{evalset}"),
    benchmark:
        bench_path("class_embeddings_{model}_{evalset}")
    shell:
        "python -m clipbackdoor class-embeddings --params {params.cfg:q} --model {input.model}"
        " --eval-dir {input.evalset} --out {output} --threads {threads} --log {log}"


rule prototypes:
    input:
        decomp_path("{model}", "{evalset}", "none"),
    output:
        "data/prototypes/{model}/{evalset}.safetensors",
    params:
        cfg=stage_params("prototypes"),
    resources:
        mem_mb=mem_mb("prototypes"),
        runtime=runtime("prototypes"),
    log:
        log_path("prototypes_{model}_{evalset}"),
    benchmark:
        bench_path("prototypes_{model}_{evalset}")
    shell:
        "python -m clipbackdoor prototypes --params {params.cfg:q} --decomp {input} --out {output} --log {log}"
