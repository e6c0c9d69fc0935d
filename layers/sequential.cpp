#include "layers/sequential.h"

#include <string>
#include <typeinfo>

#include "layers/activation.h"

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

// The module at children[i] when a plain ReLU6 follows it and it can run
// both as one op (Module::fuses_relu6). Exact type for the ReLU6: a quantizer
// put in its place runs on its own.
Module* fuses_with_next_relu6(const std::vector<Module::Child>& children, size_t i) {
    if (i + 1 >= children.size()) return nullptr;
    Module& m = *children[i].module;
    if (!m.fuses_relu6() || typeid(*children[i + 1].module) != typeid(ReLU6)) return nullptr;
    return &m;
}

}  // namespace

Variable Sequential::forward(const Variable& x) {
    // While gradients are recorded, a batch norm followed by a ReLU6 runs as
    // one op: the normalised value between them is then not kept alive until
    // backward. Without recording there is nothing to save, and each child
    // runs as itself (summary() sees every layer).
    const bool fuse = grad_enabled();
    const auto& layers = children();
    Variable y = x;
    for (size_t i = 0; i < layers.size(); ++i) {
        if (Module* m = fuse ? fuses_with_next_relu6(layers, i) : nullptr) {
            y = m->forward_relu6(y);
            ++i;  // the ReLU6 is done
        } else {
            y = (*layers[i].module)(y);
        }
    }
    return y;
}

}  // namespace hfq
