// The safetensors reader and writer. The reader follows the reference
// implementation's rules (huggingface/safetensors, safetensors/src/tensor.rs):
// a header of at most 100 MB, a JSON object, and tensors whose byte ranges
// tile the data buffer exactly, with no gap, overlap or trailing byte. It
// adds three rules of its own: duplicate JSON keys, unknown fields in a
// tensor entry and JSON nested deeper than a header needs are errors too.
//
// Nothing is allocated from sizes the header claims: every range is checked
// against the real file size first, so the tensors take at most 4 times the
// file's size (U8 -> f32), and the parsed JSON a few times the header's real
// size.
#include "engine/safetensors.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>
#include <tuple>

#include <nlohmann/json.hpp>

#include "engine/atomic_file.h"
#include "engine/check.h"

namespace hfq {

// Tensor bytes are copied as they are: the file is little-endian, and so is
// every machine hfq targets (x86-64).
static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");

namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference's limit
constexpr char kMetadataKey[] = "__metadata__";

// An element type as stored in a file, and the hfq dtype it loads as.
enum class Stored { F32, I8, I32, I64, F64, F16, BF16, U8, I16 };
struct StoredType {
    Stored id;
    const char* name;
    size_t bytes;
    DType loads_as;
};
constexpr StoredType kStoredTypes[] = {
    {Stored::F32, "F32", 4, DType::f32},   {Stored::I8, "I8", 1, DType::s8},    {Stored::I32, "I32", 4, DType::s32},
    {Stored::I64, "I64", 8, DType::s64},   {Stored::F64, "F64", 8, DType::f32}, {Stored::F16, "F16", 2, DType::f32},
    {Stored::BF16, "BF16", 2, DType::f32}, {Stored::U8, "U8", 1, DType::f32},   {Stored::I16, "I16", 2, DType::f32},
};

const StoredType* find_stored_type(const std::string& name) {
    for (const StoredType& t : kStoredTypes)
        if (name == t.name) return &t;
    return nullptr;
}

const char* stored_name(DType t) {
    switch (t) {
        case DType::f32: return "F32";
        case DType::s8: return "I8";
        case DType::s32: return "I32";
        case DType::s64: return "I64";
    }
    return "?";
}

// IEEE half precision -> float, exactly (every half is a float).
float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t exponent = (h >> 10) & 0x1f;
    const uint32_t mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {  // inf or NaN: keep the payload
        bits = sign | 0x7f800000 | (mantissa << 13);
    } else if (exponent != 0) {  // normal: rebias 15 -> 127
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else {  // zero or subnormal: mantissa * 2^-24, exact in float
        const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
        bits = sign | std::bit_cast<uint32_t>(magnitude);
    }
    return std::bit_cast<float>(bits);
}

// One element of a stored type, read from possibly unaligned bytes.
template <class T>
T load(const std::byte* p) {
    T v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// Copies (or converts) `n` stored elements into the tensor.
void load_elements(const StoredType& type, const std::byte* src, int64_t n, Tensor& dst, const std::string& where) {
    const bool kept_as_stored = type.loads_as != DType::f32 || type.id == Stored::F32;
    if (kept_as_stored) {
        std::memcpy(dst.raw(), src, static_cast<size_t>(n) * type.bytes);
        return;
    }
    float* out = dst.f32();
    for (int64_t i = 0; i < n; ++i) {
        const std::byte* p = src + i * type.bytes;
        switch (type.id) {
            case Stored::F64: {
                const double v = load<double>(p);
                // Converting an out-of-range double is undefined behaviour,
                // and such a value is no usable weight anyway.
                HFQ_CHECK(!std::isfinite(v) || std::fabs(v) <= std::numeric_limits<float>::max(), where,
                          ": F64 element ", i, " = ", v, " does not fit in f32");
                out[i] = static_cast<float>(v);
                break;
            }
            case Stored::F16: out[i] = half_to_float(load<uint16_t>(p)); break;
            case Stored::BF16: out[i] = std::bit_cast<float>(static_cast<uint32_t>(load<uint16_t>(p)) << 16); break;
            case Stored::U8: out[i] = static_cast<float>(load<uint8_t>(p)); break;
            case Stored::I16: out[i] = static_cast<float>(load<int16_t>(p)); break;
            default: break;  // the types above are all that convert
        }
    }
}

// A tensor as the header describes it, validated against the buffer size.
struct Entry {
    std::string name;
    const StoredType* type;
    Shape shape;
    int64_t numel;
    uint64_t begin, end;  // byte range in the data buffer
    size_t header_position;
};

// Parses the header JSON. nlohmann::json keeps the last of duplicate keys
// silently, so a parse callback sees every key first: it rejects duplicates
// and nesting deeper than a header needs (root -> entry -> shape), and
// records the order of the top-level keys.
json parse_header(const char* text, size_t size, const std::string& where,
                  std::map<std::string, size_t>& top_level_order) {
    // Keys seen so far in the object open at each depth: 1 = tensor names,
    // 2 = fields of one entry (or metadata keys), 3 = keys of an object where
    // a field value belongs (an error found later, but not a duplicate).
    std::map<std::string, size_t> keys_at[4];
    std::string entry;  // the top-level key being parsed, for messages
    auto check_event = [&](int depth, json::parse_event_t event, json& parsed) {
        const bool opens = event == json::parse_event_t::object_start || event == json::parse_event_t::array_start;
        HFQ_CHECK(!opens || depth <= 2, where, ": '", entry, "': JSON nested deeper than a safetensors header allows");
        if (event == json::parse_event_t::object_start) keys_at[depth + 1].clear();
        if (event == json::parse_event_t::key) {
            const std::string& key = parsed.get_ref<const std::string&>();
            if (depth == 1) entry = key;
            auto& seen = keys_at[depth];
            HFQ_CHECK(seen.emplace(key, seen.size()).second, where,
                      depth == 1 ? cat(": duplicate tensor name '", key, "'")
                                 : cat(": '", entry, "': duplicate key '", key, "'"));
        }
        return true;
    };
    json root;
    try {
        root = json::parse(text, text + size, check_event);
    } catch (const json::exception& e) {
        throw Error(cat(where, ": the header is not valid JSON (", e.what(), ")"));
    }
    top_level_order = std::move(keys_at[1]);
    return root;
}

// A JSON integer in [0, limit], or an error.
uint64_t read_count(const json& v, uint64_t limit, const std::string& where, const char* what) {
    HFQ_CHECK(v.is_number_integer(), where, ": ", what, " ", v.dump(), " is not an integer");
    HFQ_CHECK(v.is_number_unsigned() || v.get<int64_t>() >= 0, where, ": ", what, " ", v.dump(), " is negative");
    const uint64_t n = v.get<uint64_t>();
    HFQ_CHECK(n <= limit, where, ": ", what, " ", n, " is too large");
    return n;
}

Entry read_entry(const std::string& name, const json& info, size_t buffer_size, size_t header_position,
                 const std::string& file) {
    const std::string where = cat(file, ": tensor '", name, "'");
    HFQ_CHECK(info.is_object(), where, ": the entry is a JSON ", info.type_name(), ", not an object");
    for (const auto& field : info.items())
        HFQ_CHECK(field.key() == "dtype" || field.key() == "shape" || field.key() == "data_offsets", where,
                  ": unknown field '", field.key(), "'");
    for (const char* field : {"dtype", "shape", "data_offsets"})
        HFQ_CHECK(info.contains(field), where, ": \"", field, "\" is missing");

    Entry e{name, nullptr, {}, 1, 0, 0, header_position};
    const json& dtype = info["dtype"];
    HFQ_CHECK(dtype.is_string(), where, ": \"dtype\" is not a string but ", dtype.dump());
    e.type = find_stored_type(dtype.get<std::string>());
    HFQ_CHECK(e.type != nullptr, where, ": unsupported dtype ", dtype.dump(),
              " (hfq reads F32, F64, F16, BF16, I8, U8, I16, I32, I64)");

    const json& shape = info["shape"];
    HFQ_CHECK(shape.is_array(), where, ": \"shape\" is not an array but ", shape.dump());
    constexpr uint64_t kMaxDim = std::numeric_limits<int64_t>::max();
    for (const json& d : shape) {
        e.shape.push_back(static_cast<int64_t>(read_count(d, kMaxDim, where, "shape dimension")));
        HFQ_CHECK(!__builtin_mul_overflow(e.numel, e.shape.back(), &e.numel), where, ": shape ", shape_str(e.shape),
                  "... has more elements than fit in 64 bits");
    }
    uint64_t nbytes;
    HFQ_CHECK(!__builtin_mul_overflow(static_cast<uint64_t>(e.numel), e.type->bytes, &nbytes), where, ": shape ",
              shape_str(e.shape), " of ", e.type->name, " has more bytes than fit in 64 bits");

    const json& offsets = info["data_offsets"];
    HFQ_CHECK(offsets.is_array() && offsets.size() == 2, where, ": \"data_offsets\" is not [begin, end] but ",
              offsets.dump());
    e.begin = read_count(offsets[0], UINT64_MAX, where, "data_offsets begin");
    e.end = read_count(offsets[1], UINT64_MAX, where, "data_offsets end");
    HFQ_CHECK(e.begin <= e.end, where, ": data_offsets [", e.begin, ", ", e.end, "] end before they begin");
    HFQ_CHECK(e.end <= buffer_size, where, ": data_offsets [", e.begin, ", ", e.end,
              "] lie outside the data buffer of ", buffer_size, " bytes");
    HFQ_CHECK(e.end - e.begin == nbytes, where, ": data_offsets [", e.begin, ", ", e.end, "] hold ", e.end - e.begin,
              " bytes, but shape ", shape_str(e.shape), " of ", e.type->name, " needs ", nbytes);
    return e;
}

std::map<std::string, std::string> read_metadata(const json& value, const std::string& file) {
    HFQ_CHECK(value.is_object(), file, ": \"__metadata__\" is not an object but a JSON ", value.type_name());
    std::map<std::string, std::string> metadata;
    for (const auto& item : value.items()) {
        HFQ_CHECK(item.value().is_string(), file, ": \"__metadata__\" value of '", item.key(), "' is not a string but ",
                  item.value().dump());
        metadata[item.key()] = item.value().get<std::string>();
    }
    return metadata;
}

// Sorts the entries into data order and checks that they tile the buffer
// exactly. Empty tensors sharing an offset keep their header order.
void check_tiling(std::vector<Entry>& entries, size_t buffer_size, const std::string& file) {
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
        return std::tie(a.begin, a.end, a.header_position) < std::tie(b.begin, b.end, b.header_position);
    });
    uint64_t covered = 0;  // bytes [0, covered) belong to the tensors so far
    const std::string* previous = nullptr;
    for (const Entry& e : entries) {
        HFQ_CHECK(e.begin <= covered, file, ": tensor '", e.name, "': bytes [", covered, ", ", e.begin,
                  ") of the data buffer before it belong to no tensor (a gap)");
        HFQ_CHECK(e.begin == covered, file, ": tensor '", e.name, "': data_offsets [", e.begin, ", ", e.end,
                  "] overlap tensor '", *previous, "', which ends at ", covered);
        covered = e.end;
        previous = &e.name;
    }
    HFQ_CHECK(covered == buffer_size, file, ": the data buffer has ", buffer_size, " bytes, but the tensors cover ",
              covered, " (", buffer_size - covered, " trailing bytes belong to no tensor)");
}

}  // namespace

bool SafetensorsFile::has(const std::string& name) const {
    return std::any_of(tensors.begin(), tensors.end(), [&](const auto& t) { return t.first == name; });
}

const Tensor& SafetensorsFile::get(const std::string& name) const {
    for (const auto& [n, t] : tensors)
        if (n == name) return t;
    throw Error(cat("safetensors '", source, "': no tensor '", name, "' (the file has ", tensors.size(), " tensors)"));
}

SafetensorsFile parse_safetensors(const std::byte* data, size_t size, const std::string& source) {
    const std::string file = cat("safetensors '", source, "'");
    HFQ_CHECK(size >= 8, file, ": the file is ", size, " bytes, too short for the 8-byte header length");
    const uint64_t header_size = load<uint64_t>(data);
    HFQ_CHECK(header_size <= kMaxHeaderBytes, file, ": the header length ", header_size, " is absurd (the limit is ",
              kMaxHeaderBytes, " bytes)");
    HFQ_CHECK(header_size <= size - 8, file, ": the header length ", header_size, " exceeds the ", size - 8,
              " bytes that follow it in the file");

    std::map<std::string, size_t> header_order;
    const json root = parse_header(reinterpret_cast<const char*>(data + 8), header_size, file, header_order);
    HFQ_CHECK(root.is_object(), file, ": the header is a JSON ", root.type_name(), ", not an object");

    const std::byte* buffer = data + 8 + header_size;
    const size_t buffer_size = size - 8 - header_size;
    SafetensorsFile result;
    result.source = source;
    std::vector<Entry> entries;
    for (const auto& item : root.items()) {
        if (item.key() == kMetadataKey)
            result.metadata = read_metadata(item.value(), file);
        else
            entries.push_back(read_entry(item.key(), item.value(), buffer_size, header_order.at(item.key()), file));
    }
    check_tiling(entries, buffer_size, file);

    // Everything is validated: only now allocate, at most the file's size.
    for (const Entry& e : entries) {
        Tensor t = Tensor::empty(e.shape, e.type->loads_as);
        load_elements(*e.type, buffer + e.begin, e.numel, t, cat(file, ": tensor '", e.name, "'"));
        result.tensors.emplace_back(e.name, std::move(t));
    }
    return result;
}

SafetensorsFile read_safetensors(const std::string& path) {
    const std::vector<std::byte> bytes = read_file_bytes(path);
    return parse_safetensors(bytes.data(), bytes.size(), path);
}

namespace {

// A file as its pieces: the 8-byte length and the header, then each tensor's
// bytes where they already are. serialize_ and write_safetensors share it, so
// writing needs no copy of the tensors.
struct FileLayout {
    std::string head;                              // length + JSON header + padding
    std::vector<std::span<const std::byte>> data;  // each tensor's bytes, in order

    std::vector<std::span<const std::byte>> pieces() const {
        std::vector<std::span<const std::byte>> all{std::as_bytes(std::span<const char>(head))};
        all.insert(all.end(), data.begin(), data.end());
        return all;
    }
};

FileLayout lay_out(const std::vector<std::pair<std::string, Tensor>>& tensors,
                   const std::map<std::string, std::string>& metadata) {
    // ordered_json keeps the tensors in the order given; the metadata comes
    // first, as the reference writes it.
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata.empty()) header[kMetadataKey] = metadata;
    std::set<std::string> names;
    uint64_t offset = 0;
    for (const auto& [name, t] : tensors) {
        HFQ_CHECK(!name.empty(), "write_safetensors: a tensor name is empty");
        HFQ_CHECK(name != kMetadataKey, "write_safetensors: \"", kMetadataKey, "\" is reserved, not a tensor name");
        HFQ_CHECK(names.insert(name).second, "write_safetensors: duplicate tensor name '", name, "'");
        HFQ_CHECK(t.defined(), "write_safetensors: tensor '", name, "' is undefined");
        const uint64_t end = offset + t.nbytes();
        header[name] = {{"dtype", stored_name(t.dtype())}, {"shape", t.shape()}, {"data_offsets", {offset, end}}};
        offset = end;
    }
    std::string text;
    try {
        text = header.dump();
    } catch (const nlohmann::json::exception& e) {  // names and metadata must be UTF-8
        throw Error(cat("write_safetensors: a tensor name or metadata string is not valid UTF-8 (", e.what(), ")"));
    }
    // Pad with spaces so the data starts 8-byte aligned, as the reference does
    // (readers that map the file can then use it in place).
    text.append((8 - text.size() % 8) % 8, ' ');

    FileLayout layout;
    const uint64_t header_size = text.size();
    layout.head.resize(8);
    std::memcpy(layout.head.data(), &header_size, 8);
    layout.head += text;
    for (const auto& [name, t] : tensors) layout.data.emplace_back(static_cast<const std::byte*>(t.raw()), t.nbytes());
    return layout;
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
    FileLayout layout;
    try {
        layout = lay_out(tensors, metadata);
    } catch (const Error& e) {
        throw Error(cat(e.what(), " (writing '", path, "')"));
    }
    write_file_atomically(path, layout.pieces());
}

std::vector<std::byte> serialize_safetensors(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                             const std::map<std::string, std::string>& metadata) {
    const FileLayout layout = lay_out(tensors, metadata);
    std::vector<std::byte> bytes;
    for (const auto& piece : layout.pieces()) bytes.insert(bytes.end(), piece.begin(), piece.end());
    return bytes;
}

}  // namespace hfq
