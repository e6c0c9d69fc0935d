// Define-by-run reverse-mode automatic differentiation.
//
// A Variable holds a value (a Tensor), its gradient once computed, and - if it
// was produced by an op while gradients were being recorded - the Variables
// it was computed from and a closure that turns the gradient of this value
// into gradient contributions for those inputs. backward() sorts the graph
// topologically and runs the closures from the output back to the leaves.
//
// Writing an op with a hand-written backward (the quantizers are written this
// way):
//
//   Variable my_square(const Variable& x) {             // (engine/tensor_math.h's mul, scale)
//       Tensor y = mul(x.value(), x.value());             // forward on x.value()
//       return make_result(y, "my_square", {x}, [x](const Tensor& dy) {
//           x.accumulate_grad(scale(mul(x.value(), dy), 2.0f));  // dL/dx = 2 x dy
//       });
//   }
//
// Rules the closures follow: never modify dy (it may be shared with other
// inputs' gradients) except through gradient_buffer(dy), and compute an
// input's gradient only if it requires_grad() (accumulate_grad ignores the
// others, so computing it would be wasted work).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/tensor.h"

namespace hfq {

using BackwardFn = std::function<void(const Tensor& grad_output)>;

struct Node;

class Variable {
public:
    Variable() = default;  // undefined (an absent optional input, e.g. no bias)
    explicit Variable(Tensor value, bool requires_grad = false);

    bool defined() const { return node_ != nullptr; }
    const Tensor& value() const;
    Tensor& value();
    const Shape& shape() const { return value().shape(); }
    bool requires_grad() const;

    // The accumulated gradient (undefined until backward reaches this value).
    const Tensor& grad() const;
    void zero_grad();  // forgets the gradient (it is re-created on the next backward)
    // Adds g to the gradient; no-op if this Variable does not require grad.
    void accumulate_grad(const Tensor& g) const;

    // Runs backpropagation from this value. Without a seed the value must have
    // one element and its gradient is seeded with 1. Afterwards the graph is
    // freed: intermediate values keep no references to their inputs.
    void backward() const;
    void backward(const Tensor& seed) const;

    const std::string& op_name() const;
    Node* node() const { return node_.get(); }

private:
    friend Variable make_result(Tensor, std::string, std::vector<Variable>, BackwardFn);
    std::shared_ptr<Node> node_;
};

struct Node {
    Tensor value;
    Tensor grad;
    bool requires_grad = false;
    std::string op = "leaf";
    std::vector<Variable> inputs;  // what this value was computed from
    BackwardFn backward;           // empty for leaves
    bool freed = false;            // backward already ran through this node
};

// Wraps an op's output. If gradient recording is on and some input requires
// grad, the inputs and the backward closure are recorded; otherwise the result
// is a constant and the closure is dropped.
Variable make_result(Tensor value, std::string op, std::vector<Variable> inputs, BackwardFn backward);

// Where a closure may write its input's gradient: dy itself when nothing but
// the graph holds dy's memory (backward drops dy right after the closure
// returns), else a fresh uninitialised tensor of dy's shape. Writing over dy
// saves an activation-sized allocation and, on a memory-bound pass, the
// reads a processor makes of every cache line before writing to fresh
// memory. The closure must read each element of dy before writing it.
Tensor gradient_buffer(const Tensor& dy);

// Gradient recording is on by default. NoGradGuard turns it off in a scope
// (evaluation, export, backward's own closures): ops then record nothing.
// Optimizer updates need none: they write the parameters' tensors directly.
bool grad_enabled();
class NoGradGuard {
public:
    NoGradGuard();
    ~NoGradGuard();
    NoGradGuard(const NoGradGuard&) = delete;
    NoGradGuard& operator=(const NoGradGuard&) = delete;

private:
    bool previous_;
};

}  // namespace hfq
