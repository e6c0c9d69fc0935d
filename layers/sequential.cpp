#include "layers/sequential.h"

#include <string>
#include <typeinfo>

#include "layers/activation.h"
#include "layers/batch_norm.h"

namespace hfq {

Sequential::Sequential(std::vector<std::shared_ptr<Module>> layers) {
    for (auto& layer : layers) add(std::move(layer));
}

Sequential& Sequential::add(std::shared_ptr<Module> layer) {
    return add(std::to_string(children().size()), std::move(layer));
}

Sequential& Sequential::add(std::string name, std::shared_ptr<Module> layer) {
    register_module(std::move(name), std::move(layer));
    return *this;
}

namespace {

// The BatchNorm2d at children[i] when a plain ReLU6 follows it. Exact types:
// a subclass, or a quantizer put in place of the ReLU6, runs on its own.
BatchNorm2d* bn_before_relu6(const std::vector<Module::Child>& children, size_t i) {
    if (i + 1 >= children.size()) return nullptr;
    Module& m = *children[i].module;
    Module& next = *children[i + 1].module;
    if (typeid(m) != typeid(BatchNorm2d) || typeid(next) != typeid(ReLU6)) return nullptr;
    return static_cast<BatchNorm2d*>(&m);
}

}  // namespace

Variable Sequential::forward(const Variable& x) {
    // While gradients are recorded, a BatchNorm2d followed by a ReLU6 runs as
    // one op: the normalised value between them is then not kept alive until
    // backward. Without recording there is nothing to save, and each child
    // runs as itself (summary() sees every layer).
    const bool fuse = grad_enabled();
    const auto& layers = children();
    Variable y = x;
    for (size_t i = 0; i < layers.size(); ++i) {
        if (BatchNorm2d* bn = fuse ? bn_before_relu6(layers, i) : nullptr) {
            y = bn->forward_relu6(y);
            ++i;  // the ReLU6 is done
        } else {
            y = (*layers[i].module)(y);
        }
    }
    return y;
}

}  // namespace hfq
