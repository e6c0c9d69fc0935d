// Reading and writing the safetensors format
// (https://github.com/huggingface/safetensors): an 8-byte little-endian
// header length, a JSON header mapping each tensor name to
// {"dtype", "shape", "data_offsets": [begin, end]} (plus an optional
// "__metadata__" object of string values), then the raw little-endian data.
// PyTorch (safetensors.torch), NumPy and others read and write it, which is
// why hfq uses it for checkpoints, fixtures and exports.
//
// The reader trusts nothing in the file: every length, offset, dtype and
// shape is validated, and a problem throws hfq::Error naming the file and
// the tensor. Writes are atomic: a temporary file in the same folder, then a
// rename, so an interrupted save never destroys the previous file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "engine/tensor.h"

namespace hfq {

struct SafetensorsFile {
    std::vector<std::pair<std::string, Tensor>> tensors;  // in file order of their data
    std::map<std::string, std::string> metadata;          // the "__metadata__" object

    bool has(const std::string& name) const;
    // Throws naming the missing tensor (and `source`, for the message).
    const Tensor& get(const std::string& name) const;
    std::string source;  // file path (or a label) for error messages
};

// Supported dtypes: F32, I8, I32, I64 (hfq's DType), plus F64, F16, BF16,
// U8, I16, which are converted to F32 on reading (so fixtures and torchvision
// weights written in other types load); anything else is an error.
// The conversions are exact except F64 -> F32, which rounds to nearest; an
// F64 value beyond the f32 range is an error (infinities and NaN pass).
// Data is taken as little-endian, the machine's order (x86-64; a static_assert
// guards it).
// Besides the reference reader's rules (header <= 100 MB, valid offsets that
// tile the data buffer exactly), a duplicate JSON key, an unknown field in a
// tensor entry and a non-string metadata value are errors.
// The whole file is read into memory; a missing or unreadable path throws
// naming it.
SafetensorsFile read_safetensors(const std::string& path);
// Parses an in-memory image of a file; `source` names it in error messages.
SafetensorsFile parse_safetensors(const std::byte* data, size_t size, const std::string& source);

// Tensor names must be unique and non-empty; metadata values are strings.
// The header lists the metadata first, then the tensors in the order given,
// whose data follow contiguously in that order; the header is padded with
// spaces so the data start 8-byte aligned, as the reference writer does.
// The file is replaced atomically (engine/atomic_file.h).
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});
// The bytes write_safetensors would write.
std::vector<std::byte> serialize_safetensors(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                             const std::map<std::string, std::string>& metadata = {});

}  // namespace hfq
