// The optimizers (layers/optimizer.h) against PyTorch: SGD (plain, momentum,
// Nesterov, weight decay by group) and Adam, each held to a rounding-error
// bound of its update; their state round trips and load_state's checks.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "engine/check.h"
#include "engine/safetensors.h"
#include "layers/model.h"
#include "layers/optimizer.h"
#include "tests/float_error.h"

using namespace hfq;
using hfq::testing::check_far_outside;
using hfq::testing::gamma_n;

namespace {

bool same_bits(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// SGD's update on magnitudes: p, the gradients and the momentum buffer in
// absolute value, every term added. It returns, after each step, the sum of
// |terms| of the parameter's value written out from the initial value, the
// gradients and the constants. hfq's float value after t steps is within
// gamma(10 t) of it: in one step a term goes through at most 10 roundings
// (the worst, Nesterov's mu buf: the buffer's 4 (wd, wd p, + g, + mu buf),
// then mu, mu buf, the sum, lr, lr (.), p - (.)), the constants' own
// roundings to float (0.1, 0.9, 0.01) counted.
std::vector<double> sgd_magnitudes(double p, const std::vector<double>& grads, double lr, double momentum,
                                   bool nesterov, double weight_decay) {
    std::vector<double> out;
    double buf = 0;
    for (size_t t = 0; t < grads.size(); ++t) {
        const double d = std::fabs(grads[t]) + weight_decay * p;
        buf = t == 0 ? d : momentum * buf + d;
        p += lr * (momentum == 0 ? d : nesterov ? d + momentum * buf : buf);
        out.push_back(p);
    }
    return out;
}

// Adam's recurrence in exact arithmetic (double) from the same float inputs,
// with a running error analysis (Higham, Accuracy and Stability, section
// 3.3) of one float32 evaluation of it: each float operation rounds its
// result once (within u; a fused multiply-add rounds less), and earlier
// errors propagate through the recurrence.
//
// The constants are what each implementation multiplies with. hfq's options
// are floats: it multiplies by beta and 1 - beta (exact in float) and takes
// the bias corrections 1 - beta^t in double from the float beta. PyTorch
// (1.13, single-tensor Adam) is given doubles: its float kernels multiply by
// beta and 1 - beta each rounded to float, its bias corrections and
// lr / (1 - beta1^t) are doubles from the double beta and lr. For beta2 =
// 0.999, 1 - 0.999f and float(1 - 0.999) differ by 1.3e-5 relative, far more
// than a rounding: each side is held to the recurrence with its own
// constants.
struct AdamConstants {
    double beta1, beta2, one_minus_beta1, one_minus_beta2;  // the float kernels' multipliers
    double correction_beta1, correction_beta2;              // the betas of 1 - beta^t
    double lr, weight_decay, eps;
};
AdamConstants hfq_constants(const AdamOptions& o) {
    return {o.beta1, o.beta2, 1.0f - o.beta1, 1.0f - o.beta2, o.beta1, o.beta2, o.lr, o.weight_decay, o.eps};
}
AdamConstants torch_constants(double lr, double beta1, double beta2, double weight_decay) {
    return {float(beta1), float(beta2), float(1 - beta1),    float(1 - beta2), beta1,
            beta2,        lr,           float(weight_decay), float(1e-8)};
}

struct AdamTrace {
    std::vector<double> p, m, v;     // exact values
    std::vector<double> ep, em, ev;  // error bounds of a float32 evaluation
    int64_t steps = 0;
};
AdamTrace adam_trace(const Tensor& init) {
    const size_t n = size_t(init.numel());
    return {std::vector<double>(init.f32(), init.f32() + n),
            std::vector<double>(n, 0.0),
            std::vector<double>(n, 0.0),
            std::vector<double>(n, 0.0),
            std::vector<double>(n, 0.0),
            std::vector<double>(n, 0.0)};
}
void adam_trace_step(AdamTrace& t, const Tensor& grad, const AdamConstants& c) {
    using hfq::testing::gamma_n;
    const double u = hfq::testing::kUnitRoundoff;
    ++t.steps;
    // Both round these to float once for their float kernels.
    const double step_size = c.lr / (1 - std::pow(c.correction_beta1, double(t.steps)));
    const double cs = std::sqrt(1 - std::pow(c.correction_beta2, double(t.steps)));
    for (size_t k = 0; k < t.p.size(); ++k) {
        const double g = grad.f32()[k];
        // d = g + wd p: the product and the sum.
        const double d = g + c.weight_decay * t.p[k];
        const double ed = c.weight_decay * t.ep[k] + gamma_n(2) * (std::fabs(g) + std::fabs(c.weight_decay * t.p[k]));
        // m = beta1 m + (1 - beta1) d: a product and the sum on each term.
        const double m = c.beta1 * t.m[k] + c.one_minus_beta1 * d;
        t.em[k] = c.beta1 * t.em[k] + (1 + gamma_n(2)) * c.one_minus_beta1 * ed +
                  gamma_n(2) * (c.beta1 * std::fabs(t.m[k]) + c.one_minus_beta1 * std::fabs(d));
        // v = beta2 v + (1 - beta2) d^2: two products and the sum on d^2.
        const double v = c.beta2 * t.v[k] + c.one_minus_beta2 * d * d;
        t.ev[k] = c.beta2 * t.ev[k] + (1 + gamma_n(3)) * c.one_minus_beta2 * (2 * std::fabs(d) * ed + ed * ed) +
                  gamma_n(3) * (c.beta2 * t.v[k] + c.one_minus_beta2 * d * d);
        // D = sqrt(v) / cs + eps: |sqrt(v') - sqrt(v)| <= |v' - v| / sqrt(v),
        // the root's rounding, then cs's, the quotient's and the sum's.
        const double root = std::sqrt(v), e_root = t.ev[k] / root + u * (root + t.ev[k] / root);
        const double D = root / cs + c.eps, eD = (1 + gamma_n(3)) * e_root / cs + gamma_n(3) * D;
        // step_size * m / D: step_size's rounding, the product, the quotient;
        // a quotient of perturbed values moves by (em + |m / D| eD) / (D - eD).
        const double r = m / D, er = (t.em[k] + std::fabs(r) * eD) / (D - eD);
        const double U = step_size * r, eU = step_size * er * (1 + gamma_n(3)) + gamma_n(3) * std::fabs(U);
        // p - U: one more rounding.
        t.ep[k] += eU + u * (std::fabs(t.p[k]) + std::fabs(U));
        t.p[k] -= U;
        t.m[k] = m;
        t.v[k] = v;
    }
}

// The float32 tensor got against the exact values, within the bounds: the
// worst |got - exact| / bound.
double trace_ratio(const Tensor& got, const std::vector<double>& exact, const std::vector<double>& bound) {
    REQUIRE(size_t(got.numel()) == exact.size());
    double worst = 0;
    for (size_t k = 0; k < exact.size(); ++k) worst = std::max(worst, std::fabs(got.f32()[k] - exact[k]) / bound[k]);
    return worst;
}
void check_trace(const std::string& what, const Tensor& got, const std::vector<double>& exact,
                 const std::vector<double>& bound) {
    INFO(what);
    const double ratio = trace_ratio(got, exact, bound);
    if (std::getenv("HFQ_SHOW_ERRORS")) MESSAGE(what, ": worst |a - b| / bound = ", ratio);
    CHECK(ratio <= 1.0);
}

}  // namespace

TEST_CASE("SGD: PyTorch's update rule, per-group weight decay, state round trip") {
    // Two steps by hand: p = 1, grads 0.5 then -0.25, lr 0.1, momentum 0.9, wd 0.01.
    auto run = [](bool nesterov, ParamGroup group, int steps) {
        Variable p(Tensor::full({1}, 1.0f), true);
        SGD sgd({{"p", p, group}}, {.lr = 0.1f, .momentum = 0.9f, .nesterov = nesterov, .weight_decay = 0.01f});
        const float grads[] = {0.5f, -0.25f};
        for (int s = 0; s < steps; ++s) {
            sgd.zero_grad();
            p.accumulate_grad(Tensor::full({1}, grads[s]));
            sgd.step();
        }
        return double(p.value().item());
    };
    // Within gamma(10 t) of the magnitudes (sgd_magnitudes) of the exact
    // decimal results.
    auto near = [](double value, double exact, bool nesterov, bool decay, int steps) {
        const double m = sgd_magnitudes(1, {0.5, -0.25}, 0.1, 0.9, nesterov, decay ? 0.01 : 0)[steps - 1];
        return std::fabs(value - exact) <= gamma_n(10 * steps) * m;
    };
    // Plain momentum: d1 = 0.5 + 0.01 = 0.51, p1 = 1 - 0.051 = 0.949;
    // d2 = -0.25 + 0.00949, buf2 = 0.9 * 0.51 + d2 = 0.21849, p2 = p1 - 0.021849.
    CHECK(near(run(false, ParamGroup::weight, 1), 0.949, false, true, 1));
    CHECK(near(run(false, ParamGroup::weight, 2), 0.949 - 0.021849, false, true, 2));
    // Nesterov: step uses d + 0.9 buf: p1 = 1 - 0.1 (0.51 + 0.459) = 0.9031;
    // d2 = -0.25 + 0.009031, buf2 = 0.459 - 0.240969 = 0.218031,
    // p2 = p1 - 0.1 (d2 + 0.9 buf2) = p1 - 0.1 * (-0.0447411).
    CHECK(near(run(true, ParamGroup::weight, 1), 0.9031, true, true, 1));
    CHECK(near(run(true, ParamGroup::weight, 2), 0.9031 + 0.00447411, true, true, 2));
    // No decay on batch norm parameters, biases, quantizer parameters; the
    // decayed value, 0.949, is off by 1e-3, far outside.
    CHECK(near(run(false, ParamGroup::bn, 1), 0.95, false, false, 1));
    CHECK(near(run(false, ParamGroup::bias, 1), 0.95, false, false, 1));
    CHECK(near(run(false, ParamGroup::quantizer, 1), 0.95, false, false, 1));
    CHECK(!near(run(false, ParamGroup::weight, 1), 0.95, false, false, 1));

    // Without a gradient a parameter (and its momentum) is left alone.
    Variable a(Tensor::full({2}, 1.0f), true), b(Tensor::full({2}, 1.0f), true);
    SGD sgd({{"a", a, ParamGroup::weight}, {"b", b, ParamGroup::weight}}, {.lr = 0.5f, .momentum = 0.9f});
    a.accumulate_grad(Tensor::full({2}, 1.0f));
    sgd.step();
    CHECK(a.value().to_vector() == std::vector<float>{0.5f, 0.5f});
    CHECK(b.value().to_vector() == std::vector<float>{1.0f, 1.0f});
    const auto state = sgd.state();
    REQUIRE(state.size() == 1);
    CHECK(state[0].first == "a.momentum_buffer");

    // Saving and restoring the state continues exactly.
    Variable c(Tensor::full({2}, 0.5f), true);
    SGD resumed({{"a", c, ParamGroup::weight}, {"b", b, ParamGroup::weight}}, {.lr = 0.5f, .momentum = 0.9f});
    resumed.load_state(state);
    a.zero_grad();
    a.accumulate_grad(Tensor::full({2}, 1.0f));
    c.accumulate_grad(Tensor::full({2}, 1.0f));
    sgd.step();
    resumed.step();
    CHECK(same_bits(a.value(), c.value()));
    CHECK_THROWS_WITH_AS(resumed.load_state({{"z.momentum_buffer", Tensor::zeros({2})}}),
                         doctest::Contains("unknown state tensor 'z.momentum_buffer'"), Error);
    CHECK_THROWS_WITH_AS(resumed.load_state({{"a.momentum_buffer", Tensor::zeros({3})}}),
                         doctest::Contains("expected f32 [2]"), Error);

    auto model = build_model({.arch = Arch::mobilenet_v2, .width = 0.25, .classes = 3});
    const auto all = model->named_parameters();
    const auto bn = select_params(all, {ParamGroup::bn});
    const auto weights = select_params(all, {ParamGroup::weight, ParamGroup::bias});
    CHECK(bn.size() + weights.size() == all.size());
    CHECK(bn[0].name == "features.0.1.weight");
}

TEST_CASE("SGD matches torch.optim.SGD over three steps: plain, momentum, Nesterov, decay by group") {
    // tests/fixtures/make_model_fixtures.py: lr 0.5, weight decay 0.1 on the
    // "weight" group only, momentum 0.9; float64 results rounded to float32.
    const SafetensorsFile f = read_safetensors(HFQ_TEST_DATA_DIR "/sgd_reference.safetensors");
    const std::vector<std::pair<std::string, ParamGroup>> names = {
        {"w", ParamGroup::weight}, {"bn", ParamGroup::bn}, {"b", ParamGroup::bias}};
    // hfq's value after t steps is within gamma(10 t) of its magnitudes
    // (sgd_magnitudes), the fixture's float64 value rounded to float within
    // u of it: gamma(10 t + 1). As a broken variant, the weight decay on
    // every group (bn and b decay too: 0.05 |p| per step, far outside).
    double worst = 0, worst_decay_everywhere = 0;
    for (const std::string kind : {"plain", "momentum", "nesterov"}) {
        const float momentum = kind == "plain" ? 0.0f : 0.9f;
        const bool nesterov = kind == "nesterov";
        std::vector<NamedParameter> params, decayed;
        for (const auto& [name, group] : names) {
            params.push_back({name, Variable(f.get("initial." + name).clone(), true), group});
            decayed.push_back({name, Variable(f.get("initial." + name).clone(), true), ParamGroup::weight});
        }
        const SgdOptions options{.lr = 0.5f, .momentum = momentum, .nesterov = nesterov, .weight_decay = 0.1f};
        SGD sgd(params, options), sgd_decayed(decayed, options);
        for (int step = 1; step <= 3; ++step) {
            sgd.zero_grad();
            sgd_decayed.zero_grad();
            for (size_t k = 0; k < params.size(); ++k) {
                params[k].var.accumulate_grad(f.get(cat("grad", step, ".", params[k].name)));
                decayed[k].var.accumulate_grad(f.get(cat("grad", step, ".", params[k].name)));
            }
            sgd.step();
            sgd_decayed.step();
            for (size_t k = 0; k < params.size(); ++k) {
                const std::string& name = params[k].name;
                INFO(kind, " step ", step, " ", name);
                const Tensor& expected = f.get(cat(kind, ".step", step, ".", name));
                for (int64_t i = 0; i < expected.numel(); ++i) {
                    std::vector<double> grads;
                    for (int s = 1; s <= step; ++s) grads.push_back(f.get(cat("grad", s, ".", name)).f32()[i]);
                    const double wd = params[k].group == ParamGroup::weight ? 0.1 : 0.0;
                    const double bound =
                        gamma_n(10 * step + 1) *
                        sgd_magnitudes(std::fabs(f.get("initial." + name).f32()[i]), grads, 0.5, momentum, nesterov, wd)
                            .back();
                    const double e = expected.f32()[i];
                    worst = std::max(worst, std::fabs(params[k].var.value().f32()[i] - e) / bound);
                    if (wd == 0)
                        worst_decay_everywhere =
                            std::max(worst_decay_everywhere, std::fabs(decayed[k].var.value().f32()[i] - e) / bound);
                }
            }
        }
    }
    CHECK(worst <= 1.0);
    check_far_outside("SGD with weight decay on every group", worst_decay_everywhere);
}

TEST_CASE("Adam: PyTorch's torch.optim.Adam, step by step, with a skipped gradient") {
    const SafetensorsFile f = read_safetensors(HFQ_TEST_DATA_DIR "/train_adam.safetensors");
    // tests/fixtures/make_train_fixtures.py: w with lr 0.01, weight decay
    // 0.01 and the default betas (0.9, 0.999); e with lr 0.05, betas (0.8, 0.99).
    const AdamOptions ow{.lr = 0.01f, .weight_decay = 0.01f}, oe{.lr = 0.05f, .beta1 = 0.8f, .beta2 = 0.99f};
    const AdamConstants torch_w = torch_constants(0.01, 0.9, 0.999, 0.01),
                        torch_e = torch_constants(0.05, 0.8, 0.99, 0);
    // Broken: no weight decay for w, the default betas for e.
    const AdamOptions broken_w{.lr = 0.01f}, broken_e{.lr = 0.05f};
    struct Run {
        Variable w, e;
        Adam adam_w, adam_e;
    };
    auto start = [&](const AdamOptions& a, const AdamOptions& b) {
        Variable w(f.get("init.w").clone(), true), e(f.get("init.e").clone(), true);
        return Run{w, e, Adam({{"w", w, ParamGroup::weight}}, a), Adam({{"e", e, ParamGroup::quantizer}}, b)};
    };
    Run run = start(ow, oe), broken = start(broken_w, broken_e);
    // The exact recurrences: hfq's constants (h) and PyTorch's (t).
    AdamTrace hw = adam_trace(f.get("init.w")), he = adam_trace(f.get("init.e"));
    AdamTrace tw = hw, te = he;
    double broken_ratio = 0;
    for (int k = 0; k < 6; ++k) {
        for (Run* r : {&run, &broken})
            for (auto [v, name] : {std::pair{&r->w, "w"}, std::pair{&r->e, "e"}}) {
                v->zero_grad();
                const std::string g = cat("grad.", name, ".", k);
                if (f.has(g)) v->accumulate_grad(f.get(g));
            }
        for (Run* r : {&run, &broken}) {
            r->adam_w.step();
            r->adam_e.step();
        }
        adam_trace_step(hw, f.get(cat("grad.w.", k)), hfq_constants(ow));
        adam_trace_step(tw, f.get(cat("grad.w.", k)), torch_w);
        if (f.has(cat("grad.e.", k))) {  // no gradient: both leave e and its state alone
            adam_trace_step(he, f.get(cat("grad.e.", k)), hfq_constants(oe));
            adam_trace_step(te, f.get(cat("grad.e.", k)), torch_e);
        }
        check_trace(cat("hfq w after step ", k), run.w.value(), hw.p, hw.ep);
        check_trace(cat("hfq e after step ", k), run.e.value(), he.p, he.ep);
        // PyTorch's own float32 results follow the same recurrence with its
        // constants: the recurrence is PyTorch's Adam.
        check_trace(cat("PyTorch w after step ", k), f.get(cat("after.w.", k)), tw.p, tw.ep);
        check_trace(cat("PyTorch e after step ", k), f.get(cat("after.e.", k)), te.p, te.ep);
        broken_ratio = std::max(
            {broken_ratio, trace_ratio(broken.w.value(), hw.p, hw.ep), trace_ratio(broken.e.value(), he.p, he.ep)});
    }
    hfq::testing::check_far_outside("Adam without weight decay, default betas", broken_ratio);
    for (auto [opt, name, h, t] : {std::tuple{&run.adam_w, "w", &hw, &tw}, std::tuple{&run.adam_e, "e", &he, &te}}) {
        const auto state = opt->state();
        REQUIRE(state.size() == 3);
        check_trace(cat("hfq exp_avg.", name), state[0].second, h->m, h->em);
        check_trace(cat("hfq exp_avg_sq.", name), state[1].second, h->v, h->ev);
        check_trace(cat("PyTorch exp_avg.", name), f.get(cat("exp_avg.", name)), t->m, t->em);
        check_trace(cat("PyTorch exp_avg_sq.", name), f.get(cat("exp_avg_sq.", name)), t->v, t->ev);
        CHECK(same_bits(state[2].second, f.get(cat("step.", name))));  // e skipped a step: 5, w: 6
    }
}

TEST_CASE("Adam: state round trip continues bit for bit; bad state is rejected without change") {
    auto make = [] { return Variable(Tensor::from_vector({3}, {0.5f, -1.0f, 2.0f}), true); };
    auto grad = [](int k) { return Tensor::from_vector({3}, {0.1f * k, -0.3f, 1.0f / (k + 1)}); };
    Variable a = make(), b = make();
    Adam straight({{"p", a, ParamGroup::quantizer}}, {.lr = 0.1f});
    Adam first({{"p", b, ParamGroup::quantizer}}, {.lr = 0.1f});
    for (int k = 0; k < 3; ++k) {
        for (auto [v, o] : {std::pair{&a, &straight}, std::pair{&b, &first}}) {
            v->zero_grad();
            v->accumulate_grad(grad(k));
            o->step();
        }
    }
    // A fresh optimizer restored from first's state continues like the uninterrupted one.
    Adam resumed({{"p", b, ParamGroup::quantizer}}, {.lr = 0.1f});
    std::vector<std::pair<std::string, Tensor>> saved;
    for (auto& [n, t] : first.state()) saved.emplace_back(n, t.clone());
    resumed.load_state(saved);
    for (int k = 3; k < 6; ++k) {
        for (auto [v, o] : {std::pair{&a, &straight}, std::pair{&b, &resumed}}) {
            v->zero_grad();
            v->accumulate_grad(grad(k));
            o->step();
        }
    }
    CHECK(same_bits(a.value(), b.value()));
    CHECK(same_bits(straight.state()[0].second, resumed.state()[0].second));

    CHECK_THROWS_WITH_AS(resumed.load_state({{"q.exp_avg", Tensor::zeros({3})}}),
                         doctest::Contains("unknown state tensor 'q.exp_avg'"), Error);
    CHECK_THROWS_WITH_AS(resumed.load_state({{"p.exp_avg", Tensor::zeros({3})}}),
                         doctest::Contains("incomplete state for 'p'"), Error);
    CHECK_THROWS_WITH_AS(
        resumed.load_state(
            {{"p.exp_avg", Tensor::zeros({3})}, {"p.exp_avg_sq", Tensor::zeros({3})}, {"p.step", Tensor::zeros({1})}}),
        doctest::Contains("'p.step' is f32 [1], expected s64 [1]"), Error);
    CHECK(same_bits(resumed.state()[0].second, straight.state()[0].second));  // unchanged by the failures
    CHECK_THROWS_WITH_AS(Adam({{"p", a, ParamGroup::quantizer}}, {.beta1 = 1.0f}), doctest::Contains("betas"), Error);
}
