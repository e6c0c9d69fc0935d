#include "engine/random.h"

#include <cmath>

namespace hfq {

uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

Rng::Rng(uint64_t seed, uint64_t stream) : state_(mix64(seed)), stream_(mix64(stream) | 1) {}

Rng Rng::restore(uint64_t state, uint64_t stream) {
    Rng r;
    r.state_ = state;
    r.stream_ = stream | 1;
    return r;
}

Rng Rng::derive(uint64_t seed, std::initializer_list<uint64_t> keys) {
    uint64_t h = mix64(seed + 0x9e3779b97f4a7c15ULL);
    for (uint64_t k : keys) h = mix64(h ^ (k + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2)));
    return Rng(h, h >> 1);
}

// splitmix64-style counter: state advances by the stream's odd increment,
// the output is the mixed state. Passes BigCrush and never gets stuck.
uint64_t Rng::next_u64() {
    state_ += 0x9e3779b97f4a7c15ULL * stream_;
    return mix64(state_);
}

float Rng::uniform() { return static_cast<float>(next_u64() >> 40) * 0x1.0p-24f; }
double Rng::uniform_f64() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

float Rng::normal() {
    // Box-Muller; one of the pair is dropped so the state stays two integers.
    const double u1 = 1.0 - uniform_f64();  // (0, 1]
    const double u2 = uniform_f64();
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

uint64_t Rng::below(uint64_t n) {
    // Lemire's multiply-shift; the tiny bias (< n / 2^64) does not matter here.
    return static_cast<uint64_t>((static_cast<unsigned __int128>(next_u64()) * n) >> 64);
}

}  // namespace hfq
