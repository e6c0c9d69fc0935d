#include "study/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "engine/atomic_file.h"
#include "engine/check.h"
#include "study/panels.h"
#include "study/plot.h"
#include "study/stats.h"
#include "train/metrics.h"

namespace hfq::study {
namespace {

std::string fmt(const char* f, double v) {
    if (!std::isfinite(v)) return "-";
    char buf[64];
    std::snprintf(buf, sizeof buf, f, v);
    return buf;
}
std::string percent(double fraction, int digits = 2) {
    return std::isfinite(fraction) ? fmt(digits == 2 ? "%.2f %%" : "%.3f %%", 100 * fraction) : "-";
}

std::vector<const CellResult*> cells_of(const std::vector<CellResult>& cells, const std::string& arch) {
    std::vector<const CellResult*> out;
    for (const CellResult& c : cells)
        if (c.cell.arch == arch) out.push_back(&c);
    return out;
}

std::vector<double> as_doubles(const std::vector<int64_t>& v) { return {v.begin(), v.end()}; }

// ---- Figures ----------------------------------------------------------------

// An empty figure with panels of the given size.
Figure sized_figure(const std::string& title, int panel_width, int panel_height) {
    Figure fig;
    fig.title = title;
    fig.panel_width = panel_width;
    fig.panel_height = panel_height;
    return fig;
}
// A figure of one wide panel (a line per method), or of a panel per method.
Figure wide_figure(const std::string& title) {
    Figure fig = sized_figure(title, 1000, 460);
    fig.panels.emplace_back();
    return fig;
}
Figure panel_per_method(const std::string& title) { return sized_figure(title, 640, 320); }

Figure exponent_figure(const FloatModel& f, const std::vector<const CellResult*>& cells, const StudyOptions& o,
                       int64_t qat_steps) {
    Figure fig =
        panel_per_method(cat(f.model_name, ": exponent against QAT step, the layers whose exponent flips most"));
    for (const CellResult* c : cells) {
        if (!c->has_exponents) continue;
        Panel& p = fig.panels.emplace_back(
            exponent_panel(cat(c->cell.label(), ": ", c->flips.total, " flips, ", c->flips.late, " late"), "QAT step",
                           c->steps, c->traces));
        p.vlines.push_back({cat("last ", std::lround(100 * o.late_fraction), " %"),
                            {double(late_window_start(qat_steps, o.late_fraction))},
                            kGrey});
    }
    fig.columns = fig.panels.size() > 1 ? 2 : 1;
    return fig;
}

Figure error_figure(const FloatModel& f, const std::vector<const CellResult*>& cells) {
    Figure fig = wide_figure(cat(f.model_name, ": quantization error against QAT step"));
    Panel& p = fig.panels.back();
    p.title = "sum (w - Q(w))^2 / number of weights, mean over the quantized layers";
    p.x_label = "QAT step";
    p.y_label = "error per weight";
    p.log_y = true;
    for (size_t i = 0; i < cells.size(); ++i)
        p.lines.push_back({cells[i]->cell.label(), as_doubles(cells[i]->steps), cells[i]->mean_error, int(i)});
    return fig;
}

Figure accuracy_figure(const FloatModel& f, const std::vector<const CellResult*>& cells) {
    Figure fig = wide_figure(cat(f.model_name, ": test top-1 against epoch"));
    Panel& p = fig.panels.back();
    p.title = f.epoch_top1.empty() ? "QAT from the given float checkpoint (epoch 0)"
                                   : "float training, then quantization-aware training from its last epoch";
    p.x_label = f.epoch_top1.empty() ? "QAT epoch" : "epoch (float, then QAT)";
    p.y_label = "test top-1 (%)";
    p.integer_x = true;
    const double start = double(f.epoch_top1.size());
    if (!f.epoch_top1.empty()) {
        Line l{"float training", {}, {}, kGrey, false, true};
        for (size_t e = 0; e < f.epoch_top1.size(); ++e) {
            l.x.push_back(double(e + 1));
            l.y.push_back(100 * f.epoch_top1[e]);
        }
        p.lines.push_back(l);
        p.vlines.push_back(qat_start_line(start));
    }
    for (size_t i = 0; i < cells.size(); ++i) {
        Line l{cells[i]->cell.label(), {start}, {100 * cells[i]->float_top1}, int(i), false, true};
        for (size_t e = 0; e < cells[i]->epoch_top1.size(); ++e) {
            l.x.push_back(start + double(e + 1));
            l.y.push_back(100 * cells[i]->epoch_top1[e]);
        }
        p.lines.push_back(l);
    }
    return fig;
}

std::string scale_text(float s) {
    const double e = std::log2(double(s));
    return e == std::round(e) ? cat("2^", std::lround(e)) : fmt("%.4g", s);
}

Figure histogram_figure(const FloatModel& f, const std::vector<const CellResult*>& cells) {
    Figure fig = panel_per_method(cat(f.model_name, ": weights of the depthwise layer ", f.histogram_layer,
                                      " after QAT, with the grid each method chose"));
    constexpr int kBins = 81;
    for (size_t i = 0; i < cells.size(); ++i) {
        const DepthwiseLayer& h = cells[i]->histogram;
        if (h.weights.empty() || h.scales.empty()) continue;
        // Per channel, each weight is shown in units of its own channel's
        // scale, so one grid (the integers) fits every channel.
        const size_t per_group = h.weights.size() / h.scales.size();
        std::vector<double> v(h.weights.size());
        for (size_t k = 0; k < v.size(); ++k)
            v[k] = h.per_channel ? h.weights[k] / h.scales[k / per_group] : h.weights[k];
        const double step = h.per_channel ? 1.0 : double(h.scales[0]);
        double range = step * (std::max(h.qn, h.qp) + 1);
        for (double x : v) range = std::max(range, std::abs(x) * 1.02);
        Panel& p = fig.panels.emplace_back();
        p.title = cells[i]->cell.label();
        p.x_label = h.per_channel ? "weight / its channel's scale (batch norm folded)" : "weight (batch norm folded)";
        p.y_label = "count";
        p.log_y = true;
        p.bars.color = int(i);
        for (int b = 0; b <= kBins; ++b) p.bars.edges.push_back(-range + 2 * range * b / kBins);
        p.bars.counts.assign(kBins, 0);
        for (double x : v) p.bars.counts[std::min(kBins - 1, int((x + range) / (2 * range) * kBins))] += 1;
        VLines grid{
            h.per_channel ? std::string("grid (integer codes)") : cat("grid, s = ", scale_text(h.scales[0])), {}, 3};
        for (int q = -h.qn; q <= h.qp; ++q) grid.x.push_back(q * step);
        p.vlines.push_back(grid);
    }
    fig.columns = fig.panels.size() > 1 ? 2 : 1;
    return fig;
}

// ---- Seeds: groups, measures, comparisons ---------------------------------------

// The cells of one group (a cell without its seed), in seed order.
struct Group {
    CellSpec spec;  // seed 0's
    std::vector<const CellResult*> seeds;
};

std::vector<Group> groups_of(const std::vector<const CellResult*>& cells) {
    std::vector<Group> out;
    for (const CellResult* c : cells) {
        auto g = std::find_if(out.begin(), out.end(), [&](const Group& x) { return x.spec.group() == c->cell.group(); });
        if (g == out.end()) g = out.insert(out.end(), Group{c->cell, {}});
        g->seeds.push_back(c);
    }
    for (Group& g : out)
        std::sort(g.seeds.begin(), g.seeds.end(),
                  [](const CellResult* a, const CellResult* b) { return a->cell.seed < b->cell.seed; });
    return out;
}

const Group* find_group(const std::vector<Group>& groups, CellSpec spec) {
    spec.seed = 0;
    for (const Group& g : groups)
        if (g.spec.group() == spec.group()) return &g;
    return nullptr;
}

// What a comparison measures, per cell.
struct Measure {
    const char* name;  // "fake-quant top-1"
    const char* unit;  // "points", "flips"
    double scale;      // value * scale is in the unit
    double (*of)(const CellResult&);
};
const Measure kTop1{"fake-quant top-1", "points", 100, [](const CellResult& c) { return c.fake_quant_top1; }};
const Measure kLateFlips{"late exponent flips", "flips", 1,
                         [](const CellResult& c) { return c.has_exponents ? double(c.flips.late) : CellResult::kNone; }};

std::vector<double> values(const Group& g, const Measure& m) {
    std::vector<double> v;
    for (const CellResult* c : g.seeds) v.push_back(m.scale * m.of(*c));
    return v;
}

// "92.10 ± 0.12" (one seed: "92.10").
std::string mean_sd(const std::vector<double>& v, const char* f = "%.2f") {
    const double m = mean_of(v), s = sd_of(v);
    return fmt(f, m) + (std::isfinite(s) ? " ± " + fmt(f, s) : std::string());
}
std::string listed(const std::vector<double>& v, const char* f = "%.2f") {
    std::string out;
    for (double x : v) out += (out.empty() ? "" : ", ") + fmt(f, x);
    return out;
}

// One comparison: `better` (the improved form) against `base`, on the same
// seeds. claim +1: the paper says `better` is higher; -1: lower; 0: no claim
// (a question: does it differ?).
struct Comparison {
    std::string model, setting, what;  // "MobileNetV1 x0.5", "4 bits per tensor", "msqe-po2 against msqe-baseline"
    std::string finding;               // the paper's finding it tests ("" : none)
    const Measure* measure;
    int claim;
    PairedDifference d;
    int bits = 0;
    bool per_channel = false;
    std::string label;  // the comparison's name across settings (figure legend)

    std::string outcome() const {
        const std::string v = d.verdict();
        if (v == "one seed" || v == "not distinguishable" || claim == 0) return v;
        return (v == "higher") == (claim > 0) ? "reproduced" : "reversed";
    }
};

std::vector<Comparison> comparisons(const std::vector<FloatModel>& floats, const std::vector<CellResult>& cells,
                                    const StudyOptions& o) {
    std::vector<Comparison> out;
    for (const FloatModel& f : floats) {
        if (f.seed != 0) continue;  // one entry per architecture
        const std::vector<Group> groups = groups_of(cells_of(cells, f.arch));
        auto compare = [&](const Group& setting, const std::string& method, const std::string& fix,
                           const std::string& base_method, const std::string& base_fix, const std::string& base_bn,
                           const std::string& finding, const Measure& m, int claim) {
            CellSpec a = setting.spec, b = setting.spec;
            a.method = method, a.fix = fix;
            b.method = base_method, b.fix = base_fix, b.bn_stats = base_bn;
            const Group* ga = find_group(groups, a);
            const Group* gb = find_group(groups, b);
            if (!ga || !gb || ga->seeds.size() != gb->seeds.size()) return;
            const std::vector<double> va = values(*ga, m), vb = values(*gb, m);
            if (std::any_of(va.begin(), va.end(), [](double x) { return !std::isfinite(x); }) ||
                std::any_of(vb.begin(), vb.end(), [](double x) { return !std::isfinite(x); }))
                return;
            Comparison c{f.model_name, setting.spec.setting(), cat(ga->spec.label(), " against ", gb->spec.label()),
                         finding, &m, claim, paired_difference(va, vb), a.bits, a.per_channel, ""};
            if (b.bn_stats != a.bn_stats)
                c.what = cat(ga->spec.label(), ": ", a.bn_stats, " against ", b.bn_stats);
            c.label = b.bn_stats != a.bn_stats ? cat(a.bn_stats, " - ", b.bn_stats, ", ", method)
                                                : cat(ga->spec.label(), " - ", gb->spec.label());
            out.push_back(std::move(c));
        };
        // One pass per setting (bits, scales, batch statistics): the first
        // method's default cell stands for the setting.
        std::vector<std::string> seen;
        for (const Group& g : groups) {
            const std::string key = cat(g.spec.bits, g.spec.per_channel, g.spec.bn_stats);
            if (std::find(seen.begin(), seen.end(), key) != seen.end()) continue;
            seen.push_back(key);
            const std::string& bn = g.spec.bn_stats;
            for (const Measure* m : {&kTop1, &kLateFlips}) {
                const int claim = m == &kTop1 ? +1 : -1;  // better top-1; fewer late flips
                compare(g, "msqe-po2", "default", "msqe-baseline", "default", bn,
                        "the improved MSQE method (outlier sensitivity)", *m, claim);
                compare(g, "learnable-po2-msqe-round", "default", "learnable-po2-ceil", "default", bn,
                        "Round-to-Lower-MSQE (scale instability)", *m, claim);
                for (const char* method : {"msqe-po2", "learnable-po2-msqe-round"})
                    for (const std::string& fix : grid_fixes())
                        if (fix != "none" && fix != "default")
                            compare(g, method, fix, method, "none", bn,
                                    fix == "outlier-mask" ? "outlier sensitivity" : fix == "stable-exponent" ? "scale instability" : "",
                                    *m, claim);
                compare(g, "msqe-po2", "all", "msqe-po2", "default", bn, "scale instability", *m, claim);
            }
            // The faster batch statistics against the first mode: a question, not a claim.
            if (bn != o.bn_stats.front())
                for (const std::string& method : o.methods)
                    compare(g, method, "default", method, "default", o.bn_stats.front(), "", kTop1, 0);
        }
    }
    return out;
}

// ---- Figures over seeds -----------------------------------------------------------

// A panel per granularity, side by side, each wide enough for its legend.
Figure seeds_figure(const std::string& title) { return sized_figure(title, 820, 400); }

// Top-1 against bits, a line per method (default fixes, first batch-statistics
// mode), error bars of one standard deviation over the seeds; a panel per
// granularity.
Figure bits_figure(const FloatModel& f, const std::vector<const CellResult*>& cells, const StudyOptions& o) {
    Figure fig = seeds_figure(cat(f.model_name, ": top-1 against bits, mean of ", o.seeds, " seeds"));
    const std::vector<Group> groups = groups_of(cells);
    for (const std::string& granularity : o.granularities) {
        Panel& p = fig.panels.emplace_back();
        p.title = cat("one scale per ", granularity, " (bars: one standard deviation)");
        p.x_label = "weight bits (first convolution and classifier: 8)";
        p.y_label = "test top-1 (%)";
        p.integer_x = true;
        for (size_t mi = 0; mi < o.methods.size(); ++mi) {
            Line l{o.methods[mi], {}, {}, int(mi), false, true};
            for (const Group& g : groups) {
                const CellSpec& s = g.spec;
                if (s.method != o.methods[mi] || s.fix != "default" || s.bn_stats != o.bn_stats.front() ||
                    s.per_channel != (granularity == "channel"))
                    continue;
                const std::vector<double> v = values(g, kTop1);
                // Side by side: each method a little apart, so the bars do not cover each other.
                l.x.push_back(s.bits + 0.06 * (double(mi) - 0.5 * double(o.methods.size() - 1)));
                l.y.push_back(mean_of(v));
                l.error.push_back(sd_of(v));
            }
            if (!l.x.empty()) p.lines.push_back(l);
        }
    }
    fig.columns = fig.panels.size() > 1 ? 2 : 1;
    return fig;
}

// The paired differences of top-1 with their 95 % intervals, against bits; a
// panel per granularity, a line per comparison.
Figure difference_figure(const FloatModel& f, const std::vector<Comparison>& all, const StudyOptions& o) {
    Figure fig = seeds_figure(cat(f.model_name, ": paired differences of top-1 over the seeds"));
    for (const std::string& granularity : o.granularities) {
        std::vector<std::string> labels;
        for (const Comparison& c : all)
            if (c.model == f.model_name && c.measure == &kTop1 && c.claim != 0 &&
                c.per_channel == (granularity == "channel") &&
                std::find(labels.begin(), labels.end(), c.label) == labels.end())
                labels.push_back(c.label);
        if (labels.empty()) continue;
        Panel& p = fig.panels.emplace_back();
        p.title = cat("one scale per ", granularity, " (bars: 95 % interval; above 0: the first is better)");
        p.x_label = "weight bits";
        p.y_label = "top-1 difference (points)";
        p.integer_x = true;
        Line zero{"", {double(*std::min_element(o.bits.begin(), o.bits.end())) - 0.3,
                       double(*std::max_element(o.bits.begin(), o.bits.end())) + 0.3},
                  {0, 0}, kGrey, false, false, true};
        p.lines.push_back(zero);
        for (size_t li = 0; li < labels.size(); ++li) {
            Line l{labels[li], {}, {}, int(li), false, true};
            for (const Comparison& c : all)
                if (c.model == f.model_name && c.measure == &kTop1 && c.label == labels[li] &&
                    c.per_channel == (granularity == "channel")) {
                    l.x.push_back(c.bits + 0.06 * (double(li) - 0.5 * double(labels.size() - 1)));
                    l.y.push_back(c.d.mean);
                    l.error.push_back(0.5 * (c.d.hi - c.d.lo));
                }
            p.lines.push_back(l);
        }
    }
    fig.columns = fig.panels.size() > 1 ? 2 : 1;
    return fig;
}

// ---- Markdown -----------------------------------------------------------------

std::string results_table(const std::vector<FloatModel>& floats, const std::vector<CellResult>& cells,
                          const StudyOptions& o) {
    std::string t =
        cat("| model | setting | method | fake-quant top-1 (%) | per seed | integer top-1 (%) | exponent flips | "
            "flips in the last ",
            std::lround(100 * o.late_fraction), " % | mean clipped | mean codes changed | QAT time | img/s |\n");
    t += "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (const FloatModel& f : floats) {
        if (f.seed != 0) continue;
        for (const Group& g : groups_of(cells_of(cells, f.arch))) {
            auto over_seeds = [&](double (*of)(const CellResult&), double scale, const char* format) {
                std::vector<double> v;
                for (const CellResult* c : g.seeds) v.push_back(scale * of(*c));
                return mean_sd(v, format);
            };
            const bool exps = g.seeds.front()->has_exponents;
            t += cat("| ", f.model_name, " | ", g.spec.setting(), " | ", g.spec.label(), " | ",
                     mean_sd(values(g, kTop1)), " | ", listed(values(g, kTop1)), " | ",
                     over_seeds([](const CellResult& c) { return c.integer_top1; }, 100, "%.2f"), " | ",
                     exps ? over_seeds([](const CellResult& c) { return double(c.flips.total); }, 1, "%.1f") : "n/a",
                     " | ", exps ? mean_sd(values(g, kLateFlips), "%.1f") : "n/a", " | ",
                     over_seeds([](const CellResult& c) { return c.mean_clipped; }, 100, "%.3f"), " % | ",
                     over_seeds([](const CellResult& c) { return c.mean_codes_changed; }, 100, "%.3f"), " % | ",
                     format_duration(g.seeds.front()->seconds), " | ",
                     fmt("%.0f", g.seeds.front()->images_per_second), " |\n");
        }
    }
    return t;
}

std::string comparison_table(const std::vector<Comparison>& all, bool questions) {
    std::string t =
        "| model | setting | comparison | measure | per seed | mean | 95 % interval | outcome |\n"
        "|---|---|---|---|---|---:|---|---|\n";
    int rows = 0;
    for (const Comparison& c : all) {
        if ((c.claim == 0) != questions) continue;
        const char* f = c.measure == &kTop1 ? "%+.2f" : "%+.1f";
        t += cat("| ", c.model, " | ", c.setting, " | ", c.what, " | ", c.measure->name, " (", c.measure->unit,
                 ") | ", listed(c.d.differences, f), " | ", fmt(f, c.d.mean), " | ",
                 std::isfinite(c.d.lo) ? cat("[", fmt(f, c.d.lo), ", ", fmt(f, c.d.hi), "]") : std::string("-"),
                 " | ", c.outcome(), " |\n");
        ++rows;
    }
    return rows ? t : std::string();
}

// Per finding of the paper: how many settings reproduce it.
std::string findings(const std::vector<Comparison>& all) {
    std::vector<std::string> names;
    for (const Comparison& c : all)
        if (!c.finding.empty() && std::find(names.begin(), names.end(), c.finding) == names.end())
            names.push_back(c.finding);
    std::string out;
    for (const std::string& n : names) {
        out += cat("- **", n, "**:");
        for (const Measure* m : {&kTop1, &kLateFlips}) {
            int total = 0, reproduced = 0, reversed = 0;
            std::string where;
            for (const Comparison& c : all)
                if (c.finding == n && c.measure == m) {
                    ++total;
                    const std::string o = c.outcome();
                    reproduced += o == "reproduced";
                    reversed += o == "reversed";
                    if (o == "reproduced" || o == "reversed")
                        where += cat(where.empty() ? "" : "; ", c.what, ", ", c.model, ", ", c.setting, ": ", o, " ",
                                     fmt(m == &kTop1 ? "%+.2f" : "%+.1f", c.d.mean));
                }
            if (total)
                out += cat(" ", m->name, ": reproduced in ", reproduced, ", reversed in ", reversed,
                           ", not distinguishable in ", total - reproduced - reversed, " of ", total, " comparisons",
                           where.empty() ? "" : " (" + where + ")", ";");
        }
        out += "\n";
    }
    return out.empty() ? "No pair of an improved method and its traditional form in this grid.\n" : out;
}

}  // namespace

std::vector<FigureFile> write_report(const StudyOptions& o, const StudyData& data,
                                     const std::vector<FloatModel>& floats, const std::vector<CellResult>& cells) {
    namespace fs = std::filesystem;
    const std::vector<Comparison> all = comparisons(floats, cells, o);
    // The single-run figures show one slice of the grid: seed 0 at 3 bits (or
    // the narrowest width an architecture ran), the first granularity and
    // batch-statistics mode.
    std::vector<FigureFile> figures;
    std::string figure_md;
    for (const FloatModel& f : floats) {
        if (f.seed != 0) continue;
        const auto mine = cells_of(cells, f.arch);
        int bits = 0;
        for (const CellResult* c : mine)
            if (bits != 3 && (bits == 0 || c->cell.bits == 3 || c->cell.bits < bits)) bits = c->cell.bits;
        std::vector<const CellResult*> slice;
        for (const CellResult* c : mine)
            if (c->cell.bits == bits && c->cell.seed == 0 &&
                c->cell.per_channel == (o.granularities.front() == "channel") &&
                c->cell.bn_stats == o.bn_stats.front())
                slice.push_back(c);
        const std::string slice_name =
            slice.empty() ? std::string() : cat(" (seed 0, ", slice.front()->cell.setting(), ")");
        figure_md += cat("\n### ", f.model_name, "\n\n");
        std::pair<std::string, Figure> figs[] = {{"bits", bits_figure(f, mine, o)},
                                                 {"differences", difference_figure(f, all, o)},
                                                 {"exponents", exponent_figure(f, slice, o, data.qat_steps)},
                                                 {"error", error_figure(f, slice)},
                                                 {"accuracy", accuracy_figure(f, slice)},
                                                 {"histogram", histogram_figure(f, slice)}};
        for (auto& [stem, fig] : figs) {
            if (fig.panels.empty()) continue;
            if (stem != "bits" && stem != "differences") fig.title += slice_name;
            const std::string file = cat(stem, "_", f.arch, ".png");
            const cv::Mat image = render(fig);
            write_png((fs::path(o.out) / file).string(), image);
            figures.push_back({(fs::path(o.out) / file).string(), image.cols, image.rows});
            figure_md += cat("![", fig.title, "](", file, ")\n\n*", fig.title, "* (", file, ", ", image.cols, " x ",
                             image.rows, " pixels)\n\n");
        }
    }

    const TrainConfig& t = o.train;
    std::string md = "# Hardware-friendly weight quantization: the study\n\n";
    md += cat("Data: ", data.kind, " (", data.train_samples, " training images per QAT epoch, ", data.test_samples,
              " test images, ", data.input_size, "x", data.input_size, "). Batch ", t.batch_size, ", schedule ",
              t.schedule, ". Seeds: ", o.seeds, " (trainer seeds ", t.seed, "..", t.seed + uint64_t(o.seeds) - 1,
              ": data order, augmentation, dropout), ",
              o.float_seeds ? "each from its own float model (trained with the same seed)"
                            : "all from one float model per architecture",
              ".\n\n");
    for (const FloatModel& f : floats) {
        // Paths relative to the report folder: the report reads the same on any machine.
        std::string top1;
        for (const CellResult& c : cells)
            if (c.cell.arch == f.arch && c.cell.seed == f.seed) top1 = percent(c.float_top1);
        md += cat("- ", f.model_name, o.float_seeds ? cat(", seed ", f.seed) : std::string(), ": float model `",
                  fs::path(f.checkpoint).lexically_relative(fs::path(o.out)).string(), "`",
                  f.epoch_top1.empty() ? std::string(" (given)")
                                       : cat(" (trained here: ", f.epoch_top1.size(), " epochs, lr ", t.lr, ")"),
                  ", test top-1 ", top1, "; histogram layer ", f.histogram_layer, "\n");
    }
    std::string bn_modes;
    for (size_t i = 1; i < o.bn_stats.size(); ++i) bn_modes += cat(i > 1 ? ", " : "", o.bn_stats[i]);
    std::string bn_bits;
    for (int b : o.bn_stats_bits) bn_bits += cat(bn_bits.empty() ? "" : ", ", b);
    md += cat("\nEvery cell: quantization-aware training from that float model, ", t.qat_epochs,
              " epoch(s) = ", data.qat_steps, " steps, lr ", t.qat_lr, " (", t.schedule,
              "), first convolution and classifier at ", t.first_layer_bits ? t.first_layer_bits : t.bits, " and ",
              t.last_layer_bits ? t.last_layer_bits : t.bits, " bits, batch norm ",
              t.fold_bn ? "folded" : "not folded", " with batch statistics from ", o.bn_stats.front(),
              bn_modes.empty() ? std::string() : cat(" (and ", bn_modes, " at ", bn_bits, " bits)"),
              std::find(o.bn_stats.begin(), o.bn_stats.end(), "quantized-conv-freeze") != o.bn_stats.end()
                  ? "; quantized-conv-freeze: quantized-conv, batch norm frozen after half the QAT steps"
                  : "",
              ". Learnable scales: ", t.quantizer_optimizer, ", lr ", t.quantizer_lr, ".\n\n");
    md += "## Findings\n\nA difference counts only when its 95 % interval over the seeds excludes zero "
          "(*reproduced*: in the paper's direction; *reversed*: against it).\n\n" +
          findings(all);
    md += "\n## Results\n\nMean ± standard deviation over the seeds (per seed: seed 0 first).\n\n" +
          results_table(floats, cells, o);
    md += "\n## Improved methods against their traditional forms\n\nPaired by seed: each seed's difference "
          "(first minus second), their mean and its 95 % interval (Student's t).\n\n" +
          comparison_table(all, false);
    if (const std::string q = comparison_table(all, true); !q.empty())
        md += "\n## Batch statistics: does the faster mode cost accuracy?\n\n" + q;
    md += "\n## Figures\n" + figure_md;
    md +=
        cat("## How the columns are computed\n\n"
            "- *fake-quant top-1*: the trained model with fake-quantized weights, on the test set; *integer "
            "top-1*: the network rebuilt from the integer export alone (int8 codes, exponents, folded biases).\n"
            "- *exponent flips*: over every quantized layer and scale group, the training steps whose exponent "
            "differs from the previous step's (docs/quantizers.md, section 5), counted from the exponents logged at "
            "every step. "
            "*flips in the last ",
            std::lround(100 * o.late_fraction), " %*: those at steps after ",
            late_window_start(data.qat_steps, o.late_fraction), " of ", data.qat_steps,
            ". lsq learns a real scale: it has no exponent (n/a).\n"
            "- *mean clipped*: the fraction of weights outside the grid's range; *mean codes changed*: the "
            "fraction of integer codes that changed from the previous step; both averaged over the steps and the "
            "quantized layers (each layer counting once).\n"
            "- *QAT time* and *img/s*: seed 0's training throughput, evaluations excluded from img/s.\n"
            "- *95 % interval*: mean paired difference d -+ t(0.975, n - 1) s_d / sqrt(n) over the n seeds "
            "(study/stats.h). The seeds share the float model and the test set, so the interval measures "
            "the noise of quantization-aware training (data order, augmentation), not of the float model's "
            "training", o.float_seeds ? " (here each seed has its own float model: it measures both)" : "",
            ".\n"
            "- Figures: the exponent traces show, per method, the ",
            o.plot_layers,
            " layers with the most flips (per channel: the channel that flips most); the error is "
            "sum (w - Q(w))^2 over a layer's weights divided by their number, averaged over the layers.\n\n"
            "## Cells\n\nEach cell's trainer folder (config, metrics.jsonl with the per-step diagnostics, "
            "checkpoints, export, summary) is `cells/<group>/seed<k>/run/`, its result "
            "`cells/<group>/seed<k>/result.json`.\n");
    write_file_atomically((fs::path(o.out) / "report.md").string(), md);
    return figures;
}

}  // namespace hfq::study
