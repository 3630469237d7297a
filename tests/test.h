/* A tiny test framework: each tests/test_*.c is one program whose main runs its tests with RUN()
 * and ends with TEST_END(), printing "N passed, N failed". tests/run_tests.sh adds them up. */
#ifndef MSA_TEST_H
#define MSA_TEST_H

#include <stdio.h>
#include <stdlib.h>

typedef struct TestCtx {
    int passed, failed;
    int current_failed;
    void *fixture; /* whatever the test program's main shares with its tests (e.g. an Engine) */
} TestCtx;

#define EXPECT(cond, ...)                                                                           \
    do {                                                                                            \
        if (!(cond)) {                                                                              \
            printf("    FAIL %s:%d: ", __FILE__, __LINE__);                                         \
            printf(__VA_ARGS__);                                                                    \
            printf("\n");                                                                           \
            tc->current_failed = 1;                                                                 \
            return;                                                                                 \
        }                                                                                           \
    } while (0)

#define TEST(name) static void name(TestCtx *tc)

#define RUN(name)                                                                                   \
    do {                                                                                            \
        tc->current_failed = 0;                                                                     \
        fflush(stdout);                                                                             \
        name(tc);                                                                                   \
        if (tc->current_failed) tc->failed++;                                                       \
        else tc->passed++;                                                                          \
        printf("  %s %s\n", tc->current_failed ? "FAIL" : "ok  ", #name);                           \
        fflush(stdout);                                                                             \
    } while (0)

#define TEST_BEGIN()                                                                                \
    TestCtx tc_storage = {0};                                                                 \
    TestCtx *tc = &tc_storage

#define TEST_END()                                                                                  \
    do {                                                                                            \
        printf("%d passed, %d failed\n", tc->passed, tc->failed);                                   \
        return tc->failed ? 1 : 0;                                                                  \
    } while (0)

#endif
