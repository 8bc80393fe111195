// The layout shared with gmt_kernels/radix.py: histogram and state columns, key formats, and the
// sample's block hash. Each constant here has its namesake there; tests/test_cpu_backend.py checks
// that they agree.
#pragma once

#include <cstdint>
#include <string>

namespace gmt {
namespace radix {

constexpr int kRadixBits = 12;
constexpr int64_t kBins = int64_t(1) << kRadixBits;
constexpr int64_t kAbove = kBins, kNonfinite = kBins + 1, kHistColumns = kBins + 2;

enum StateColumn : int64_t { LO, LAST, SHIFT, SAMPLE, DONE, K, NUMEL, SLACK, KNOWN_LO, KNOWN_LAST, kStateColumns };

constexpr int64_t kSampleBlock = 64;
constexpr double kSampleSigmas = 4.0, kSampleDesignEffect = double(kSampleBlock);

// mantissa_bits == 0: integer keys (u32, the random score), none of them non-finite: inf_key is
// above every key.
struct KeyFormat {
  const char* name;
  int key_bits;
  int mantissa_bits;
  uint64_t key_max() const { return (uint64_t(1) << key_bits) - 1; }
  uint64_t inf_key() const {
    if (mantissa_bits == 0) return key_max() + 1;
    return ((uint64_t(1) << (key_bits - mantissa_bits)) - 1) << mantissa_bits;
  }
};
constexpr KeyFormat kFormats[] = {{"f16", 15, 10}, {"bf16", 15, 7}, {"f32", 31, 23}, {"f64", 63, 52}, {"u32", 32, 0}};

inline const KeyFormat* find_format(const std::string& name) {
  for (const auto& f : kFormats) {
    if (name == f.name) return &f;
  }
  return nullptr;
}

// radix.sampled_blocks: block j of the tensor with index t in the call has hash
// h(j) = ((j mod 2^31) * 0x9E3779B1 + (t mod 2^31) * 0x85EBCA77) mod 2^32, so h(j + i) = h(j) + i * kStep
// while j + i stays below the next multiple of 2^31, and it is sampled at 1 / 2**log2 if the top
// log2 bits of h(j) are zero.
struct BlockHash {
  static constexpr uint32_t kStep = 0x9E3779B1u;
  uint32_t h;
  BlockHash(uint64_t block, uint64_t tensor_index)
      : h(uint32_t((block & 0x7fffffffu) * kStep + (tensor_index & 0x7fffffffu) * 0x85EBCA77u)) {}
};

}  // namespace radix
}  // namespace gmt
