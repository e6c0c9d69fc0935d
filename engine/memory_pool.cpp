#include "engine/memory_pool.h"

#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace hfq {
namespace {

constexpr size_t kAlignment = 64;

struct Pool {
    std::mutex mutex;
    std::unordered_map<size_t, std::vector<std::byte*>> free_blocks;  // by size
    PoolStats stats;
};

Pool& pool() {
    // Never destroyed: tensors in static objects may be freed after main().
    static Pool* p = new Pool;
    return *p;
}

size_t round_up(size_t bytes) {
    size_t n = bytes == 0 ? kAlignment : bytes;
    return (n + kAlignment - 1) / kAlignment * kAlignment;
}

void give_back(std::byte* block, size_t size) {
    Pool& p = pool();
    std::lock_guard lock(p.mutex);
    p.free_blocks[size].push_back(block);
    p.stats.in_use_bytes -= size;
    p.stats.cached_bytes += size;
}

}  // namespace

std::shared_ptr<std::byte> pool_allocate(size_t bytes) {
    const size_t size = round_up(bytes);
    Pool& p = pool();
    std::byte* block = nullptr;
    {
        std::lock_guard lock(p.mutex);
        auto it = p.free_blocks.find(size);
        if (it != p.free_blocks.end() && !it->second.empty()) {
            block = it->second.back();
            it->second.pop_back();
            p.stats.cached_bytes -= size;
        } else {
            ++p.stats.os_allocations;
        }
        p.stats.in_use_bytes += size;
        if (p.stats.in_use_bytes > p.stats.peak_in_use_bytes)
            p.stats.peak_in_use_bytes = p.stats.in_use_bytes;
    }
    if (!block) {
        block = static_cast<std::byte*>(std::aligned_alloc(kAlignment, size));
        if (!block) {
            std::lock_guard lock(p.mutex);
            p.stats.in_use_bytes -= size;
            throw std::bad_alloc();
        }
    }
    return std::shared_ptr<std::byte>(block, [size](std::byte* b) { give_back(b, size); });
}

PoolStats pool_stats() {
    std::lock_guard lock(pool().mutex);
    return pool().stats;
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
}

}  // namespace hfq
