# The two README commands: `make run` (set up + run the default pipeline + print the results table) and
# `make test` (set up + run the test suite). Both work on a fresh machine with only Python 3.10+.
VENV  ?= .venv
CORES ?= $(shell nproc 2>/dev/null || echo 2)
# on a GPU machine Snakemake must know how many GPUs there are (each gpu=1 job claims one; none run on the CPU)
GPUS  ?= $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
# `make test` workers: one per core, at most 4 (the suite is many small torch jobs and CLI subprocesses)
TEST_WORKERS ?= $(shell n=$(CORES); [ $$n -gt 4 ] && n=4; echo $$n)
GPU_RES = $(if $(filter-out 0,$(GPUS)),--resources gpu=$(GPUS))
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1

.PHONY: setup run html-report lock pull-decomp defenses abd b2 rehearsal test test-slow lint dvc-yaml

# torch first, from the exact pin (a CPU build where one is provided; never a newer range: that pulls
# GBs of CUDA wheels), then everything else under the same constraints so nothing can move torch.
$(VENV)/.installed: pyproject.toml configs/constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -c configs/constraints.txt -e '.[test]'
	touch $@

setup: $(VENV)/.installed

run: setup
	snakemake all --cores $(CORES) $(GPU_RES)
	-python -m clipbackdoor lock  # (a copy outside git/DVC still gets its results table)
	python -m clipbackdoor report

html-report: setup  # report.html (every table, figure and page, captioned) and, where Chromium exists, report.png
	snakemake --report report.html --cores 1
	-python -m clipbackdoor report-screenshot --report report.html --out report.png  # (no Chromium: one line, no stop)

lock: setup  # after any `snakemake` run of params.yaml: record the completed stages in dvc.lock (then dvc push)
	python -m clipbackdoor lock

# a colleague's cached decompositions (no model weights), then the defenses and results from them alone
pull-decomp: setup
	python -m clipbackdoor pull-decomp

defenses: setup
	snakemake defenses --cores $(CORES) --allowed-rules defenses defend mmd summary tables figures head_map
	python -m clipbackdoor report

abd: setup  # seed 002's ABD study (configs/abd.yaml): results/abd/tables/abd_*.md
	snakemake all --cores $(CORES) $(GPU_RES) --configfile configs/abd.yaml
	cat results/abd/tables/abd_table1.md

b2: setup  # seed 000's B² audit (configs/b2.yaml = params.yaml + its `b2` section): results/b2/tables/b2_audit.md
	snakemake b2 --cores $(CORES) $(GPU_RES) --configfile configs/b2.yaml
	head -30 results/b2/tables/b2_audit.md

rehearsal: setup  # the paper profile's stage graph on generated real-format inputs (configs/rehearsal.yaml)
	python -m clipbackdoor.pipeline.rehearsal --out data/rehearsal
	snakemake all --cores $(CORES) $(GPU_RES) --configfile configs/rehearsal.yaml  # B² included (its `b2` section)
	python -m clipbackdoor report --results rehearsal

test: setup  # one pytest-xdist worker per core (at most 4), a test file per worker (its fixtures built once)
	python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: setup
	python -m pytest -q -m slow

lint: setup  # pyflakes-class checks (ruff from the registry, the `dev` extra)
	pip install --quiet -c configs/constraints.txt -e '.[dev]'
	ruff check --select F src tests benchmarks

dvc-yaml: setup
	python -m clipbackdoor dvc-yaml
