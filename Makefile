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

$(STAMP): $(REQS) requirements-cpu.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing $(REQS). The first install builds llama-cpp-python from source (about 10 minutes on 2 cores)."
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/python -m pip install -r $(REQS)
	$(BIN)/python -m pip install --no-deps -r requirements-nodeps.txt
	touch $@

demo: setup
	$(BIN)/python train.py

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV)
