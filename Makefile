# msa-train build. `make` builds the CPU backend, the programs and the tests; with nvcc on PATH it
# also compiles every CUDA source in kernels/cuda (CI runs that to catch CUDA build breaks).
#   make            build/train, build/prepare_text, build/opcheck, tests
#   make test       CPU tests (closing line "N passed, N failed")
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

CFLAGS += $(HDF5_CFLAGS) $(BLAS_CFLAGS)
LDLIBS := $(HDF5_LIBS) -ljansson $(BLAS_LIBS) $(LDLIBS)

LIB_SRC  := $(wildcard kernels/*.c kernels/cpu/*.c autograd/*.c data/*.c train/*.c dist/*.c)
LIB_SRC  := $(filter-out train/main.c,$(LIB_SRC))
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
LIB      := $(BUILD)/libmsa.a

TOOLS      := $(patsubst tools/%.c,$(BUILD)/%,$(wildcard tools/*.c))
TEST_SRC   := $(wildcard tests/test_*.c)
TEST_BINS  := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
TEST_UTIL  := $(BUILD)/obj/tests/gradcheck.o

NVCC    := $(shell command -v nvcc 2>/dev/null)
CU_SRC  := $(wildcard kernels/cuda/*.cu)
CU_OBJ  := $(CU_SRC:%.cu=$(BUILD)/obj/%.o)
NVCCFLAGS := -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xcompiler -Wall,-Wextra,-Werror -DMSA_CUDA

ALL := $(BUILD)/train $(TOOLS) $(TEST_BINS)
ifneq ($(NVCC),)
ifneq ($(CU_SRC),)
  ALL += cuda
endif
endif

.PHONY: all test data cuda clean
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
	@bash tests/run_tests.sh $(TEST_BINS)

data: data/shakespeare/train.h5
data/shakespeare/train.h5: data/shakespeare/input.txt $(BUILD)/prepare_text
	$(BUILD)/prepare_text --tokenizer char --val-fraction 0.1 data/shakespeare/input.txt data/shakespeare

cuda: $(CU_OBJ)
$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

clean:
	rm -rf $(BUILD)

-include $(LIB_OBJ:.o=.d) $(TEST_UTIL:.o=.d)
