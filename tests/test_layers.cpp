// The Module API (names, groups, modes, replacing and wrapping layers),
// initialisation, the layers themselves and the model config.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>

#include "engine/check.h"
#include "engine/ops.h"
#include "engine/tensor_math.h"
#include "layers/activation.h"
#include "layers/batch_norm.h"
#include "layers/conv2d.h"
#include "layers/linear.h"
#include "layers/mobilenet_v1.h"
#include "layers/mobilenet_v2.h"
#include "layers/pooling.h"
#include "layers/sequential.h"
#include "tests/float_error.h"
#include "tests/gradcheck.h"

using namespace hfq;
using hfq::testing::abs_of;
using hfq::testing::batch_norm_magnitude;
using hfq::testing::bound_from;
using hfq::testing::channel_stats;
using hfq::testing::check_far_outside;
using hfq::testing::check_within_bound;
using hfq::testing::gamma_n;
using hfq::testing::random_tensor;
using hfq::testing::worst_bound_ratio;

namespace {

std::vector<std::string> names_of(const std::vector<std::pair<std::string, Tensor>>& state) {
    std::vector<std::string> out;
    for (const auto& [name, t] : state) out.push_back(name);
    return out;
}

std::vector<std::string> param_names(const Module& m) {
    std::vector<std::string> out;
    for (const NamedParameter& p : m.named_parameters()) out.push_back(p.name);
    return out;
}

bool same_values(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// y = w * 2^e for a scalar parameter e: a stand-in for a weight quantizer,
// written as a custom op the way quantizers are.
class PowerOfTwoScale : public Module {
public:
    PowerOfTwoScale() {
        exponent_ = Variable(Tensor::full({1}, 1.0f), true);
        register_parameter("exponent", &exponent_, ParamGroup::quantizer);
    }
    Variable forward(const Variable& w) override {
        const float s = std::exp2(exponent_.value().item());
        Variable e = exponent_;
        return make_result(scale(w.value(), s), "pow2_scale", {w, e}, [w, e, s](const Tensor& dy) {
            w.accumulate_grad(scale(dy, s));
            e.accumulate_grad(Tensor::full({1}, float(sum_f64(mul(dy, w.value())) * s * std::log(2.0))));
        });
    }
    std::string type_name() const override { return "PowerOfTwoScale"; }

private:
    Variable exponent_;
};

// How a quantization wrapper is built on the API: the wrapped Conv2d is
// registered inline (its names stay "weight", ...), the quantizer is a child.
class WrappedConv : public Module {
public:
    explicit WrappedConv(std::shared_ptr<Conv2d> conv) : conv_(std::move(conv)) {
        register_inline(conv_);
        register_module("weight_quantizer", std::make_shared<PowerOfTwoScale>());
    }
    Variable forward(const Variable& x) override {
        return conv_->apply(x, (*child("weight_quantizer"))(conv_->weight()));
    }
    std::string type_name() const override { return "WrappedConv"; }
    bool summary_row() const override { return true; }
    int64_t macs(const Shape& in, const Shape& out) const override { return conv_->macs(in, out); }

private:
    std::shared_ptr<Conv2d> conv_;
};

// Conv followed by batch norm as one module, replacing the pair inside a
// Sequential; it keeps them under their old names "0" and "1".
class ConvBnPair : public Module {
public:
    ConvBnPair(std::shared_ptr<Module> conv, std::shared_ptr<Module> bn) {
        register_module("0", std::move(conv));
        register_module("1", std::move(bn));
    }
    Variable forward(const Variable& x) override { return (*child("1"))((*child("0"))(x)); }
    std::string type_name() const override { return "ConvBnPair"; }
};

}  // namespace

TEST_CASE("names, groups and order follow PyTorch's state_dict") {
    auto block = conv_bn_act(3, 8, 3, 2, 1, Activation::relu6);
    CHECK(names_of(block->state_dict()) == std::vector<std::string>{"0.weight", "1.weight", "1.bias", "1.running_mean",
                                                                    "1.running_var", "1.num_batches_tracked"});
    const auto params = block->named_parameters();
    REQUIRE(params.size() == 3);
    CHECK(params[0].group == ParamGroup::weight);
    CHECK(params[1].group == ParamGroup::bn);
    CHECK(params[2].group == ParamGroup::bn);
    CHECK(params[0].var.shape() == Shape{8, 3, 3, 3});
    // num_batches_tracked is an int64 scalar, as in PyTorch.
    const Tensor nbt = block->state_dict()[5].second;
    CHECK(nbt.dtype() == DType::s64);
    CHECK(nbt.shape().empty());

    Linear fc(4, 2);
    CHECK(fc.named_parameters()[1].group == ParamGroup::bias);
    CHECK(Conv2d::make(4, 4, 1, 1, 1, /*bias=*/true)->named_parameters()[1].group == ParamGroup::bias);

    auto v2 = build_model({.arch = Arch::mobilenet_v2, .width = 0.5, .classes = 10});
    const auto names = param_names(*v2);
    CHECK(names.front() == "features.0.0.weight");
    CHECK(std::count(names.begin(), names.end(), "features.3.conv.0.0.weight") == 1);
    CHECK(std::count(names.begin(), names.end(), "features.1.conv.1.weight") == 1);  // t = 1: no expansion
    CHECK(names.back() == "classifier.1.bias");
    auto v1 = build_model({.arch = Arch::mobilenet_v1, .width = 0.25, .classes = 7});
    CHECK(param_names(*v1).back() == "classifier.bias");
    CHECK(param_names(*v1)[3] == "features.1.0.weight");
    CHECK(v1->find("features.26.0").describe() == "Conv2d(256, 256, k=1, s=1, p=0)");
}

TEST_CASE("parameter counts at width 1.0, 1000 classes (and the channel rules)") {
    auto count = [](const Module& m) {
        int64_t n = 0;
        for (const auto& p : m.named_parameters()) n += p.var.value().numel();
        return n;
    };
    CHECK(count(*build_model({.arch = Arch::mobilenet_v1})) == 4231976);
    CHECK(count(*build_model({.arch = Arch::mobilenet_v2})) == 3504872);
    // Width 0.5 / 10 classes, as PyTorch counts them (fixture models).
    CHECK(count(*build_model({.arch = Arch::mobilenet_v1, .width = 0.5, .classes = 10})) == 823722);
    CHECK(count(*build_model({.arch = Arch::mobilenet_v2, .width = 0.5, .classes = 10})) == 700490);

    CHECK(MobileNetV1::channels(32, 0.25) == 8);
    CHECK(MobileNetV1::channels(1024, 0.75) == 768);
    CHECK(MobileNetV1::channels(16, 0.25) == 8);  // never below 8
    CHECK(MobileNetV2::make_divisible(32 * 0.5) == 16);
    CHECK(MobileNetV2::make_divisible(24 * 0.35) == 8);
    CHECK(MobileNetV2::make_divisible(96 * 0.75) == 72);
    CHECK(MobileNetV2::make_divisible(1280 * 1.4) == 1792);
    CHECK(MobileNetV2::make_divisible(20) == 24);  // rounds half up
    CHECK(MobileNetV2::make_divisible(11) == 16);  // 8 would be more than 10% below
    // last_channel scales only above width 1.
    auto wide = build_model({.arch = Arch::mobilenet_v2, .width = 1.4, .classes = 10});
    CHECK(dynamic_cast<Linear&>(wide->find("classifier.1")).in_features() == 1792);
    auto narrow = build_model({.arch = Arch::mobilenet_v2, .width = 0.35, .classes = 10});
    CHECK(dynamic_cast<Linear&>(narrow->find("classifier.1")).in_features() == 1280);
}

TEST_CASE("inverted residuals: residual only where the shape is kept") {
    auto m = build_model({.arch = Arch::mobilenet_v2});
    std::vector<int> with_residual;
    for (int i = 1; i <= 17; ++i)
        if (dynamic_cast<InvertedResidual&>(m->find("features." + std::to_string(i))).uses_residual())
            with_residual.push_back(i);
    // torchvision: blocks 3, 5, 6, 8, 9, 10, 12, 13, 15, 16 add their input.
    CHECK(with_residual == std::vector<int>{3, 5, 6, 8, 9, 10, 12, 13, 15, 16});
}

TEST_CASE("train() and eval() reach every module") {
    auto m = build_model({.arch = Arch::mobilenet_v2, .width = 0.25, .classes = 3});
    m->eval();
    for (auto& [name, mod] : m->named_modules()) CHECK(!mod->is_training());
    m->train();
    for (auto& [name, mod] : m->named_modules()) CHECK(mod->is_training());
    // A replacement takes the parent's mode.
    m->eval();
    m->find("features.0").replace_child("0", Conv2d::make(3, 8, 3, 2));
    CHECK(!m->find("features.0.0").is_training());
}

TEST_CASE("finding, replacing and wrapping children") {
    auto seq = conv_bn_act(3, 4, 3, 1, 1, Activation::relu);
    CHECK_THROWS_WITH_AS(seq->find("1.x"), doctest::Contains("no child named 'x'"), Error);
    CHECK_THROWS_WITH_AS(seq->child("7"), doctest::Contains("no child named '7' (children: 0, 1, 2)"), Error);

    const Tensor x = random_tensor({2, 5, 5, 3}, 1);
    seq->initialize(3);
    seq->eval();
    const Tensor before = (*seq)(Variable(x)).value().clone();
    const auto names_before = names_of(seq->state_dict());

    SUBCASE("a wrapper keeps the wrapped layer's names and adds its own") {
        auto conv = std::dynamic_pointer_cast<Conv2d>(seq->child("0"));
        seq->replace_child("0", std::make_shared<WrappedConv>(conv));
        auto names = names_of(seq->state_dict());
        CHECK(names[0] == "0.weight");
        CHECK(names[1] == "0.weight_quantizer.exponent");
        names.erase(names.begin() + 1);
        CHECK(names == names_before);
        const auto params = seq->named_parameters();
        CHECK(params[1].group == ParamGroup::quantizer);
        // The wrapper runs the same convolution on the transformed weight:
        // with exponent 1 the conv output doubles (exact), then BN (eval) and
        // ReLU.
        Variable w(scale(conv->weight().value(), 2.0f));
        const Tensor y = (*seq)(Variable(x)).value();
        const Tensor expected = relu((*seq->child("1"))(conv->apply(Variable(x), w))).value();
        // Both convolutions (the same sums, whichever kernel oneDNN runs for
        // each) are within gamma(27 + 1) of M =
        // conv2d(|x|, |2 w|) (n = 3 * 3 * 3 products), so |c| <= M; batch norm
        // maps an error e to |s| e and adds gamma(6) of |s| (|c - mean| +
        // |mean|) + |beta| (float_error.h); ReLU moves no two values apart.
        // Each side: gamma(27 + 7) of |s| (M + 2 |mean|) + |beta|.
        auto& bn = dynamic_cast<BatchNorm2d&>(*seq->child("1"));
        const Tensor conv_magnitude = conv->apply(Variable(abs_of(x)), Variable(abs_of(w.value()))).value();
        Tensor magnitude = Tensor::empty(conv_magnitude.shape());
        for (int64_t i = 0; i < magnitude.numel(); ++i) {
            const int64_t c = i % 4;
            const double s =
                std::fabs(bn.weight().value().f32()[c]) / std::sqrt(double(bn.running_var().f32()[c]) + bn.eps());
            magnitude.f32()[i] = float(s * (conv_magnitude.f32()[i] + 2 * std::fabs(bn.running_mean().f32()[c])) +
                                       std::fabs(bn.bias().value().f32()[c]));
        }
        const Tensor bound = bound_from(magnitude, 2 * gamma_n(27 + 7), 27 + 2);
        check_within_bound("the wrapper vs conv, batch norm and ReLU", y, expected, bound);
        const Tensor unscaled = relu((*seq->child("1"))(conv->apply(Variable(x), conv->weight()))).value();
        check_far_outside("the wrapper vs the untransformed weight", worst_bound_ratio(y, unscaled, bound));
        // Gradients reach the exponent and the wrapped weight.
        seq->train();
        Variable loss = sum((*seq)(Variable(x)));
        loss.backward();
        CHECK(params[0].var.grad().defined());
        CHECK(params[1].var.grad().defined());
        CHECK(std::fabs(params[1].var.grad().item()) > 0);
    }
    SUBCASE("a pair of children replaced by one inline module keeps all names") {
        seq->replace_children({"0", "1"}, std::make_shared<ConvBnPair>(seq->child("0"), seq->child("1")));
        CHECK(seq->children().size() == 2);
        CHECK(names_of(seq->state_dict()) == names_before);
        CHECK(same_values((*seq)(Variable(x)).value(), before));
        // The names inside the inline module are found and replaced as before.
        CHECK(seq->find("0").type_name() == "Conv2d");
        auto bn = std::make_shared<BatchNorm2d>(4);
        seq->replace_child("1", bn);
        CHECK(seq->child("1") == bn);
        CHECK(names_of(seq->state_dict()) == names_before);
        CHECK_THROWS_WITH_AS(seq->child("3"), doctest::Contains("no child named '3' (children: 0, 1, 2)"), Error);
        CHECK_THROWS_WITH_AS(seq->replace_children({"2", "0"}, std::make_shared<ReLU>()),
                             doctest::Contains("no direct child named '0'"), Error);
    }
    SUBCASE("name collisions are refused") {
        auto s = std::make_shared<Sequential>();
        s->add("a", std::make_shared<ReLU>());
        CHECK_THROWS_WITH_AS(s->add("a", std::make_shared<ReLU>()), doctest::Contains("'a' is already registered"),
                             Error);
        CHECK_THROWS_AS(s->add("b.c", std::make_shared<ReLU>()), Error);
        // An inline child whose names collide with its parent's.
        struct Twice : Module {
            std::shared_ptr<Conv2d> c = Conv2d::make(1, 1, 1);
            Twice() {
                register_inline(c);
                register_module("weight", std::make_shared<ReLU>());
                register_inline(Conv2d::make(1, 1, 1));
            }
            Variable forward(const Variable& x) override { return x; }
            std::string type_name() const override { return "Twice"; }
        } twice;
        CHECK_THROWS_WITH_AS(twice.state_dict(), doctest::Contains("'weight' is used twice"), Error);
    }
}

TEST_CASE("initialisation as torchvision, reproducible from the seed") {
    auto a = build_model({.arch = Arch::mobilenet_v1, .width = 0.5, .classes = 10}, 42);
    auto b = build_model({.arch = Arch::mobilenet_v1, .width = 0.5, .classes = 10}, 42);
    auto c = build_model({.arch = Arch::mobilenet_v1, .width = 0.5, .classes = 10}, 43);
    const auto sa = a->state_dict(), sb = b->state_dict(), sc = c->state_dict();
    for (size_t i = 0; i < sa.size(); ++i) CHECK(same_values(sa[i].second, sb[i].second));
    CHECK(!same_values(sa[0].second, sc[0].second));

    // The N values of a weight are normal(0, sigma) draws: their mean is
    // within 5 standard deviations, 5 sigma / sqrt(N), of 0 and their standard
    // deviation within 5 sigma / sqrt(2 N) of sigma. A wrong fan (the
    // depthwise's 9 instead of 512 * 9, or the kernel's 3 x 3 left out)
    // moves sigma by a factor of 3 or more.
    auto check_normal = [](const Tensor& t, double sigma) {
        const double n = double(t.numel()), m = sum_f64(t) / n;
        const double sd = std::sqrt(sum_f64(mul(t, t)) / n - m * m);
        CHECK(std::fabs(m) <= 5 * sigma / std::sqrt(n));
        CHECK(std::fabs(sd - sigma) <= 5 * sigma / std::sqrt(2 * n));
    };
    // Pointwise conv features.26: {512, 512, 1, 1}, fan_out 512 -> std sqrt(2/512).
    check_normal(dynamic_cast<Conv2d&>(a->find("features.26.0")).weight().value(), std::sqrt(2.0 / 512));
    // Depthwise features.25: {512, 1, 3, 3}, fan_out 512 * 9.
    check_normal(dynamic_cast<Conv2d&>(a->find("features.25.0")).weight().value(), std::sqrt(2.0 / (512 * 9)));
    auto& fc = dynamic_cast<Linear&>(a->find("classifier"));
    check_normal(fc.weight().value(), 0.01);
    CHECK(max_abs(fc.bias().value()) == 0.0f);
    auto& bn = dynamic_cast<BatchNorm2d&>(a->find("features.3.1"));
    CHECK(bn.weight().value().to_vector() == std::vector<float>(bn.channels(), 1.0f));
    CHECK(max_abs(bn.bias().value()) == 0.0f);
    CHECK(bn.running_var().to_vector() == std::vector<float>(bn.channels(), 1.0f));
}

TEST_CASE("batch norm: num_batches_tracked counts training forwards only") {
    BatchNorm2d bn(3);
    const Variable x(random_tensor({2, 4, 4, 3}, 5));
    bn(x);
    bn(x);
    CHECK(bn.num_batches_tracked() == 2);
    const Tensor mean_after = bn.running_mean().clone();
    CHECK(max_abs(mean_after) > 0);  // running statistics moved
    bn.eval();
    bn(x);
    CHECK(bn.num_batches_tracked() == 2);
    CHECK(same_values(bn.running_mean(), mean_after));
    CHECK_THROWS_WITH_AS(bn(Variable(random_tensor({2, 4, 4, 5}, 1))), doctest::Contains("3 channels"), Error);
}

TEST_CASE("Sequential runs BatchNorm2d + ReLU6 as one op while recording gradients, only for those exact types") {
    struct OwnReLU6 : ReLU6 {};  // stands for a layer put in place of the ReLU6
    auto block = [](std::shared_ptr<Module> activation) {
        return std::make_shared<Sequential>(
            std::vector<std::shared_ptr<Module>>{std::make_shared<BatchNorm2d>(3), std::move(activation)});
    };
    const Tensor x = random_tensor({2, 4, 4, 3}, 6, 2.0f);
    auto fused = block(std::make_shared<ReLU6>()), separate = block(std::make_shared<OwnReLU6>());
    const Variable y = (*fused)(Variable(x, true));
    const Variable expected = (*separate)(Variable(x, true));
    CHECK(y.op_name() == "batch_norm_relu6");
    CHECK(expected.op_name() == "relu6");
    // Each within gamma(6) of batch_norm_magnitude (float_error.h) before
    // the clamp, which moves no two values apart.
    const Tensor ones = Tensor::full({3}, 1.0f), zeros = Tensor::zeros({3});
    const Tensor bound = bound_from(batch_norm_magnitude(x, ones, zeros, channel_stats(x), 1e-5f), 2 * gamma_n(6), 1);
    check_within_bound("fused vs separate", y.value(), expected.value(), bound);
    auto& bn = dynamic_cast<BatchNorm2d&>(*fused->child("0"));
    CHECK(bn.num_batches_tracked() == 1);
    CHECK(same_values(bn.running_var(), dynamic_cast<BatchNorm2d&>(*separate->child("0")).running_var()));
    // Without recording, each layer runs as itself (summary() sees both).
    NoGradGuard no_grad;
    CHECK((*fused)(Variable(x)).op_name() == "relu6");
    CHECK(bn.num_batches_tracked() == 2);
    separate->eval();  // a wrong statistic: the running ones
    check_far_outside("fused vs separate with the running statistics",
                      worst_bound_ratio(y.value(), (*separate)(Variable(x)).value(), bound));
}

TEST_CASE("dropout: seeded by initialize, state restorable, identity in eval") {
    auto model = build_model({.arch = Arch::mobilenet_v2, .width = 0.25, .classes = 4, .dropout = 0.5}, 9);
    auto rngs = model->named_rngs();
    REQUIRE(rngs.size() == 1);
    CHECK(rngs[0].first == "classifier.0");
    auto& drop = dynamic_cast<Dropout&>(model->find("classifier.0"));
    const Variable x(Tensor::full({4, 64}, 1.0f));
    const Rng saved = drop.rng();
    const Tensor first = drop(x).value().clone();
    // About half zeroed, the rest scaled by 1 / (1 - p) = 2.
    int zeros = 0;
    for (float v : first.to_vector()) {
        CHECK((v == 0.0f || v == 2.0f));
        zeros += v == 0.0f;
    }
    CHECK(zeros > 80);  // 256 draws: 128 +- 48, 6 standard deviations (8)
    CHECK(zeros < 176);
    // Restoring the generator state replays the same mask; a new mask differs.
    CHECK(!same_values(drop(x).value(), first));
    *rngs[0].second = Rng::restore(saved.state(), saved.stream());
    CHECK(same_values(drop(x).value(), first));
    // The same seed gives the same masks in another model instance.
    auto twin = build_model(model->config(), 9);
    CHECK(same_values(dynamic_cast<Dropout&>(twin->find("classifier.0"))(x).value(), first));
    drop.eval();
    CHECK(same_values(drop(x).value(), x.value()));
}

TEST_CASE("model config: JSON round trip and strict parsing") {
    ModelConfig c{.arch = Arch::mobilenet_v1,
                  .width = 0.75,
                  .classes = 10,
                  .input_channels = 1,
                  .small_input = true,
                  .activation = Activation::relu};
    const std::string json = c.to_json();
    CHECK(json == R"({"arch":"mobilenet_v1","width":0.75,"classes":10,"input_channels":1,)"
                  R"("small_input":true,"activation":"relu","dropout":0.0})");
    const ModelConfig d = ModelConfig::from_json(json);
    CHECK(d.to_json() == json);
    CHECK(ModelConfig{}.effective_dropout() == 0.2);
    CHECK(ModelConfig::from_json(R"({"arch":"v2"})").arch == Arch::mobilenet_v2);
    CHECK_THROWS_WITH_AS(ModelConfig::from_json(R"({"arch":"resnet"})"), doctest::Contains("unknown arch 'resnet'"),
                         Error);
    CHECK_THROWS_WITH_AS(ModelConfig::from_json(R"({"widht":1})"), doctest::Contains("unknown key 'widht'"), Error);
    CHECK_THROWS_WITH_AS(ModelConfig::from_json(R"({"classes":"ten"})"), doctest::Contains("'classes' must be"), Error);
    CHECK_THROWS_WITH_AS(ModelConfig::from_json(R"({"width":-1})"), doctest::Contains("width"), Error);
    CHECK_THROWS_WITH_AS(ModelConfig::from_json("[1, 2"), doctest::Contains("not a JSON object"), Error);
    CHECK_THROWS_WITH_AS(ModelConfig::from_json(R"({"activation":"relu"})"), doctest::Contains("relu6 throughout"),
                         Error);
}

TEST_CASE("small-input variants and input channels") {
    NoGradGuard no_grad;
    auto out_hw = [](const ModelConfig& c, int size) {
        auto m = build_model(c);
        m->eval();
        // The last feature map's side: run the features only.
        return (*m->child("features"))(Variable(Tensor::zeros({1, size, size, c.input_channels}))).shape()[1];
    };
    ModelConfig v1{.arch = Arch::mobilenet_v1, .width = 0.25, .classes = 10, .input_channels = 1};
    ModelConfig v2{.arch = Arch::mobilenet_v2, .width = 0.25, .classes = 10, .input_channels = 1};
    CHECK(out_hw(v1, 32) == 1);
    CHECK(out_hw(v2, 32) == 1);
    v1.small_input = v2.small_input = true;
    CHECK(out_hw(v1, 32) == 2);  // total stride 16
    CHECK(out_hw(v1, 28) == 2);
    CHECK(out_hw(v2, 32) == 4);  // total stride 8
    CHECK(out_hw(v2, 28) == 4);
    auto m = build_model(v2);
    CHECK(m->forward(Variable(Tensor::zeros({2, 28, 28, 1}))).shape() == Shape{2, 10});
    CHECK_THROWS_WITH_AS(m->forward(Variable(Tensor::zeros({2, 28, 28, 3}))),
                         doctest::Contains("expected input {N, H, W, 1}"), Error);
}
