# Each target creates or updates .venv by itself. torch is installed first, pinned, so that pip
# never resolves the torch requirement itself (any other spec pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fxq-stamp
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
PHOTOS := data/photos/debian/MANIFEST.json

.PHONY: test demo bench fashion-mnist photos train clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,plot,imagenet]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# The demo evaluates on the real 10k test set when it can install it; otherwise it says it used the
# bundled 500-image subset.
demo: $(STAMP)
	-@$(MAKE) --no-print-directory fashion-mnist
	$(BIN)/fxq demo

# The real Fashion-MNIST test set (10k images) comes from Debian's package; bench and train need it.
fashion-mnist:
	@test -f $(FMNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

# Fashion-MNIST CNNs (tools/bench.py), then EfficientNet-Lite1 on real photos (tools/bench_efficientnet.py),
# then the ViT (tools/bench_vit.py: twin-uniform + Hessian against naive, float islands and integer-only),
# then the low-bit rows (tools/bench_lowbit.py: Hessian search and reconstruction, several hours on 2 cores);
# each writes its tables to docs/bench/ (README.md keeps a hand-copied summary).
bench: $(STAMP) fashion-mnist photos
	$(BIN)/python tools/bench.py
	$(BIN)/python tools/bench_efficientnet.py
	$(BIN)/python tools/bench_vit.py
	$(BIN)/python tools/bench_lowbit.py

# Real photographs for scoring EfficientNet-Lite1: Debian wallpaper/sample packages fetched with
# `apt-get download` (no root needed; `apt-get update` only if the lists are missing), ~126 MB.
photos: $(STAMP)
	@test -f $(PHOTOS) || { apt-get update -qq || true; $(BIN)/python tools/fetch_photos.py; }

train: $(STAMP) fashion-mnist
	$(BIN)/python tools/train_zoo.py --model all

clean:
	rm -rf $(VENV) build *.egg-info
