# Seed 002's Adversarial Backdoor Defense: universal adversarial perturbations that imitate the backdoor
# (abd_generator), the defense fine-tune and its ablation arms (abd_finetune -> data/models/RUN.ARM, scored like
# every model), the Fig. 2 similarity table and Tables I-III. The arms run when listed in repair.methods.

ABD_NEEDS_PERTURBATION = {"abd", "abd_img_only", "uap"}


def abd_similarity_path(run, evalset=None):
    """Fig. 2 on the run's first evaluation set (the one its attacker-side stages use)."""
    return f"{RESULTS}/analysis/abd/{run}_{evalset or run_eval(run)}.csv"


rule abd_generator:
    input:
        model="data/models/{run}",
        normal="data/models/clean",
        train="data/datasets/train",
    output:
        "data/abd/{run}/perturbations.safetensors",
    params:
        cfg=lambda wc: params_json("abd.generator", *optional_keys("abd.n_pairs")),
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("abd_generator"),
        runtime=runtime("abd_generator"),
    log:
        log_path("abd_generator_{run}"),
    benchmark:
        bench_path("abd_generator_{run}")
    shell:
        "python -m clipbackdoor abd-generator --params {params.cfg:q} --run {wildcards.run} --model {input.model}"
        " --normal {input.normal} --clean-dir {input.train}/finetune --out {output} --threads {threads} --log {log}"


rule abd_finetune:
    input:
        model="data/models/{run}",
        train="data/datasets/train",
        perturbations=lambda wc: (
            [f"data/abd/{wc.run}/perturbations.safetensors"] if wc.arm in ABD_NEEDS_PERTURBATION else []
        ),
    output:
        directory("data/models/{run}.{arm}"),
    wildcard_constraints:
        arm="|".join(ABD_ARMS),
    params:
        cfg=lambda wc: params_json("abd.perturbation", "abd.generator.location", "abd.adv_fraction", "abd.eda_alpha",
                                   "abd.synonyms", "abd.optim", *optional_keys("abd.n_pairs")),
        perturbations=lambda wc, input: ["--perturbations", *input.perturbations] if input.perturbations else [],
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("abd_finetune"),
        runtime=runtime("abd_finetune"),
    log:
        log_path("abd_finetune_{run}.{arm}"),
    benchmark:
        bench_path("abd_finetune_{run}.{arm}")
    shell:
        "python -m clipbackdoor abd-finetune --params {params.cfg:q} --run {wildcards.run} --arm {wildcards.arm}"
        " --model {input.model} --clean-dir {input.train}/finetune {params.perturbations:q} --out {output}"
        " --ckpt-dir data/checkpoints/abd_{wildcards.run}.{wildcards.arm} --threads {threads} --log {log}"


rule abd_similarity:
    input:
        model="data/models/{run}",
        classes="data/decomp/{run}/{evalset}/classes.safetensors",
        clean_model="data/models/clean",
        clean_classes="data/decomp/clean/{evalset}/classes.safetensors",
        evalset=lambda wc: eval_dir(wc.evalset),
        perturbations="data/abd/{run}/perturbations.safetensors",
        asset=lambda wc: trigger_asset(wc.run),
    output:
        abd_similarity_path("{run}", "{evalset}"),
    params:
        cfg=lambda wc: params_json("abd.generator.location", "abd.fig2_images", f"attacks.{attack_of(wc.run)}",
                                   target_key(wc.run)),
        asset=lambda wc: asset_args(wc.run),
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("abd_similarity"),
        runtime=runtime("abd_similarity"),
    log:
        log_path("abd_similarity_{run}_{evalset}"),
    benchmark:
        bench_path("abd_similarity_{run}_{evalset}")
    shell:
        "python -m clipbackdoor abd-similarity --params {params.cfg:q} --trigger {wildcards.run} --model {input.model}"
        " --classes {input.classes} --clean-model {input.clean_model} --clean-classes {input.clean_classes}"
        " --eval-dir {input.evalset} --perturbations {input.perturbations} {params.asset:q} --out {output}"
        " --threads {threads} --log {log}"


rule abd_tables:
    input:
        summary=RESULTS + "/metrics/summary.csv",
        similarity=[abd_similarity_path(r) for r in RUNS],
    output:
        [f for t in ("table1", "table2", "table3", "fig2") for f in table_outputs(f"{RESULTS}/tables/abd_{t}", "abd", "abd_table")],
    params:
        out_dir=RESULTS + "/tables",
    resources:
        mem_mb=mem_mb("abd_tables"),
        runtime=runtime("abd_tables"),
    log:
        log_path("abd_tables"),
    benchmark:
        bench_path("abd_tables")
    shell:
        "python -m clipbackdoor abd-tables --summary {input.summary} --similarity {input.similarity}"
        " --out-dir {params.out_dir:q} --log {log}"
