// The one oneDNN CPU engine and stream the whole program uses, helpers to
// describe hfq tensors to oneDNN, and a cache so that each primitive is
// created once per shape and reused on every step.
//
// oneDNN 2.6.3 as Debian builds it runs its kernels on OpenMP threads; all
// oneDNN calls are made from one (the training) thread. set_compute_threads
// sets the OpenMP team size; data-loader threads (oneTBB) are separate.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>

#include <oneapi/dnnl/dnnl.hpp>

#include "engine/tensor.h"

namespace hfq {

dnnl::engine& cpu_engine();
dnnl::stream& cpu_stream();

void set_compute_threads(int n);
int compute_threads();

// oneDNN dims of a shape.
dnnl::memory::dims to_dims(const Shape& s);
// Memory descriptors of hfq's plain layouts. An NHWC activation {N,H,W,C} is
// described with oneDNN's logical NCHW dims and format tag nhwc.
dnnl::memory::desc nhwc_desc(const Tensor& t);
dnnl::memory::desc plain_desc(const Shape& s);  // row-major f32 of any rank (<= 6)
// A oneDNN memory object over a tensor's storage (no copy).
dnnl::memory as_memory(const dnnl::memory::desc& d, const Tensor& t);

// A map from a key string (built from the shapes and parameters of a call) to
// whatever an op needs to keep: primitive descriptors, primitives. One cache
// per op, stored as a function-local static.
template <class Value>
class PrimitiveCache {
public:
    Value& get(const std::string& key, const std::function<Value()>& create) {
        auto it = entries_.find(key);
        if (it == entries_.end()) it = entries_.emplace(key, create()).first;
        return it->second;
    }
    size_t size() const { return entries_.size(); }

private:
    std::unordered_map<std::string, Value> entries_;
};

// Copies src into a tensor of the layout dst_desc describes, through a cached
// reorder primitive; returns src unchanged when the layouts already agree.
// The result is kept as raw bytes in an s8 tensor of the right size when the
// layout is blocked (it is only ever handed back to oneDNN).
Tensor reorder_to(const Tensor& src, const dnnl::memory::desc& src_desc, const dnnl::memory::desc& dst_desc);
// Reorders into an existing tensor (dst must hold dst_desc.get_size() bytes).
void reorder_into(const Tensor& src, const dnnl::memory::desc& src_desc, Tensor& dst,
                  const dnnl::memory::desc& dst_desc);

// Wraps a oneDNN call and turns dnnl::error into hfq::Error naming the op.
void run_primitive(const char* op, const dnnl::primitive& p, const std::unordered_map<int, dnnl::memory>& args);

}  // namespace hfq
