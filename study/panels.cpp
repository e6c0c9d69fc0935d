#include "study/panels.h"

#include "engine/check.h"

namespace hfq::study {

Panel exponent_panel(const std::string& title, const std::string& x_label, const std::vector<int64_t>& steps,
                     const std::vector<ExponentTrace>& traces) {
    Panel p;
    p.title = title;
    p.x_label = x_label;
    p.y_label = "exponent (scale = 2^e)";
    p.integer_y = true;
    const std::vector<double> x(steps.begin(), steps.end());
    for (size_t k = 0; k < traces.size(); ++k) {
        const ExponentTrace& t = traces[k];
        HFQ_CHECK(t.exponents.size() == steps.size(), "exponent_panel: ", t.layer, " has ", t.exponents.size(),
                  " exponents for ", steps.size(), " steps");
        const std::string channel = t.per_channel ? cat(" ch ", t.group) : std::string();
        p.lines.push_back({cat(t.layer, channel, " (", t.flips.total, t.flips.total == 1 ? " flip)" : " flips)"), x,
                           std::vector<double>(t.exponents.begin(), t.exponents.end()), int(k), /*steps=*/true});
    }
    return p;
}

VLines qat_start_line(double x) { return {"QAT starts", {x}, kGrey}; }

}  // namespace hfq::study
