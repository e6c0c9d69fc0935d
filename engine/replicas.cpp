#include "engine/replicas.h"

namespace hfq::replicas {

namespace {
SumFn g_sum;  // empty: a single process
bool g_sync_batch_norm = false;
}  // namespace

void install(SumFn sum, bool sync_batch_norm) {
    g_sum = std::move(sum);
    g_sync_batch_norm = g_sum && sync_batch_norm;
}

bool active() { return static_cast<bool>(g_sum); }
bool sync_batch_norm() { return g_sync_batch_norm; }

void sum(double* values, int64_t count) {
    if (g_sum && count > 0) g_sum(values, count);
}

}  // namespace hfq::replicas
