// CPU feature detection and the process-wide capability level (see cpu_capability.h).
#include "cpu_capability.h"

#include <atomic>
#include <stdexcept>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include "simd.h"

namespace gmt {
namespace cpu {
namespace {

bool cpu_has(Level level) {
  switch (level) {
    case Level::kDefault:
      return true;
    case Level::kNeon:
#ifdef GMT_SIMD_NEON
      return true;  // NEON (Advanced SIMD) is part of every AArch64 CPU
#else
      return false;
#endif
    case Level::kAvx2:
    case Level::kAvx512: {
#if defined(GMT_SIMD_X86)
      __builtin_cpu_init();
      // __builtin_cpu_supports also checks that the OS saves the vector registers (XGETBV).
      unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
      const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
      const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("popcnt") && f16c;
      if (level == Level::kAvx2) return avx2;
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
      return false;
#endif
    }
  }
  return false;
}

// The variants each kernel has in this build.
bool kernel_has(Kernel kernel, Level level) {
  if (level == Level::kDefault) return true;
  if (kernel == Kernel::kHistogramF64) return false;
  for (Level built : compiled_levels()) {
    if (built == level) return true;
  }
  return false;
}

Level best_supported() { return supported_levels().front(); }

std::atomic<int>& level_store() {
  static std::atomic<int> level{static_cast<int>(best_supported())};
  return level;
}

}  // namespace

const char* level_name(Level level) {
  switch (level) {
    case Level::kDefault: return "default";
    case Level::kNeon: return "neon";
    case Level::kAvx2: return "avx2";
    case Level::kAvx512: return "avx512";
  }
  return "?";
}

const char* kernel_name(Kernel kernel) {
  switch (kernel) {
    case Kernel::kMaskedAdamw: return "masked_adamw";
    case Kernel::kHistogramWhole: return "histogram_whole";
    case Kernel::kHistogramInterval: return "histogram_interval";
    case Kernel::kHistogramSample: return "histogram_sample";
    case Kernel::kHistogramF64: return "histogram_f64_keys";
    case Kernel::kHistogramGradOverWeight: return "histogram_grad_over_weight";
    case Kernel::kHistogramRandom: return "histogram_random";
    case Kernel::kMaskedAdamwGradOverWeight: return "masked_adamw_grad_over_weight";
    case Kernel::kMaskedAdamwRandom: return "masked_adamw_random";
    case Kernel::kMaskedAdamwStoredMask: return "masked_adamw_stored_mask";
    case Kernel::kCount: break;
  }
  return "?";
}

const char* known_level_names() { return "avx512, avx2, neon, default"; }

std::vector<Level> compiled_levels() {
  std::vector<Level> levels;
#ifdef GMT_SIMD_X86
  levels.push_back(Level::kAvx512);
  levels.push_back(Level::kAvx2);
#endif
#ifdef GMT_SIMD_NEON
  levels.push_back(Level::kNeon);
#endif
  levels.push_back(Level::kDefault);
  return levels;
}

std::vector<Level> supported_levels() {
  std::vector<Level> levels;
  for (Level level : compiled_levels()) {
    if (cpu_has(level)) levels.push_back(level);
  }
  return levels;
}

std::string supported_level_names() {
  std::string names;
  for (Level level : supported_levels()) names += std::string(names.empty() ? "" : ", ") + level_name(level);
  return names;
}

Level current_level() { return static_cast<Level>(level_store().load(std::memory_order_relaxed)); }

void set_level(const std::string& name) {
  for (Level level : {Level::kAvx512, Level::kAvx2, Level::kNeon, Level::kDefault}) {
    if (name != level_name(level)) continue;
    bool compiled = false;
    for (Level built : compiled_levels()) compiled = compiled || built == level;
    if (!compiled) {
      throw std::invalid_argument("CPU capability '" + name + "' is not compiled into this build of gmt_kernels (" +
                                  "it targets another architecture or compiler); possible here: " +
                                  supported_level_names() + ".");
    }
    if (!cpu_has(level)) {
      throw std::invalid_argument(
          "CPU capability '" + name + "' needs " +
          (level == Level::kAvx512 ? "AVX-512 F/BW/VL/DQ (with AVX2, FMA, F16C)" : "AVX2, FMA, F16C and POPCNT") +
          ", which this CPU lacks; possible here: " + supported_level_names() + ".");
    }
    level_store().store(static_cast<int>(level), std::memory_order_relaxed);
    return;
  }
  throw std::invalid_argument("unknown CPU capability '" + name + "'; the levels are " + known_level_names() +
                              ", and this CPU and build can run: " + supported_level_names() + ".");
}

Level kernel_level(Kernel kernel) {
  const Level now = current_level();
  for (Level level : compiled_levels()) {  // best first: the first variant not above `now`
    if (static_cast<int>(level) <= static_cast<int>(now) && kernel_has(kernel, level)) return level;
  }
  return Level::kDefault;
}

}  // namespace cpu
}  // namespace gmt
