// Parameter-free element-wise layers: ReLU, ReLU6 and Dropout.
#pragma once
#include "layers/module.h"

namespace hfq {

class ReLU : public Module {
public:
    Variable forward(const Variable& x) override;
    std::string type_name() const override { return "ReLU"; }
};

class ReLU6 : public Module {
public:
    Variable forward(const Variable& x) override;
    std::string type_name() const override { return "ReLU6"; }
};

// Inverted dropout with probability p (identity in evaluation). The masks
// come from the module's own generator: initialize(seed) seeds it from the
// seed and the module's name; named_rngs() exposes it for checkpoints.
class Dropout : public Module {
public:
    explicit Dropout(float p);
    Variable forward(const Variable& x) override;
    float p() const { return p_; }
    Rng& rng() { return rng_; }
    std::string type_name() const override { return "Dropout"; }
    std::string describe() const override;

protected:
    void reset_parameters(Rng& rng) override;  // reseeds the mask generator
    Rng* own_rng() override { return &rng_; }

private:
    float p_;
    Rng rng_;
};

}  // namespace hfq
