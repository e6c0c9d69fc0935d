// Sequential: children applied in order, named "0", "1", ... by default
// (PyTorch's nn.Sequential).
#pragma once
#include <memory>

#include "layers/module.h"

namespace hfq {

class Sequential : public Module {
public:
    Sequential() = default;
    explicit Sequential(std::vector<std::shared_ptr<Module>> layers);

    // Appends a layer named by its position ("0", "1", ...).
    Sequential& add(std::shared_ptr<Module> layer);
    // Appends a layer under an explicit name.
    Sequential& add(std::string name, std::shared_ptr<Module> layer);

    Variable forward(const Variable& x) override;
    size_t size() const { return children().size(); }
    std::string type_name() const override { return "Sequential"; }
};

}  // namespace hfq
