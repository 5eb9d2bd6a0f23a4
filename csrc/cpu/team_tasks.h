// The threads that share one recurrence, and what happens when one of them is late.
//
// Each part of a TeamPlan (recurrence.h) is a chain of tasks run in order: packing its
// weights, projecting its input, then one task per time step. A thread runs the parts it
// owns, and a task starts once the tasks it depends on are done (Sync: the part's own
// previous task, every part of its direction, or every part). Threads that stay inside one
// parallel region and poll counters pay well under a microsecond per step, where a
// fork/join per step costs tens of microseconds.
//
// A server process always has other busy threads, and a thread that loses its core loses
// it for a scheduler time slice (milliseconds): before this scheduler, its partners waited
// at the next step's barrier that long. Two defences:
//  * A task is *claimed* before it runs (a compare-and-swap on the part's count of claimed
//    tasks), so any thread may run any part's next task, exactly once. A thread that sees
//    another part's next task ready and unclaimed for longer than kTakeOverAfter (its owner
//    is not running) takes that part over, and the call goes on with fewer threads.
//    Ownership moves only on lateness, so while everyone keeps up each part's weights stay
//    in one core's L2.
//  * A taken-over part does not help when its thread lost the core in the middle of a task,
//    or when the caller's own thread did: the call still waits. So a call in which a team
//    thread was off its core for more than kLostFloor (and a quarter of the call: its wall
//    time in the region less its CPU time) lost a time slice, and a second such call within
//    kLostWindow puts the layers on one thread (TeamPlan asks team_solo()) for kSoloFor.
//    Within kSoloProbeWindow of a period's end one lost slice is enough, and the next
//    period is twice as long, up to kSoloForMax. With one core kept busy by another process, a
//    two-thread team at batch 1 loses a time slice in about one call of ten; one thread on
//    the free core loses almost none and is ~1.4x slower than two. The first call after
//    the period probes the team again. Short hiccups (a hypervisor's 100 us) change nothing.
//
// A team smaller than planned (nested parallelism runs the whole range on one thread) owns
// every part and still finishes, so no plan can hang.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <memory>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace seqfuse {

// What task t of a part waits for, besides the part's own task t - 1.
enum class Sync {
  kOwn,        // nothing else
  kDirection,  // every part of the same direction has done its task t - 1
  kAll,        // every part has done its task t - 1
};

// A ready task left unclaimed this long means its owner is not running: a step takes a
// few microseconds, a lost time slice milliseconds.
constexpr std::chrono::microseconds kTakeOverAfter{20};
// A team thread off its core this long (and a quarter of the call) lost a time slice.
constexpr std::chrono::microseconds kLostFloor{400};
// Two lost time slices this close make a busy machine: an idle one (a VM's hypervisor) loses
// about one a second.
constexpr std::chrono::milliseconds kLostWindow{50};
// How long a busy machine keeps the layers on one thread: kSoloFor, doubled (up to
// kSoloForMax) each time a call loses a time slice again within kSoloProbeWindow of the
// end of the last period (then one lost slice is enough).
constexpr std::chrono::milliseconds kSoloFor{100};
constexpr std::chrono::milliseconds kSoloForMax{1600};
constexpr std::chrono::milliseconds kSoloProbeWindow{1000};

// The calling thread's CPU time (ns): what it ran, not counting time off its core.
inline int64_t thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// True while the layers should run on one thread (team_tasks.cpp).
bool team_solo();
// Called after a call that lost a time slice to a late thread (two in kLostWindow: solo).
void team_lost_time_slice();

// Runs tasks [0, n_tasks) of every part p of [0, n_parts), each chain in order, with
// body(p, t), on one parallel region. Parts [k * parts_per_dir, (k + 1) * parts_per_dir)
// share a direction. sync(t) says what task t waits for.
template <typename SyncOf, typename Body>
void run_team_tasks(int64_t n_parts, int64_t parts_per_dir, int64_t n_tasks, const SyncOf& sync,
                    const Body& body) {
  if (n_parts <= 1) {
    for (int64_t t = 0; t < n_tasks; ++t) body(0, t);
    return;
  }
  using Clock = std::chrono::steady_clock;
  const Clock::time_point call_start = Clock::now();
  // `done` is what the partners poll while they wait; it has a cache line of its own, so
  // that claiming a task (written by the owner every step, read by the others only when
  // they look for a late owner) does not pull that line away from them once more a step.
  struct Chain {
    alignas(64) std::atomic<int64_t> done{0};  // tasks finished
    alignas(64) std::atomic<int64_t> claimed{0};  // tasks started
    std::atomic<int64_t> owner{-1};  // the thread (its first part index) that runs it
  };
  std::unique_ptr<Chain[]> chains(new Chain[n_parts]);
  // Per thread (indexed by its first part): how long it was off its core in the region.
  // Each slot is written by its thread only and read after the region's join.
  std::vector<int64_t> off_core_ns(n_parts, 0);

  auto deps_done = [&](int64_t p, int64_t t) {
    const Sync s = t == 0 ? Sync::kOwn : sync(t);
    if (s == Sync::kOwn) return true;
    const int64_t q0 = s == Sync::kAll ? 0 : p / parts_per_dir * parts_per_dir;
    const int64_t q1 = s == Sync::kAll ? n_parts : q0 + parts_per_dir;
    for (int64_t q = q0; q < q1; ++q)
      if (chains[q].done.load(std::memory_order_acquire) < t) return false;
    return true;
  };
  // The next task of part p if it can start now (nobody has claimed it, its dependencies
  // are done), else -1.
  auto startable = [&](int64_t p) -> int64_t {
    const int64_t t = chains[p].done.load(std::memory_order_acquire);
    if (t >= n_tasks || chains[p].claimed.load(std::memory_order_acquire) != t) return -1;
    return deps_done(p, t) ? t : -1;
  };
  auto finished = [&] {
    for (int64_t p = 0; p < n_parts; ++p)
      if (chains[p].done.load(std::memory_order_acquire) < n_tasks) return false;
    return true;
  };

  at::parallel_for(0, n_parts, 1, [&](int64_t p0, int64_t p1) {
    const int64_t me = p0;
    const Clock::time_point entered = Clock::now();
    const int64_t cpu_entered = thread_cpu_ns();
    // A thread arriving late (woken from sleep) takes its parts back from whoever ran
    // them meanwhile; later, parts move only on lateness.
    for (int64_t p = p0; p < p1; ++p) chains[p].owner.store(me, std::memory_order_release);
    auto try_run = [&](int64_t p) {
      int64_t t = startable(p);
      if (t < 0 || !chains[p].claimed.compare_exchange_strong(t, t + 1, std::memory_order_acq_rel))
        return false;
      body(p, t);
      chains[p].done.store(t + 1, std::memory_order_release);
      return true;
    };
    // Per other part: the task last seen ready and unclaimed, and since when.
    std::vector<int64_t> seen_task(n_parts, -1);
    std::vector<Clock::time_point> seen_at(n_parts);
    int64_t idle = 0;
    while (true) {
      bool ran = false;
      for (int64_t p = 0; p < n_parts; ++p)  // one task per owned part per pass: interleaved
        if (chains[p].owner.load(std::memory_order_relaxed) == me && try_run(p)) ran = true;
      if (ran) {
        idle = 0;
        continue;
      }
      if (finished()) break;
      ++idle;
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#endif
      if (idle % 32 != 0) continue;
      // Every 32 polls (about a microsecond): is another part's owner late?
      const Clock::time_point now = Clock::now();
      for (int64_t q = 0; q < n_parts; ++q) {
        int64_t owner = chains[q].owner.load(std::memory_order_relaxed);
        if (owner == me) continue;
        const int64_t t = startable(q);
        if (t < 0) {
          seen_task[q] = -1;
        } else if (seen_task[q] != t) {
          seen_task[q] = t;
          seen_at[q] = now;
        } else if (now - seen_at[q] > kTakeOverAfter) {
          chains[q].owner.compare_exchange_strong(owner, me, std::memory_order_acq_rel);
          seen_task[q] = -1;
        }
      }
      // Waiting long (more threads than cores): let the thread we wait for have the core.
      if (idle > 4096) std::this_thread::yield();
    }
    const int64_t wall = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - entered).count();
    off_core_ns[me] = std::max<int64_t>(wall - (thread_cpu_ns() - cpu_entered), 0);
  });

  const int64_t lost = *std::max_element(off_core_ns.begin(), off_core_ns.end());
  const int64_t floor = std::chrono::duration_cast<std::chrono::nanoseconds>(kLostFloor).count();
  if (lost > floor && 4 * lost > std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - call_start).count())
    team_lost_time_slice();
}

}  // namespace seqfuse
