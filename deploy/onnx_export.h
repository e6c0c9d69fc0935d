// export.onnx: an hfq export (quant/export.h) as an ONNX model, opset 13, in
// the QDQ form that ONNX tools and runtimes read as "quantized":
//
//   input  float {N, H, W, C}   NHWC, as hfq's tensors (H, W, N symbolic; C fixed)
//     -> Transpose [0, 3, 1, 2] -> NCHW, the layout of ONNX's Conv
//   per IntegerLayer <L> (conv or linear):
//     <L>.q           int8 initializer: the export's codes, OIHW / {out, in}
//     <L>.scale       float {out}: 2^exp (lsq: the stored scale), one per output
//                     channel (a per-tensor scale repeated)
//     <L>.zero_point  int8 {out}: 0 (symmetric grids)
//     DequantizeLinear(axis = 0) -> <L>.weight, read only by the next node:
//     Conv (strides, pads or auto_pad SAME_UPPER, group) or Gemm (transB = 1)
//     with the float <L>.bias -> <L>
//   ReLU -> Relu, ReLU6 -> Clip(0, 6), the residual sum -> Add (named after
//   the block), the global pooling -> GlobalAveragePool + Flatten, dropout ->
//   nothing (identity in evaluation)
//   per activation quantizer <A> (W4A8), exponent k, grid [-qn, qp]:
//     [Clip(-qn 2^k, qp 2^k) -> <A>.clipped, when the grid is narrower than
//      the storage type's range]
//     QuantizeLinear(<A>.scale = 2^k, <A>.zero_point = 0) -> <A>.codes
//     DequantizeLinear -> <A>.dequantized
//     uint8 codes on an unsigned grid, int8 on a signed one (the entry's
//     "signed" in "hfq.export"; the zero point's type selects the output type)
//   the output: the classifier's output {N, classes}, named after it
// Every "hfq.*" metadata entry of the export becomes a metadata_props entry;
// the producer is "hfq". The model passes onnx::checker::check_model before
// it is written (atomically: engine/atomic_file.h).
//
// Errors (hfq::Error, naming the export file and the tensor or layer): what
// build_model_from_export refuses (a missing tensor, a code tensor of the
// wrong shape, ...), a module the ONNX graph has no counterpart for, an
// exponent outside float's normal range, a model the checker rejects.
#pragma once
#include <string>

#include "engine/safetensors.h"

namespace hfq::deploy {

void write_onnx(const SafetensorsFile& export_file, const std::string& path);
void write_onnx(const std::string& export_path, const std::string& path);

}  // namespace hfq::deploy
