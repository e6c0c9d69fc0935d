// The statistics of the study's seeds: a cell run with N seeds gives N values
// of each measure; two methods run with the same N seeds (same float model,
// same data order and augmentation per seed) give N paired differences.
//
//   mean  m = (1/N) sum x_i
//   sd    s = sqrt( sum (x_i - m)^2 / (N - 1) )          (sample standard deviation)
//   95 % interval of the mean paired difference d:
//         m_d -+ t(0.975, N - 1) * s_d / sqrt(N)         (Student's t: the seeds' spread
//                                                           estimates the noise; N >= 2)
// A difference is called significant when its interval excludes zero.
#pragma once
#include <span>
#include <string>
#include <vector>

namespace hfq::study {

double mean_of(std::span<const double> x);
// NaN for fewer than two values.
double sd_of(std::span<const double> x);

// The p-quantile of Student's t distribution with `df` degrees of freedom
// (p in (0.5, 1), df >= 1): bisection on its CDF, the density integrated by
// Simpson's rule.
double t_quantile(double p, int df);

struct PairedDifference {
    std::vector<double> differences;  // a - b, seed by seed
    double mean = 0, sd = 0;
    double lo = 0, hi = 0;  // the 95 % interval of the mean (NaN with one seed)
    // "higher" / "lower" (the interval lies above / below zero),
    // "not distinguishable" (it contains zero), or "one seed" (no interval).
    std::string verdict() const;
};

// a[i] and b[i] are the same seed's values; throws hfq::Error when the sizes differ or are zero.
PairedDifference paired_difference(std::span<const double> a, std::span<const double> b);

}  // namespace hfq::study
