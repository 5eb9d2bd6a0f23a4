#include "fork_safety.h"

#include <ATen/Parallel.h>

#include <atomic>

#include <pthread.h>

namespace seqfuse {
namespace {

// The one piece of process-wide state in csrc/, and process-wide on purpose: a fork is.
// process-wide: set once in a forked child, never cleared.
std::atomic<bool>& forked_flag() {
  static std::atomic<bool> flag{false};  // process-wide
  return flag;
}

void mark_forked_child() { forked_flag().store(true, std::memory_order_relaxed); }

// Registered when the library loads (only an atomic store runs in the child's handler:
// it must be async-signal-safe).
const int kAtforkRegistered = pthread_atfork(nullptr, nullptr, mark_forked_child);

}  // namespace

bool in_forked_child() { return forked_flag().load(std::memory_order_relaxed); }

void before_cpu_op() {
  if (in_forked_child() && at::get_num_threads() > 1) at::set_num_threads(1);
}

}  // namespace seqfuse
