# msa-train build. `make` builds the CPU backend, the programs and the tests. With nvcc on PATH it
# also builds the CUDA backend (kernels/cuda: *.cu with nvcc for sm_90a, *.c with the C compiler) into
# the library, defines MSA_CUDA for every C file and links cuBLASLt, cuBLAS and the CUDA runtime;
# such binaries still run on machines without a GPU as long as train.device = "cpu" (CI runs `make`
# and `make test` that way). Without nvcc everything stays CPU-only. MPI (mpicc) is always needed;
# CUDA builds link NCCL too (dist/nccl.c).
#   make            build/train, build/prepare_text, build/opcheck, tests (and build/tests/gpu/test_gpu)
#   make test       CPU tests (closing line "N passed, N failed")
#   make test-gpu   CUDA kernels against the CPU reference + a short CPU-vs-CUDA training run (needs a GPU)
#   make data       tokenise the shipped Shakespeare text into data/shakespeare/{train,val}.h5
#   make data-long  the same text as data/shakespeare_long/{train,val}.h5: the last quarter for validation,
#                   one document of 278,849 tokens (longer than a 256K window; the shipped val.h5 has 111K)
#   make cuda       CUDA objects only (needs nvcc)
#   make BLAS=0     no OpenBLAS (plain OpenMP loops for GEMM)
#   make SANITIZE=1 [test]  the CPU build under AddressSanitizer and UndefinedBehaviorSanitizer, in
#                   build-san/ (the normal build/ stays as it is); its test run stops at the first finding
#   make fuzz-smoke every fuzz target of tests/fuzz/ for a bounded time (clang, libFuzzer; build-fuzz/)

CC      ?= gcc
FUZZ_CC ?= clang
# SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer build in build-san (make SANITIZE=1 test);
# SANITIZE=fuzz: the same with clang and libFuzzer's coverage in build-fuzz (make fuzz-smoke sets it)
SANITIZE ?= 0
ifeq ($(SANITIZE),1)
  BUILD := build-san
else ifeq ($(SANITIZE),fuzz)
  BUILD := build-fuzz
  CC    := $(FUZZ_CC)
  ifeq ($(shell command -v $(FUZZ_CC) 2>/dev/null),)
    $(error $(FUZZ_CC) not found: the fuzz targets need clang and libFuzzer (bash tools/install_deps.sh --fuzz))
  endif
else
  BUILD := build
endif
CFLAGS  := -std=c11 -O2 -g -Wall -Wextra -Werror -fopenmp -D_GNU_SOURCE -MMD -MP
LDLIBS  := -fopenmp -lm

PKG_HDF5 := $(shell pkg-config --exists hdf5 && echo hdf5)
ifeq ($(PKG_HDF5),)
  # Ubuntu/Debian serial HDF5 without a .pc file (the GPU machine): headers and libs at fixed places
  HDF5_CFLAGS := -I/usr/include/hdf5/serial
  HDF5_LIBS   := -L/usr/lib/x86_64-linux-gnu/hdf5/serial -lhdf5
else
  HDF5_CFLAGS := $(shell pkg-config --cflags hdf5)
  HDF5_LIBS   := $(shell pkg-config --libs hdf5)
endif
# extra include/library dirs for dependencies carried to machines that lack their -dev packages
DEPS_PREFIX ?=
ifneq ($(DEPS_PREFIX),)
  CFLAGS += -I$(DEPS_PREFIX)/usr/include -I$(DEPS_PREFIX)/usr/include/x86_64-linux-gnu
  LDLIBS += -L$(DEPS_PREFIX)/usr/lib/x86_64-linux-gnu -Wl,-rpath,$(DEPS_PREFIX)/usr/lib/x86_64-linux-gnu
endif

BLAS ?= 1
ifeq ($(BLAS),1)
  BLAS_CFLAGS := -DMSA_BLAS $(shell pkg-config --cflags openblas 2>/dev/null)
  BLAS_LIBS   := $(shell pkg-config --libs openblas 2>/dev/null || echo -lopenblas)
endif

# MPI (dist/: launch, ranks, CPU collectives): the flags of the mpicc wrapper (OpenMPI's --showme), so
# the build uses the C compiler above and every program links the MPI library
MPICC ?= mpicc
MPI_CFLAGS := $(shell $(MPICC) --showme:compile 2>/dev/null)
MPI_LIBS   := $(shell $(MPICC) --showme:link 2>/dev/null)
ifeq ($(strip $(MPI_LIBS)),)
  $(error $(MPICC) --showme:link gave nothing: install OpenMPI (bash tools/install_deps.sh: libopenmpi-dev, openmpi-bin))
endif

CFLAGS += $(HDF5_CFLAGS) $(BLAS_CFLAGS) $(MPI_CFLAGS)
LDLIBS := $(HDF5_LIBS) -ljansson $(BLAS_LIBS) $(MPI_LIBS) $(LDLIBS)

LIB_SRC  := $(wildcard kernels/*.c kernels/cpu/*.c autograd/*.c layers/*.c data/*.c train/*.c dist/*.c)
LIB_SRC  := $(filter-out train/main.c,$(LIB_SRC))
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
LIB      := $(BUILD)/libmsa.a

TOOLS      := $(patsubst tools/%.c,$(BUILD)/%,$(wildcard tools/*.c))
TEST_SRC   := $(wildcard tests/test_*.c)
TEST_BINS  := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
# Python tests of the tools (run with .venv/bin/python, which tools/install_deps.sh sets up)
TEST_PY    := $(wildcard tests/test_*.py)
TEST_UTIL  := $(BUILD)/obj/tests/gradcheck.o $(BUILD)/obj/tests/dist_harness.o

NVCC    := $(shell command -v nvcc 2>/dev/null)
ifneq ($(filter 1 fuzz,$(SANITIZE)),)
  # CPU only: the sanitizers see no device code, and the CUDA runtime's own allocations would only add noise
  NVCC :=
  # float-cast-overflow: GCC leaves it out of "undefined" (a double beyond an int's range cast to it)
  SAN_FLAGS := -fsanitize=address,undefined,float-cast-overflow $(if $(filter fuzz,$(SANITIZE)),-fsanitize=fuzzer-no-link)
  CFLAGS += $(SAN_FLAGS) -fno-sanitize-recover=all -fno-omit-frame-pointer
  # clang warns that it cannot vectorize the `omp simd` loops (kernels/cpu/vec_impl.h) once ASan
  # instruments them: a missed optimisation of this build, not a defect of the code
  CFLAGS += $(if $(filter fuzz,$(SANITIZE)),-Wno-pass-failed)
  LDLIBS += $(SAN_FLAGS)
endif
CU_SRC  := $(wildcard kernels/cuda/*.cu)
CU_OBJ  := $(CU_SRC:%.cu=$(BUILD)/obj/%.o)
NVCCFLAGS := -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xcompiler -Wall,-Wextra,-Werror -DMSA_CUDA -MMD -MP
# CUTLASS's headers (header-only), for the MoE grouped GEMM only: tools/install_deps.sh unpacks PyPI's
# nvidia-cutlass wheel there; -isystem keeps -Werror off their warnings; -DNDEBUG drops CuTe's device
# asserts, whose calls inside the mainloop make ptxas serialise the wgmma pipeline (ptxas C7510)
CUTLASS_INCLUDE ?= .deps/cutlass/include
CUTLASS_OBJ := $(BUILD)/obj/kernels/cuda/moe_grouped_gemm.o
GPU_TEST  := $(BUILD)/tests/gpu/test_gpu

ALL := $(BUILD)/train $(TOOLS) $(TEST_BINS)
ifneq ($(NVCC),)
  CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
  LIB_SRC += $(wildcard kernels/cuda/*.c)
  LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/obj/%.o) $(CU_OBJ)
  # the CUDA runtime and NCCL headers for dist/nccl.c (NCCL: in the toolkit here, in /usr/include and the
  # system library directory on the GPU machine, which the compiler searches anyway)
  CFLAGS  += -DMSA_CUDA -I$(CUDA_HOME)/include
  LDLIBS  += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lnccl -lcudnn -lcublasLt -lcublas -lcudart -lstdc++
  ALL     += $(GPU_TEST)
endif

.PHONY: all test test-gpu data data-long cuda clean
all: $(ALL)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(LIB): $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/train: train/main.c $(LIB)
	$(CC) $(CFLAGS) $< $(LIB) $(LDLIBS) -o $@

$(BUILD)/%: tools/%.c $(LIB)
	$(CC) $(CFLAGS) $< $(LIB) $(LDLIBS) -o $@

$(BUILD)/tests/%: tests/%.c $(TEST_UTIL) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< $(TEST_UTIL) $(LIB) $(LDLIBS) -o $@

ifneq ($(SANITIZE),1)
test: all data data-long
	@bash tests/run_tests.sh $(TEST_BINS) $(TEST_PY)
else
# The tests name their programs relative to the repository root (build/train, build/tests/test_dist, ...),
# so the sanitized suite runs in build-san/view: a link to every top-level entry of the repository, except
# that its build/ is build-san. SAN_OPTIONS says why each option is there.
SAN_VIEW := $(BUILD)/view
# abort_on_error: a finding kills with SIGABRT, never the exit status 1 that tests expect of a refused input.
# detect_leaks=0: fatal() ends a process with its memory in use by design (a refused input is what many
# tests run), so LeakSanitizer would report whatever a finished function's local pointed to; and OpenMPI
# keeps its own allocations until exit.
SAN_OPTIONS := ASAN_OPTIONS=abort_on_error=1:detect_leaks=0 UBSAN_OPTIONS=abort_on_error=1:print_stacktrace=1
test: all data data-long
	@rm -rf $(SAN_VIEW) && mkdir -p $(SAN_VIEW)
	@for e in $$(ls -A); do case $$e in build|$(BUILD)|.git) ;; *) ln -s ../../$$e $(SAN_VIEW)/$$e ;; esac; done
	@ln -s .. $(SAN_VIEW)/build
	@cd $(SAN_VIEW) && $(SAN_OPTIONS) bash tests/run_tests.sh $(TEST_BINS:$(BUILD)/%=build/%) $(TEST_PY)
endif

# GPU checks: every CUDA kernel against the CPU reference on random inputs, then a few training steps
# of configs/tiny.json on both devices (run from the repository root, on a machine with a GPU)
ifneq ($(NVCC),)
GPU_TEST_SRC := $(wildcard tests/gpu/*.c)
$(GPU_TEST): $(GPU_TEST_SRC) tests/gpu/gpu_check.h tests/gpu/gpu_cases.h $(TEST_UTIL) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(GPU_TEST_SRC) $(TEST_UTIL) $(LIB) $(LDLIBS) -o $@

test-gpu: $(GPU_TEST) data
	@bash tests/run_tests.sh $(GPU_TEST)
else
test-gpu:
	@echo "make test-gpu: nvcc is not on PATH, so this build has no CUDA backend" >&2; exit 1
endif

# Fuzz targets (tests/fuzz/README.md): each one's libFuzzer binary in build-fuzz/fuzz/, run for FUZZ_SECONDS
# each by tests/fuzz/smoke.sh, which fails on any finding
FUZZ_SECONDS ?= 45
FUZZ_TARGETS := $(patsubst tests/fuzz/%.c,$(BUILD)/fuzz/%,$(wildcard tests/fuzz/fuzz_*.c))
$(BUILD)/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $(BUILD)/obj/tests/fuzz/fuzz.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fsanitize=fuzzer $< $(BUILD)/obj/tests/fuzz/fuzz.o $(LIB) $(LDLIBS) -o $@
.PHONY: fuzz fuzz-smoke
.SECONDARY: $(BUILD)/obj/tests/fuzz/fuzz.o
ifeq ($(SANITIZE),fuzz)
fuzz: $(FUZZ_TARGETS)
fuzz-smoke: $(FUZZ_TARGETS)
	@bash tests/fuzz/smoke.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)
else
fuzz fuzz-smoke:
	@$(MAKE) --no-print-directory SANITIZE=fuzz $@
endif

data: data/shakespeare/train.h5
data/shakespeare/train.h5: data/shakespeare/input.txt $(BUILD)/prepare_text
	$(BUILD)/prepare_text --tokenizer char --val-fraction 0.1 data/shakespeare/input.txt data/shakespeare

# --min-doc-tokens 262145: the tool fails rather than write a validation file too short for a 256K window
data-long: data/shakespeare_long/train.h5
data/shakespeare_long/train.h5: data/shakespeare/input.txt $(BUILD)/prepare_text
	$(BUILD)/prepare_text --tokenizer char --val-fraction 0.25 --min-doc-tokens 262145 data/shakespeare/input.txt data/shakespeare_long

cuda: $(CU_OBJ)
$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@
$(CUTLASS_OBJ): NVCCFLAGS += -isystem $(CUTLASS_INCLUDE) --expt-relaxed-constexpr -DNDEBUG
$(CUTLASS_OBJ): $(CUTLASS_INCLUDE)/cutlass/cutlass.h
$(CUTLASS_INCLUDE)/cutlass/cutlass.h:
	@echo "make: CUTLASS's headers are not in $(CUTLASS_INCLUDE): run bash tools/install_deps.sh (or make CUTLASS_INCLUDE=DIR)" >&2; exit 1

clean:
	rm -rf build build-san build-fuzz

-include $(LIB_OBJ:.o=.d) $(TEST_UTIL:.o=.d) $(CU_OBJ:.o=.d) $(BUILD)/obj/tests/fuzz/fuzz.d
