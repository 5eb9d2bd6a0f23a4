// A barrier between the threads that share one recurrence. A fork/join per time step
// costs tens of microseconds (thread wake-up); threads that stay inside one parallel
// region and spin on a counter pay well under a microsecond per step.
//
// The counter counts *work parts*, not threads: each thread adds the number of parts it
// finished. A team that turns out smaller than planned (nested parallelism runs the
// whole range on one thread) still completes every step, so the barrier cannot hang.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace seqfuse {

class PartBarrier {
 public:
  explicit PartBarrier(int64_t parts_per_round) : parts_(parts_per_round) {}

  void arrive(int64_t parts_done) { done_.fetch_add(parts_done, std::memory_order_acq_rel); }

  // Waits until `rounds` full rounds of parts have arrived.
  void wait_for_round(int64_t rounds) const {
    const int64_t target = rounds * parts_;
    int64_t spins = 0;
    while (done_.load(std::memory_order_acquire) < target) {
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#endif
      if (++spins > 4096) std::this_thread::yield();
    }
  }

 private:
  const int64_t parts_;
  std::atomic<int64_t> done_{0};
};

}  // namespace seqfuse
