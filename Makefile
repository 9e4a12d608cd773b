# The local torch==2.13.0 CPU wheel goes in first: with it present, the `torch>=2.11` range in
# pyproject.toml is satisfied and pip never downloads a CUDA build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TEST_JOBS ?=

.PHONY: install demo test study bench clean

# The peers' RL code (test oracles, tests/engine/algorithms/peers.py) goes in without its
# dependency trees (ray, deepspeed, vllm, hydra...), which an extra cannot express: --no-deps, pinned,
# into build/peers rather than site-packages: verl and OpenRLHF ship a top-level `tests` package,
# which would shadow this repository's `tests` (a namespace package) in every process.
.installed: pyproject.toml setup.py Makefile
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q triton==3.6.0  # the lent GPU image's Triton: interpreter runs the same APIs
	rm -rf build/peers
	$(PIP) install -q --no-deps --target build/peers verl==0.9.1 trl==1.16.0 openrlhf==0.11.2 areal==1.0.4
	rm -rf build/peers/tests build/peers/bin
	touch .installed

install: .installed

demo: .installed
	$(PYTHON) -m meshrl.cli demo

test: .installed
	$(PYTHON) -m pytest -q tests

study: .installed
	$(PYTHON) -m meshrl.cli study

# CPU smoke runs of every benchmark; real figures come from `bash benchmarks/gpu_session.sh` on a GPU.
bench: .installed
	$(PYTHON) benchmarks/fused_kernels.py --small
	$(PYTHON) benchmarks/train_throughput.py --small
	$(PYTHON) benchmarks/generate.py --small --check
	$(PYTHON) benchmarks/decode_attention.py --small
	$(PYTHON) benchmarks/decode_gemms.py --small
	$(PYTHON) benchmarks/moe.py --small
	$(PYTHON) benchmarks/realloc.py --small

clean:
	rm -rf .installed runs build *.egg-info
