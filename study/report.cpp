#include "study/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "engine/atomic_file.h"
#include "engine/check.h"
#include "study/panels.h"
#include "study/plot.h"
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
std::string signed_points(double a, double b) { return fmt("%+.2f points", 100 * (a - b)); }

std::vector<const CellResult*> cells_of(const std::vector<CellResult>& cells, const std::string& arch) {
    std::vector<const CellResult*> out;
    for (const CellResult& c : cells)
        if (c.cell.arch == arch) out.push_back(&c);
    return out;
}

const CellResult* find_cell(const std::vector<const CellResult*>& cells, const std::string& method,
                            const std::string& fix) {
    for (const CellResult* c : cells)
        if (c->cell.method == method && c->cell.fix == fix) return c;
    return nullptr;
}

std::vector<double> as_doubles(const std::vector<int64_t>& v) { return {v.begin(), v.end()}; }

// ---- Figures ----------------------------------------------------------------

// A figure of one wide panel (a line per method), or of a panel per method.
Figure wide_figure(const std::string& title) {
    Figure fig;
    fig.title = title;
    fig.panel_width = 1000;
    fig.panel_height = 460;
    fig.panels.emplace_back();
    return fig;
}
Figure panel_per_method(const std::string& title) {
    Figure fig;
    fig.title = title;
    fig.panel_width = 640;
    fig.panel_height = 320;
    return fig;
}

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

// ---- Markdown -----------------------------------------------------------------

std::string results_table(const std::vector<FloatModel>& floats, const std::vector<CellResult>& cells,
                          const StudyOptions& o) {
    std::string t =
        cat("| model | method | float top-1 | fake-quant top-1 | integer top-1 | exponent flips | flips in the "
            "last ",
            std::lround(100 * o.late_fraction), " % | mean clipped | mean codes changed | QAT time | img/s |\n");
    t += "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (const FloatModel& f : floats)
        for (const CellResult* c : cells_of(cells, f.arch))
            t += cat("| ", f.model_name, " | ", c->cell.label(), " | ", percent(c->float_top1), " | ",
                     percent(c->fake_quant_top1), " | ", percent(c->integer_top1), " | ",
                     c->has_exponents ? std::to_string(c->flips.total) : "n/a", " | ",
                     c->has_exponents ? std::to_string(c->flips.late) : "n/a", " | ", percent(c->mean_clipped, 3),
                     " | ", percent(c->mean_codes_changed, 3), " | ",
                     std::isfinite(c->seconds) ? format_duration(c->seconds) : "-", " | ",
                     fmt("%.0f", c->images_per_second), " |\n");
    return t;
}

// The paper's claims, checked on these numbers: each improved method against
// its traditional form, and each fix against no fixes.
std::string comparisons(const std::vector<FloatModel>& floats, const std::vector<CellResult>& cells) {
    std::string out;
    auto compare = [&](const FloatModel& f, const CellResult* better, const CellResult* base) {
        if (!better || !base) return;
        out += cat("- ", f.model_name, ", ", better->cell.label(), " against ", base->cell.label(),
                   ": fake-quant top-1 ", signed_points(better->fake_quant_top1, base->fake_quant_top1), " (",
                   percent(better->fake_quant_top1), " vs ", percent(base->fake_quant_top1), "), integer ",
                   signed_points(better->integer_top1, base->integer_top1), "; exponent flips ", better->flips.total,
                   " vs ", base->flips.total, ", late ", better->flips.late, " vs ", base->flips.late, ".\n");
    };
    for (const FloatModel& f : floats) {
        const auto mine = cells_of(cells, f.arch);
        compare(f, find_cell(mine, "msqe-po2", "default"), find_cell(mine, "msqe-baseline", "default"));
        compare(f, find_cell(mine, "learnable-po2-msqe-round", "default"),
                find_cell(mine, "learnable-po2-ceil", "default"));
        for (const char* m : {"msqe-po2", "learnable-po2-msqe-round"})
            for (const std::string& fix : grid_fixes())
                if (fix != "none") compare(f, find_cell(mine, m, fix), find_cell(mine, m, "none"));
        // The stable exponent in the paper's setting: on top of msqe-po2's other fixes.
        compare(f, find_cell(mine, "msqe-po2", "all"), find_cell(mine, "msqe-po2", "default"));
    }
    return out.empty() ? "No pair of an improved method and its baseline in this grid.\n" : out;
}

}  // namespace

std::vector<FigureFile> write_report(const StudyOptions& o, const StudyData& data,
                                     const std::vector<FloatModel>& floats, const std::vector<CellResult>& cells) {
    namespace fs = std::filesystem;
    std::vector<FigureFile> figures;
    std::string figure_md;
    for (const FloatModel& f : floats) {
        const auto mine = cells_of(cells, f.arch);
        figure_md += cat("\n### ", f.model_name, "\n\n");
        const std::pair<std::string, Figure> figs[] = {{"exponents", exponent_figure(f, mine, o, data.qat_steps)},
                                                       {"error", error_figure(f, mine)},
                                                       {"accuracy", accuracy_figure(f, mine)},
                                                       {"histogram", histogram_figure(f, mine)}};
        for (const auto& [stem, fig] : figs) {
            if (fig.panels.empty()) continue;
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
              " test images, ", data.input_size, "x", data.input_size, "). Seed ", t.seed, ", batch ", t.batch_size,
              ", schedule ", t.schedule, ".\n\n");
    for (const FloatModel& f : floats)
        md += cat("- ", f.model_name, ": float model ", f.checkpoint,
                  f.epoch_top1.empty() ? std::string(" (given)")
                                       : cat(" (trained here: ", f.epoch_top1.size(), " epochs, lr ", t.lr, ")"),
                  "; histogram layer ", f.histogram_layer, "\n");
    md +=
        cat("\nEvery cell: quantization-aware training from that float model, ", t.qat_epochs,
            " epoch(s) = ", data.qat_steps, " steps, lr ", t.qat_lr, " (", t.schedule, "), weights at ", t.bits,
            " bits ", t.per_channel ? "per output channel" : "per tensor", " (first convolution ",
            t.first_layer_bits ? t.first_layer_bits : t.bits, " bits, classifier ",
            t.last_layer_bits ? t.last_layer_bits : t.bits, " bits), batch norm ", t.fold_bn ? "folded" : "not folded",
            ". Learnable scales: ", t.quantizer_optimizer, ", lr ", t.quantizer_lr, ".\n\n");
    md += "## Results\n\n" + results_table(floats, cells, o);
    md += "\n## Improved methods against their traditional forms\n\n" + comparisons(floats, cells);
    md += "\n## Figures\n" + figure_md;
    md +=
        cat("## How the columns are computed\n\n"
            "- *float top-1*: the float model on the test set; *fake-quant top-1*: the trained model with "
            "fake-quantized weights; *integer top-1*: the network rebuilt from the integer export alone "
            "(int8 codes, exponents, folded biases).\n"
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
            "- *QAT time* and *img/s*: training throughput of the cell, evaluations excluded from img/s.\n"
            "- Figures: the exponent traces show, per method, the ",
            o.plot_layers,
            " layers with the most flips (per channel: the channel that flips most); the error is "
            "sum (w - Q(w))^2 over a layer's weights divided by their number, averaged over the layers.\n\n"
            "## Cells\n\nEach cell's trainer folder (config, metrics.jsonl with the per-step diagnostics, "
            "checkpoints, export, summary) is `cells/<cell>/run/`, its result `cells/<cell>/result.json`.\n");
    write_file_atomically((fs::path(o.out) / "report.md").string(), md);
    return figures;
}

}  // namespace hfq::study
