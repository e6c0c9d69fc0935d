// The safetensors reader and writer, and atomic file writes: bit-exact round
// trips, a file written by an independent Python writer
// (tests/fixtures/make_safetensors_fixture.py), every kind of corrupt file,
// and failed writes that must leave the previous file intact.
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "engine/atomic_file.h"
#include "engine/check.h"
#include "engine/safetensors.h"

using namespace hfq;
namespace fs = std::filesystem;

namespace {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }
// doctest::Contains for a message built at run time.
doctest::Contains message_with(const std::string& part) { return doctest::Contains(part.c_str()); }

template <class T>
Tensor tensor_of(Shape shape, const std::vector<T>& values) {
    Tensor t = Tensor::empty(std::move(shape), dtype_of<T>());
    REQUIRE(static_cast<size_t>(t.numel()) == values.size());
    if (!values.empty()) std::memcpy(t.raw(), values.data(), t.nbytes());
    return t;
}

bool same_bits(const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// A file image: header length, the header text as given, `data` bytes.
std::vector<std::byte> file_image(const std::string& header, const std::vector<uint8_t>& data) {
    std::vector<std::byte> bytes(8);
    const uint64_t n = header.size();
    std::memcpy(bytes.data(), &n, 8);
    for (char c : header) bytes.push_back(static_cast<std::byte>(c));
    for (uint8_t b : data) bytes.push_back(static_cast<std::byte>(b));
    return bytes;
}

// The hfq::Error message parsing `bytes` gives ("" when it parses).
std::string parse_error(const std::vector<std::byte>& bytes) {
    try {
        parse_safetensors(bytes.data(), bytes.size(), "bad.safetensors");
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

// A fresh, empty folder under the system's temporary folder.
fs::path fresh_folder(const std::string& name) {
    const fs::path p = fs::temp_directory_path() / cat("hfq_test_safetensors_", ::getpid(), "_", name);
    fs::remove_all(p);
    fs::create_directories(p);
    return p;
}

std::string file_text(const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<std::string> folder_listing(const fs::path& folder) {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(folder)) names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
}

// Tensors of every dtype hfq keeps, with values that catch byte mix-ups:
// NaN payloads, negative zero, subnormals, extremes, scalars, empty tensors.
NamedTensors all_kinds() {
    const float nan_with_payload = std::bit_cast<float>(0x7fc01234u);
    return {
        {"conv.weight", tensor_of<float>({2, 1, 2, 2}, {1.5f, -0.0f, nan_with_payload, 1e-40f, -3e38f,
                                                        std::numeric_limits<float>::infinity(), 0.1f, -7})},
        {"scale", tensor_of<float>({}, {0.125f})},
        {"empty", tensor_of<float>({0}, {})},
        {"empty_too", tensor_of<int32_t>({2, 0, 3}, {})},
        {"codes", tensor_of<int8_t>({5}, {-128, -1, 0, 1, 127})},
        {"index", tensor_of<int32_t>({3}, {std::numeric_limits<int32_t>::min(), 0, 2147483647})},
        {"bn.num_batches_tracked", tensor_of<int64_t>({}, {1234567890123456789})},
        {"steps", tensor_of<int64_t>({2}, {std::numeric_limits<int64_t>::min(), -1})},
    };
}

}  // namespace

TEST_CASE("round trip is bit-exact for every dtype, scalars and empty tensors, in the given order") {
    const NamedTensors tensors = all_kinds();
    const std::map<std::string, std::string> metadata{{"format", "pt"}, {"note", "ünïcödé, \"quotes\""}, {"empty", ""}};
    const std::vector<std::byte> bytes = serialize_safetensors(tensors, metadata);

    uint64_t header_size;
    std::memcpy(&header_size, bytes.data(), 8);
    CHECK((8 + header_size) % 8 == 0);  // the data starts aligned, as the reference writes it

    const SafetensorsFile file = parse_safetensors(bytes.data(), bytes.size(), "memory");
    REQUIRE(file.tensors.size() == tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
        CAPTURE(tensors[i].first);
        CHECK(file.tensors[i].first == tensors[i].first);
        CHECK(same_bits(file.tensors[i].second, tensors[i].second));
    }
    CHECK(file.metadata == metadata);
    CHECK(file.has("scale"));
    CHECK(file.get("scale").shape() == Shape{});
    CHECK(file.get("scale").item() == 0.125f);
    CHECK_FALSE(file.has("missing"));
    CHECK_THROWS_WITH_AS(file.get("missing"), doctest::Contains("'memory': no tensor 'missing'"), Error);

    // The same through a file, which holds exactly the serialized bytes.
    const fs::path folder = fresh_folder("round_trip");
    const std::string path = (folder / "all.safetensors").string();
    write_safetensors(path, tensors, metadata);
    const std::string written = file_text(path);
    CHECK(written.size() == bytes.size());
    CHECK(std::memcmp(written.data(), bytes.data(), bytes.size()) == 0);
    const SafetensorsFile from_disk = read_safetensors(path);
    CHECK(from_disk.source == path);
    REQUIRE(from_disk.tensors.size() == tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) CHECK(same_bits(from_disk.tensors[i].second, tensors[i].second));
    CHECK(folder_listing(folder) == std::vector<std::string>{"all.safetensors"});  // no temporary left over
    fs::remove_all(folder);
}

TEST_CASE("a view is written as its own elements only") {
    const Tensor rows = tensor_of<float>({3, 2}, {1, 2, 3, 4, 5, 6});
    const std::vector<std::byte> bytes = serialize_safetensors({{"middle", rows.slice0(1, 2)}});
    const SafetensorsFile file = parse_safetensors(bytes.data(), bytes.size(), "memory");
    CHECK(file.get("middle").shape() == Shape{1, 2});
    CHECK(file.get("middle").to_vector() == std::vector<float>{3, 4});
}

TEST_CASE("a file written by the independent Python writer reads with the right values") {
    const SafetensorsFile file = read_safetensors(HFQ_TEST_DATA_DIR "/safetensors_fixture.safetensors");

    // Tensors come in data order; the header lists them in reverse.
    std::vector<std::string> names;
    for (const auto& [name, t] : file.tensors) names.push_back(name);
    CHECK(names == std::vector<std::string>{"features.0.weight", "specials", "bn.num_batches_tracked", "f64", "bf16",
                                            "f16", "u8", "i16", "i8", "i32", "empty"});
    CHECK(file.metadata == std::map<std::string, std::string>{
                               {"format", "pt"}, {"producer", "tests/fixtures/make_safetensors_fixture.py"}});

    const Tensor& w = file.get("features.0.weight");
    CHECK(w.shape() == Shape{2, 3});
    for (int i = 0; i < 6; ++i) CHECK(w.f32()[i] == (i - 2.5f) * 0.5f);

    const float* s = file.get("specials").f32();
    CHECK(s[0] == std::numeric_limits<float>::infinity());
    CHECK(s[1] == -std::numeric_limits<float>::infinity());
    CHECK((s[2] == 0.0f && std::signbit(s[2])));
    CHECK(s[3] == std::numeric_limits<float>::denorm_min());
    CHECK(std::isnan(s[4]));

    const Tensor& steps = file.get("bn.num_batches_tracked");
    CHECK(steps.shape() == Shape{});
    CHECK(steps.data<int64_t>()[0] == 123456789012345);

    // Converted to f32 on reading.
    CHECK(file.get("f64").to_vector() == std::vector<float>{static_cast<float>(1.0 / 3.0), -2.5f, 0.0f});
    CHECK(file.get("bf16").shape() == Shape{2, 2});
    CHECK(file.get("bf16").to_vector() == std::vector<float>{1.0f, -0.5f, 3.140625f, std::ldexp(1.0f, 100)});
    CHECK(file.get("f16").to_vector() == std::vector<float>{1.0f, -2.0f, 65504.0f, std::ldexp(1.0f, -24)});
    CHECK(file.get("u8").to_vector() == std::vector<float>{0, 128, 255});
    CHECK(file.get("i16").to_vector() == std::vector<float>{-32768, 32767});

    const Tensor& i8 = file.get("i8");
    CHECK(std::vector<int8_t>(i8.data<int8_t>(), i8.data<int8_t>() + 4) == std::vector<int8_t>{-128, -1, 0, 127});
    const Tensor& i32 = file.get("i32");
    CHECK(i32.data<int32_t>()[0] == std::numeric_limits<int32_t>::min());
    CHECK(i32.data<int32_t>()[1] == std::numeric_limits<int32_t>::max());
    CHECK(file.get("empty").shape() == Shape{0, 3});
    CHECK(file.get("empty").dtype() == DType::f32);
}

TEST_CASE("half, bfloat16 and small integers convert to f32 exactly, including specials") {
    // F16: 1, -0, smallest subnormal 2^-24, largest subnormal 1023 * 2^-24,
    // smallest normal 2^-14, largest 65504, -inf, NaN.
    const std::vector<uint16_t> halves{0x3c00, 0x8000, 0x0001, 0x03ff, 0x0400, 0x7bff, 0xfc00, 0x7e00};
    // BF16: 1, -3, inf, smallest subnormal 2^-133.
    const std::vector<uint16_t> bf16{0x3f80, 0xc040, 0x7f80, 0x0001};
    std::vector<uint8_t> data(2 * (halves.size() + bf16.size()));
    std::memcpy(data.data(), halves.data(), 2 * halves.size());
    std::memcpy(data.data() + 2 * halves.size(), bf16.data(), 2 * bf16.size());
    for (uint8_t u : {0, 200, 255}) data.push_back(u);
    for (int16_t v : {-32768, -1, 32767}) {
        data.push_back(static_cast<uint8_t>(v & 0xff));
        data.push_back(static_cast<uint8_t>((v >> 8) & 0xff));
    }
    const std::string header = R"({"h":{"dtype":"F16","shape":[8],"data_offsets":[0,16]},)"
                               R"("b":{"dtype":"BF16","shape":[4],"data_offsets":[16,24]},)"
                               R"("u":{"dtype":"U8","shape":[3],"data_offsets":[24,27]},)"
                               R"("s":{"dtype":"I16","shape":[3],"data_offsets":[27,33]}})";
    const std::vector<std::byte> bytes = file_image(header, data);
    const SafetensorsFile file = parse_safetensors(bytes.data(), bytes.size(), "converted");

    const std::vector<float> h = file.get("h").to_vector();
    CHECK(h[0] == 1.0f);
    CHECK((h[1] == 0.0f && std::signbit(h[1])));
    CHECK(h[2] == std::ldexp(1.0f, -24));
    CHECK(h[3] == std::ldexp(1023.0f, -24));
    CHECK(h[4] == std::ldexp(1.0f, -14));
    CHECK(h[5] == 65504.0f);
    CHECK(h[6] == -std::numeric_limits<float>::infinity());
    CHECK(std::isnan(h[7]));
    const std::vector<float> b = file.get("b").to_vector();
    CHECK(b[0] == 1.0f);
    CHECK(b[1] == -3.0f);
    CHECK(b[2] == std::numeric_limits<float>::infinity());
    CHECK(b[3] == std::ldexp(1.0f, -133));
    CHECK(file.get("u").to_vector() == std::vector<float>{0, 200, 255});
    CHECK(file.get("s").to_vector() == std::vector<float>{-32768, -1, 32767});
}

TEST_CASE("F64 values outside the f32 range are an error, infinities are not") {
    auto f64_file = [](double v) {
        std::vector<uint8_t> data(8);
        std::memcpy(data.data(), &v, 8);
        return file_image(R"({"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", data);
    };
    const std::vector<std::byte> big = f64_file(1e300);
    CHECK_THROWS_WITH_AS(parse_safetensors(big.data(), big.size(), "f64.safetensors"),
                         doctest::Contains("'f64.safetensors': tensor 'd': F64 element 0 = 1e+300 does not fit in f32"),
                         Error);
    const std::vector<std::byte> inf = f64_file(-std::numeric_limits<double>::infinity());
    CHECK(parse_safetensors(inf.data(), inf.size(), "inf").get("d").item() == -std::numeric_limits<float>::infinity());
}

TEST_CASE("every kind of corrupt header is rejected, naming the file, the tensor and the problem") {
    const std::string w = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
    REQUIRE(parse_error(file_image(w, std::vector<uint8_t>(8))).empty());  // the base case is valid

    struct Case {
        std::string header;
        size_t data_bytes;
        std::vector<std::string> expected;  // substrings of the message
    };
    const auto entry = [](const std::string& body) { return R"({"w":{)" + body + "}}"; };
    const std::string dtype_shape = R"("dtype":"F32","shape":[2],)";
    const std::vector<Case> cases = {
        {"", 0, {"not valid JSON"}},
        {R"({"w":)", 0, {"not valid JSON"}},
        {"{\"\xff\":1}", 0, {"not valid JSON"}},  // not UTF-8
        {"[1,2]", 0, {"the header is a JSON array, not an object"}},
        {R"({"w":3})", 0, {"tensor 'w'", "entry is a JSON number, not an object"}},
        {entry(R"("shape":[2],"data_offsets":[0,8])"), 8, {"tensor 'w'", "\"dtype\" is missing"}},
        {entry(R"("dtype":7,"shape":[2],"data_offsets":[0,8])"), 8, {"tensor 'w'", "\"dtype\" is not a string"}},
        {entry(R"("dtype":"Q7","shape":[2],"data_offsets":[0,8])"), 8, {"tensor 'w'", "unsupported dtype \"Q7\""}},
        {entry(R"("dtype":"BOOL","shape":[2],"data_offsets":[0,2])"), 2, {"tensor 'w'", "unsupported dtype \"BOOL\""}},
        {entry(R"("dtype":"F32","data_offsets":[0,8])"), 8, {"tensor 'w'", "\"shape\" is missing"}},
        {entry(R"("dtype":"F32","shape":2,"data_offsets":[0,8])"), 8, {"tensor 'w'", "\"shape\" is not an array"}},
        {entry(R"("dtype":"F32","shape":[2.0],"data_offsets":[0,8])"),
         8,
         {"tensor 'w'", "shape dimension 2.0 is not an integer"}},
        {entry(R"("dtype":"F32","shape":["2"],"data_offsets":[0,8])"), 8, {"tensor 'w'", "is not an integer"}},
        {entry(R"("dtype":"F32","shape":[-2],"data_offsets":[0,8])"),
         8,
         {"tensor 'w'", "shape dimension -2 is negative"}},
        {entry(R"("dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,8])"),
         8,
         {"tensor 'w'", "shape dimension 9223372036854775808 is too large"}},
        {entry(R"("dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8])"),
         8,
         {"tensor 'w'", "more elements than fit in 64 bits"}},
        {entry(R"("dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,8])"),
         8,
         {"tensor 'w'", "more bytes than fit in 64 bits"}},
        {entry(R"("dtype":"F32","shape":[2])"), 8, {"tensor 'w'", "\"data_offsets\" is missing"}},
        {entry(dtype_shape + R"("data_offsets":[0])"), 8, {"tensor 'w'", "\"data_offsets\" is not [begin, end]"}},
        {entry(dtype_shape + R"("data_offsets":[0,"8"])"),
         8,
         {"tensor 'w'", "data_offsets end \"8\" is not an integer"}},
        {entry(dtype_shape + R"("data_offsets":[-1,7])"), 8, {"tensor 'w'", "data_offsets begin -1 is negative"}},
        {entry(dtype_shape + R"("data_offsets":[8,0])"), 8, {"tensor 'w'", "end before they begin"}},
        {entry(dtype_shape + R"("data_offsets":[0,16])"),
         8,
         {"tensor 'w'", "data_offsets [0, 16] lie outside the data buffer of 8 bytes"}},
        {entry(dtype_shape + R"("data_offsets":[0,18446744073709551615])"),
         8,
         {"tensor 'w'", "outside the data buffer"}},
        {entry(R"("dtype":"F32","shape":[3],"data_offsets":[0,8])"),
         8,
         {"tensor 'w'", "data_offsets [0, 8] hold 8 bytes, but shape [3] of F32 needs 12"}},
        {entry(dtype_shape + R"("data_offsets":[0,8],"extra":1)"), 8, {"tensor 'w'", "unknown field 'extra'"}},
        {entry(R"("dtype":"F32","shape":[[2]],"data_offsets":[0,8])"), 8, {"'w'", "nested deeper"}},
        {entry(R"("dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8])"), 8, {"'w'", "duplicate key 'dtype'"}},
        {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
         16,
         {"duplicate tensor name 'w'"}},
        // The data buffer must be covered exactly.
        {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
         12,
         {"tensor 'b'", "overlap tensor 'a', which ends at 8"}},
        {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
         12,
         {"tensor 'b'", "bytes [4, 8)", "(a gap)"}},
        {entry(dtype_shape + R"("data_offsets":[4,12])"), 12, {"tensor 'w'", "bytes [0, 4)", "(a gap)"}},
        {w, 12, {"the data buffer has 12 bytes, but the tensors cover 8 (4 trailing bytes"}},
        {"{}", 4, {"the data buffer has 4 bytes, but the tensors cover 0"}},
        // Metadata: an object of strings.
        {R"({"__metadata__":[1]})", 0, {"\"__metadata__\" is not an object"}},
        {R"({"__metadata__":{"epoch":3}})", 0, {"\"__metadata__\" value of 'epoch' is not a string but 3"}},
    };
    for (const Case& c : cases) {
        CAPTURE(c.header);
        const std::string message = parse_error(file_image(c.header, std::vector<uint8_t>(c.data_bytes)));
        CAPTURE(message);
        CHECK(contains(message, "safetensors 'bad.safetensors': "));
        for (const std::string& part : c.expected) CHECK(contains(message, part));
    }
}

TEST_CASE("bad lengths are rejected without reading or allocating what the header claims") {
    CHECK(contains(parse_error({}), "'bad.safetensors': the file is 0 bytes, too short for the 8-byte header length"));
    CHECK(contains(parse_error(std::vector<std::byte>(7)), "the file is 7 bytes, too short"));

    std::vector<std::byte> bytes = file_image("{}", {});
    const uint64_t past_the_end = 3;
    std::memcpy(bytes.data(), &past_the_end, 8);
    CHECK(contains(parse_error(bytes), "'bad.safetensors': the header length 3 exceeds the 2 bytes that follow it"));
    const uint64_t absurd = uint64_t(1) << 62;
    std::memcpy(bytes.data(), &absurd, 8);
    CHECK(contains(parse_error(bytes), "the header length 4611686018427387904 is absurd"));
}

TEST_CASE("every truncation, extension and byte change of a valid file is handled cleanly") {
    const std::vector<std::byte> valid =
        serialize_safetensors({{"a", tensor_of<float>({2}, {1, 2})}, {"n", tensor_of<int64_t>({}, {7})}}, {{"k", "v"}});
    REQUIRE(parse_error(valid).empty());
    // Each prefix is copied into a buffer of exactly its size, so the
    // sanitizer build catches any read past the end.
    for (size_t n = 0; n < valid.size(); ++n) {
        CAPTURE(n);
        const std::vector<std::byte> prefix(valid.begin(), valid.begin() + n);
        CHECK_FALSE(parse_error(prefix).empty());
    }
    std::vector<std::byte> longer = valid;
    longer.push_back(std::byte{0});
    CHECK(contains(parse_error(longer), "1 trailing bytes"));

    // Any single changed byte either still parses or throws hfq::Error;
    // nothing else may escape.
    size_t rejected = 0;
    for (size_t i = 0; i < valid.size(); ++i) {
        for (uint8_t value : {0x00, 0x22, 0x7b, 0xff}) {
            std::vector<std::byte> changed = valid;
            changed[i] = std::byte{value};
            CAPTURE(i);
            CHECK_NOTHROW(rejected += !parse_error(changed).empty());
        }
    }
    CHECK(rejected > valid.size());  // the header bytes are sensitive
}

TEST_CASE("the writer rejects names it could not write back") {
    const Tensor t = tensor_of<float>({1}, {1});
    CHECK_THROWS_WITH_AS(serialize_safetensors({{"a", t}, {"a", t}}), doctest::Contains("duplicate tensor name 'a'"),
                         Error);
    CHECK_THROWS_WITH_AS(serialize_safetensors({{"", t}}), doctest::Contains("a tensor name is empty"), Error);
    CHECK_THROWS_WITH_AS(serialize_safetensors({{"__metadata__", t}}), doctest::Contains("is reserved"), Error);
    CHECK_THROWS_WITH_AS(serialize_safetensors({{"u", Tensor()}}), doctest::Contains("tensor 'u' is undefined"), Error);
    CHECK_THROWS_WITH_AS(serialize_safetensors({{"\xff", t}}), doctest::Contains("not valid UTF-8"), Error);

    // A rejected write names the path and leaves the old file alone.
    const fs::path folder = fresh_folder("writer_rejects");
    const std::string path = (folder / "model.safetensors").string();
    write_safetensors(path, {{"a", t}});
    const std::string before = file_text(path);
    CHECK_THROWS_WITH_AS(write_safetensors(path, {{"a", t}, {"a", t}}),
                         message_with("duplicate tensor name 'a' (writing '" + path + "')"), Error);
    CHECK(file_text(path) == before);
    fs::remove_all(folder);
}

TEST_CASE("reading a missing file or a folder names the path") {
    const fs::path folder = fresh_folder("read_errors");
    const std::string missing = (folder / "missing.safetensors").string();
    CHECK_THROWS_WITH_AS(read_safetensors(missing),
                         message_with("cannot open '" + missing + "': No such file or directory"), Error);
    CHECK_THROWS_WITH_AS(read_safetensors(folder.string()),
                         message_with("cannot read '" + folder.string() + "': Is a directory"), Error);
    fs::remove_all(folder);
}

TEST_CASE("atomic writes replace the whole file or fail leaving it intact") {
    const fs::path folder = fresh_folder("atomic");
    const std::string path = (folder / "notes.txt").string();
    write_file_atomically(path, std::string("first version"));
    CHECK(file_text(path) == "first version");
    write_file_atomically(path, std::string("second"));
    CHECK(file_text(path) == "second");
    CHECK(read_file_bytes(path).size() == 6);

    SUBCASE("a folder that does not exist") {
        const std::string nowhere = (folder / "no_such_folder" / "x.safetensors").string();
        CHECK_THROWS_WITH_AS(write_safetensors(nowhere, {{"a", Tensor::zeros({1})}}),
                             message_with("cannot write '" + nowhere + "'"), Error);
        CHECK_THROWS_WITH_AS(write_file_atomically(nowhere, std::string("x")),
                             doctest::Contains("No such file or directory"), Error);
    }
    SUBCASE("the disk fills up in the middle of the write") {
        // A file size limit makes write() fail with EFBIG part-way, as a full
        // disk would (also for root, unlike a read-only folder).
        rlimit old_limit{};
        REQUIRE(getrlimit(RLIMIT_FSIZE, &old_limit) == 0);
        rlimit small = old_limit;
        small.rlim_cur = 100;
        const auto old_handler = signal(SIGXFSZ, SIG_IGN);  // return EFBIG rather than kill
        REQUIRE(setrlimit(RLIMIT_FSIZE, &small) == 0);
        std::string message;
        try {
            write_safetensors(path, {{"big", Tensor::zeros({1000})}});
        } catch (const Error& e) {
            message = e.what();
        }
        setrlimit(RLIMIT_FSIZE, &old_limit);
        signal(SIGXFSZ, old_handler);
        CHECK(contains(message, "cannot write '" + path + "': writing"));
        CHECK(contains(message, "File too large"));
        CHECK(contains(message, "the previous file, if any, is unchanged"));
    }
    SUBCASE("the target is a folder, so the final rename fails") {
        const std::string occupied = (folder / "occupied").string();
        fs::create_directory(occupied);
        CHECK_THROWS_WITH_AS(write_file_atomically(occupied, std::string("x")),
                             message_with("cannot write '" + occupied + "': renaming over the target"), Error);
        CHECK(fs::is_directory(occupied));
        fs::remove(occupied);
    }
    // Whatever failed, the previous file is intact and no temporary is left.
    CHECK(file_text(path) == "second");
    CHECK(folder_listing(folder) == std::vector<std::string>{"notes.txt"});
    fs::remove_all(folder);
}
