#include <doctest/doctest.h>

#include <cstdlib>

#include "tests/test_train_util.h"

TEST_CASE("experiment: make images") {
    const char* dir = std::getenv("HFQ_EXP_DIR");
    if (dir) hfq::test::make_image_folder(std::string(dir) + "/images");
}
