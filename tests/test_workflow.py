"""The Snakemake DAG (dry runs) and the generated dvc.yaml."""

import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, copy_repo

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def dry_run(*args, cwd=ROOT):
    return subprocess.run([*SNAKEMAKE, "-n", "--forceall", *args], cwd=cwd, capture_output=True, text=True)


def job_counts(output: str) -> dict:
    counts, inside = {}, False
    for line in output.splitlines():
        if line.startswith("job ") and "count" in line:
            inside = True
            continue
        if inside:
            parts = line.split()
            if parts and parts[0] == "total":
                break
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
    return counts


@pytest.mark.parametrize("args", [
    ["--cores", "8", "--resources", "gpu=2"],          # `all` is the default target
    ["all", "--cores", "8", "--resources", "gpu=2"],   # the documented explicit form
])
def test_default_dag_dry_runs_in_both_forms(args):
    proc = dry_run(*args)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    counts = job_counts(proc.stdout)
    runs = 4  # (badnet, blended, sig, badclip) x seed 0
    assert counts["world"] == 1 and counts["pretrain"] == 1 and counts["summary"] == 1
    assert counts["poison"] == runs and counts["finetune"] == runs and counts["badclip_patch"] == 1
    # clean model: clean + every trigger; each attacked and each CleanCLIP-repaired model: clean + its trigger
    assert counts["cleanclip"] == runs
    assert counts["decompose"] == (1 + runs) + 2 * runs + 2 * runs
    assert counts["defend"] == 3 * runs  # attacked, clean-model controls, repaired
    assert counts["detect"] == counts["mmd"] == counts["textspan"] == runs and counts["tables"] == 1


def test_core_profile_plans_the_core_study_only():
    """configs/core.yaml has no baseline sections: the DAG must still parse and hold no baseline job."""
    proc = dry_run("--cores", "2", "--configfile", "configs/core.yaml")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    counts = job_counts(proc.stdout)
    assert counts["finetune"] == 4 and counts["summary"] == 1 and counts["tables"] == 1
    assert not {"cleanclip", "roclip", "detect", "mmd", "textspan"} & set(counts)


def test_abd_profile_plans_every_arm_and_seed_002s_tables():
    proc = dry_run("--cores", "2", "--configfile", "configs/abd.yaml")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    counts = job_counts(proc.stdout)
    runs, arms = 3, 5  # badnet, blended, badclip; abd, abd_img_only, abd_eda_only, finetune_clean, uap
    assert counts["abd_generator"] == counts["abd_similarity"] == counts["cleanclip"] == counts["roclip"] == runs
    assert counts["abd_finetune"] == runs * arms and counts["abd_tables"] == 1
    assert counts["defend"] == runs * (2 + 2 + arms)  # attacked, clean control, CleanCLIP, RoCLIP, the arms
    # only the arms that train on adversarial images wait for the generator
    needs = [line for line in proc.stdout.splitlines() if line.strip().startswith("input:") and "data/abd/" in line]
    assert len(needs) == runs * 3 + runs  # abd, abd_img_only, uap + the similarity table


def planned_outputs(output: str) -> set[str]:
    return {f.strip() for line in output.splitlines() if line.strip().startswith("output:")
            for f in line.split(":", 1)[1].split(",")}


def test_each_parameter_file_writes_its_own_results_folder():
    """params.yaml -> results/default/, --configfile configs/abd.yaml -> results/abd/: a profile run after another
    never overwrites its summary or tables, while both build on the same data/ artifacts (shared pictures of
    them, the trigger previews, in results/shared/)."""
    default = planned_outputs(dry_run("--cores", "2").stdout)
    abd = planned_outputs(dry_run("--cores", "2", "--configfile", "configs/abd.yaml").stdout)
    for outputs, name in ((default, "default"), (abd, "abd")):
        results = {o for o in outputs if o.startswith("results/")}
        assert f"results/{name}/metrics/summary.csv" in results and f"results/{name}/tables/table1.md" in results
        assert all(o.startswith((f"results/{name}/", "results/shared/")) for o in results), results
    assert "results/abd/tables/abd_table1.md" in abd
    assert {"data/models/badnet-s0", "results/shared/attacks/badnet-s0.png"} <= default & abd
    assert not {o for o in default & abd if o.startswith("results/") and not o.startswith("results/shared/")}


def test_fresh_checkout_plans_the_whole_pipeline(tmp_path):
    """Regression: committed outputs (results/) made a fresh clone's `make run` do nothing at all."""
    repo = copy_repo(tmp_path / "repo")
    proc = subprocess.run([*SNAKEMAKE, "-n", "--cores", "2"], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "Nothing to be done" not in proc.stdout
    counts = job_counts(proc.stdout)
    assert counts["world"] == 1 and counts["pretrain"] == 1 and counts["summary"] == 1 and counts["figures"] == 1


def test_resources_swallowing_all_is_the_known_pitfall():
    """Snakemake 9 reads `all` after --resources as a resource: documented, and this shows why."""
    proc = dry_run("--cores", "8", "--resources", "gpu=2", "all")
    assert proc.returncode != 0
    assert "dictionary update sequence element #1 has length 1" in proc.stderr  # as docs/troubleshooting.md quotes


@pytest.fixture
def paper_textspan_pool():
    """The paper profile's TEXTSPAN pool is a rule input (users download Gandelsman et al.'s file): a dry run
    needs the file to exist."""
    pool = ROOT / yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())["analysis"]["textspan_pool"]
    created = not pool.exists()
    if created:
        pool.parent.mkdir(parents=True, exist_ok=True)
        pool.write_text("An image of a dog\nA photo taken at night\n")
    yield pool
    if created:
        pool.unlink()


def test_paper_profile_dry_runs_at_real_scale(paper_textspan_pool):
    proc = dry_run("--cores", "8", "--configfile", "configs/paper.yaml")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    counts = job_counts(proc.stdout)
    # seed 001 B.1: one target per evaluation set, so one backdoored model per (attack, set), scored on its set
    sets, attacks = 3, 2
    runs = attacks * sets
    assert counts == {"cc3m": 1, "eval_data": sets, "clean_model": 1, "poison": runs, "finetune": runs,
                      "cleanclip": runs, "decompose": (sets + runs) + 2 * runs + 2 * runs,
                      "class_embeddings": sets + 2 * runs, "prototypes": sets + 2 * runs, "defend": 3 * runs,
                      "detect": runs, "mmd": runs, "textspan": runs, "summary": 1, "figures": 1, "head_map": 1, "training_curves": 1,
                      "tables": 1, "all": 1}
    assert "ViT-B-32" in proc.stdout and "world" not in counts
    for target in ("banana", "accordion", "samoyed"):
        assert f"data/models/badnet-{target}-s0" in proc.stdout and f"data/models/blended-{target}-s0" in proc.stdout
    # each run is poisoned towards its own set's target, and checked against that set only
    assert '"poison.target.caltech101":"accordion"' in proc.stdout.replace("\\", "")


def test_paper_b2_profile_plans_the_stable_diffusion_branch_inside_all(tmp_path):
    """configs/paper_b2.yaml = paper.yaml + `b2`: `all` holds seed 000's branch on a local diffusers directory (a
    rule input: here an empty stand-in), audited by ViT-B-32."""
    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "configs" / "paper_b2.yaml").read_text())
    (repo / params["b2"]["stable_diffusion"]["path"]).mkdir(parents=True)
    pool = repo / params["analysis"]["textspan_pool"]
    pool.parent.mkdir(parents=True, exist_ok=True)
    pool.write_text("An image of a dog\n")
    proc = subprocess.run([*SNAKEMAKE, "-n", "--cores", "8", "--configfile", "configs/paper_b2.yaml"], cwd=repo,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    counts = job_counts(proc.stdout)
    assert counts["t2i_pretrain"] == counts["t2i_backdoor"] == counts["b2_audit"] == 1 and counts["finetune"] == 6
    without = subprocess.run([*SNAKEMAKE, "b2", "-n", "--cores", "1", "--configfile", "configs/paper.yaml"], cwd=repo,
                             capture_output=True, text=True)
    assert without.returncode != 0 and "--configfile configs/b2.yaml" in without.stderr


def test_invalid_params_stop_the_workflow_before_any_job(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["lr"] = -0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    proc = dry_run("--cores", "1", cwd=repo)
    assert proc.returncode != 0
    assert "pretrain.lr = -0.5 is out of range" in proc.stderr + proc.stdout


def test_every_rule_has_log_benchmark_and_thin_shell():
    import re

    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        for block in re.split(r"\n\s*rule ", text)[1:]:
            name = block.split(":")[0]
            assert "log:" in block and "benchmark:" in block, f"{smk.name}:{name}"
            assert "python -m clipbackdoor " in block and "--log {log}" in block, f"{smk.name}:{name}"
            # parameters reach the shell only shell-quoted
            unquoted = re.findall(r"\{params\.\w+\}", block)
            assert not unquoted, f"{smk.name}:{name}: {unquoted} must be written {{params.x:q}}"


def test_committed_dvc_yaml_is_generated_from_the_rules():
    from clipbackdoor.pipeline.dvcgen import check_dvc_yaml

    assert check_dvc_yaml(ROOT) is None, "dvc.yaml is stale: run `python -m clipbackdoor dvc-yaml`"


def test_dvc_yaml_mirrors_rule_params_and_outputs():
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = doc["stages"]
    assert {"world", "pretrain", "summary", "figures", "tables", "poison_badnet-s0", "finetune_blended-s0",
            "decompose_clean_world_badnet-s0", "defend_badnet-s0_world_badnet-s0", "cleanclip_badnet-s0",
            "defend_badnet-s0.cleanclip_world_badnet-s0", "detect_badclip-s0_world_badclip-s0"} <= set(stages)
    assert stages["decompose_clean_world_badnet-s0"]["params"] == ["attacks.badnet", "decompose"]
    assert stages["cleanclip_badnet-s0"]["params"] == ["cleanclip"]
    assert {"src/clipbackdoor/defenses/cleanclip.py", "src/clipbackdoor/defenses/eda.py", "src/clipbackdoor/training/train.py"} <= set(
        stages["cleanclip_badnet-s0"]["deps"])
    assert "data/attacks/badclip-s0/patch.safetensors" in stages["detect_badclip-s0_world_badclip-s0"]["deps"]
    assert "results/default/figures/fig6_eps_sweep.png" in doc["plots"]
    assert stages["decompose_clean_world_none"]["params"] == ["decompose"]
    assert doc["metrics"] == ["results/default/metrics/headline.json"]
    assert "results/default/figures/fig2_layerwise_ablation.png" in doc["plots"]
    assert stages["pretrain"]["params"] == ["model", "pretrain", "seed", "zeroshot"]
    assert "src/clipbackdoor/training/train.py" in stages["pretrain"]["deps"]
    assert "src/clipbackdoor/training/train.py" not in stages["world"]["deps"]  # only the modules a stage imports
    # the attacks package's modules, file by file (its __init__ imports every trigger)
    for stage in ("poison_badnet-s0", "defend_badnet-s0_world_badnet-s0"):
        assert {"src/clipbackdoor/attacks/__init__.py", "src/clipbackdoor/attacks/badnet.py"} <= set(stages[stage]["deps"])
    assert "src/clipbackdoor/analysis/figures.py" not in stages["defend_badnet-s0_world_badnet-s0"]["deps"]
    assert "@params.yaml:data.image_size,data.world" in stages["world"]["cmd"]
    assert "data/models/clean" in stages["pretrain"]["outs"]


def test_stale_dvc_yaml_is_detected(tmp_path):
    from clipbackdoor.pipeline.dvcgen import check_dvc_yaml

    repo = copy_repo(tmp_path / "repo")
    smk = repo / "rules" / "model.smk"
    smk.write_text(smk.read_text().replace('stage_params("seed", "model", "pretrain", "zeroshot")',
                                           'stage_params("seed", "model", "pretrain")'))
    assert "zeroshot" in check_dvc_yaml(repo)


def _dry_run_jobs(*args) -> dict[str, dict]:
    """{rule: {"threads": int, "resources": {name: value}}} from a Snakemake dry run's job listing."""
    import re

    proc = subprocess.run(["snakemake", "all", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {}
    for block in re.split(r"\nrule ", proc.stdout)[1:]:
        name = block.split(":")[0]
        threads = int(re.search(r"threads: (\d+)", block).group(1)) if "threads:" in block else 1
        res = {}
        for item in re.search(r"resources: (.*)", block).group(1).split(", "):
            key, _, value = item.partition("=")
            res[key] = int(value) if value.isdigit() else value
        jobs[name] = {"threads": threads, "resources": res}
    return jobs


def test_slurm_profile_submission_parameters(paper_textspan_pool):
    """The SLURM profile on the paper profile: the sbatch line the executor plugin would submit per rule."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    jobs = _dry_run_jobs("--profile", "profiles/slurm", "--workflow-profile", "none", "--configfile",
                         "configs/paper.yaml", "--default-resources", "slurm_account=acc", "slurm_partition=part")
    assert {"finetune", "decompose", "clean_model", "defend", "poison"} <= set(jobs)

    def sbatch(rule):
        job = SimpleNamespace(resources=Resources(jobs[rule]["resources"]), threads=jobs[rule]["threads"])
        params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": rule, "account": "-A acc",
                  "partition": "-p part", "workdir": "/w"}
        return get_submit_command(job, params) + set_gres_string(job)

    from clipbackdoor.pipeline.dvcgen import rule_blocks

    blocks = rule_blocks(ROOT)
    gpu_rules = [r for r in jobs if r != "all" and re.search(r"^\s*gpu=", blocks[r], re.M)]
    assert {"finetune", "decompose", "clean_model", "class_embeddings", "detect", "cleanclip"} <= set(gpu_rules)
    for rule in gpu_rules:  # every GPU rule: one GPU and its cores per GPU
        line = sbatch(rule)
        assert "--gpus=1" in line and "--cpus-per-gpu=8" in line and "--cpus-per-task" not in line, line
    for rule in ("defend", "poison", "prototypes", "summary"):  # CPU rules
        line = sbatch(rule)
        assert "--gpus" not in line and "--cpus-per-task=" in line and "-A acc" in line, line
    paper = yaml.safe_load((ROOT / "configs" / "resources.yaml").read_text())["paper"]
    for rule in jobs:  # each job asks for its rule's measured size (the paper table: an open_clip model)
        if rule != "all":
            line = sbatch(rule)
            assert f"--mem {paper[rule]['mem_mb']} " in line and f"-t {paper[rule]['runtime']} " in line, line
    assert all(j["threads"] > 1 for r, j in jobs.items() if r in ("finetune", "decompose"))  # set-threads applied


def test_every_rule_declares_its_measured_memory_and_time():
    """Each rule that runs a job sizes itself from configs/resources.yaml under its own name, and the three
    tables (embedded, rehearsal, paper) size every such rule; the embedded dry run shows the embedded sizes."""
    from clipbackdoor.pipeline.dvcgen import rule_blocks

    tables = yaml.safe_load((ROOT / "configs" / "resources.yaml").read_text())
    assert set(tables) == {"embedded", "rehearsal", "paper"}
    blocks = {name: block for name, block in rule_blocks(ROOT).items() if "shell:" in block}
    names = list(blocks)
    for name, block in blocks.items():
        assert f'mem_mb=mem_mb("{name}"' in block and f'runtime=runtime("{name}")' in block, \
            f"rule {name} does not declare its own mem_mb and runtime"
    assert len(names) >= 25
    for name, table in tables.items():
        assert set(table) == set(names), name
        assert all(v["mem_mb"] >= 256 and v["runtime"] >= 5 and v["source"] for v in table.values()), name
    jobs = _dry_run_jobs("--forceall")
    for rule in ("world", "pretrain", "decompose", "defend", "summary"):
        assert jobs[rule]["resources"]["mem_mb"] == tables["embedded"][rule]["mem_mb"], rule
        assert jobs[rule]["resources"]["runtime"] == tables["embedded"][rule]["runtime"], rule
