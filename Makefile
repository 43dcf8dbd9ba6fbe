# The two commands a fresh machine needs: `make demo` and `make test`. Both set up and build.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all setup build demo analyze-demo test test-gpu clean

all: build

setup:
	@bash scripts/setup.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: setup $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

# The main job, on the built-in text (data/kjv_excerpt.txt, public domain): a small
# character-level GPT trained from the same seed on the same batches at fp32 and at int4
# (HQ forward, bit-split + LSS backward), then the table and the picture of the loss curves.
# Only the CLI is built, so a fresh 2-core machine gets to the training quickly.
DEMO_OUT ?= out/demo
DEMO_ARGS ?= --model gpt --layers 2 --d-model 64 --heads 4 --context 64 --batch 16 \
             --steps 600 --lr 3e-3 --warmup 50 --eval-every 100 --eval-batches 16 --log-every 100
demo: setup $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS) --target nibble
	$(BUILD)/nibble compare --precisions fp32,int4 $(DEMO_ARGS) --out $(DEMO_OUT)

# Which INT4 quantizer suits an activation with outlier channels (SQNR table).
analyze-demo: build
	$(BUILD)/nibble analyze --builtin

# Every CPU test.
test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --label-exclude gpu

# GPU tests, for the machine with an NVIDIA GPU.
test-gpu: build
	cd $(BUILD) && ctest --output-on-failure --label-regex gpu

clean:
	rm -rf $(BUILD)
