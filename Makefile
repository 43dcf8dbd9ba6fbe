# The two commands a fresh machine needs: `make demo` and `make test`. Both set up and build.
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all setup build demo test test-gpu clean

all: build

setup:
	@bash scripts/setup.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

build: setup $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

# The main job on built-in data: which INT4 quantizer suits an activation with outliers.
demo: build
	$(BUILD)/nibble analyze --builtin

# Every CPU test.
test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --label-exclude gpu

# GPU tests, for the machine with an NVIDIA GPU.
test-gpu: build
	cd $(BUILD) && ctest --output-on-failure --label-regex gpu

clean:
	rm -rf $(BUILD)
