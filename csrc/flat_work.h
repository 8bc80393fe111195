// Work over many tensors as one index space: every kernel of the CPU backend splits the entries of
// ALL its tensors into contiguous per-thread ranges (at::parallel_for), so 8 large tensors and 800
// small ones both keep every core busy, and a thread's range crosses only a few tensor boundaries.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace gmt {

// Entries of the index space handed to one thread at a time: small enough that two cores balance
// on 8 x 2^22 entries, large enough that per-range set-up (flushing a histogram) is noise.
constexpr int64_t kGrain = int64_t(1) << 16;

// A list of tensor sizes laid end to end: item i holds global indices [start[i], start[i+1]).
class FlatIndex {
 public:
  explicit FlatIndex(const std::vector<int64_t>& sizes) : start_(sizes.size() + 1, 0) {
    for (size_t i = 0; i < sizes.size(); ++i) start_[i + 1] = start_[i] + sizes[i];
  }
  int64_t total() const { return start_.back(); }

  // Calls fn(item, first, last) for the part [first, last) (local indices) of each item that
  // overlaps the global range [begin, end), in order.
  template <class Fn>
  void for_each_piece(int64_t begin, int64_t end, Fn&& fn) const {
    size_t item = std::upper_bound(start_.begin(), start_.end(), begin) - start_.begin() - 1;
    for (; item + 1 < start_.size() && start_[item] < end; ++item) {
      int64_t lo = std::max(begin, start_[item]), hi = std::min(end, start_[item + 1]);
      if (lo < hi) fn(item, lo - start_[item], hi - start_[item]);
    }
  }

 private:
  std::vector<int64_t> start_;
};

// Adds to a counter that other threads may add to at the same time.
inline void atomic_add(int64_t* counter, int64_t value) {
  __atomic_fetch_add(counter, value, __ATOMIC_RELAXED);
}

}  // namespace gmt
