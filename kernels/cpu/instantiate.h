/* Instantiate the kernel bodies in CPU_IMPL for float and double (see cpu.h). No include guard:
 * included once per kernel file. */
#ifndef CPU_IMPL
#error "define CPU_IMPL before including instantiate.h"
#endif

#define T float
#define S(name) name##_f32
#include CPU_IMPL
#undef T
#undef S

#define T double
#define S(name) name##_f64
#include CPU_IMPL
#undef T
#undef S

#undef CPU_IMPL
