// libFuzzer target for the safetensors reader (run it with scripts/fuzz.sh).
//
// Any input must either parse or throw hfq::Error: a crash, a sanitizer
// report, another exception type or a huge allocation is a bug. An input
// that parses must also survive a round trip: written back and read again,
// it gives the same tensors, bit for bit, in the same order.
#include <cstdint>
#include <cstring>

#include "engine/check.h"
#include "engine/safetensors.h"

namespace {

bool same(const hfq::SafetensorsFile& a, const hfq::SafetensorsFile& b) {
    if (a.tensors.size() != b.tensors.size() || a.metadata != b.metadata) return false;
    for (size_t i = 0; i < a.tensors.size(); ++i) {
        const auto& [name_a, ta] = a.tensors[i];
        const auto& [name_b, tb] = b.tensors[i];
        if (name_a != name_b || ta.shape() != tb.shape() || ta.dtype() != tb.dtype() ||
            std::memcmp(ta.raw(), tb.raw(), ta.nbytes()) != 0)
            return false;
    }
    return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    hfq::SafetensorsFile file;
    try {
        file = hfq::parse_safetensors(reinterpret_cast<const std::byte*>(data), size, "fuzz input");
    } catch (const hfq::Error&) {
        return 0;  // rejected cleanly
    }
    // The reader accepts an empty tensor name (the format allows it); the
    // writer refuses one, so such files cannot round-trip.
    for (const auto& [name, t] : file.tensors)
        if (name.empty()) return 0;
    const std::vector<std::byte> bytes = hfq::serialize_safetensors(file.tensors, file.metadata);
    if (!same(file, hfq::parse_safetensors(bytes.data(), bytes.size(), "round trip"))) __builtin_trap();
    return 0;
}
