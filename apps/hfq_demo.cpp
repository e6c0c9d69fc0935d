// The engine's smoke demo: a small convnet (conv-BN-ReLU6, depthwise, pointwise,
// global pool, classifier) trained for a few SGD steps on one fixed random
// batch. The loss must fall: forward, backward and update all work together.
//
// Everything is written with the raw ops of engine/ops.h, so this file is also
// a compact tour of a training step.
#include <cmath>
#include <cstdio>
#include <vector>

#include "engine/check.h"
#include "engine/dnnl_context.h"
#include "engine/ops.h"
#include "engine/random.h"
#include "engine/tensor_math.h"

using namespace hfq;

namespace {

Variable parameter(const Shape& shape, float stddev, Rng& rng) {
    Tensor t = Tensor::empty(shape);
    for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = stddev * rng.normal();
    return Variable(t, true);
}

Variable constant_parameter(const Shape& shape, float value) { return Variable(Tensor::full(shape, value), true); }

struct BatchNormState {
    Variable gamma, beta;
    Tensor running_mean, running_var;
    explicit BatchNormState(int64_t c)
        : gamma(constant_parameter({c}, 1)),
          beta(constant_parameter({c}, 0)),
          running_mean(Tensor::zeros({c})),
          running_var(Tensor::full({c}, 1)) {}
    Variable operator()(const Variable& x) { return batch_norm(x, gamma, beta, running_mean, running_var, true); }
};

}  // namespace

int main() {
    try {
        set_compute_threads(2);
        Rng rng(0);
        const int64_t batch = 16, size = 16, classes = 10;

        // Parameters (OIHW weights).
        Variable w_stem = parameter({16, 3, 3, 3}, std::sqrt(2.0f / 27), rng);
        Variable w_dw = parameter({16, 1, 3, 3}, std::sqrt(2.0f / 9), rng);
        Variable w_pw = parameter({32, 16, 1, 1}, std::sqrt(2.0f / 16), rng);
        Variable w_fc = parameter({classes, 32}, 0.1f, rng);
        Variable b_fc = constant_parameter({classes}, 0);
        BatchNormState bn_stem(16), bn_dw(16), bn_pw(32);
        std::vector<Variable> params = {w_stem,       w_dw,        w_pw,       w_fc,        b_fc,      bn_stem.gamma,
                                        bn_stem.beta, bn_dw.gamma, bn_dw.beta, bn_pw.gamma, bn_pw.beta};

        // A fixed random batch: images {N,H,W,C} (NHWC) and labels.
        Variable images(Tensor::empty({batch, size, size, 3}));
        for (int64_t i = 0; i < images.value().numel(); ++i) images.value().f32()[i] = rng.normal();
        std::vector<int32_t> labels(batch);
        for (auto& l : labels) l = static_cast<int32_t>(rng.below(classes));

        const float lr = 0.1f;
        float first = 0, last = 0;
        for (int step = 0; step < 30; ++step) {
            Conv2dParams stem{.stride = 2, .padding = 1};
            Conv2dParams depthwise{.stride = 1, .padding = 1, .groups = 16};
            Variable x = relu6(bn_stem(conv2d(images, w_stem, {}, stem)));  // {16, 8, 8, 16}
            x = relu6(bn_dw(conv2d(x, w_dw, {}, depthwise)));               // {16, 8, 8, 16}
            x = relu6(bn_pw(conv2d(x, w_pw, {}, {})));                      // {16, 8, 8, 32}
            Variable logits = linear(global_avg_pool(x), w_fc, b_fc);       // {16, 10}
            Variable loss = cross_entropy(logits, labels);
            loss.backward();

            // Plain SGD: p -= lr * dL/dp, then forget the gradient.
            for (Variable& p : params) {
                axpy_(p.value(), -lr, p.grad());
                p.zero_grad();
            }
            last = loss.value().item();
            if (step == 0) first = last;
            if (step % 5 == 0 || step == 29) std::printf("step %2d  loss %.4f\n", step, last);
        }
        std::printf("loss fell from %.4f to %.4f\n", first, last);
        return last < first ? 0 : 1;
    } catch (const Error& e) {
        std::fprintf(stderr, "hfq_demo: %s\n", e.what());
        return 1;
    }
}
