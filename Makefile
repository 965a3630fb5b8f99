# Two commands do all set-up from a fresh clone (README):
#   make demo   create .venv, install, generate the demo dataset, run the main job on it
#   make test   create/update .venv and run the whole test suite (what .ci/run calls)
#   make demo-table  the table's workflow on the demo data: one sweep launch (2 archs), one report
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# DALI's build: cuda13 matches the torch pip installs by default (+cu130); cuda12 for torch's CUDA-12 wheels
# (README, "Install on a cluster")
CUDA   ?= cuda13
DEMO_DATA ?= data/demo

.PHONY: demo demo-table test install lint clean

# Re-install only when the package definition changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet "pip>=23"
	@# one DALI build per environment: both would install the same nvidia/dali package over each other
	$(PY) -m pip uninstall --quiet -y nvidia-dali-$(if $(filter cuda13,$(CUDA)),cuda120,cuda130) 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[test,$(CUDA)]'
	touch $@

install: $(VENV)/.installed

$(DEMO_DATA)/class_index.json: | $(VENV)/.installed
	$(PY) -m data_pipeline demo $(DEMO_DATA)

DEMO_RUN ?= runs/demo

demo: $(VENV)/.installed $(DEMO_DATA)/class_index.json
	$(PY) slurm/launch.py --config demo --cluster local data.root=$(DEMO_DATA) run_dir=$(DEMO_RUN)
	@echo "demo trained: plot $(DEMO_RUN)/curves.png, checkpoints $(DEMO_RUN)/{last,best}.pth, per-epoch metrics $(DEMO_RUN)/metrics.jsonl,"
	@echo "              W&B offline run $$(ls -d $(DEMO_RUN)/wandb/offline-run-* 2>/dev/null | tail -n 1); evaluating best.pth into $(DEMO_RUN)/eval.json:"
	@# The last line says whether best.pth landed inside the band measured over seeds (README, "The demo");
	@# outside it (evaluate's exit status 1) make still succeeds: the run itself worked, its number is off.
	$(PY) evaluate --checkpoint $(DEMO_RUN)/best.pth --data $(DEMO_DATA) --json $(DEMO_RUN)/eval.json || [ $$? -eq 1 ]

# The table's workflow on the demo data: one launch trains both archs (one job each, one after another here, in
# $(TABLE_RUN)/demo-<arch>), one report evaluates and tabulates them ($(TABLE_RUN)/report.md, .json, .png). The
# report's exit status 1 (a run outside the demo band) is its verdict, not a failure of the workflow.
TABLE_RUN ?= runs/demo-table
TABLE_ARCHS ?= vgg11_bn,vgg13_bn

demo-table: $(VENV)/.installed $(DEMO_DATA)/class_index.json
	$(PY) slurm/launch.py --recipe demo --arch $(TABLE_ARCHS) --cluster local --run-dir $(TABLE_RUN) --data $(DEMO_DATA)
	$(PY) evaluate --report $(TABLE_RUN)/* || [ $$? -eq 1 ]

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs data/demo .pytest_cache .ruff_cache *.egg-info
