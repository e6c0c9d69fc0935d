#include "engine/tensor.h"

#include <algorithm>
#include <cstring>

#include "engine/check.h"
#include "engine/memory_pool.h"

namespace hfq {

size_t dtype_size(DType t) {
    switch (t) {
        case DType::f32: return 4;
        case DType::s8: return 1;
        case DType::s32: return 4;
        case DType::s64: return 8;
    }
    return 0;
}

const char* dtype_name(DType t) {
    switch (t) {
        case DType::f32: return "f32";
        case DType::s8: return "s8";
        case DType::s32: return "s32";
        case DType::s64: return "s64";
    }
    return "?";
}

std::string shape_str(const Shape& s) {
    std::string out = "[";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
    return out + "]";
}

int64_t shape_numel(const Shape& s) {
    int64_t n = 1;
    for (int64_t d : s) n *= d;
    return n;
}

void check_dtype(const Tensor& t, DType expected) {
    HFQ_CHECK(t.defined(), "tensor access: the tensor is undefined");
    HFQ_CHECK(t.dtype() == expected, "tensor access: tensor of ", shape_str(t.shape()), " holds ",
              dtype_name(t.dtype()), ", read as ", dtype_name(expected));
}

Tensor Tensor::empty(Shape shape, DType dtype) {
    for (int64_t d : shape) HFQ_CHECK(d >= 0, "Tensor::empty: negative dimension in ", shape_str(shape));
    Tensor t;
    t.shape_ = std::move(shape);
    t.dtype_ = dtype;
    t.storage_ = pool_allocate(t.nbytes());
    return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype) {
    Tensor t = empty(std::move(shape), dtype);
    std::memset(t.raw(), 0, t.nbytes());
    return t;
}

Tensor Tensor::full(Shape shape, float value) {
    Tensor t = empty(std::move(shape));
    t.fill(value);
    return t;
}

Tensor Tensor::from_vector(Shape shape, const std::vector<float>& values) {
    HFQ_CHECK(shape_numel(shape) == static_cast<int64_t>(values.size()), "Tensor::from_vector: shape ",
              shape_str(shape), " needs ", shape_numel(shape), " values, got ", values.size());
    Tensor t = empty(std::move(shape));
    std::copy(values.begin(), values.end(), t.f32());
    return t;
}

int64_t Tensor::dim(int i) const {
    const int r = rank();
    HFQ_CHECK(i >= -r && i < r, "Tensor::dim: index ", i, " out of range for shape ", shape_str(shape_));
    return shape_[i < 0 ? i + r : i];
}

Tensor Tensor::reshape(Shape shape) const {
    HFQ_CHECK(shape_numel(shape) == numel(), "reshape: cannot view ", shape_str(shape_), " as ", shape_str(shape));
    Tensor t = *this;
    t.shape_ = std::move(shape);
    return t;
}

Tensor Tensor::slice0(int64_t begin, int64_t end) const {
    HFQ_CHECK(rank() >= 1 && 0 <= begin && begin <= end && end <= shape_[0], "slice0: rows [", begin, ", ", end,
              ") out of range for shape ", shape_str(shape_));
    Tensor t = *this;
    const int64_t row = numel() / std::max<int64_t>(shape_[0], 1);
    t.offset_ += begin * row * dtype_size(dtype_);
    t.shape_[0] = end - begin;
    return t;
}

Tensor Tensor::clone() const {
    if (!defined()) return {};
    Tensor t = empty(shape_, dtype_);
    std::memcpy(t.raw(), raw(), nbytes());
    return t;
}

void Tensor::copy_from(const Tensor& other) {
    HFQ_CHECK(shape_ == other.shape_ && dtype_ == other.dtype_, "copy_from: destination ", shape_str(shape_), " ",
              dtype_name(dtype_), " vs source ", shape_str(other.shape_), " ", dtype_name(other.dtype_));
    std::memmove(raw(), other.raw(), nbytes());
}

void Tensor::fill(float value) {
    float* p = f32();
    std::fill(p, p + numel(), value);
}

float Tensor::item() const {
    HFQ_CHECK(numel() == 1, "item: tensor of shape ", shape_str(shape_), " has ", numel(), " elements, not 1");
    return f32()[0];
}

std::vector<float> Tensor::to_vector() const {
    const float* p = f32();
    return std::vector<float>(p, p + numel());
}

}  // namespace hfq
