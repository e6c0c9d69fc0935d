#include "engine/memory_pool.h"

#include <sanitizer/asan_interface.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <set>
#include <unordered_map>
#include <utility>
#include <vector>

namespace hfq {
namespace {

constexpr size_t kAlignment = 64;
// Blocks of at least this size are large: carved from segments (below).
constexpr size_t kLargeBlock = size_t{1} << 20;
constexpr size_t kPage = 4096;
// Address space reserved per segment. Pages cost memory only once touched,
// so a large reservation is free and lets most blocks share one range.
constexpr size_t kSegmentBytes = size_t{1} << 32;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// Large blocks. A training step needs many sizes, and each size peaks at
// another moment (activations in the forward pass, gradients of other
// shapes in backward). Free lists of exact sizes would keep the sum of those
// peaks; here freed blocks merge with free neighbours and a request takes the
// smallest free range that fits, so memory freed as one size serves another,
// and the touched part of a segment stays near the peak of bytes in use.
class Segments {
public:
    // Reserves a new segment able to hold at least `size` bytes.
    void add_segment(size_t size) {
        size_t bytes = std::max(size, kSegmentBytes);
        // One page more than is handed out: free ranges of two segments that
        // happen to be adjacent in memory never merge.
        auto map = [](size_t n) {
            return mmap(nullptr, n + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        };
        void* base = map(bytes);
        if (base == MAP_FAILED) base = map(bytes = size);  // strict overcommit: reserve only what is asked
        if (base == MAP_FAILED) throw std::bad_alloc();
        auto* start = static_cast<std::byte*>(base);
        segments_[start] = {start + bytes, start};
        insert(start, bytes);
    }

    // Null when no free range fits.
    std::byte* take(size_t size) {
        auto it = by_size_.lower_bound({size, nullptr});
        if (it == by_size_.end()) return nullptr;
        auto [range_size, start] = *it;
        erase(start, range_size);
        if (range_size > size) insert(start + size, range_size - size);
        std::byte*& touched = std::prev(segments_.upper_bound(start))->second.touched_end;
        touched = std::max(touched, start + size);
        return start;
    }

    // Bytes of the segments up to their highest block handed out since the
    // last release_pages(): about what they cost in memory.
    size_t touched_bytes() const {
        size_t n = 0;
        for (const auto& [start, s] : segments_) n += s.touched_end - start;
        return n;
    }

    void give_back(std::byte* start, size_t size) {
        auto next = by_address_.lower_bound(start);
        if (next != by_address_.end() && start + size == next->first) {
            const auto [next_start, next_size] = *next;
            erase(next_start, next_size);
            size += next_size;
        }
        auto prev = by_address_.lower_bound(start);
        if (prev != by_address_.begin() && std::prev(prev)->first + std::prev(prev)->second == start) {
            const auto [prev_start, prev_size] = *std::prev(prev);
            erase(prev_start, prev_size);
            start = prev_start;
            size += prev_size;
        }
        insert(start, size);
    }

    // Gives the physical pages of every free range back to the OS; the
    // address space stays reserved and is touched again on reuse.
    void release_pages() {
        for (auto [start, size] : by_address_) {
            const auto begin = round_up(reinterpret_cast<uintptr_t>(start), kPage);
            const auto end = (reinterpret_cast<uintptr_t>(start) + size) / kPage * kPage;
            if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
            Segment& segment = std::prev(segments_.upper_bound(start))->second;
            if (start + size == segment.end) segment.touched_end = std::min(segment.touched_end, start);
        }
    }

private:
    void insert(std::byte* start, size_t size) {
        by_address_.emplace(start, size);
        by_size_.emplace(size, start);
    }
    void erase(std::byte* start, size_t size) {
        by_address_.erase(start);
        by_size_.erase({size, start});
    }

    // Two views of the same free ranges.
    std::map<std::byte*, size_t> by_address_;
    std::set<std::pair<size_t, std::byte*>> by_size_;  // best fit, lowest address first
    struct Segment {
        std::byte* end;          // of the part handed out
        std::byte* touched_end;  // of its highest block so far
    };
    std::map<std::byte*, Segment> segments_;  // by start
};

struct Pool {
    std::mutex mutex;
    std::unordered_map<size_t, std::vector<std::byte*>> free_blocks;  // small blocks, by size
    Segments segments;
    PoolStats stats;          // cached_bytes: small blocks only; pool_stats() adds the segments'
    size_t large_in_use = 0;  // bytes of in_use_bytes that are large blocks
};

Pool& pool() {
    // Never destroyed: tensors in static objects may be freed after main().
    static Pool* p = new Pool;
    return *p;
}

// The block's size as the pool hands it out.
size_t block_size(size_t bytes) {
    const size_t n = round_up(bytes == 0 ? kAlignment : bytes, kAlignment);
    return n >= kLargeBlock ? round_up(n, kPage) : n;
}

void give_back(std::byte* block, size_t size) {
    // Under AddressSanitizer a cached block is poisoned: a use after free is
    // still reported, though the block never goes back to malloc (no-op otherwise).
    ASAN_POISON_MEMORY_REGION(block, size);
    Pool& p = pool();
    std::lock_guard lock(p.mutex);
    if (size >= kLargeBlock) {
        p.segments.give_back(block, size);
        p.large_in_use -= size;
    } else {
        p.free_blocks[size].push_back(block);
        p.stats.cached_bytes += size;
    }
    p.stats.in_use_bytes -= size;
}

// Under the pool's lock: a block of `size`, reused if possible.
std::byte* take(Pool& p, size_t size) {
    if (size >= kLargeBlock) {
        std::byte* block = p.segments.take(size);
        if (!block) {
            ++p.stats.os_allocations;
            p.segments.add_segment(size);
            block = p.segments.take(size);
        }
        p.large_in_use += size;
        return block;
    }
    auto it = p.free_blocks.find(size);
    if (it != p.free_blocks.end() && !it->second.empty()) {
        std::byte* block = it->second.back();
        it->second.pop_back();
        p.stats.cached_bytes -= size;
        return block;
    }
    ++p.stats.os_allocations;
    auto* block = static_cast<std::byte*>(std::aligned_alloc(kAlignment, size));
    if (!block) throw std::bad_alloc();
    return block;
}

}  // namespace

std::shared_ptr<std::byte> pool_allocate(size_t bytes) {
    const size_t size = block_size(bytes);
    Pool& p = pool();
    std::byte* block = nullptr;
    {
        std::lock_guard lock(p.mutex);
        block = take(p, size);
        p.stats.in_use_bytes += size;
        if (p.stats.in_use_bytes > p.stats.peak_in_use_bytes) p.stats.peak_in_use_bytes = p.stats.in_use_bytes;
    }
    // Only the bytes asked for are usable: under AddressSanitizer, reading
    // past them into the block's rounding is reported too.
    ASAN_UNPOISON_MEMORY_REGION(block, bytes);
    ASAN_POISON_MEMORY_REGION(block + bytes, size - bytes);
    return std::shared_ptr<std::byte>(block, [size](std::byte* b) { give_back(b, size); });
}

PoolStats pool_stats() {
    Pool& p = pool();
    std::lock_guard lock(p.mutex);
    PoolStats s = p.stats;
    s.cached_bytes += p.segments.touched_bytes() - p.large_in_use;
    return s;
}

void pool_reset_peak() {
    std::lock_guard lock(pool().mutex);
    pool().stats.peak_in_use_bytes = pool().stats.in_use_bytes;
}

void pool_release_cached() {
    Pool& p = pool();
    std::lock_guard lock(p.mutex);
    for (auto& [size, blocks] : p.free_blocks)
        for (std::byte* b : blocks) std::free(b);
    p.free_blocks.clear();
    p.stats.cached_bytes = 0;
    p.segments.release_pages();
}

}  // namespace hfq
