#include "engine/autograd.h"

#include <unordered_set>

#include "engine/check.h"
#include "engine/op_profile.h"
#include "engine/tensor_math.h"

namespace hfq {
namespace {
thread_local bool g_grad_enabled = true;
}

bool grad_enabled() { return g_grad_enabled; }
NoGradGuard::NoGradGuard() : previous_(g_grad_enabled) { g_grad_enabled = false; }
NoGradGuard::~NoGradGuard() { g_grad_enabled = previous_; }

Variable::Variable(Tensor value, bool requires_grad) : node_(std::make_shared<Node>()) {
    node_->value = std::move(value);
    node_->requires_grad = requires_grad;
}

const Tensor& Variable::value() const {
    HFQ_CHECK(node_, "Variable::value: the variable is undefined");
    return node_->value;
}
Tensor& Variable::value() {
    HFQ_CHECK(node_, "Variable::value: the variable is undefined");
    return node_->value;
}
bool Variable::requires_grad() const { return node_ && node_->requires_grad; }
const Tensor& Variable::grad() const {
    HFQ_CHECK(node_, "Variable::grad: the variable is undefined");
    return node_->grad;
}
void Variable::zero_grad() {
    if (node_) node_->grad = Tensor();
}
const std::string& Variable::op_name() const {
    HFQ_CHECK(node_, "Variable::op_name: the variable is undefined");
    return node_->op;
}

void Variable::accumulate_grad(const Tensor& g) const {
    if (!requires_grad()) return;
    HFQ_CHECK(g.shape() == node_->value.shape(), "backward of ", node_->op, ": gradient of shape ",
              shape_str(g.shape()), " for a value of shape ", shape_str(node_->value.shape()));
    // Out of place: g may be shared with another input's gradient (add's
    // backward hands the same tensor to both of its inputs).
    node_->grad = node_->grad.defined() ? add(node_->grad, g) : g;
}

Tensor gradient_buffer(const Tensor& dy) { return dy.sole_owner() ? dy : Tensor::empty(dy.shape()); }

Variable make_result(Tensor value, std::string op, std::vector<Variable> inputs, BackwardFn backward) {
    Variable out(std::move(value));
    if (op_profile::enabled()) op_profile::charge(op_profile::kForward, op + " " + shape_str(out.node_->value.shape()));
    out.node_->op = std::move(op);
    if (!grad_enabled()) return out;
    bool any = false;
    for (const Variable& v : inputs) any = any || v.requires_grad();
    if (!any) return out;
    out.node_->requires_grad = true;
    out.node_->inputs = std::move(inputs);
    out.node_->backward = std::move(backward);
    return out;
}

void Variable::backward() const {
    HFQ_CHECK(node_ && node_->value.numel() == 1, "backward: without a seed the output must have one element, got ",
              node_ ? shape_str(node_->value.shape()) : "an undefined variable");
    backward(Tensor::full(node_->value.shape(), 1.0f));
}

void Variable::backward(const Tensor& seed) const {
    HFQ_CHECK(node_, "backward: the variable is undefined");
    HFQ_CHECK(node_->requires_grad, "backward: ", node_->op, " does not depend on anything that requires grad");
    HFQ_CHECK(!node_->freed, "backward: the graph of ", node_->op,
              " was already freed by an earlier backward; run the forward pass again");

    // Depth-first post-order gives a topological order (inputs before users);
    // an explicit stack keeps deep networks from overflowing the call stack.
    // `order` holds Variables (owning references): freeing a node's inputs
    // below must not destroy a node that is still to be processed. Once a
    // node is processed its entry is dropped, so an intermediate value that
    // nothing else holds is freed right away: the activations go one by one
    // while the (growing) gradients of the early layers are made.
    std::vector<Variable> order;
    std::unordered_set<Node*> seen{node_.get()};
    std::vector<std::pair<Variable, size_t>> stack{{*this, 0}};
    while (!stack.empty()) {
        Node* n = stack.back().first.node();
        size_t& next_input = stack.back().second;
        if (next_input < n->inputs.size()) {
            const Variable& in = n->inputs[next_input++];
            if (in.requires_grad() && seen.insert(in.node()).second) stack.push_back({in, 0});
        } else {
            order.push_back(std::move(stack.back().first));
            stack.pop_back();
        }
    }

    accumulate_grad(seed);
    if (op_profile::enabled()) op_profile::charge(op_profile::kBackward, "autograd bookkeeping");
    NoGradGuard no_grad;  // the closures compute with tensors, record nothing
    for (auto it = order.rbegin(); it != order.rend(); ++it) {
        Node* n = it->node();
        if (n->backward && n->grad.defined()) {
            n->backward(n->grad);
            if (op_profile::enabled())
                op_profile::charge(op_profile::kBackward, n->op + " " + shape_str(n->value.shape()));
        }
        // Free the graph: drop the closure (and what it captured) and the
        // links to the inputs. Intermediate gradients are dropped too; leaves
        // (parameters) keep theirs for the optimizer.
        if (n->backward) {
            n->backward = nullptr;
            n->inputs.clear();
            n->grad = Tensor();
            n->freed = true;
        }
        *it = Variable();
    }
    if (op_profile::enabled()) op_profile::charge(op_profile::kBackward, "autograd bookkeeping");
}

}  // namespace hfq
