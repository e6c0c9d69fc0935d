// A blocking first-in first-out queue of bounded capacity that can be closed.
//
// The loader's producer pushes finished batches; the trainer pops them. Once
// closed (the loader is being destroyed), a waiting or later push returns false
// at once instead of blocking, so shutting down never hangs on a full queue.
// (tbb::concurrent_bounded_queue::abort only wakes the calls already waiting,
// which leaves a race with a push that starts just after it.)
#pragma once
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <mutex>

namespace hfq {

template <class T>
class BoundedQueue {
public:
    explicit BoundedQueue(size_t capacity) : capacity_(capacity) {}

    // Waits for room; false (item dropped) when the queue is closed.
    bool push(T item) {
        std::unique_lock lock(mutex_);
        not_full_.wait(lock, [&] { return closed_ || items_.size() < capacity_; });
        if (closed_) return false;
        items_.push_back(std::move(item));
        not_empty_.notify_one();
        return true;
    }

    // Waits for an item; false when the queue is closed and empty.
    bool pop(T& item) {
        std::unique_lock lock(mutex_);
        not_empty_.wait(lock, [&] { return closed_ || !items_.empty(); });
        if (items_.empty()) return false;
        item = std::move(items_.front());
        items_.pop_front();
        not_full_.notify_one();
        return true;
    }

    void close() {
        std::lock_guard lock(mutex_);
        closed_ = true;
        not_full_.notify_all();
        not_empty_.notify_all();
    }

private:
    const size_t capacity_;
    std::mutex mutex_;
    std::condition_variable not_full_, not_empty_;
    std::deque<T> items_;
    bool closed_ = false;
};

}  // namespace hfq
