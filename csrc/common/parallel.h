// A small persistent thread pool: parallel_for(n, nthreads, fn(begin, end)).
// Kernels run with the GIL released; the calling thread takes part in the work.
// We avoid OpenMP so that our runtime never fights the one bundled with PyTorch.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>

namespace fluid {

// Runs fn(i0, i1) over [0, n) split into contiguous chunks across up to `nthreads` threads.
// The first exception thrown by any chunk is re-thrown in the caller after all chunks end.
void parallel_for(int64_t n, int nthreads, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace fluid
