#include "parallel.h"

#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fluid {
namespace {

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // leaked on purpose: no join at interpreter exit
    return *pool;
  }

  void run(int64_t n, int nthreads, const std::function<void(int64_t, int64_t)>& fn) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one parallel region at a time
    ensure_workers(nthreads - 1);
    const int64_t chunks = std::min<int64_t>(n, nthreads);
    std::exception_ptr first_error;
    std::mutex err_mutex;
    auto do_chunk = [&](int64_t c) {
      int64_t b = n * c / chunks, e = n * (c + 1) / chunks;
      try {
        fn(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> g(err_mutex);
        if (!first_error) first_error = std::current_exception();
      }
    };
    {
      std::unique_lock<std::mutex> lk(mutex_);
      task_ = do_chunk;
      next_chunk_ = 1;  // chunk 0 is run by the caller
      total_chunks_ = chunks;
      pending_ = chunks - 1;
      ++generation_;
    }
    cv_.notify_all();
    do_chunk(0);
    {
      std::unique_lock<std::mutex> lk(mutex_);
      done_cv_.wait(lk, [&] { return pending_ == 0; });
      task_ = nullptr;
    }
    if (first_error) std::rethrow_exception(first_error);
  }

 private:
  void ensure_workers(int want) {
    while (nworkers_ < want) {
      std::thread([this] { worker_loop(); }).detach();
      ++nworkers_;
    }
  }
  void worker_loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mutex_);
    for (;;) {
      cv_.wait(lk, [&] { return generation_ != seen && next_chunk_ < total_chunks_; });
      seen = generation_;
      while (next_chunk_ < total_chunks_) {
        int64_t c = next_chunk_++;
        auto task = task_;
        lk.unlock();
        task(c);
        lk.lock();
        if (--pending_ == 0) done_cv_.notify_all();
      }
    }
  }

  std::mutex run_mutex_, mutex_;
  std::condition_variable cv_, done_cv_;
  int nworkers_ = 0;
  std::function<void(int64_t)> task_;
  int64_t next_chunk_ = 0, total_chunks_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace

void parallel_for(int64_t n, int nthreads, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (nthreads <= 1 || n == 1) {
    fn(0, n);
    return;
  }
  Pool::get().run(n, nthreads, fn);
}

}  // namespace fluid
