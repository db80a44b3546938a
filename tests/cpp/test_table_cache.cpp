// ctest suite for csrc/table_cache.h, over a host-memory policy that records every block it
// hands out: what the CUDA instantiation (csrc/ops_cuda.cu) cannot show without a GPU.
// Usage: test_table_cache <hit_miss|lru|held|upload_throws|oom|capture_miss|capture_pin|hammer>
#include "table_cache.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"  // CHECK, failures()

// Host blocks, never reused (a freed block is poisoned and kept), so that a table read after
// its free is seen: not live, and its bytes are 0xDD.
struct Ledger {
  std::mutex mu;
  std::map<void*, size_t> live;
  std::vector<void*> dead;
  int allocs = 0, frees = 0, releases = 0;
  int fail_allocs = 0;   // the next n try_allocate calls report out of memory
  int fail_uploads = 0;  // the next n uploads throw
  ~Ledger() {
    for (auto& kv : live) std::free(kv.first);
    for (void* p : dead) std::free(p);
  }
  bool is_live(const void* p) {
    std::lock_guard<std::mutex> lock(mu);
    return live.count(const_cast<void*>(p)) != 0;
  }
  size_t n_live() {
    std::lock_guard<std::mutex> lock(mu);
    return live.size();
  }
};

thread_local bool t_capturing = false;  // the calling thread's stream is being captured

struct FakeMemory {
  Ledger* l;
  bool capturing() { return t_capturing; }
  void* try_allocate(size_t bytes) {
    std::lock_guard<std::mutex> lock(l->mu);
    if (l->fail_allocs > 0) {
      --l->fail_allocs;
      return nullptr;
    }
    void* p = std::malloc(bytes);
    l->live[p] = bytes;
    ++l->allocs;
    return p;
  }
  void release_cached_memory() {
    std::lock_guard<std::mutex> lock(l->mu);
    ++l->releases;
  }
  [[noreturn]] void out_of_memory(size_t) { throw std::bad_alloc(); }
  void upload(void* dst, const void* src, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(l->mu);
      if (l->fail_uploads > 0) {
        --l->fail_uploads;
        throw std::runtime_error("fake: upload failed");
      }
      if (!l->live.count(dst)) throw std::logic_error("fake: upload to a block that is not live");
    }
    std::memcpy(dst, src, bytes);
  }
  void free(void* p) noexcept {
    std::lock_guard<std::mutex> lock(l->mu);
    auto it = l->live.find(p);
    if (it == l->live.end()) {
      std::fprintf(stderr, "fake: free of a block that is not live (double free)\n");
      std::abort();
    }
    std::memset(p, 0xDD, it->second);
    l->live.erase(it);
    l->dead.push_back(p);
    ++l->frees;
  }
  [[noreturn]] void fail(const char* message) { throw std::runtime_error(message); }
};

using Cache = zf_cuda::TableCache<FakeMemory>;

// A table of 4 words that names its layout k.
struct Key {
  uint64_t w[4];
};
static Key key(uint64_t k) { return Key{{k, k * 3 + 1, ~k, 42}}; }
static Cache::Handle get(Cache& c, uint64_t k, int device = 0) {
  const Key t = key(k);
  return c.get(&t, sizeof t, device);
}
static bool holds(const Cache::Handle& h, uint64_t k) {
  const Key t = key(k);
  return h.get() && std::memcmp(h.get(), &t, sizeof t) == 0;
}

static void test_hit_miss() {
  Ledger l;
  {
    Cache c(FakeMemory{&l}, 4);
    const void* a;
    {
      Cache::Handle h = get(c, 1);
      a = h.get();
      CHECK(holds(h, 1), "the uploaded table differs from the key");
    }
    CHECK(l.allocs == 1, "%d allocations for one miss", l.allocs);
    {
      Cache::Handle h = get(c, 1);
      CHECK(h.get() == a && l.allocs == 1, "a hit allocated (%d) or moved the table", l.allocs);
      Cache::Handle h2 = get(c, 1, /*device=*/1);
      CHECK(h2.get() != a && l.allocs == 2, "the same bytes on another device must be a miss");
      Cache::Handle h3 = get(c, 2);
      CHECK(holds(h3, 2) && l.allocs == 3 && c.size() == 3, "allocs %d size %zu", l.allocs, c.size());
    }
    CHECK(l.frees == 0, "%d tables freed under capacity", l.frees);
    // The whole table is the key: a shorter table that is a prefix of a cached one (a list of
    // fewer tensors), or one that differs in its last byte only (the last tensor's id), is
    // another layout, uploaded with its own bytes.
    Ledger l2;
    Cache c2(FakeMemory{&l2}, 4);
    Key t = key(7);
    Cache::Handle whole = c2.get(&t, sizeof t, 0);
    Cache::Handle prefix = c2.get(&t, sizeof t / 2, 0);
    CHECK(prefix.get() != whole.get() && l2.allocs == 2 && l2.live[const_cast<void*>(prefix.get())] == sizeof t / 2,
          "a table that is a prefix of a cached one hit it (allocs %d)", l2.allocs);
    Key last = t;
    reinterpret_cast<uint8_t*>(&last)[sizeof last - 1] ^= 1;
    Cache::Handle other = c2.get(&last, sizeof last, 0);
    CHECK(other.get() != whole.get() && l2.allocs == 3 && std::memcmp(other.get(), &last, sizeof last) == 0,
          "a table differing in its last byte hit another (allocs %d)", l2.allocs);
  }
  CHECK(l.n_live() == 0, "%zu blocks leaked by the cache's destructor", l.n_live());
}

static void test_lru() {
  Ledger l;
  Cache c(FakeMemory{&l}, 3);
  std::map<uint64_t, const void*> at;
  for (uint64_t k : {1, 2, 3}) at[k] = get(c, k).get();
  get(c, 1);     // 2 is now the least recently used
  get(c, 4);     // evicts 2
  CHECK(!l.is_live(at[2]) && l.is_live(at[1]) && l.is_live(at[3]), "not the LRU table was freed");
  CHECK(get(c, 1).get() == at[1] && get(c, 3).get() == at[3], "survivors must hit");
  const int allocs = l.allocs;
  get(c, 2);     // a miss again; evicts 4 (1 and 3 were used after it)
  CHECK(l.allocs == allocs + 1 && c.size() == 3, "allocs %d size %zu", l.allocs, c.size());
  CHECK(get(c, 1).get() == at[1] && get(c, 3).get() == at[3] && l.allocs == allocs + 1, "4 was not the LRU");
  // Now 2 (just uploaded) was used before 1 and 3: the next miss evicts 2, the one after it 1,
  // never the table the previous miss uploaded.
  const void* five = get(c, 5).get();
  get(c, 6);
  CHECK(l.is_live(five) && get(c, 5).get() == five && l.allocs == allocs + 3,
        "the table uploaded by the previous miss was evicted first (allocs %d)", l.allocs);
}

// defect (a): a table evicted by a miss while a launch still holds it must stay readable.
static void test_held() {
  Ledger l;
  Cache c(FakeMemory{&l}, 2);
  Cache::Handle h = get(c, 1);
  const void* p = h.get();
  get(c, 2);
  get(c, 3);  // 1 is the LRU: evicted, but held
  get(c, 4);
  CHECK(l.is_live(p) && holds(h, 1), "a held table was freed by an eviction");
  CHECK(c.size() == 2, "size %zu", c.size());
  h.reset();
  get(c, 5);  // the next miss frees the released table
  CHECK(!l.is_live(p), "an evicted table was not freed after its last handle dropped");
  CHECK(l.n_live() == 2, "%zu blocks live for a cache of 2", l.n_live());
  // Moved handles hold as well.
  Cache::Handle a = get(c, 6);
  Cache::Handle b = std::move(a);
  get(c, 7);
  get(c, 8);
  CHECK(holds(b, 6) && !a.get(), "a moved handle lost its table");
  // Move assignment (csrc/multi_tensor_ops.h assigns each group's handle): the source lets go
  // (one holder, not two releases), the target drops what it held.
  {
    Ledger l2;
    Cache c2(FakeMemory{&l2}, 1);
    Cache::Handle src = get(c2, 1);
    Cache::Handle dst = get(c2, 2);  // retires 1 (held by src)
    const void* two = dst.get();
    dst = std::move(src);            // 2 released (cached, unheld); dst holds 1
    CHECK(!src.get() && holds(dst, 1), "move assignment lost the table");
    src.reset();                     // a moved-from handle releases nothing
    get(c2, 3);                      // evicts 2 (unheld: freed); 1 retired and held: kept
    CHECK(!l2.is_live(two), "the table a handle held before a move assignment was never released");
    get(c2, 4);
    CHECK(holds(dst, 1), "a moved-from handle released its old table (a second release): freed while held");
    Cache::Handle& alias = dst;
    dst = std::move(alias);          // self-move keeps the table
    CHECK(holds(dst, 1), "a self-move assignment dropped the table");
  }
  // The cache's destructor frees what it still has: a table evicted while held and released
  // after (retired, waiting for a miss that never came).
  Ledger l3;
  {
    Cache c3(FakeMemory{&l3}, 1);
    Cache::Handle k = get(c3, 1);
    get(c3, 2);  // retires 1
    k.reset();
  }
  CHECK(l3.n_live() == 0, "%zu blocks leaked by the destructor (a released retired table)", l3.n_live());
}

// defect (b): an upload that throws frees its block.
static void test_upload_throws() {
  Ledger l;
  Cache c(FakeMemory{&l}, 2);
  get(c, 1);
  get(c, 2);
  l.fail_uploads = 1;
  bool threw = false;
  try {
    get(c, 3);
  } catch (const std::runtime_error&) {
    threw = true;
  }
  CHECK(threw, "the upload's error was not raised");
  CHECK(l.n_live() == 2 && c.size() == 2, "%zu blocks live (a failed upload leaked), %zu cached", l.n_live(), c.size());
  const int allocs = l.allocs;
  get(c, 1);
  get(c, 2);
  CHECK(l.allocs == allocs, "a failed upload evicted a table");
  CHECK(holds(get(c, 3), 3), "the retry must upload");
}

static void test_oom() {
  Ledger l;
  Cache c(FakeMemory{&l}, 2);
  l.fail_allocs = 1;
  CHECK(holds(get(c, 1), 1) && l.releases == 1, "one out-of-memory: release the cached memory and retry");
  l.fail_allocs = 2;
  bool threw = false;
  try {
    get(c, 2);
  } catch (const std::bad_alloc&) {
    threw = true;
  }
  CHECK(threw && l.releases == 2 && c.size() == 1 && l.n_live() == 1, "second out-of-memory must raise");
}

// defect (c): a miss under capture raises the warm-up message, allocating nothing.
static void test_capture_miss() {
  Ledger l;
  Cache c(FakeMemory{&l}, 2);
  get(c, 1);
  t_capturing = true;
  CHECK(holds(get(c, 1), 1), "a hit under capture must work");
  std::string what;
  try {
    get(c, 2);
  } catch (const std::runtime_error& e) {
    what = e.what();
  }
  t_capturing = false;
  CHECK(what.find("Run the step once before capturing") != std::string::npos, "got %s", what.c_str());
  CHECK(l.allocs == 1 && l.frees == 0, "a miss under capture allocated or freed");
}

// defect (c): a table a graph captured is never evicted, and nothing is freed under capture.
static void test_capture_pin() {
  Ledger l;
  Cache c(FakeMemory{&l}, 3);
  std::map<uint64_t, const void*> at;
  for (uint64_t k : {1, 2}) at[k] = get(c, k).get();
  t_capturing = true;
  get(c, 1);  // baked into a graph
  t_capturing = false;
  for (uint64_t k = 10; k < 40; ++k) get(c, k);  // churn: 1 stays the LRU of all
  CHECK(l.is_live(at[1]) && get(c, 1).get() == at[1], "a table fetched during capture was evicted");
  CHECK(!l.is_live(at[2]), "2 was never pinned and should have been evicted");
  CHECK(c.size() == 3, "size %zu", c.size());
  // Every table pinned: the cache grows rather than free one.
  Ledger l2;
  Cache c2(FakeMemory{&l2}, 2);
  t_capturing = true;
  try {
    get(c2, 1);
  } catch (const std::runtime_error&) {
  }
  t_capturing = false;
  get(c2, 1);
  get(c2, 2);
  t_capturing = true;
  get(c2, 1);
  get(c2, 2);
  t_capturing = false;
  get(c2, 3);
  CHECK(c2.size() == 3 && l2.frees == 0, "size %zu frees %d: a pinned table was evicted", c2.size(), l2.frees);
  // A table evicted while held, released during a capture: not freed until a miss outside it.
  Ledger l3;
  Cache c3(FakeMemory{&l3}, 1);
  Cache::Handle h = get(c3, 1);
  const void* p = h.get();
  get(c3, 2);  // retires 1
  t_capturing = true;
  h.reset();
  get(c3, 2);
  CHECK(l3.is_live(p) && l3.frees == 0, "freed during a capture");
  bool refused = false;
  try {
    get(c3, 9);  // a miss under capture: refused before it frees anything
  } catch (const std::runtime_error&) {
    refused = true;
  }
  CHECK(refused && l3.is_live(p) && l3.frees == 0, "a miss under capture freed a released table");
  t_capturing = false;
  get(c3, 3);
  CHECK(!l3.is_live(p), "the released table was not freed by the next miss");
}

// Several threads, more layouts than the capacity: every table a thread holds stays live and
// unchanged until it drops it, and nothing leaks.
static void test_hammer() {
  Ledger l;
  {
    Cache c(FakeMemory{&l}, 4);
    constexpr int kThreads = 8, kIters = 4000, kLayouts = 12;
    std::vector<std::thread> ts;
    for (int t = 0; t < kThreads; ++t) {
      ts.emplace_back([&, t] {
        uint64_t x = 0x9E3779B97F4A7C15ULL * (t + 1);
        for (int i = 0; i < kIters; ++i) {
          x ^= x << 13;
          x ^= x >> 7;
          x ^= x << 17;
          const uint64_t k = x % kLayouts;
          Cache::Handle h = get(c, k);
          Cache::Handle h2 = get(c, (k + 1) % kLayouts);  // two held at once, as a launch of two dtypes
          for (int spin = 0; spin < 3; ++spin) {
            std::this_thread::yield();
            CHECK(l.is_live(h.get()) && holds(h, k), "thread %d: a held table was freed or changed", t);
            CHECK(l.is_live(h2.get()) && holds(h2, (k + 1) % kLayouts), "thread %d: second table freed", t);
          }
        }
      });
    }
    for (std::thread& th : ts) th.join();
    CHECK(l.frees > 0, "the hammer never evicted: it tests nothing");
    CHECK(c.size() <= 4, "size %zu", c.size());
    get(c, 1000);  // frees every retired table (all released)
    CHECK(l.n_live() == c.size(), "%zu blocks live for %zu cached: leaked", l.n_live(), c.size());
  }
  CHECK(l.n_live() == 0, "%zu blocks leaked", l.n_live());
}

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "";
  if (which == "hit_miss") test_hit_miss();
  else if (which == "lru") test_lru();
  else if (which == "held") test_held();
  else if (which == "upload_throws") test_upload_throws();
  else if (which == "oom") test_oom();
  else if (which == "capture_miss") test_capture_miss();
  else if (which == "capture_pin") test_capture_pin();
  else if (which == "hammer") test_hammer();
  else {
    std::fprintf(stderr, "unknown test %s\n", which.c_str());
    return 2;
  }
  return failures();
}
