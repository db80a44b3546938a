// The cache of launch tables on the device (csrc/ops_cuda.cu's CudaLauncher::table), as a
// template over the memory it manages, so that its logic is plain C++: ops_cuda.cu
// instantiates it over CUDA (cudaMalloc, an upload on the current stream, cudaFree, the
// stream's capture state), tests/cpp/test_table_cache.cpp over host memory that records
// every block it hands out and frees, and checks what the device cannot show without a GPU
// (and a GPU only shows as a rare wrong result): that no table is freed while a launch still
// needs it, that a failed upload leaks nothing, that a CUDA graph's tables are never freed.
//
// Tables are keyed by their exact bytes (pointers, dtypes, sizes, ids): a table that compares
// equal describes the same memory, so reusing it is always correct, also after a tensor was
// freed and another one allocated at the same address.  An optimizer calls the ops with the
// same few layouts every step (one per parameter group and op), so after the first step no
// call uploads anything.  Bounded; the least recently used table is dropped.  A step cycles
// through its layouts in a fixed order, the worst case for that policy: once they outnumber
// the capacity every call misses (a cudaFree, an upload, a stream sync).  At 64 tables that
// was any ZO-Adam with more than 32 param groups (two layouts each: perturb, and params + m +
// v), e.g. layer-wise lr groups of an LLM.  1024 tables of 88 bytes a tensor: device memory of
// 13 MB if every one were a ViT-B list (152 tensors), the usual few tables of a run far less.
//
// Lifetimes (why get returns a Handle and not the pointer):
// - A table is used after get returns: the caller launches its kernels over it.  Another
//   thread's miss may evict it in between (more layouts in use than the capacity); freed
//   then, the launch read freed memory (or another layout's table, allocated at the same
//   address).  A Handle holds its table: an evicted table that is still held is retired,
//   not freed, and freed by the first miss after its last Handle dropped.
// - All frees happen in get's miss path, under the lock, where the uploads happen anyway:
//   cudaFree waits for the device to finish (so no kernel still reads the table), which a
//   Handle's destructor (after every launch) must not do, and it may fail, which a destructor
//   cannot report.
// - Under CUDA-graph capture (torch.cuda.graph) the stream may not allocate, synchronize or
//   free: a miss raises kCaptureMissMessage (torch's documented warm-up uploads every table
//   first), and nothing is evicted or freed.  A graph keeps the table's address and reads it
//   at every replay, for as long as the graph lives, which the cache cannot know: a table
//   fetched during a capture is pinned, never evicted (the cache then grows past its
//   capacity if every table is pinned; graphs capture few layouts).
// - An upload that fails (out of memory, an error of the stream) frees its block.
//
// The Memory policy (one instance, called under the cache's lock except `capturing`):
//   bool capturing();                           // is the caller's stream being captured
//   void* try_allocate(size_t bytes);           // nullptr: out of memory (error cleared)
//   void release_cached_memory();               // hand cached free memory back (torch's emptyCache)
//   [[noreturn]] void out_of_memory(size_t bytes);
//   void upload(void* dst, const void* src, size_t bytes);  // complete when it returns
//   void free(void* p) noexcept;
//   [[noreturn]] void fail(const char* message);  // raise the user's error
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

namespace zf_cuda {

inline constexpr const char* kCaptureMissMessage =
    "zfkernels: a CUDA graph is being captured (torch.cuda.graph) and this op call's launch table "
    "(its parameter layout: tensors, dtypes, sizes, ids) is not on the device yet; uploading it "
    "would allocate and synchronize, which capture forbids. Run the step once before capturing "
    "(torch's warm-up on a side stream), with the same parameters, buffers and param groups, so "
    "that every table the graph uses is uploaded before the capture.";

template <class Memory>
class TableCache {
  struct Item {
    int device;
    std::vector<uint8_t> bytes;  // the key: the table as uploaded
    void* dptr;
    uint64_t used;               // clock of the last get: LRU
    size_t holders;              // Handles alive
    bool pinned;                 // fetched during a capture: a graph may read it at any replay
  };

 public:
  static constexpr size_t kDefaultCapacity = 1024;

  // Holds its table on the device (not evicted to be freed) while it lives: keep it until
  // the launches over the table are enqueued.  Move-only; must not outlive the cache.
  class Handle {
   public:
    Handle() = default;
    Handle(Handle&& o) noexcept : cache_(o.cache_), item_(o.item_) { o.cache_ = nullptr; }
    Handle& operator=(Handle&& o) noexcept {
      if (this != &o) {
        reset();
        cache_ = o.cache_;
        item_ = o.item_;
        o.cache_ = nullptr;
      }
      return *this;
    }
    Handle(const Handle&) = delete;
    Handle& operator=(const Handle&) = delete;
    ~Handle() { reset(); }
    const void* get() const { return cache_ ? item_->dptr : nullptr; }
    void reset() noexcept {
      if (cache_) cache_->release(item_);
      cache_ = nullptr;
    }

   private:
    friend class TableCache;
    Handle(TableCache* c, Item* it) : cache_(c), item_(it) {}
    TableCache* cache_ = nullptr;
    Item* item_ = nullptr;
  };

  explicit TableCache(Memory memory = Memory(), size_t capacity = kDefaultCapacity)
      : memory_(std::move(memory)), capacity_(capacity) {}
  TableCache(const TableCache&) = delete;
  TableCache& operator=(const TableCache&) = delete;
  ~TableCache() {
    for (Item& it : live_) memory_.free(it.dptr);
    for (Item& it : retired_) memory_.free(it.dptr);
  }

  // The device copy of the `bytes` bytes at `key` for `device` (the current one: the policy
  // allocates and uploads there), uploaded on a miss.
  Handle get(const void* key, size_t bytes, int device) {
    const bool capturing = memory_.capturing();  // the caller's stream: asked outside the lock
    std::lock_guard<std::mutex> lock(mu_);
    ++clock_;
    for (Item& it : live_) {
      if (it.device == device && it.bytes.size() == bytes && std::memcmp(it.bytes.data(), key, bytes) == 0) {
        it.used = clock_;
        if (capturing) it.pinned = true;
        ++it.holders;
        return Handle(this, &it);
      }
    }
    if (capturing) memory_.fail(kCaptureMissMessage);
    free_released();
    Item item{device, std::vector<uint8_t>(static_cast<const uint8_t*>(key), static_cast<const uint8_t*>(key) + bytes),
              nullptr, clock_, 1, false};
    // Owned until the table is in the cache: a failed upload (or a failure to record it)
    // frees the block instead of leaking it.
    struct Owned {
      Memory& m;
      void* p;
      ~Owned() {
        if (p) m.free(p);
      }
    } block{memory_, allocate(bytes)};
    memory_.upload(block.p, key, bytes);
    item.dptr = block.p;
    // Evict after the upload: a failed allocation or upload leaves the cache as it was.
    if (live_.size() >= capacity_) evict_lru();
    live_.push_back(std::move(item));
    block.p = nullptr;
    return Handle(this, &live_.back());
  }

  // Tables cached (retired ones, evicted but not yet freed, not counted).
  size_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return live_.size();
  }
  Memory& memory() { return memory_; }

 private:
  // The memory of a run near the device's capacity is mostly reserved by torch's caching
  // allocator (free blocks it keeps cached): an allocation of a few bytes then fails where
  // torch's own allocations free cached blocks and retry.  So does this one, once.
  void* allocate(size_t bytes) {
    void* p = memory_.try_allocate(bytes);
    if (!p) {
      memory_.release_cached_memory();
      p = memory_.try_allocate(bytes);
    }
    if (!p) memory_.out_of_memory(bytes);
    return p;
  }

  // The least recently used table that no graph may read: freed if no Handle holds it
  // (the free waits for the kernels that may still read it), else retired until released.
  void evict_lru() {
    auto lru = live_.end();
    for (auto it = live_.begin(); it != live_.end(); ++it)
      if (!it->pinned && (lru == live_.end() || it->used < lru->used)) lru = it;
    if (lru == live_.end()) return;  // all pinned: grow rather than free a graph's table
    if (lru->holders == 0) {
      memory_.free(lru->dptr);
      live_.erase(lru);
    } else {
      retired_.splice(retired_.end(), live_, lru);  // the Handles' Item* stay valid
    }
  }

  void free_released() {
    for (auto it = retired_.begin(); it != retired_.end();) {
      if (it->holders == 0) {
        memory_.free(it->dptr);
        it = retired_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void release(Item* it) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    --it->holders;  // a retired table is freed by the next miss (see the header)
  }

  Memory memory_;
  const size_t capacity_;
  std::mutex mu_;
  std::list<Item> live_;     // list: a Handle's Item* stays valid across inserts, erases, splices
  std::list<Item> retired_;  // evicted while held
  uint64_t clock_ = 0;
};

}  // namespace zf_cuda
