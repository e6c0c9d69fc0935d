#include "layers/summary.h"

#include <cstdio>
#include <map>

#include "engine/check.h"

namespace hfq {
namespace {

// 1234567 -> "1,234,567"
std::string grouped(int64_t v) {
    std::string digits = std::to_string(v < 0 ? -v : v), out;
    for (size_t i = 0; i < digits.size(); ++i) {
        if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
        out += digits[i];
    }
    return v < 0 ? "-" + out : out;
}

int64_t count_params(const Module& m) {
    int64_t n = 0;
    for (const NamedParameter& p : m.named_parameters()) n += p.var.value().numel();
    return n;
}

}  // namespace

ModelSummary summarize(Module& model, const Shape& input) {
    HFQ_CHECK(input.size() == 4 && input[0] == 1, "summarize: input must be {1, H, W, C}, got ", shape_str(input));
    std::map<const Module*, std::string> names;
    for (auto& [name, m] : model.named_modules()) names.emplace(m, name);  // an inline child keeps its parent's

    const bool was_training = model.is_training();
    model.eval();
    CallRecorder recorder;
    try {
        NoGradGuard no_grad;
        model(Variable(Tensor::zeros(input)));
    } catch (...) {
        model.train(was_training);
        throw;
    }
    model.train(was_training);

    ModelSummary s;
    s.input = input;
    std::map<const Module*, bool> counted;
    for (const CallRecorder::Call& c : recorder.calls()) {
        SummaryRow r;
        r.name = names.count(c.module) ? names[c.module] : "?";
        r.description = c.module->describe();
        r.output = c.output;
        // A module called twice contributes its parameters once.
        r.params = counted[c.module] ? 0 : count_params(*c.module);
        counted[c.module] = true;
        r.macs = c.module->macs(c.input, c.output);
        s.total_macs += r.macs;
        s.rows.push_back(std::move(r));
    }
    s.total_params = count_params(model);
    return s;
}

std::string ModelSummary::to_string() const {
    std::string out;
    char line[512];
    std::snprintf(line, sizeof line, "%-24s %-44s %-20s %12s %14s\n", "layer", "type", "output (NHWC)", "params",
                  "MACs");
    out += line;
    for (const SummaryRow& r : rows) {
        std::snprintf(line, sizeof line, "%-24s %-44s %-20s %12s %14s\n", r.name.c_str(), r.description.c_str(),
                      shape_str(r.output).c_str(), grouped(r.params).c_str(), grouped(r.macs).c_str());
        out += line;
    }
    std::snprintf(line, sizeof line, "%-24s %-44s %-20s %12s %14s\n", "total", ("input " + shape_str(input)).c_str(),
                  "", grouped(total_params).c_str(), grouped(total_macs).c_str());
    return out + line;
}

}  // namespace hfq
