// Module: the building block of a network, in the spirit of torch.nn.Module.
//
// A module owns named parameters (trainable Variables), named buffers
// (Tensors that are state but not trained, e.g. batch norm's running
// statistics) and named child modules, in order. Names compose
// hierarchically exactly like PyTorch's state_dict keys:
//
//   model                         MobileNetV2
//    `- features                  Sequential
//        `- 3                     InvertedResidual
//            `- conv              Sequential
//                `- 0             Sequential (Conv2dNormActivation)
//                    `- 0         Conv2d      -> "features.3.conv.0.0.weight"
//
// so a checkpoint written by PyTorch loads by name.
//
// Every parameter carries a group tag so an optimizer can treat batch-norm
// parameters, biases and quantizer exponents differently from weights
// (e.g. no weight decay on them, or Adam instead of SGD).
//
// Wrapping and replacing layers (what quantization does):
//   * replace_child(name, m) swaps a child for another module under the same
//     name (Conv2d -> Quantized<Conv2d>).
//   * A child can be registered *inline*: its parameters, buffers and
//     children are named as if they belonged to the parent. A wrapper that
//     registers the wrapped layer inline keeps the layer's names ("weight",
//     not "inner.weight"), so float checkpoints load into a wrapped model,
//     and adds its own (e.g. "weight_quantizer.exponent").
//   * replace_children({"0", "1"}, m) puts m (inline) in place of several
//     consecutive children (a conv and its batch norm, folded into one
//     module); m registers the modules it replaces under their old names.
//
// Modules are created with std::make_shared and never copied or moved (the
// registry points at their members).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "engine/autograd.h"
#include "engine/random.h"
#include "engine/tensor.h"

namespace hfq {

// What a parameter is, for the optimizer.
enum class ParamGroup {
    weight,     // convolution and linear weights
    bias,       // convolution and linear biases
    bn,         // batch-norm scale (gamma) and shift (beta)
    quantizer,  // quantizer parameters (e.g. log2 step sizes)
};
const char* param_group_name(ParamGroup g);

struct NamedParameter {
    std::string name;  // full hierarchical name, e.g. "features.0.1.weight"
    Variable var;      // a handle: shares the module's value and gradient
    ParamGroup group;
};

class Module {
public:
    Module() = default;
    virtual ~Module() = default;
    Module(const Module&) = delete;
    Module& operator=(const Module&) = delete;

    // The computation. Callers use operator(), which also lets summarize() (layers/summary.h)
    // observe each layer's output shape.
    virtual Variable forward(const Variable& x) = 0;
    Variable operator()(const Variable& x);
    // Whether forward_relu6 runs relu6(forward(x)) as fewer ops (batch norm
    // and ReLU6 as one pass, holding less memory until backward): Sequential
    // then calls it for this module and a ReLU6 after it, while gradients are
    // recorded. Same values, gradients and state updates.
    virtual bool fuses_relu6() const { return false; }
    virtual Variable forward_relu6(const Variable& x);

    // Short type name ("Conv2d") and a one-line description with the
    // configuration ("Conv2d(16, 32, k=3, s=2, p=1, groups=1)").
    virtual std::string type_name() const = 0;
    virtual std::string describe() const { return type_name(); }

    // ---- Names -------------------------------------------------------------
    // All parameters below this module, named relative to it, in PyTorch's
    // state_dict order (own parameters, then children in order).
    std::vector<NamedParameter> named_parameters() const;
    std::vector<Variable> parameters() const;
    // All buffers below this module; the pointers refer to the modules' own
    // tensors (write through them to load state).
    std::vector<std::pair<std::string, Tensor*>> named_buffers();
    // Parameters (values) and buffers together, in PyTorch's state_dict
    // order; the tensors share memory with the module.
    std::vector<std::pair<std::string, Tensor>> state_dict() const;
    // This module (name "") and every module below it, depth first. An
    // inline child has the same name as its parent.
    std::vector<std::pair<std::string, Module*>> named_modules();
    // Random generators owned by modules below this one (dropout masks),
    // by module name: for saving and restoring the training state exactly.
    std::vector<std::pair<std::string, Rng*>> named_rngs();

    // ---- Children ----------------------------------------------------------
    struct Child {
        std::string name;
        std::shared_ptr<Module> module;
        bool is_inline = false;  // its names appear directly under ours
    };
    const std::vector<Child>& children() const { return children_; }
    // The child with this name: a direct child, or one registered by an
    // inline child (whose names count as ours). Throws naming it if absent.
    std::shared_ptr<Module> child(const std::string& name) const;
    // A module by dotted path relative to this one ("features.3.conv.0");
    // "" is this module. Throws naming the first missing component.
    Module& find(const std::string& path);
    // Replaces the child `name` (as child() finds it), keeping its name and
    // position.
    void replace_child(const std::string& name, std::shared_ptr<Module> replacement);
    // Replaces the consecutive direct children `names` (in order) by one
    // inline module at the position of the first.
    void replace_children(const std::vector<std::string>& names, std::shared_ptr<Module> replacement);

    // ---- Modes -------------------------------------------------------------
    // Training mode (batch statistics, dropout) or evaluation mode, for this
    // module and everything below it.
    void train(bool on = true);
    void eval() { train(false); }
    bool is_training() const { return training_; }

    // Forgets the gradients of all parameters below.
    void zero_grad();

    // (Re-)initialises parameters and random state below this module from
    // `seed`: every module gets its own stream derived from the seed and its
    // name, so the result does not depend on construction order.
    void initialize(uint64_t seed);

    // ---- Hooks for summarize() (layers/summary.h) --------------------
    // Multiply-accumulates of one call with these input and output shapes
    // (convolution and linear layers; everything else counts 0).
    virtual int64_t macs(const Shape& input, const Shape& output) const { return 0; }
    // Whether summarize() shows this module as one row. Default: modules
    // without children. Containers answer false (their children are shown);
    // a wrapper around a layer answers true and reports the layer's MACs.
    virtual bool summary_row() const { return children_.empty(); }

protected:
    // Registration, done by constructors. The slots must be members of the
    // module (they are referred to by pointer).
    void register_parameter(std::string name, Variable* slot, ParamGroup group);
    void register_buffer(std::string name, Tensor* slot);
    void register_module(std::string name, std::shared_ptr<Module> child);
    void register_inline(std::shared_ptr<Module> child);

    // Per-module part of initialize(): set own parameters / random state.
    virtual void reset_parameters(Rng& rng) {}
    // A module that owns a random generator returns it here.
    virtual Rng* own_rng() { return nullptr; }

private:
    struct Param {
        std::string name;
        Variable* slot;
        ParamGroup group;
    };
    struct Buffer {
        std::string name;
        Tensor* slot;
    };
    void check_new_name(const std::string& name) const;
    size_t child_index(const std::string& name) const;  // direct children only
    // The list entry holding child `name` (in self or in an inline child), or
    // null. Self is Module or const Module.
    template <class Self>
    static auto find_child(Self& self, const std::string& name) -> decltype(&self.children_[0]);
    // Depth-first walk in state_dict order: f(prefix, module) for self, then
    // its children (an inline child keeps the parent's prefix).
    template <class Self, class Visit>
    static void visit(Self& self, const std::string& prefix, Visit&& f);

    std::vector<Param> params_;
    std::vector<Buffer> buffers_;
    std::vector<Child> children_;
    bool training_ = true;
};

// While alive, records every call of a summary row (see summary_row()) on
// this thread: the module and its input and output shapes. Calls made inside
// a recorded row (a wrapper calling its quantizer) are not recorded.
class CallRecorder {
public:
    struct Call {
        Module* module;
        Shape input, output;
    };
    CallRecorder();
    ~CallRecorder();
    CallRecorder(const CallRecorder&) = delete;
    CallRecorder& operator=(const CallRecorder&) = delete;
    const std::vector<Call>& calls() const { return calls_; }

private:
    friend class Module;
    std::vector<Call> calls_;
    bool inside_row_ = false;
    CallRecorder* previous_;
};

// "prefix.name", or just name when the prefix is empty.
std::string join_name(const std::string& prefix, const std::string& name);

}  // namespace hfq
