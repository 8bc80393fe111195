// The CPU capability (ISA level) the kernels of this extension run at, switchable at run time
// (GMT_KERNELS_CPU_CAPABILITY when the module loads, or gmt_kernels.backends.cpu.set_cpu_capability),
// and the one function every kernel asks which of its compiled variants to run: kernel_level.
// gmt_kernels.backends.cpu.kernel_capabilities() reports what kernel_level answers, so a test
// sees the path that really runs.
#pragma once

#include <string>
#include <vector>

namespace gmt {
namespace cpu {

// Ordered: a kernel runs the best variant it has at or below the level in use. NEON and the x86
// levels never meet in one build (a build targets one architecture).
enum class Level : int { kDefault = 0, kNeon = 1, kAvx2 = 2, kAvx512 = 3 };

// Each kernel that has per-ISA variants. kHistogramF64 is the histogram over 64-bit keys (float64
// gradients, or dtypes that meet in the f64 key format, any criterion): it has the portable variant
// only. The criteria of SEMANTICS.md section 8 are variants of their own: the histogram scoring
// grad_over_weight (f32 keys) or random (u32 keys, every pass kind), and the update scoring them or
// reading a stored mask.
enum class Kernel : int {
  kMaskedAdamw,
  kHistogramWhole,
  kHistogramInterval,
  kHistogramSample,
  kHistogramF64,
  kHistogramGradOverWeight,
  kHistogramRandom,
  kMaskedAdamwGradOverWeight,
  kMaskedAdamwRandom,
  kMaskedAdamwStoredMask,
  kCount
};

const char* level_name(Level level);
const char* kernel_name(Kernel kernel);
const char* known_level_names();  // "avx512, avx2, neon, default"

// Levels compiled into this build, best first (always ending with kDefault).
std::vector<Level> compiled_levels();
// Levels this CPU and this build can run, best first (always ending with kDefault).
std::vector<Level> supported_levels();
// "avx2, default": for error messages.
std::string supported_level_names();

Level current_level();
// Switches the level; throws std::invalid_argument (saying what is possible) for an unknown name
// or a level this CPU or build cannot run. The level is unchanged then.
void set_level(const std::string& name);

// The variant `kernel` runs at the current level: read once per call by each kernel.
Level kernel_level(Kernel kernel);

}  // namespace cpu
}  // namespace gmt
