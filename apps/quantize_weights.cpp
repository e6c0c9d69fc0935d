// quantize_weights: post-training quantization of a safetensors file with any
// quantizer of docs/quantizers.md (see quant/quantize_weights.h for the output format).
//
//   quantize_weights --method msqe-po2 --bits 4 [--per-channel] IN.safetensors OUT.safetensors
//   quantize_weights --method learnable-po2 --rounding ceil --bits 3 in.safetensors out.safetensors
//
// Prints one line per quantized tensor (exponents, error). Exit status 0 on
// success, 1 on any error (message on standard error); IN is never
// overwritten and OUT is replaced atomically.
#include <CLI/CLI.hpp>

#include <iostream>
#include <string>

#include "engine/check.h"
#include "quant/quantize_weights.h"

using namespace hfq;

int main(int argc, char** argv) {
    CLI::App app{"Quantize every float tensor of rank >= 2 of a safetensors file (hardware-friendly quantizers)"};
    std::string method, rounding = "msqe-round", in, out;
    quant::QuantizerOptions options;
    std::string methods;
    for (const std::string& m : quant::quantizer_methods()) methods += (methods.empty() ? "" : ", ") + m;
    app.add_option("--method", method, "quantizer: " + methods)->required();
    app.add_option("--bits", options.bits, "bits, 2..8 (signed grid, -(2^(b-1)-1) .. 2^(b-1)-1)")
        ->capture_default_str();
    app.add_flag("--per-channel", options.per_channel, "one scale per index of axis 0 (default: per tensor)");
    app.add_option("--rounding", rounding, "learnable-po2's exponent rounding: ceil, rint, msqe-round")
        ->capture_default_str();
    app.add_option("IN", in, "input .safetensors")->required();
    app.add_option("OUT", out, "output .safetensors (written atomically, never IN)")->required();
    CLI11_PARSE(app, argc, argv);
    try {
        options.rounding = quant::parse_exponent_rounding(rounding);
        const quant::QuantizeWeightsReport report = quant::quantize_weights(in, out, method, options);
        std::cout << quant::quantize_weights_summary(report);
        std::cout << "wrote " << out << "\n";
        return 0;
    } catch (const std::exception& e) {  // hfq::Error, and e.g. out of memory
        std::cerr << "quantize_weights: error: " << e.what() << "\n";
        return 1;
    }
}
