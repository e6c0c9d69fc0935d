#include "train/integer_engine_check.h"

#include "deploy/integer_engine.h"
#include "engine/autograd.h"

namespace hfq {

IntegerEngineCheck check_integer_engine(const std::string& export_path, Model& fake_quant,
                                        std::shared_ptr<const Dataset> data, const EvalOptions& options) {
    const deploy::IntegerEngine engine(export_path);
    const bool was_training = fake_quant.is_training();
    fake_quant.eval();
    NoGradGuard no_grad;
    IntegerEngineCheck r;
    EvalOptions o = options;
    double identical = 0;
    auto logits = [&](const Tensor& images) {
        const Tensor ours = engine.run(images).float_logits();
        const Tensor theirs = fake_quant(Variable(images)).value();
        const int64_t k = ours.dim(1);
        for (int64_t n = 0; n < ours.dim(0); ++n) {
            bool same = true;
            for (int64_t j = 0; j < k; ++j) same = same && ours.f32()[n * k + j] == theirs.f32()[n * k + j];
            identical += same;
        }
        return ours;
    };
    // The count is summed over the ranks with the evaluation's own sums.
    if (options.sum)
        o.sum = [&](double* values, int64_t count) {
            std::vector<double> v(values, values + count);
            v.push_back(identical);
            options.sum(v.data(), count + 1);
            std::copy(v.begin(), v.begin() + count, values);
            identical = v.back();
        };
    try {
        r.engine = evaluate(logits, std::move(data), o);
    } catch (...) {
        fake_quant.train(was_training);
        throw;
    }
    fake_quant.train(was_training);
    r.identical_logits = int64_t(identical);
    return r;
}

}  // namespace hfq
