// fork() and the CPU kernels. OpenMP's thread team does not survive fork(): in the child of
// a process whose OpenMP threads have run, the first parallel region waits forever for
// threads that exist only in the parent (libgomp). A preloading server (gunicorn --preload,
// multiprocessing with fork) does exactly this with a loaded model. pthread_atfork marks
// the child, and every CPU op's entry calls before_cpu_op(), which then puts ATen on one
// thread before anything parallel runs: the op, and the ATen ops inside it, finish.
// (seqfuse/__init__.py does the same from Python's fork hook, for torch's own ops too.)
#pragma once

namespace seqfuse {

// True in a process forked from one that loaded seqfuse.
bool in_forked_child();

// At each CPU op's entry: in a forked child, one ATen thread (set again if it was raised:
// the team is gone for good).
void before_cpu_op();

}  // namespace seqfuse
