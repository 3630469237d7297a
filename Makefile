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
#   make cuda       CUDA objects only (needs nvcc)
#   make BLAS=0     no OpenBLAS (plain OpenMP loops for GEMM)

CC      ?= gcc
BUILD   := build
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
CU_SRC  := $(wildcard kernels/cuda/*.cu)
CU_OBJ  := $(CU_SRC:%.cu=$(BUILD)/obj/%.o)
NVCCFLAGS := -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xcompiler -Wall,-Wextra,-Werror -DMSA_CUDA -MMD -MP
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

.PHONY: all test test-gpu data cuda clean
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

test: all data
	@bash tests/run_tests.sh $(TEST_BINS) $(TEST_PY)

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

data: data/shakespeare/train.h5
data/shakespeare/train.h5: data/shakespeare/input.txt $(BUILD)/prepare_text
	$(BUILD)/prepare_text --tokenizer char --val-fraction 0.1 data/shakespeare/input.txt data/shakespeare

cuda: $(CU_OBJ)
$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

clean:
	rm -rf $(BUILD)

-include $(LIB_OBJ:.o=.d) $(TEST_UTIL:.o=.d) $(CU_OBJ:.o=.d)
