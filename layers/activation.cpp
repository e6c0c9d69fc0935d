#include "layers/activation.h"

#include "engine/check.h"
#include "engine/ops.h"

namespace hfq {

Variable ReLU::forward(const Variable& x) { return relu(x); }
Variable ReLU6::forward(const Variable& x) { return relu6(x); }

Dropout::Dropout(float p) : p_(p) { HFQ_CHECK(p >= 0.0f && p < 1.0f, "Dropout: p must be in [0, 1), got ", p); }

Variable Dropout::forward(const Variable& x) { return dropout(x, p_, is_training(), rng_); }

std::string Dropout::describe() const { return cat("Dropout(p=", p_, ")"); }

void Dropout::reset_parameters(Rng& rng) { rng_ = Rng(rng.next_u64(), rng.next_u64()); }

}  // namespace hfq
