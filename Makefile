.PHONY: install test lint demo compile bench
install:   ## set-up (CPU torch; GPU users install their CUDA torch first)
	python -m pip install torch==2.13.0
	python -m pip install -e ".[dev]" -c constraints.txt
	dvc pull
test:
	python -m pytest -q
lint:
	ruff check src tests components pipelines benchmarks
demo:      ## the whole pipeline, locally, on the sample subjects (tiny model)
	customcrafter pipeline run-local
compile:
	customcrafter pipeline compile
bench:     ## needs a CUDA GPU
	python benchmarks/gpu.py
