#include "engine/tensor_math.h"

#include <algorithm>
#include <cmath>

#include "engine/check.h"

namespace hfq {
namespace {

void check_same(const char* fn, const Tensor& a, const Tensor& b) {
    HFQ_CHECK(a.shape() == b.shape(), fn, ": shapes differ, ", shape_str(a.shape()), " vs ", shape_str(b.shape()));
}

template <class F>
Tensor zip(const char* fn, const Tensor& a, const Tensor& b, F f) {
    check_same(fn, a, b);
    Tensor out = Tensor::empty(a.shape());
    const float* pa = a.f32();
    const float* pb = b.f32();
    float* po = out.f32();
    const int64_t n = a.numel();
    for (int64_t i = 0; i < n; ++i) po[i] = f(pa[i], pb[i]);
    return out;
}

}  // namespace

Tensor add(const Tensor& a, const Tensor& b) {
    return zip("add", a, b, [](float x, float y) { return x + y; });
}
Tensor sub(const Tensor& a, const Tensor& b) {
    return zip("sub", a, b, [](float x, float y) { return x - y; });
}
Tensor mul(const Tensor& a, const Tensor& b) {
    return zip("mul", a, b, [](float x, float y) { return x * y; });
}

Tensor scale(const Tensor& a, float s) {
    Tensor out = Tensor::empty(a.shape());
    const float* pa = a.f32();
    float* po = out.f32();
    for (int64_t i = 0, n = a.numel(); i < n; ++i) po[i] = s * pa[i];
    return out;
}

void add_(Tensor& a, const Tensor& b) { axpy_(a, 1.0f, b); }

void axpy_(Tensor& y, float alpha, const Tensor& x) {
    check_same("axpy_", y, x);
    float* py = y.f32();
    const float* px = x.f32();
    for (int64_t i = 0, n = y.numel(); i < n; ++i) py[i] += alpha * px[i];
}

double sum_f64(const Tensor& a) {
    const float* p = a.f32();
    double s = 0;
    for (int64_t i = 0, n = a.numel(); i < n; ++i) s += p[i];
    return s;
}

float max_abs(const Tensor& a) {
    const float* p = a.f32();
    float m = 0;
    for (int64_t i = 0, n = a.numel(); i < n; ++i) m = std::max(m, std::fabs(p[i]));
    return m;
}

double max_rel_diff(const Tensor& a, const Tensor& b, double floor) {
    check_same("max_rel_diff", a, b);
    const float* pa = a.f32();
    const float* pb = b.f32();
    double worst = 0;
    for (int64_t i = 0, n = a.numel(); i < n; ++i) {
        const double d = std::fabs(double(pa[i]) - pb[i]) / std::max<double>(std::fabs(pb[i]), floor);
        if (std::isnan(d)) return d;  // a NaN anywhere is the worst
        worst = std::max(worst, d);
    }
    return worst;
}

}  // namespace hfq
