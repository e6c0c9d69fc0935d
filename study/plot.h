// Line plots and histograms drawn with OpenCV, for the study's report: one
// figure is a grid of panels, each with its title, axis labels, tick labels
// ("nice" numbers: 1, 2 or 5 times a power of ten), optional log-scale y, and
// a legend in its right margin.
//
//   Figure f;
//   f.title = "Exponent against training step";
//   Panel& p = f.panels.emplace_back();
//   p.title = "msqe-po2";  p.x_label = "step";  p.y_label = "exponent";
//   p.lines.push_back({"features.3.0", {1, 2, 3}, {-5, -4, -4}, /*color*/ 0, /*steps*/ true});
//   (a Line's `error` adds error bars: y -+ error[i] at point i)
//   write_png("exponents.png", render(f));     // figure_size(f) pixels
#pragma once
#include <string>
#include <vector>

#include <opencv2/core.hpp>

namespace hfq::study {

struct Line {
    std::string label;         // legend entry ("" : none)
    std::vector<double> x, y;  // same length; non-finite points are skipped (a gap)
    int color = 0;             // index into the palette
    bool steps = false;        // draw as a staircase (values hold until the next x)
    bool markers = false;      // a dot at every point
    bool dashed = false;       // dashes: a line that may lie on another one still lets it show
    std::vector<double> error = {};  // empty, or per point the half-length of a vertical error bar (y -+ error; linear y only)
};

// A histogram: counts[i] of the values in [edges[i], edges[i+1]).
struct Bars {
    std::vector<double> edges;
    std::vector<double> counts;
    int color = 7;  // grey
};

// Vertical lines across the panel (e.g. grid levels), with one legend entry.
struct VLines {
    std::string label;
    std::vector<double> x;
    int color = 3;
    bool dashed = true;
};

struct Panel {
    std::string title, x_label, y_label;
    bool log_y = false;      // non-positive values are skipped
    bool integer_x = false;  // ticks on integers only (epochs)
    bool integer_y = false;  // ticks on integers only (exponents)
    std::vector<Line> lines;
    Bars bars;
    std::vector<VLines> vlines;
};

struct Figure {
    std::string title;
    std::vector<Panel> panels;
    int columns = 1;
    int panel_width = 640;  // pixels per panel, legend margin included
    int panel_height = 360;
    bool align_panels = false;  // every legend margin as wide as the widest: the plot areas line up
};

// A figure written to disk.
struct FigureFile {
    std::string path;
    int width = 0, height = 0;
};

// Width and height in pixels of render(f): columns x rows of panels plus a
// title band.
cv::Size figure_size(const Figure& f);
// A white 8-bit BGR image.
cv::Mat render(const Figure& f);
// PNG-encodes and writes the image atomically.
void write_png(const std::string& path, const cv::Mat& image);

// Tick positions covering [lo, hi] at 1, 2 or 5 times a power of ten, about
// `target` of them (exposed for tests).
std::vector<double> nice_ticks(double lo, double hi, int target = 6);
// A short tick label: "0.25", "1e-05", "-3".
std::string tick_label(double v);
// The palette's colour count; colour indices wrap around.
int palette_size();

}  // namespace hfq::study
