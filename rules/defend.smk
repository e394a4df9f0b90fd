# Defenses on cached decompositions only (no model forward pass).


rule defend:
    input:
        clean=decomp_path("{model}", "{evalset}", "none"),
        triggered=decomp_path("{model}", "{evalset}", "{trigger}"),
        prototypes="data/prototypes/{model}/{evalset}.safetensors",
        classes="data/decomp/{model}/{evalset}/classes.safetensors",
    output:
        defend_path("{model}", "{evalset}", "{trigger}"),
    params:
        cfg=lambda wc: params_json("defend", target_key(wc.trigger)),
    resources:
        mem_mb=mem_mb("defend"),
        runtime=runtime("defend"),
    log:
        log_path("defend_{model}_{evalset}_{trigger}"),
    benchmark:
        bench_path("defend_{model}_{evalset}_{trigger}")
    shell:
        "python -m clipbackdoor defend --params {params.cfg:q} --clean {input.clean} --triggered {input.triggered}"
        " --trigger {wildcards.trigger} --prototypes {input.prototypes} --classes {input.classes} --out {output}"
        " --log {log}"
