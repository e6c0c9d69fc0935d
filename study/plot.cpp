#include "study/plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "engine/atomic_file.h"
#include "engine/check.h"

namespace hfq::study {
namespace {

// Tableau's ten colours (BGR), distinguishable in print and by most colour-blind readers.
const cv::Scalar kPalette[] = {{180, 119, 31}, {14, 127, 255},  {44, 160, 44},   {40, 39, 214},  {189, 103, 148},
                               {75, 86, 140},  {194, 119, 227}, {127, 127, 127}, {34, 189, 188}, {207, 190, 23}};
const cv::Scalar kBlack{0, 0, 0}, kGridGrey{225, 225, 225}, kWhite{255, 255, 255};
constexpr int kFont = cv::FONT_HERSHEY_SIMPLEX;
constexpr double kTickScale = 0.42, kLabelScale = 0.47, kTitleScale = 0.52, kFigureTitleScale = 0.62;
constexpr int kFigureTitleBand = 36;
// Panel margins (pixels): title above, tick labels and axis labels left and below.
constexpr int kTop = 30, kLeft = 70, kBottom = 46, kLegendPad = 12;

cv::Scalar colour(int index) { return kPalette[((index % palette_size()) + palette_size()) % palette_size()]; }

int text_width(const std::string& s, double scale, int thickness = 1) {
    int baseline = 0;
    return cv::getTextSize(s, kFont, scale, thickness, &baseline).width;
}

enum class Align { left, centre, right };

// Text with its baseline at y, shrunk until it fits max_width.
void put_text(cv::Mat& img, const std::string& s, int x, int y, double scale, Align align, int max_width = 1 << 20,
              int thickness = 1, cv::Scalar c = kBlack) {
    while (scale > 0.25 && text_width(s, scale, thickness) > max_width) scale *= 0.9;
    const int w = text_width(s, scale, thickness);
    const int x0 = align == Align::left ? x : align == Align::centre ? x - w / 2 : x - w;
    cv::putText(img, s, {x0, y}, kFont, scale, c, thickness, cv::LINE_AA);
}

// A label read bottom to top, centred on (cx, cy).
void put_vertical_text(cv::Mat& img, const std::string& s, int cx, int cy, double scale, int max_height) {
    while (scale > 0.25 && text_width(s, scale) > max_height) scale *= 0.9;
    int baseline = 0;
    const cv::Size size = cv::getTextSize(s, kFont, scale, 1, &baseline);
    cv::Mat strip(size.height + baseline + 4, size.width + 4, CV_8UC3, kWhite);
    cv::putText(strip, s, {2, size.height + 2}, kFont, scale, kBlack, 1, cv::LINE_AA);
    cv::Mat turned;
    cv::rotate(strip, turned, cv::ROTATE_90_COUNTERCLOCKWISE);
    const cv::Rect where(cx - turned.cols / 2, cy - turned.rows / 2, turned.cols, turned.rows);
    const cv::Rect inside = where & cv::Rect(0, 0, img.cols, img.rows);
    if (inside.area() > 0)
        turned(cv::Rect(inside.x - where.x, inside.y - where.y, inside.width, inside.height)).copyTo(img(inside));
}

// The data range of an axis, padded; a single value becomes a unit-wide range.
struct Range {
    double lo = std::numeric_limits<double>::infinity(), hi = -std::numeric_limits<double>::infinity();
    void add(double v) {
        if (!std::isfinite(v)) return;
        lo = std::min(lo, v);
        hi = std::max(hi, v);
    }
    bool empty() const { return lo > hi; }
    Range padded(double fraction, double min_span) const {
        Range r = *this;
        if (r.empty()) r.lo = 0, r.hi = 1;
        if (r.hi - r.lo < min_span) {
            const double mid = 0.5 * (r.lo + r.hi);
            r.lo = mid - min_span / 2, r.hi = mid + min_span / 2;
        }
        const double pad = (r.hi - r.lo) * fraction;
        return {r.lo - pad, r.hi + pad};
    }
};

// Maps data to pixel coordinates of the plot area (y already log10 on a log axis).
struct Mapping {
    cv::Rect area;
    Range x, y;
    bool log_y = false;
    double yv(double v) const { return log_y ? (v > 0 ? std::log10(v) : std::nan("")) : v; }
    cv::Point2d at(double vx, double vy) const {  // vy already transformed
        return {area.x + (vx - x.lo) / (x.hi - x.lo) * area.width,
                area.y + area.height - (vy - y.lo) / (y.hi - y.lo) * area.height};
    }
};

// Drawn with 4 fractional bits of sub-pixel precision, so thin lines stay smooth.
void segment(cv::Mat& img, cv::Point2d a, cv::Point2d b, cv::Scalar c, int thickness) {
    auto fixed = [](cv::Point2d p) { return cv::Point(int(std::lround(p.x * 16)), int(std::lround(p.y * 16))); };
    cv::line(img, fixed(a), fixed(b), c, thickness, cv::LINE_AA, /*shift=*/4);
}

// Draws a line's segments, solid or dashed; the dashes run on across the
// corners, so a polyline of short segments is dashed like a long one.
struct Pen {
    static constexpr double kDash = 9, kPeriod = 15;  // pixels drawn, of each period
    cv::Mat& img;
    cv::Scalar c;
    bool dashed;
    double phase = 0;  // how far into a period the next segment starts

    void stroke(cv::Point2d a, cv::Point2d b) {
        if (!dashed) return segment(img, a, b, c, 2);
        const double length = cv::norm(b - a);
        for (double t = 0; t < length;) {
            const double at = std::fmod(phase + t, kPeriod);
            const double end = std::min(length, t + std::max(1e-3, at < kDash ? kDash - at : kPeriod - at));
            if (at < kDash) segment(img, a + (b - a) * (t / length), a + (b - a) * (end / length), c, 2);
            t = end;
        }
        phase = std::fmod(phase + length, kPeriod);
    }
};

void draw_line(cv::Mat& img, const Mapping& m, const Line& l) {
    const cv::Scalar c = colour(l.color);
    Pen pen{img, c, l.dashed};
    bool have_prev = false;
    cv::Point2d prev;
    double prev_y = 0;
    for (size_t i = 0; i < l.x.size() && i < l.y.size(); ++i) {
        const double vy = m.yv(l.y[i]);
        if (!std::isfinite(l.x[i]) || !std::isfinite(vy)) {
            have_prev = false;
            continue;
        }
        const cv::Point2d p = m.at(l.x[i], vy);
        if (have_prev) {
            if (l.steps) {
                const cv::Point2d corner = m.at(l.x[i], prev_y);
                pen.stroke(prev, corner);
                pen.stroke(corner, p);
            } else {
                pen.stroke(prev, p);
            }
        }
        if (i < l.error.size() && std::isfinite(l.error[i]) && !m.log_y) {
            const cv::Point2d top = m.at(l.x[i], vy + l.error[i]), bottom = m.at(l.x[i], vy - l.error[i]);
            segment(img, top, bottom, c, 1);
            for (const cv::Point2d& end : {top, bottom}) segment(img, end - cv::Point2d(5, 0), end + cv::Point2d(5, 0), c, 1);
        }
        if (l.markers)
            cv::circle(img, cv::Point(int(std::lround(p.x)), int(std::lround(p.y))), 4, c, cv::FILLED, cv::LINE_AA);
        prev = p;
        prev_y = vy;
        have_prev = true;
    }
}

void draw_dashed_vertical(cv::Mat& img, int x, int y0, int y1, cv::Scalar c, bool dashed) {
    if (!dashed) {
        cv::line(img, {x, y0}, {x, y1}, c, 1, cv::LINE_AA);
        return;
    }
    for (int y = y0; y < y1; y += 10) cv::line(img, {x, y}, {x, std::min(y1, y + 6)}, c, 1, cv::LINE_AA);
}

std::vector<double> integer_ticks(double lo, double hi) {
    std::vector<double> t = nice_ticks(lo, hi);
    if (t.size() >= 2 && t[1] - t[0] >= 1) return t;
    t.clear();
    for (double v = std::ceil(lo); v <= std::floor(hi); v += 1) t.push_back(v);
    return t;
}

// Ticks of a log axis (lo, hi are log10 values): the powers of ten, or
// 1, 2 and 5 times them, or plain nice numbers inside a narrow range.
std::vector<double> log_ticks(double lo, double hi) {
    for (const std::vector<double>& multiples : {std::vector<double>{1}, std::vector<double>{1, 2, 5}}) {
        std::vector<double> t;
        for (double d = std::floor(lo); d <= std::ceil(hi); d += 1)
            for (double k : multiples) {
                const double v = d + std::log10(k);
                if (v >= lo && v <= hi) t.push_back(v);
            }
        if (t.size() >= 3) return t;
    }
    std::vector<double> t;
    for (double v : nice_ticks(std::pow(10.0, lo), std::pow(10.0, hi), 4))
        if (v > 0) t.push_back(std::log10(v));
    return t;
}

struct LegendEntry {
    std::string label;
    cv::Scalar c;
    bool dashed;
};

std::vector<LegendEntry> legend_of(const Panel& p) {
    std::vector<LegendEntry> legend;
    for (const Line& l : p.lines)
        if (!l.label.empty()) legend.push_back({l.label, colour(l.color), l.dashed});
    for (const VLines& v : p.vlines)
        if (!v.label.empty()) legend.push_back({v.label, colour(v.color), v.dashed});
    return legend;
}

// The right margin a panel's legend needs (a third of the panel at most).
int legend_width(const Panel& p, int panel_width) {
    int w = 16;
    for (const LegendEntry& e : legend_of(p)) w = std::max(w, 34 + text_width(e.label, kTickScale) + 8);
    return std::min(w, panel_width / 3);
}

// `legend_margin`: the room right of the plot area for the legend (at least legend_width(p)).
void draw_panel(cv::Mat& img, const cv::Rect& box, const Panel& p, int legend_margin) {
    const std::vector<LegendEntry> legend = legend_of(p);

    Mapping m;
    m.log_y = p.log_y;
    m.area = cv::Rect(box.x + kLeft, box.y + kTop, std::max(10, box.width - kLeft - legend_margin - kLegendPad),
                      std::max(10, box.height - kTop - kBottom));
    Range xr, yr;
    for (const Line& l : p.lines) {
        for (double v : l.x) xr.add(v);
        for (size_t i = 0; i < l.y.size(); ++i) {
            yr.add(m.yv(l.y[i]));
            if (i < l.error.size() && std::isfinite(l.error[i]) && !p.log_y)
                for (double end : {l.y[i] - l.error[i], l.y[i] + l.error[i]}) yr.add(end);
        }
    }
    for (double e : p.bars.edges) xr.add(e);
    if (!p.bars.counts.empty()) {
        yr.add(0);  // the bars' base: 0, or a count of 1 on a log axis
        for (double c : p.bars.counts) yr.add(m.yv(c));
    }
    for (const VLines& v : p.vlines)
        for (double x : v.x) xr.add(x);
    m.x = xr.padded(0.02, 1e-9 + (xr.empty() ? 1 : std::abs(xr.hi) * 1e-6 + 1e-12));
    m.y = yr.padded(0.06, p.integer_y ? 1.0 : p.log_y ? 0.5 : 1e-12 + std::abs(yr.hi) * 0.02);
    if (!p.bars.counts.empty() && !p.log_y) m.y.lo = 0;  // bars stand on the axis

    // Grid lines and tick labels.
    const std::vector<double> xt =
        p.integer_x ? integer_ticks(m.x.lo, m.x.hi) : nice_ticks(m.x.lo, m.x.hi, std::max(3, m.area.width / 90));
    std::vector<double> yt;
    if (p.log_y) {
        yt = log_ticks(m.y.lo, m.y.hi);
    } else {
        yt = p.integer_y ? integer_ticks(m.y.lo, m.y.hi) : nice_ticks(m.y.lo, m.y.hi, std::max(3, m.area.height / 60));
    }
    for (double v : xt) {
        const int x = int(std::lround(m.at(v, m.y.lo).x));
        cv::line(img, {x, m.area.y}, {x, m.area.y + m.area.height}, kGridGrey, 1);
        cv::line(img, {x, m.area.y + m.area.height}, {x, m.area.y + m.area.height + 4}, kBlack, 1);
        put_text(img, tick_label(v), x, m.area.y + m.area.height + 18, kTickScale, Align::centre);
    }
    for (double v : yt) {
        const int y = int(std::lround(m.at(m.x.lo, v).y));
        cv::line(img, {m.area.x, y}, {m.area.x + m.area.width, y}, kGridGrey, 1);
        cv::line(img, {m.area.x - 4, y}, {m.area.x, y}, kBlack, 1);
        put_text(img, tick_label(p.log_y ? std::pow(10.0, v) : v), m.area.x - 7, y + 5, kTickScale, Align::right,
                 kLeft - 26);
    }

    // Data, drawn on a copy and only its plot area copied back: clipped to the area.
    {
        cv::Mat canvas = img.clone();
        for (size_t i = 0; i + 1 < p.bars.edges.size() && i < p.bars.counts.size(); ++i) {
            const cv::Point2d a = m.at(p.bars.edges[i], m.yv(p.bars.counts[i]));
            const cv::Point2d b = m.at(p.bars.edges[i + 1], p.log_y ? m.y.lo : 0.0);
            if (p.bars.counts[i] <= 0) continue;
            cv::rectangle(canvas, cv::Point(int(a.x), int(a.y)), cv::Point(int(b.x), int(b.y)),
                          colour(p.bars.color) * 0.5 + kWhite * 0.5, cv::FILLED);
        }
        for (const VLines& v : p.vlines)
            for (double x : v.x)
                draw_dashed_vertical(canvas, int(std::lround(m.at(x, m.y.lo).x)), m.area.y, m.area.y + m.area.height,
                                     colour(v.color), v.dashed);
        for (const Line& l : p.lines) draw_line(canvas, m, l);
        canvas(m.area).copyTo(img(m.area));
    }
    cv::rectangle(img, m.area, kBlack, 1);

    // Titles and labels.
    put_text(img, p.title, m.area.x + m.area.width / 2, box.y + 20, kTitleScale, Align::centre, box.width - 8, 1);
    put_text(img, p.x_label, m.area.x + m.area.width / 2, box.y + box.height - 8, kLabelScale, Align::centre,
             m.area.width);
    put_vertical_text(img, p.y_label + (p.log_y ? " (log scale)" : ""), box.x + 12, m.area.y + m.area.height / 2,
                      kLabelScale, m.area.height);

    // Legend, in the right margin.
    int y = m.area.y + 12;
    const int x = m.area.x + m.area.width + kLegendPad;
    for (const LegendEntry& e : legend) {
        if (y > m.area.y + m.area.height) break;
        if (e.dashed) {
            for (int dx = 0; dx < 24; dx += 8) cv::line(img, {x + dx, y - 4}, {x + dx + 5, y - 4}, e.c, 2, cv::LINE_AA);
        } else {
            cv::line(img, {x, y - 4}, {x + 24, y - 4}, e.c, 2, cv::LINE_AA);
        }
        put_text(img, e.label, x + 30, y, kTickScale, Align::left, box.x + box.width - (x + 30) - 2);
        y += 18;
    }
}

}  // namespace

int palette_size() { return int(sizeof kPalette / sizeof kPalette[0]); }

std::vector<double> nice_ticks(double lo, double hi, int target) {
    std::vector<double> out;
    if (!(hi > lo) || !std::isfinite(lo) || !std::isfinite(hi)) return out;
    const double raw = (hi - lo) / std::max(1, target);
    const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
    const double norm = raw / magnitude;
    const double multiple = norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10;  // step = multiple * magnitude
    // Below 1, dividing by the exact integer 1/magnitude gives the nearest
    // double (0.3, not 3 * 0.1 = 0.30000000000000004).
    const double inverse = magnitude < 1 ? std::round(1 / magnitude) : 0;
    auto value = [&](double k) { return inverse > 0 ? k * multiple / inverse : k * multiple * magnitude; };
    for (double k = std::ceil(lo / (multiple * magnitude)); value(k) <= hi + multiple * magnitude * 1e-9; k += 1)
        out.push_back(k == 0 ? 0.0 : value(k));  // no "-0"
    return out;
}

std::string tick_label(double v) {
    char buf[32];
    if (v != 0 && (std::abs(v) < 1e-3 || std::abs(v) >= 1e5))
        std::snprintf(buf, sizeof buf, "%.0e", v);
    else
        std::snprintf(buf, sizeof buf, "%.6g", v);
    return buf;
}

cv::Size figure_size(const Figure& f) {
    const int columns = std::max(1, f.columns);
    const int rows = std::max<int>(1, int((f.panels.size() + columns - 1) / columns));
    return {columns * f.panel_width, kFigureTitleBand + rows * f.panel_height};
}

cv::Mat render(const Figure& f) {
    HFQ_CHECK(f.panel_width >= 200 && f.panel_height >= 150, "plot: panels must be at least 200 x 150 pixels, got ",
              f.panel_width, " x ", f.panel_height);
    const cv::Size size = figure_size(f);
    cv::Mat img(size, CV_8UC3, kWhite);
    put_text(img, f.title, size.width / 2, 25, kFigureTitleScale, Align::centre, size.width - 10, 2);
    const int columns = std::max(1, f.columns);
    int widest_legend = 0;
    for (const Panel& p : f.panels) widest_legend = std::max(widest_legend, legend_width(p, f.panel_width));
    for (size_t i = 0; i < f.panels.size(); ++i) {
        const cv::Rect box(int(i % columns) * f.panel_width, kFigureTitleBand + int(i / columns) * f.panel_height,
                           f.panel_width, f.panel_height);
        draw_panel(img, box, f.panels[i], f.align_panels ? widest_legend : legend_width(f.panels[i], f.panel_width));
    }
    return img;
}

void write_png(const std::string& path, const cv::Mat& image) {
    std::vector<uint8_t> bytes;
    HFQ_CHECK(!image.empty() && cv::imencode(".png", image, bytes), path, ": cannot encode the figure as PNG");
    write_file_atomically(path, std::as_bytes(std::span<const uint8_t>(bytes)));
}

}  // namespace hfq::study
