// Pooling and reshaping layers (no parameters).
#pragma once
#include "layers/module.h"

namespace hfq {

// Average over kernel x kernel windows; padded positions are not counted
// (PyTorch's count_include_pad=False). {N,H,W,C} -> {N,Ho,Wo,C}
class AvgPool2d : public Module {
public:
    AvgPool2d(int kernel, int stride, int padding = 0);
    Variable forward(const Variable& x) override;
    std::string type_name() const override { return "AvgPool2d"; }
    std::string describe() const override;

private:
    int kernel_, stride_, padding_;
};

// Average over all positions: {N,H,W,C} -> {N,C} (PyTorch's
// AdaptiveAvgPool2d(1) followed by flatten).
class GlobalAvgPool : public Module {
public:
    Variable forward(const Variable& x) override;
    std::string type_name() const override { return "GlobalAvgPool"; }
};

// {N, ...} -> {N, product of the rest}.
class Flatten : public Module {
public:
    Variable forward(const Variable& x) override;
    std::string type_name() const override { return "Flatten"; }
};

}  // namespace hfq
