// Tensor: a shape, an element type and a contiguous, 64-byte-aligned block of
// memory that views share.
//
// Memory layout conventions (used end to end, so no layer reorders its input):
//   * Activations are NHWC ("channels last"): a 4-D activation has shape
//     {N, H, W, C} and element (n, h, w, c) sits at ((n*H + h)*W + w)*C + c.
//     oneDNN's depthwise kernel (jit_dw:avx2) runs on this layout directly,
//     and on it a pointwise (1x1) convolution is a plain matrix product, which
//     hfq runs with sgemm tiles of its own (engine/conv2d_pointwise.cpp).
//   * Features after pooling and the logits are {N, C}.
//   * Convolution weights are PyTorch's OIHW: {out, in/groups, kh, kw};
//     linear weights {out, in}. The quantizers and the optimizers work on
//     this plain layout; a oneDNN convolution reorders it, once per forward
//     call, into the layout its kernel prefers (a pointwise one reads it as
//     it is).
// Shapes are always the physical shape: a tensor is contiguous, row-major
// in the order its shape lists.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace hfq {

enum class DType { f32, s8, s32, s64 };
size_t dtype_size(DType t);
const char* dtype_name(DType t);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 3, 4]"
int64_t shape_numel(const Shape& s);

class Tensor {
public:
    Tensor() = default;  // undefined: no storage

    static Tensor empty(Shape shape, DType dtype = DType::f32);  // uninitialised
    static Tensor zeros(Shape shape, DType dtype = DType::f32);
    static Tensor full(Shape shape, float value);
    static Tensor from_vector(Shape shape, const std::vector<float>& values);

    bool defined() const { return storage_ != nullptr; }
    const Shape& shape() const { return shape_; }
    int rank() const { return static_cast<int>(shape_.size()); }
    int64_t dim(int i) const;  // i < 0 counts from the end
    int64_t numel() const { return shape_numel(shape_); }
    DType dtype() const { return dtype_; }
    size_t nbytes() const { return numel() * dtype_size(dtype_); }

    // Typed access; throws if T does not match dtype().
    template <class T>
    T* data();
    template <class T>
    const T* data() const;
    float* f32() { return data<float>(); }
    const float* f32() const { return data<float>(); }
    void* raw() { return storage_.get() + offset_; }
    const void* raw() const { return storage_.get() + offset_; }

    // Same memory, another shape with the same number of elements.
    Tensor reshape(Shape shape) const;
    // Rows [begin, end) of the first dimension, sharing memory.
    Tensor slice0(int64_t begin, int64_t end) const;
    // A deep copy.
    Tensor clone() const;
    // Copies other's elements into this tensor (same shape and dtype).
    void copy_from(const Tensor& other);
    void fill(float value);
    float item() const;  // the value of a one-element f32 tensor
    std::vector<float> to_vector() const;
    // True when both tensors view the same memory block.
    bool shares_storage_with(const Tensor& other) const { return storage_ == other.storage_; }
    // True when no other tensor (or view) holds this tensor's memory.
    bool sole_owner() const { return storage_.use_count() == 1; }

private:
    std::shared_ptr<std::byte> storage_;
    size_t offset_ = 0;  // in bytes
    Shape shape_;
    DType dtype_ = DType::f32;
};

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
    return DType::f32;
}
template <>
constexpr DType dtype_of<int8_t>() {
    return DType::s8;
}
template <>
constexpr DType dtype_of<int32_t>() {
    return DType::s32;
}
template <>
constexpr DType dtype_of<int64_t>() {
    return DType::s64;
}

void check_dtype(const Tensor& t, DType expected);

template <class T>
T* Tensor::data() {
    check_dtype(*this, dtype_of<T>());
    return reinterpret_cast<T*>(storage_.get() + offset_);
}
template <class T>
const T* Tensor::data() const {
    check_dtype(*this, dtype_of<T>());
    return reinterpret_cast<const T*>(storage_.get() + offset_);
}

}  // namespace hfq
