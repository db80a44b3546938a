# zeroflow developer targets.
#   make bench        CPU benchmark suite (< 10 min on 2 cores; run it on a quiet machine):
#                     pytest-benchmark JSON in results/, then docs/performance.md + docs/perf/*.png
#   make bench-fast   the CI smoke mode of the same suites (tiny sizes, one round; < 2 min):
#                     JSON and report in results/fast/ (docs/ untouched)
#   make bench-sweep  query sweep q in {1,...,32} (zo_sgd, zo_adam; ~8 min), then the report
#   make bench-gpu    benchmarks/gpu_check.sh (on a CUDA machine; output in $$OUT or results/gpu/)
#   make census       instruction census of the Triton kernels, compiled offline for sm_90 (no GPU;
#                     benchmarks/sass_census.py) with the device image's Triton: the python of
#                     `make rehearse`'s venv where it exists, else CENSUS_PY=...; then the
#                     registers, spills and access widths of that python's CUDA extension's
#                     sm_90 kernels (benchmarks/cuda_census.py)
#   make rehearse     the test suite on this CPU under the device image's versions (python 3.12, torch 2.11,
#                     Triton 3.6, numpy 2.5: benchmarks/device_image_requirements.txt) in $(IMAGE_VENV), with the
#                     extensions built in place for it, which a lease then carries (SKIP_BUILD=auto bash benchmarks/gpu_check.sh)
#   make bench-report the report again from the JSON already in results/ (cpu_*.json, and gpu_*.json
#                     copied there from a GPU run's gpu_logs.tar.gz: bench/gpu_*.json)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
RESULTS ?= results
BENCH_PYTHONPATH := PYTHONPATH=$(CURDIR)/python:$(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
PYTEST_BENCH := $(PY) -m pytest -q -rfEs -p no:cacheprovider --benchmark-columns=min,median,rounds --benchmark-sort=name
SUITES := kernels optim_step end_to_end distributed
SWEEP_JSON := $(RESULTS)/query_sweep.json

.PHONY: bench bench-fast bench-sweep bench-gpu bench-report census rehearse

bench:
	@mkdir -p $(RESULTS)
	@for s in $(SUITES); do \
	  echo "== bench $$s"; \
	  env -u TRITON_INTERPRET -u BENCH_FAST $(BENCH_PYTHONPATH) BENCH_DEVICE=cpu \
	    $(PYTEST_BENCH) benchmarks/test_bench_$$s.py --benchmark-json=$(RESULTS)/cpu_$$s.json \
	    2>&1 | tee $(RESULTS)/cpu_$$s.log || exit 1; \
	  grep -E '^(SKIPPED|FAILED|ERROR)' $(RESULTS)/cpu_$$s.log > $(RESULTS)/cpu_$$s.json.skips.txt || true; \
	done
	$(MAKE) bench-report

# GPU results fetched from a device lease (gpu_check.sh's JSON, copied to results/gpu_*.json)
# become the GPU sections of the same page.
bench-report:
	$(BENCH_PYTHONPATH) $(PY) -m benchmarks.report $(foreach s,$(SUITES),$(RESULTS)/cpu_$(s).json) $(wildcard $(RESULTS)/gpu_*.json) \
	  --out docs/performance.md --plots docs/perf/ $(if $(wildcard $(SWEEP_JSON)),--sweep $(SWEEP_JSON)) \
	  $(if $(wildcard benchmarks/notes.md),--notes benchmarks/notes.md)

bench-fast:
	@mkdir -p $(RESULTS)/fast
	env BENCH_FAST=1 TRITON_INTERPRET=1 BENCH_DEVICE=cpu $(BENCH_PYTHONPATH) \
	  $(PYTEST_BENCH) $(foreach s,$(SUITES),benchmarks/test_bench_$(s).py) --benchmark-json=$(RESULTS)/fast/bench_fast.json 2>&1 | tee $(RESULTS)/fast/bench_fast.log
	@grep -E '^(SKIPPED|FAILED|ERROR)' $(RESULTS)/fast/bench_fast.log > $(RESULTS)/fast/bench_fast.json.skips.txt || true
	$(BENCH_PYTHONPATH) $(PY) -m benchmarks.report $(RESULTS)/fast/bench_fast.json \
	  --out $(RESULTS)/fast/performance.md --plots $(RESULTS)/fast/perf/

bench-sweep:
	$(BENCH_PYTHONPATH) $(PY) -m benchmarks.bench_query_sweep --out $(SWEEP_JSON) --workdir $(RESULTS)/sweep \
	  --plot docs/perf/query_sweep.png
	$(MAKE) bench-report

bench-gpu:
	bash benchmarks/gpu_check.sh

CENSUS_PY ?= $(if $(wildcard $(IMAGE_VENV)/bin/python),$(IMAGE_VENV)/bin/python,$(PY))
census:
	@mkdir -p $(RESULTS)
	env -u TRITON_INTERPRET $(BENCH_PYTHONPATH) $(CENSUS_PY) -m benchmarks.sass_census --json $(RESULTS)/triton_census.json
	$(BENCH_PYTHONPATH) $(CENSUS_PY) -m benchmarks.cuda_census --json $(RESULTS)/cuda_census.json

IMAGE_PY ?= $(firstword $(wildcard /root/.pyenv/versions/3.12*/bin/python) python3.12)
IMAGE_VENV ?= $(RESULTS)/image-venv
rehearse:
	test -x $(IMAGE_VENV)/bin/python || $(IMAGE_PY) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q -r benchmarks/device_image_requirements.txt
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} ZEROFLOW_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$${MAX_JOBS:-2} \
	  $(IMAGE_VENV)/bin/python setup.py -q build_ext --inplace
	$(BENCH_PYTHONPATH) $(IMAGE_VENV)/bin/python -m pytest -q -p no:cacheprovider -rfEs -n $${TEST_WORKERS:-2}
