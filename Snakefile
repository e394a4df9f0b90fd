# clipbackdoor workflow. One source of truth for the DAG: this file and rules/*.smk.
# `dvc.yaml` is generated from it (python -m clipbackdoor dvc-yaml); a test fails when it is stale.
#
#   snakemake --cores 8 --resources gpu=2          # `all` is the default target
#   snakemake all --cores 8 --resources gpu=2      # naming the target: put it BEFORE --resources
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# Parameters: params.yaml, or a profile given with --configfile (e.g. configs/paper.yaml) that REPLACES it:
# profiles are complete parameter sets, and a deep merge would leak embedded-world keys into the real-scale
# profile. rules/common.smk loads and validates them (one line and exit status 2 on bad input).
report: "results/README.md"


include: "rules/common.smk"


rule all:
    default_target: True
    input:
        ALL_TARGETS,


include: "rules/data.smk"
include: "rules/model.smk"
include: "rules/attack.smk"
include: "rules/decompose.smk"
include: "rules/defend.smk"
include: "rules/baselines.smk"
include: "rules/abd.smk"
if B2:

    include: "rules/b2.smk"
include: "rules/analysis.smk"
include: "rules/metrics.smk"
if "sweep" in config:

    include: "rules/sweep.smk"


# The defenses without any model or GPU, on a colleague's decompositions: after `make pull-decomp` (the cached
# decompositions, class embeddings, prototypes and detector scores, and the clean model's metrics.json), run
#   snakemake defenses --cores 2 --allowed-rules defenses defend mmd summary tables figures head_map    (= make defenses)
# --allowed-rules makes the pulled files plain inputs, so nothing upstream (no model) is rebuilt.
rule defenses:
    input:
        DEFENSE_TARGETS,


# seed 000's B² branch alone: snakemake b2 --cores 2 --configfile configs/b2.yaml (`all` includes it there)
if B2:

    rule b2:
        input:
            B2_OUTPUTS,

# (the targets are not known yet while the Snakefile loads: read the command line, only Snakemake's own)
elif "snakemake" in (Path(sys.argv[0]).name, Path(sys.argv[0]).parent.name) and "b2" in sys.argv[1:]:
    print("clipbackdoor (workflow load): error: the b2 target needs parameters with a `b2` section (seed 000, "
          "the B² audit)\n  fix: snakemake b2 --cores 2 --configfile configs/b2.yaml (make b2; at real scale "
          "configs/paper_b2.yaml)", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
