#include "layers/pooling.h"

#include "engine/check.h"
#include "engine/ops.h"

namespace hfq {

AvgPool2d::AvgPool2d(int kernel, int stride, int padding) : kernel_(kernel), stride_(stride), padding_(padding) {
    HFQ_CHECK(kernel > 0 && stride > 0 && padding >= 0 && 2 * padding <= kernel, "AvgPool2d: invalid kernel=", kernel,
              " stride=", stride, " padding=", padding);
}

Variable AvgPool2d::forward(const Variable& x) { return avg_pool2d(x, kernel_, stride_, padding_); }

std::string AvgPool2d::describe() const { return cat("AvgPool2d(k=", kernel_, ", s=", stride_, ", p=", padding_, ")"); }

Variable GlobalAvgPool::forward(const Variable& x) { return global_avg_pool(x); }

Variable Flatten::forward(const Variable& x) { return flatten(x); }

}  // namespace hfq
