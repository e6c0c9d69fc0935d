// MetricsLog: JSON lines appended and flushed as they happen; a file whose
// last line was cut by a killed run gets that line ended before the next record.
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <string>

#include "tests/test_data_util.h"
#include "train/metrics.h"

using namespace hfq;

TEST_CASE("MetricsLog appends one line per record, flushed at once; NaN becomes null") {
    test::TempDir dir;
    const std::string path = dir / "metrics.jsonl";
    {
        MetricsLog log(path);
        log.write({{"type", "start"}, {"step", 0}});
        CHECK(test::read_text(path) == "{\"type\":\"start\",\"step\":0}\n");  // flushed before the log closes
        log.write({{"loss", std::nan("")}});
    }
    MetricsLog again(path);
    again.write({{"type", "resume"}});
    CHECK(test::read_text(path) == "{\"type\":\"start\",\"step\":0}\n{\"loss\":null}\n{\"type\":\"resume\"}\n");
}

TEST_CASE("MetricsLog after a killed run: the broken last line is ended, the next record starts its own line") {
    test::TempDir dir;
    const std::string path = dir / "metrics.jsonl";
    std::ofstream(path) << "{\"type\":\"start\"}\n{\"type\":\"st";
    MetricsLog log(path);
    log.write({{"type", "resume"}});
    CHECK(test::read_text(path) == "{\"type\":\"start\"}\n{\"type\":\"st\n{\"type\":\"resume\"}\n");
}

TEST_CASE("MetricsLog: a folder that cannot hold the file is an error naming it") {
    test::TempDir dir;
    const std::string path = dir / "missing/metrics.jsonl";
    CHECK_THROWS_WITH_AS(MetricsLog{path}, doctest::Contains(path.c_str()), Error);
}
