// A caching allocator for tensor storage.
//
// A training step allocates the same activation and gradient sizes every
// time. Returning freed blocks to the operating system and asking for them
// again costs a page fault per 4 KiB on every step (PyTorch loses up to 45 %
// of a 224x224 step this way), so freed blocks are kept and handed out again:
// small blocks (< 1 MiB) in per-size free lists, large ones (activations,
// gradients) as ranges of a few big reserved segments, where free neighbours
// merge and any size can reuse them (engine/memory_pool.cpp). All blocks are
// 64-byte aligned (AVX-512 cache line, and what oneDNN prefers).
#pragma once
#include <cstddef>
#include <memory>

namespace hfq {

struct PoolStats {
    size_t in_use_bytes = 0;  // held by live tensors
    size_t cached_bytes = 0;  // freed, kept for reuse (for large blocks: the free part of
                              // the segments below their highest block since the last
                              // pool_release_cached())
    size_t peak_in_use_bytes = 0;
    size_t os_allocations = 0;  // how often the pool had to ask the OS (small blocks, segments)
};

// Returns a block of at least `bytes` bytes; it goes back to the pool when the
// last shared_ptr copy is dropped. Thread-safe (loader threads allocate too).
std::shared_ptr<std::byte> pool_allocate(size_t bytes);

PoolStats pool_stats();
void pool_reset_peak();
// Gives the memory of every cached block back to the operating system (the
// segments keep their address space).
void pool_release_cached();

}  // namespace hfq
