#include "study/stats.h"

#include <cmath>
#include <limits>

#include "engine/check.h"

namespace hfq::study {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// P(0 <= T <= t) for Student's t with df degrees of freedom:
//   f(x) = Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) * (1 + x^2/df)^(-(df+1)/2)
// integrated by Simpson's rule over 4096 intervals: the density is smooth,
// the rule's error ~ t^5 max|f''''| / (180 n^4) is far below 1e-9 for t < 100.
double t_half_cdf(double t, int df) {
    const double nu = df;
    const double log_c = std::lgamma((nu + 1) / 2) - std::lgamma(nu / 2) - 0.5 * std::log(nu * M_PI);
    auto f = [&](double x) { return std::exp(log_c - (nu + 1) / 2 * std::log1p(x * x / nu)); };
    constexpr int n = 4096;
    const double h = t / n;
    double sum = f(0) + f(t);
    for (int i = 1; i < n; ++i) sum += (i % 2 ? 4 : 2) * f(i * h);
    return sum * h / 3;
}

}  // namespace

double mean_of(std::span<const double> x) {
    HFQ_CHECK(!x.empty(), "mean of no values");
    double s = 0;
    for (double v : x) s += v;
    return s / double(x.size());
}

double sd_of(std::span<const double> x) {
    if (x.size() < 2) return kNaN;
    const double m = mean_of(x);
    double s = 0;
    for (double v : x) s += (v - m) * (v - m);
    return std::sqrt(s / double(x.size() - 1));
}

double t_quantile(double p, int df) {
    HFQ_CHECK(p > 0.5 && p < 1 && df >= 1, "t_quantile: p in (0.5, 1) and df >= 1, got ", p, " and ", df);
    // P(T <= t) = 1/2 + t_half_cdf(t); the quantile of df = 1 at p = 0.9995 is
    // 636.6, so [0, 1000] brackets every p the study asks for.
    double lo = 0, hi = 1000;
    for (int i = 0; i < 100 && hi - lo > 1e-10; ++i) {
        const double mid = 0.5 * (lo + hi);
        (0.5 + t_half_cdf(mid, df) < p ? lo : hi) = mid;
    }
    return 0.5 * (lo + hi);
}

PairedDifference paired_difference(std::span<const double> a, std::span<const double> b) {
    HFQ_CHECK(!a.empty() && a.size() == b.size(), "paired_difference: ", a.size(), " and ", b.size(),
              " values: the same seeds are needed on both sides");
    PairedDifference d;
    for (size_t i = 0; i < a.size(); ++i) d.differences.push_back(a[i] - b[i]);
    d.mean = mean_of(d.differences);
    d.sd = sd_of(d.differences);
    const size_t n = d.differences.size();
    if (n < 2) {
        d.lo = d.hi = kNaN;
    } else {
        const double half = t_quantile(0.975, int(n - 1)) * d.sd / std::sqrt(double(n));
        d.lo = d.mean - half;
        d.hi = d.mean + half;
    }
    return d;
}

std::string PairedDifference::verdict() const {
    if (!std::isfinite(lo)) return "one seed";
    if (lo > 0) return "higher";
    if (hi < 0) return "lower";
    return "not distinguishable";
}

}  // namespace hfq::study
