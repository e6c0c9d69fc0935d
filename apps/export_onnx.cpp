// export_onnx: writes the ONNX form of a quantized model (deploy/onnx_export.h).
//
//   export_onnx run/export.safetensors                 # -> run/export.onnx
//   export_onnx run/final.safetensors -o model.onnx    # a QAT checkpoint
//
// The input is an export (metadata "hfq.export": export.safetensors), or a
// QAT checkpoint (metadata "hfq.quant_policy": final.safetensors, or a run's
// checkpoint.safetensors, whose optimizer state is skipped), which is first
// exported as train_mobilenet exports it, to a temporary file removed
// afterwards. Without -o the output is the input's path with ".onnx" in place
// of ".safetensors".
// Exit status 0 on success; 1 with a message on standard error for a file
// that is neither (a float checkpoint has no quantized layers to export) or
// that the export refuses; CLI11's status for bad options.
#include <CLI/CLI.hpp>
#include <filesystem>
#include <iostream>
#include <string>

#include "deploy/onnx_export.h"
#include "engine/check.h"
#include "engine/safetensors.h"
#include "layers/checkpoint.h"
#include "quant/export.h"
#include "train/qat_checkpoint.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

// A QAT checkpoint restored as train_mobilenet restores it, exported as a
// run's end exports it, and that export written as ONNX.
void export_checkpoint(const SafetensorsFile& file, const std::string& out) {
    const TemporaryExport exported(restore_qat_checkpoint(file), checkpoint_preprocessing(file));
    deploy::write_onnx(exported.path(), out);
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"Write the ONNX model (QDQ, opset 13) of an hfq export or QAT checkpoint"};
    std::string input, output;
    app.add_option("input", input, "export.safetensors, or a QAT checkpoint")->required()->check(CLI::ExistingFile);
    app.add_option("-o,--output", output, "the .onnx file to write (default: the input with .onnx)");
    CLI11_PARSE(app, argc, argv);

    try {
        if (output.empty()) output = fs::path(input).replace_extension(".onnx").string();
        const SafetensorsFile file = read_safetensors(input);
        if (file.metadata.count(quant::kExportKey)) {
            deploy::write_onnx(file, output);
        } else {
            HFQ_CHECK(file.metadata.count(quant::kQuantPolicyKey), input, ": neither an export (no '",
                      quant::kExportKey, "' metadata) nor a QAT checkpoint (no '", quant::kQuantPolicyKey,
                      "'): a float model has no quantized layers to export");
            export_checkpoint(file, output);
        }
        std::cout << "export_onnx: wrote " << output << '\n';
        return 0;
    } catch (const std::exception& e) {
        std::cerr << "export_onnx: " << e.what() << '\n';
        return 1;
    }
}
