#include "engine/replicas.h"

#include <vector>

#include "engine/check.h"

namespace hfq::replicas {

namespace {
SumFn g_sum;  // empty: a single process
bool g_sync_batch_norm = false;
int g_replicas = 1;
IndexFn g_index;
}  // namespace

void install(SumFn sum, bool sync_batch_norm, int replicas, IndexFn index) {
    HFQ_CHECK(!sum || (replicas >= 1 && index), "replicas::install: a sum needs the replica count and an index");
    g_sum = std::move(sum);
    g_sync_batch_norm = g_sum && sync_batch_norm;
    g_replicas = g_sum ? replicas : 1;
    g_index = g_sum ? std::move(index) : IndexFn{};
}

bool active() { return static_cast<bool>(g_sum); }
bool sync_batch_norm() { return g_sync_batch_norm; }

void sum(double* values, int64_t count) {
    if (g_sum && count > 0) g_sum(values, count);
}

Rows rows_in_batch(int64_t local_rows) {
    if (!g_sum) return {0, local_rows};
    const int me = g_index();
    HFQ_CHECK(me >= 0 && me < g_replicas, "replicas: index ", me, " outside [0, ", g_replicas, ")");
    std::vector<double> rows(g_replicas, 0.0);  // every replica's count at its index (exact below 2^53)
    rows[me] = static_cast<double>(local_rows);
    sum(rows.data(), g_replicas);
    Rows r{0, 0};
    for (int i = 0; i < g_replicas; ++i) {
        if (i < me) r.offset += static_cast<int64_t>(rows[i]);
        r.total += static_cast<int64_t>(rows[i]);
    }
    return r;
}

}  // namespace hfq::replicas
