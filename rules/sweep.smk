# The poisoning-rate sweep (a `sweep` section): ASR and CACC against the rate. Per swept run and rate, one more
# poisoned set and fine-tune (the run's own rate reuses its model), scored zero-shot on every evaluation image.

SWEEP_POINTS = sweep_points(config)  # (run, rate tag, reuses the run's own model)
OWN_RATE = {(run, rate) for run, rate, own in SWEEP_POINTS if own}


def sweep_dir(run, rate):
    return f"data/sweep/{run}/r{rate}"


def sweep_model(run, rate):
    return f"data/models/{run}" if (run, rate) in OWN_RATE else f"{sweep_dir(run, rate)}/model"


def trigger_keys(run):
    """The run's attack settings but its rate: a sweep point's poisoning takes its rate from the path, and an edit
    of the run's own rate must not redo every point (it reruns the run's own poison, whose params list it)."""
    attack = attack_of(run)
    return [f"attacks.{attack}.{key}" for key in config["attacks"][attack] if key != "rate"]


def sweep_manifest(run, rate):
    return f"data/poisoned/{run}.manifest.parquet" if (run, rate) in OWN_RATE else f"{sweep_dir(run, rate)}/manifest.parquet"


rule sweep_poison:
    input:
        train="data/datasets/train",
        evals=lambda wc: [eval_dir(n) for n in RUN_EVALS[wc.run]],
        asset=lambda wc: trigger_asset(wc.run, poisoning=True),
    output:
        shards=directory("data/sweep/{run}/r{rate}/poisoned"),
        manifest="data/sweep/{run}/r{rate}/manifest.parquet",
    params:
        cfg=lambda wc: params_json(*trigger_keys(wc.run), target_key(wc.run), "poison.caption_templates",
                                    "data.image_size"),
        evals=lambda wc: eval_args(RUN_EVALS[wc.run]),
        asset=lambda wc: asset_args(wc.run, poisoning=True),
    resources:
        mem_mb=mem_mb("sweep_poison"),
        runtime=runtime("sweep_poison"),
    log:
        log_path("sweep_poison_{run}_r{rate}"),
    benchmark:
        bench_path("sweep_poison_{run}_r{rate}")
    shell:
        "python -m clipbackdoor poison --params {params.cfg:q} --run {wildcards.run} --rate {wildcards.rate}"
        " --finetune-dir {input.train}/finetune --eval {params.evals:q} --out {output.shards}"
        " --manifest {output.manifest} {params.asset:q} --log {log}"


rule sweep_finetune:
    input:
        model="data/models/clean",
        train="data/sweep/{run}/r{rate}/poisoned",
        base="data/datasets/train",
    output:
        directory("data/sweep/{run}/r{rate}/model"),
    params:
        cfg=stage_params("finetune"),
    threads: JOB_THREADS
    resources:
        gpu=config["finetune"].get("devices", 1),
        mem_mb=mem_mb("sweep_finetune", config["finetune"].get("devices", 1)),
        runtime=runtime("sweep_finetune"),
    log:
        log_path("sweep_finetune_{run}_r{rate}"),
    benchmark:
        bench_path("sweep_finetune_{run}_r{rate}")
    shell:
        "python -m clipbackdoor finetune --params {params.cfg:q} --run {wildcards.run} --model {input.model}"
        " --train {input.train} --out {output} --ckpt-dir data/checkpoints/sweep_{wildcards.run}_r{wildcards.rate}"
        " --threads {threads} --log {log}"


rule backdoor_eval:
    input:
        model=lambda wc: sweep_model(wc.run, wc.rate),
        evalset=lambda wc: eval_dir(wc.evalset),
        asset=lambda wc: trigger_asset(wc.run),
    output:
        "data/sweep/{run}/r{rate}/{evalset}.json",
    params:
        cfg=lambda wc: params_json("sweep.batch_size", *trigger_keys(wc.run), target_key(wc.run), "zeroshot.templates"),
        asset=lambda wc: asset_args(wc.run),
    threads: JOB_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("backdoor_eval"),
        runtime=runtime("backdoor_eval"),
    log:
        log_path("backdoor_eval_{run}_r{rate}_{evalset}"),
    benchmark:
        bench_path("backdoor_eval_{run}_r{rate}_{evalset}")
    shell:
        "python -m clipbackdoor backdoor-eval --params {params.cfg:q} --model {input.model} --eval-dir {input.evalset}"
        " --trigger {wildcards.run} {params.asset:q} --out {output} --threads {threads} --log {log}"


rule rate_sweep:
    input:
        evals=[f"{sweep_dir(r, rate)}/{e}.json" for r, rate, _ in SWEEP_POINTS for e in RUN_EVALS[r]],
        manifests=[sweep_manifest(r, rate) for r, rate, _ in SWEEP_POINTS],
    output:
        csv=RESULTS + "/metrics/rate_sweep.csv",
        png=report_item(RESULTS + "/figures/asr_vs_rate.png", "attacks", "fig_rate_sweep", "Figures"),
    params:
        # + the keys that shape the sweep's graph: an edit reaches this stage (under DVC: which then asks for a
        # regenerated dvc.yaml), not the summary, which does not read them
        cfg=stage_params("seed", "sweep.attacks", "sweep.rates"),
        points=[f"{r}:{e}:{rate}={sweep_dir(r, rate)}/{e}.json,{sweep_manifest(r, rate)}"
                for r, rate, _ in SWEEP_POINTS for e in RUN_EVALS[r]],
    resources:
        mem_mb=mem_mb("rate_sweep"),
        runtime=runtime("rate_sweep"),
    log:
        log_path("rate_sweep"),
    benchmark:
        bench_path("rate_sweep")
    shell:
        "python -m clipbackdoor rate-sweep --params {params.cfg:q} --points {params.points:q} --csv {output.csv}"
        " --png {output.png} --log {log}"
