#include "layers/module.h"

#include <algorithm>
#include <unordered_set>

#include "engine/check.h"
#include "engine/ops.h"

namespace hfq {
namespace {

thread_local CallRecorder* g_recorder = nullptr;

// FNV-1a: a stable hash of a module name, to key its random stream.
uint64_t hash_name(const std::string& s) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ULL;
    return h;
}

// Throws when a full name appears twice (possible only through inline
// children whose names collide with the parent's).
class UniqueNames {
public:
    void add(const std::string& name) {
        HFQ_CHECK(seen_.insert(name).second, "Module: the name '", name,
                  "' is used twice (an inline child collides with its parent)");
    }

private:
    std::unordered_set<std::string> seen_;
};

}  // namespace

const char* param_group_name(ParamGroup g) {
    switch (g) {
        case ParamGroup::weight: return "weight";
        case ParamGroup::bias: return "bias";
        case ParamGroup::bn: return "bn";
        case ParamGroup::quantizer: return "quantizer";
    }
    return "?";
}

std::string join_name(const std::string& prefix, const std::string& name) {
    if (prefix.empty()) return name;
    if (name.empty()) return prefix;
    return prefix + "." + name;
}

CallRecorder::CallRecorder() : previous_(g_recorder) { g_recorder = this; }
CallRecorder::~CallRecorder() { g_recorder = previous_; }

Variable Module::forward_relu6(const Variable& x) { return relu6(forward(x)); }

Variable Module::operator()(const Variable& x) {
    CallRecorder* rec = g_recorder;
    if (rec == nullptr || rec->inside_row_ || !summary_row()) return forward(x);
    rec->inside_row_ = true;
    struct Reset {
        CallRecorder* r;
        ~Reset() { r->inside_row_ = false; }
    } reset{rec};
    Variable y = forward(x);
    rec->calls_.push_back({this, x.shape(), y.shape()});
    return y;
}

template <class Self, class Visit>
void Module::visit(Self& self, const std::string& prefix, Visit&& f) {
    f(prefix, self);
    for (const Child& c : self.children_) visit(*c.module, c.is_inline ? prefix : join_name(prefix, c.name), f);
}

std::vector<NamedParameter> Module::named_parameters() const {
    std::vector<NamedParameter> out;
    UniqueNames names;
    visit(*this, "", [&](const std::string& prefix, const Module& m) {
        for (const Param& p : m.params_) {
            out.push_back({join_name(prefix, p.name), *p.slot, p.group});
            names.add(out.back().name);
        }
    });
    return out;
}

std::vector<Variable> Module::parameters() const {
    std::vector<Variable> out;
    for (NamedParameter& p : named_parameters()) out.push_back(std::move(p.var));
    return out;
}

std::vector<std::pair<std::string, Tensor*>> Module::named_buffers() {
    std::vector<std::pair<std::string, Tensor*>> out;
    UniqueNames names;
    visit(*this, "", [&](const std::string& prefix, const Module& m) {
        for (const Buffer& b : m.buffers_) {
            out.emplace_back(join_name(prefix, b.name), b.slot);
            names.add(out.back().first);
        }
    });
    return out;
}

std::vector<std::pair<std::string, Tensor>> Module::state_dict() const {
    std::vector<std::pair<std::string, Tensor>> out;
    UniqueNames names;
    visit(*this, "", [&](const std::string& prefix, const Module& m) {
        for (const Param& p : m.params_) out.emplace_back(join_name(prefix, p.name), p.slot->value());
        for (const Buffer& b : m.buffers_) out.emplace_back(join_name(prefix, b.name), *b.slot);
    });
    for (const auto& [name, t] : out) names.add(name);
    return out;
}

std::vector<std::pair<std::string, Module*>> Module::named_modules() {
    std::vector<std::pair<std::string, Module*>> out;
    visit(*this, "", [&](const std::string& prefix, Module& m) { out.emplace_back(prefix, &m); });
    return out;
}

std::vector<std::pair<std::string, Rng*>> Module::named_rngs() {
    std::vector<std::pair<std::string, Rng*>> out;
    for (auto& [name, m] : named_modules())
        if (Rng* r = m->own_rng()) out.emplace_back(name, r);
    return out;
}

void Module::check_new_name(const std::string& name) const {
    HFQ_CHECK(!name.empty() && name.find('.') == std::string::npos, type_name(), ": invalid member name '", name,
              "' (names are non-empty and contain no '.')");
    auto taken = [&](const auto& list) {
        return std::any_of(list.begin(), list.end(), [&](const auto& e) { return e.name == name; });
    };
    HFQ_CHECK(!taken(params_) && !taken(buffers_) && !taken(children_), type_name(), ": the name '", name,
              "' is already registered");
}

void Module::register_parameter(std::string name, Variable* slot, ParamGroup group) {
    check_new_name(name);
    HFQ_CHECK(slot->defined() && slot->requires_grad(), type_name(), ": parameter '", name,
              "' must be a defined Variable that requires grad");
    params_.push_back({std::move(name), slot, group});
}

void Module::register_buffer(std::string name, Tensor* slot) {
    check_new_name(name);
    HFQ_CHECK(slot->defined(), type_name(), ": buffer '", name, "' is undefined");
    buffers_.push_back({std::move(name), slot});
}

void Module::register_module(std::string name, std::shared_ptr<Module> child) {
    check_new_name(name);
    HFQ_CHECK(child != nullptr, type_name(), ": child '", name, "' is null");
    children_.push_back({std::move(name), std::move(child), false});
}

void Module::register_inline(std::shared_ptr<Module> child) {
    HFQ_CHECK(child != nullptr, type_name(), ": inline child is null");
    // Inline children have no name of their own; an internal placeholder
    // keeps child(name) lookups unambiguous.
    children_.push_back({"<inline " + std::to_string(children_.size()) + ">", std::move(child), true});
}

template <class Self>
auto Module::find_child(Self& self, const std::string& name) -> decltype(&self.children_[0]) {
    for (auto& c : self.children_)
        if (!c.is_inline && c.name == name) return &c;
    for (auto& c : self.children_)
        if (c.is_inline)
            if (auto found = find_child(*c.module, name)) return found;
    return nullptr;
}

namespace {

// "0, 1, 2" - the names child() knows, for error messages.
std::string child_names(const std::vector<Module::Child>& children) {
    std::string out;
    for (const Module::Child& c : children) {
        const std::string name = c.is_inline ? child_names(c.module->children()) : c.name;
        if (!name.empty()) out += (out.empty() ? "" : ", ") + name;
    }
    return out;
}

}  // namespace

size_t Module::child_index(const std::string& name) const {
    for (size_t i = 0; i < children_.size(); ++i)
        if (children_[i].name == name) return i;
    std::string direct;
    for (const Child& c : children_) direct += (direct.empty() ? "" : ", ") + c.name;
    throw Error(cat(type_name(), ": no direct child named '", name, "' (direct children: ", direct, ")"));
}

std::shared_ptr<Module> Module::child(const std::string& name) const {
    const Child* c = find_child(*this, name);
    HFQ_CHECK(c, type_name(), ": no child named '", name, "' (children: ", child_names(children_), ")");
    return c->module;
}

Module& Module::find(const std::string& path) {
    Module* m = this;
    size_t start = 0;
    while (start < path.size()) {
        size_t dot = path.find('.', start);
        if (dot == std::string::npos) dot = path.size();
        m = m->child(path.substr(start, dot - start)).get();
        start = dot + 1;
    }
    return *m;
}

void Module::replace_child(const std::string& name, std::shared_ptr<Module> replacement) {
    HFQ_CHECK(replacement != nullptr, type_name(), ": replacement for child '", name, "' is null");
    Child* c = find_child(*this, name);
    HFQ_CHECK(c, type_name(), ": no child named '", name, "' (children: ", child_names(children_), ")");
    replacement->train(training_);
    c->module = std::move(replacement);
}

void Module::replace_children(const std::vector<std::string>& names, std::shared_ptr<Module> replacement) {
    HFQ_CHECK(!names.empty() && replacement != nullptr, type_name(),
              ": replace_children needs at least one name and a replacement");
    const size_t first = child_index(names[0]);
    for (size_t k = 1; k < names.size(); ++k)
        HFQ_CHECK(child_index(names[k]) == first + k, type_name(), ": replace_children: '", names[k],
                  "' does not directly follow '", names[k - 1], "'");
    replacement->train(training_);
    children_.erase(children_.begin() + first + 1, children_.begin() + first + names.size());
    children_[first] = {"<inline " + names[0] + ">", std::move(replacement), true};
}

void Module::train(bool on) {
    training_ = on;
    for (Child& c : children_) c.module->train(on);
}

void Module::zero_grad() {
    for (NamedParameter& p : named_parameters()) p.var.zero_grad();
}

void Module::initialize(uint64_t seed) {
    for (auto& [name, m] : named_modules()) {
        Rng rng = Rng::derive(seed, {hash_name(name), hash_name(m->type_name())});
        m->reset_parameters(rng);
    }
}

}  // namespace hfq
