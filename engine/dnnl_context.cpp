#include "engine/dnnl_context.h"

#include <omp.h>

#include "engine/check.h"

namespace hfq {

dnnl::engine& cpu_engine() {
    static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
    return engine;
}

dnnl::stream& cpu_stream() {
    static dnnl::stream stream(cpu_engine());
    return stream;
}

void set_compute_threads(int n) {
    HFQ_CHECK(n >= 1, "set_compute_threads: need at least 1 thread, got ", n);
    omp_set_num_threads(n);
}

int compute_threads() { return omp_get_max_threads(); }

dnnl::memory::dims to_dims(const Shape& s) { return dnnl::memory::dims(s.begin(), s.end()); }

dnnl::memory::desc nhwc_desc(const Tensor& t) {
    HFQ_CHECK(t.rank() == 4, "nhwc_desc: activation must be {N,H,W,C}, got ", shape_str(t.shape()));
    const auto& s = t.shape();
    return dnnl::memory::desc({s[0], s[3], s[1], s[2]}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::nhwc);
}

dnnl::memory::desc plain_desc(const Shape& s) {
    using tag = dnnl::memory::format_tag;
    static const tag tags[] = {tag::undef, tag::a, tag::ab, tag::abc, tag::abcd, tag::abcde, tag::abcdef};
    HFQ_CHECK(s.size() >= 1 && s.size() <= 6, "plain_desc: rank ", s.size(), " not supported: ", shape_str(s));
    return dnnl::memory::desc(to_dims(s), dnnl::memory::data_type::f32, tags[s.size()]);
}

dnnl::memory as_memory(const dnnl::memory::desc& d, const Tensor& t) {
    HFQ_CHECK(t.nbytes() >= d.get_size(), "as_memory: tensor of ", t.nbytes(), " bytes, descriptor needs ",
              d.get_size());
    return dnnl::memory(d, cpu_engine(), const_cast<void*>(t.raw()));
}

void run_primitive(const char* op, const dnnl::primitive& p, const std::unordered_map<int, dnnl::memory>& args) {
    try {
        p.execute(cpu_stream(), args);
    } catch (const dnnl::error& e) {
        throw Error(cat(op, ": oneDNN failed: ", e.what()));
    }
}

namespace {
std::string desc_key(const dnnl::memory::desc& d) {
    // The raw descriptor bytes identify dims, type and layout exactly.
    const auto& c = d.data;
    return std::string(reinterpret_cast<const char*>(&c), sizeof(c));
}
}  // namespace

void reorder_into(const Tensor& src, const dnnl::memory::desc& src_desc, Tensor& dst,
                  const dnnl::memory::desc& dst_desc) {
    static PrimitiveCache<dnnl::reorder> cache;
    auto& r = cache.get(desc_key(src_desc) + desc_key(dst_desc), [&] {
        return dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), src_desc, cpu_engine(), dst_desc));
    });
    run_primitive("reorder", r, {{DNNL_ARG_FROM, as_memory(src_desc, src)}, {DNNL_ARG_TO, as_memory(dst_desc, dst)}});
}

Tensor reorder_to(const Tensor& src, const dnnl::memory::desc& src_desc, const dnnl::memory::desc& dst_desc) {
    if (src_desc == dst_desc) return src;
    Tensor dst = Tensor::empty({static_cast<int64_t>(dst_desc.get_size())}, DType::s8);
    reorder_into(src, src_desc, dst, dst_desc);
    return dst;
}

}  // namespace hfq
