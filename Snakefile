# clipbackdoor workflow. One source of truth for the DAG: this file and rules/*.smk.
# `dvc.yaml` is generated from it (python -m clipbackdoor dvc-yaml); a test fails when it is stale.
#
#   snakemake --cores 8 --resources gpu=2          # `all` is the default target
#   snakemake all --cores 8 --resources gpu=2      # naming the target: put it BEFORE --resources
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
include: "rules/b2.smk"
include: "rules/analysis.smk"
include: "rules/metrics.smk"


# seed 000's B² branch, its own target: snakemake b2 --cores 2
rule b2:
    input:
        B2_OUTPUTS,
