// The process-wide memory of a busy machine (team_tasks.h): when the last time slice was
// lost, whether the layers run on one thread for now, and for how long the next busy
// spell sends them there.
#include "team_tasks.h"

#include <algorithm>

namespace seqfuse {
namespace {

int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

constexpr int64_t ns(std::chrono::nanoseconds d) { return d.count(); }

struct BusyMachine {
  std::atomic<int64_t> last_lost{INT64_MIN / 2};  // steady clock, ns
  std::atomic<int64_t> solo_until{0};
  std::atomic<int64_t> solo_for{ns(kSoloFor)};    // the next period's length
};

// Process-wide on purpose: whether the cores are busy is a fact about the machine, and
// every call should learn it from any call's late thread.
BusyMachine& busy_machine() {
  static BusyMachine memory;  // process-wide
  return memory;
}

}  // namespace

bool team_solo() { return steady_ns() < busy_machine().solo_until.load(std::memory_order_relaxed); }

void team_lost_time_slice() {
  BusyMachine& m = busy_machine();
  const int64_t now = steady_ns(), ended = m.solo_until.load(std::memory_order_relaxed);
  if (now < ended) return;  // already on one thread (a concurrent call lost one too)
  const bool probing = now - ended < ns(kSoloProbeWindow);
  // One lost slice alone is a hiccup; a second one soon after is a busy machine. Right
  // after a period on one thread, one is enough: the machine was busy a moment ago.
  if (now - m.last_lost.exchange(now, std::memory_order_relaxed) > ns(kLostWindow) && !probing) return;
  // Busy again right after a period on one thread: the next period is twice as long, as
  // each probe costs a time slice. Busy after a long quiet time: the first period again.
  int64_t period = m.solo_for.load(std::memory_order_relaxed);
  period = probing ? std::min(2 * period, ns(kSoloForMax)) : ns(kSoloFor);
  m.solo_for.store(period, std::memory_order_relaxed);
  m.solo_until.store(now + period, std::memory_order_relaxed);
}

}  // namespace seqfuse
