#include "layers/sequential.h"

#include <string>

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

Variable Sequential::forward(const Variable& x) {
    Variable y = x;
    for (const Child& c : children()) y = (*c.module)(y);
    return y;
}

}  // namespace hfq
