// CHECK(cond, fmt, ...) of the standalone C++ tests (tests/cpp/, CMakeLists.txt): a failed
// check is printed with its file, line and condition, counted in g_fail, and the test goes on
// (a test's main returns failures(): 1 if any check failed). Atomic: test_table_cache checks
// from several threads.
#pragma once

#include <atomic>
#include <cstdio>

static std::atomic<int> g_fail{0};
#define CHECK(cond, ...)                                                            \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      ++g_fail;                                                                     \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                            \
      std::fprintf(stderr, "\n");                                                   \
    }                                                                               \
  } while (0)

// The exit status of a test: 0, or 1 after saying how many checks failed.
static inline int failures() {
  if (g_fail == 0) return 0;
  std::fprintf(stderr, "%d check(s) failed\n", g_fail.load());
  return 1;
}
