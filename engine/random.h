// A small, fast, seedable random number generator whose whole state is two
// integers, so it can be saved in a checkpoint and restored exactly.
// Streams for independent purposes (dropout in layer 3, the augmentation of
// sample 1234 in epoch 5) are derived from (seed, purpose...) with
// Rng::derive, so results do not depend on the order threads run in.
#pragma once
#include <cstdint>
#include <initializer_list>

namespace hfq {

class Rng {
public:
    explicit Rng(uint64_t seed = 0, uint64_t stream = 0);

    // A generator keyed by this seed and extra keys, independent of how many
    // numbers this generator has produced.
    static Rng derive(uint64_t seed, std::initializer_list<uint64_t> keys);

    uint64_t next_u64();
    float uniform();             // [0, 1)
    double uniform_f64();        // [0, 1)
    float normal();              // standard normal
    uint64_t below(uint64_t n);  // uniform integer in [0, n)

    // Saving and restoring: Rng::restore(r.state(), r.stream()) continues r's sequence.
    static Rng restore(uint64_t state, uint64_t stream);
    uint64_t state() const { return state_; }
    uint64_t stream() const { return stream_; }

private:
    uint64_t state_;
    uint64_t stream_;  // odd increment: distinct streams give distinct sequences
};

uint64_t mix64(uint64_t x);  // the splitmix64 finaliser: a good bit mixer

}  // namespace hfq
