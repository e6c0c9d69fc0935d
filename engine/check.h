// Error reporting: every bad input becomes an hfq::Error whose message names
// the operation (or file) and what was wrong, never a crash or a silent
// wrong answer.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace hfq {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Concatenates any streamable values into one message.
template <class... Parts>
std::string cat(const Parts&... parts) {
    std::ostringstream s;
    (s << ... << parts);
    return s.str();
}

}  // namespace hfq

// HFQ_CHECK(cond, "op_name: ", details...) throws hfq::Error with the message
// when cond is false.
#define HFQ_CHECK(cond, ...)                                      \
    do {                                                          \
        if (!(cond)) throw ::hfq::Error(::hfq::cat(__VA_ARGS__)); \
    } while (0)
