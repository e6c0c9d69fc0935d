// Tensor storage, views, the memory pool and tensor_math.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>

#include "engine/check.h"
#include "engine/memory_pool.h"
#include "engine/random.h"
#include "engine/tensor.h"
#include "engine/tensor_math.h"

using namespace hfq;

TEST_CASE("storage is 64-byte aligned, views share it") {
    Tensor t = Tensor::from_vector({2, 3}, {1, 2, 3, 4, 5, 6});
    CHECK(reinterpret_cast<uintptr_t>(t.raw()) % 64 == 0);
    Tensor v = t.reshape({3, 2});
    v.f32()[5] = 60;
    CHECK(t.f32()[5] == 60);
    CHECK(v.shares_storage_with(t));
    Tensor row = t.slice0(1, 2);
    CHECK(row.shape() == Shape{1, 3});
    CHECK(row.f32()[0] == 4);
    Tensor c = t.clone();
    c.f32()[0] = -1;
    CHECK(t.f32()[0] == 1);
}

TEST_CASE("bad shapes and types throw with the shapes in the message") {
    Tensor t = Tensor::zeros({2, 3});
    CHECK_THROWS_WITH_AS(t.reshape({4, 2}), "reshape: cannot view [2, 3] as [4, 2]", Error);
    CHECK_THROWS_AS(t.data<int32_t>(), Error);
    CHECK_THROWS_AS(add(t, Tensor::zeros({3, 2})), Error);
    CHECK_THROWS_AS(t.slice0(1, 3), Error);
    CHECK_THROWS_AS(Tensor::from_vector({2}, {1, 2, 3}), Error);
    CHECK_THROWS_AS(t.item(), Error);
}

TEST_CASE("the pool reuses freed blocks instead of asking the OS again") {
    const size_t bytes = 12345 * 4;
    { Tensor a = Tensor::empty({12345}); }
    const PoolStats before = pool_stats();
    for (int i = 0; i < 10; ++i) Tensor a = Tensor::empty({12345});
    const PoolStats after = pool_stats();
    CHECK(after.os_allocations == before.os_allocations);
    CHECK(after.cached_bytes >= bytes);
}

TEST_CASE("large blocks: freed neighbours merge and serve another size without asking the OS") {
    const int64_t floats = int64_t{1} << 20;  // 4 MiB: a large block
    std::byte* first = nullptr;
    size_t os_allocations = 0;
    {
        Tensor a = Tensor::empty({floats}), b = Tensor::empty({floats});
        CHECK(reinterpret_cast<uintptr_t>(a.raw()) % 64 == 0);
        CHECK(static_cast<std::byte*>(b.raw()) == static_cast<std::byte*>(a.raw()) + floats * 4);  // carved in order
        first = static_cast<std::byte*>(a.raw());
        os_allocations = pool_stats().os_allocations;
    }
    CHECK(pool_stats().cached_bytes >= size_t(2 * floats * 4));
    // Twice the size: the two freed blocks, merged, at the same address.
    Tensor c = Tensor::empty({2 * floats});
    CHECK(static_cast<std::byte*>(c.raw()) == first);
    // A smaller block of another size reuses the start of a free range too.
    c = Tensor();
    Tensor d = Tensor::empty({3 * floats / 2});
    CHECK(static_cast<std::byte*>(d.raw()) == first);
    CHECK(pool_stats().os_allocations == os_allocations);
    // Released: nothing is kept any more (no other large block is alive here).
    d = Tensor();
    pool_release_cached();
    CHECK(pool_stats().cached_bytes == 0);
    Tensor e = Tensor::empty({floats});  // the address space is still the pool's
    CHECK(static_cast<std::byte*>(e.raw()) == first);
}

TEST_CASE("tensor_math") {
    Tensor a = Tensor::from_vector({3}, {1, -2, 3});
    Tensor b = Tensor::from_vector({3}, {0.5f, 0.5f, -1});
    CHECK(add(a, b).to_vector() == std::vector<float>{1.5f, -1.5f, 2});
    CHECK(mul(a, b).to_vector() == std::vector<float>{0.5f, -1, -3});
    CHECK(scale(a, 2).to_vector() == std::vector<float>{2, -4, 6});
    axpy_(a, 2, b);
    CHECK(a.to_vector() == std::vector<float>{2, -1, 1});
    CHECK(sum_f64(a) == 2.0);
    CHECK(max_abs(b) == 1.0f);
    // |2.2f - 2| / 2 in double: exact.
    CHECK(max_rel_diff(Tensor::from_vector({2}, {1.0f, 2.2f}), Tensor::from_vector({2}, {1.0f, 2.0f})) ==
          (double(2.2f) - 2) / 2);
}

TEST_CASE("Rng: reproducible, restorable, derived streams independent of use") {
    Rng a(42), b(42);
    for (int i = 0; i < 5; ++i) CHECK(a.next_u64() == b.next_u64());
    Rng saved = Rng::restore(a.state(), a.stream());
    CHECK(saved.next_u64() == a.next_u64());
    Rng d1 = Rng::derive(7, {1, 2}), d2 = Rng::derive(7, {1, 2}), d3 = Rng::derive(7, {2, 1});
    CHECK(d1.next_u64() == d2.next_u64());
    CHECK(d1.next_u64() != d3.next_u64());
    // The mean of 10000 uniform draws: 0.5, standard deviation
    // sqrt(1/12 / 10000) = 0.0029; within 5.
    double mean = 0;
    for (int i = 0; i < 10000; ++i) mean += a.uniform();
    CHECK(std::fabs(mean / 10000 - 0.5) <= 5 * std::sqrt(1.0 / 12 / 10000));
    for (int i = 0; i < 1000; ++i) CHECK(a.below(7) < 7);
}
