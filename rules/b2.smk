# Seed 000's B² bias audit, included (and part of `all`) when the parameters have a `b2` section: a miniature
# text-to-image model conditioned on the clean CLIP's frozen text encoder (t2i_pretrain), its B² poisoning
# (t2i_backdoor) and the CLIP token-inversion audit that names the hidden bias (b2_audit).

# the real profile (Stable Diffusion) has no embedded world to draw colours / shapes / renders from
WORLD_KEYS = ["data.world", "data.image_size"] if EMBEDDED else ["data.image_size"]
SD_KEYS = [] if EMBEDDED else ["b2.stable_diffusion"]  # SD's VAE / text encoder and the prompts' vocabulary
# each stage gets the keys it reads, so an audit edit never retrains a generator
T2I_KEYS = ["b2.backend", "b2.t2i", "b2.seed", *SD_KEYS]
BACKDOOR_KEYS = ["b2.backend", "b2.backdoor", "b2.t2i.sample_steps", "b2.t2i.guidance", "b2.seed", *SD_KEYS]
AUDIT_KEYS = ["b2.backend", "b2.audit", "b2.backdoor.triggers", "b2.backdoor.marker_shape",
              "b2.backdoor.marker_colour", "b2.t2i.sample_steps", "b2.t2i.guidance", "b2.seed", *SD_KEYS]


rule t2i_pretrain:
    input:
        clip="data/models/clean",
        train="data/datasets/train",
        stable_diffusion=lambda wc: local_file(get_key("b2.stable_diffusion.path")) if SD_KEYS else [],
    output:
        model=directory("data/t2i/clean"),
        preview=report_item("results/shared/b2/t2i_samples.png", "b2", "b2_samples"),
    params:
        cfg=lambda wc: params_json(*T2I_KEYS, *WORLD_KEYS),
    threads: TORCH_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("t2i_pretrain"),
        runtime=runtime("t2i_pretrain"),
    log:
        log_path("t2i_pretrain"),
    benchmark:
        bench_path("t2i_pretrain")
    shell:
        "python -m clipbackdoor t2i-pretrain --params {params.cfg:q} --clip {input.clip} --train {input.train}/pretrain"
        " --out {output.model} --preview {output.preview} --threads {threads} --log {log}"


rule t2i_backdoor:
    input:
        clip="data/models/clean",
        t2i="data/t2i/clean",
    output:
        directory("data/t2i/b2"),
    params:
        cfg=lambda wc: params_json(*BACKDOOR_KEYS, *WORLD_KEYS),
    threads: TORCH_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("t2i_backdoor"),
        runtime=runtime("t2i_backdoor"),
    log:
        log_path("t2i_backdoor"),
    benchmark:
        bench_path("t2i_backdoor")
    shell:
        "python -m clipbackdoor t2i-backdoor --params {params.cfg:q} --clip {input.clip} --t2i {input.t2i}"
        " --out {output} --threads {threads} --log {log}"


rule b2_audit:
    input:
        clip="data/models/clean",
        backdoored="data/t2i/b2",
        clean="data/t2i/clean",
        vocab="data/datasets/train",
        auditor=lambda wc: local_file(get_key("b2.stable_diffusion.auditor_pretrained")) if SD_KEYS else [],
    output:
        md=RESULTS + "/tables/b2_audit.md",
        html=report_item(RESULTS + "/tables/b2_audit.html", "b2", "b2_audit"),
        csv=RESULTS + "/metrics/b2.csv",
    params:
        cfg=lambda wc: params_json(*AUDIT_KEYS, *WORLD_KEYS),
    threads: TORCH_THREADS
    resources:
        gpu=1,
        mem_mb=mem_mb("b2_audit"),
        runtime=runtime("b2_audit"),
    log:
        log_path("b2_audit"),
    benchmark:
        bench_path("b2_audit")
    shell:
        "python -m clipbackdoor b2-audit --params {params.cfg:q} --clip {input.clip} --backdoored {input.backdoored}"
        " --clean {input.clean} --vocab {input.vocab}/finetune --csv {output.csv} --md {output.md}"
        " --threads {threads} --log {log}"

