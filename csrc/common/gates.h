// Activation and head arithmetic shared by the CPU loops and the CUDA kernels.
//
// The formulas follow PyTorch's CPU GRU cell (aten/src/ATen/native/RNN.cpp):
//   r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z),
//   n = tanh(gi_n + r * gh_n), h' = (h - n) * z + n,
// where gi = W_ih x + b_ih and gh = W_hh h + b_hh (gate order r, z, n).
#pragma once

#include <cmath>

#include "hd.h"

namespace gfn {

GFN_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/// One GRU hidden unit: gate pre-activations (biases included) and the old state.
GFN_HD float gru_unit(float gi_r, float gi_z, float gi_n, float gh_r, float gh_z,
                      float gh_n, float h) {
  const float r = sigmoid(gi_r + gh_r);
  const float z = sigmoid(gi_z + gh_z);
  const float n = tanhf(gi_n + r * gh_n);
  return (h - n) * z + n;
}

/// Patch coordinate from an actor output in [0, 1]: floor(action * (S - P)), in float32.
///
/// Matches `torch.floor(action * (S - P)).int()` for a float32 `action`; the result is
/// clamped to [0, range] so a value of exactly 1.0 (or a NaN) can never address memory
/// outside the image.
GFN_HD int patch_coord(float action, int range) {
  const float v = floorf(action * static_cast<float>(range));
  if (!(v >= 0.0f)) return 0;  // also catches NaN
  if (v > static_cast<float>(range)) return range;
  return static_cast<int>(v);
}

GFN_HD float relu(float x) { return x > 0.0f ? x : 0.0f; }

}  // namespace gfn
