// Grid sizes of the CUDA launches. Every kernel that covers n elements (or rows, or batch
// tiles) loops over them with int64 indices, striding by the grid, so the grid need not hold
// one block per element: capped_blocks() gives one block per `per_block` elements up to
// kMaxGridBlocks, a count that fits any grid dimension, whatever n is. Host code without a CUDA
// header, so that a CPU build can test it.
#pragma once

#include <algorithm>
#include <cstdint>

namespace gfn {

/// Most blocks of a launch along one grid dimension (the limit of grid.y and grid.z; grid.x
/// allows more, but a grid-stride loop does not need them).
constexpr int64_t kMaxGridBlocks = 65535;

/// Blocks for `n` elements at `per_block` elements a block: ceil(n / per_block), at least 1
/// (a launch needs one; the loop then does nothing) and at most kMaxGridBlocks (the loop
/// strides over the rest).
inline unsigned capped_blocks(int64_t n, int64_t per_block) {
  if (n <= 0 || per_block <= 0) return 1;
  return static_cast<unsigned>(std::min<int64_t>((n - 1) / per_block + 1, kMaxGridBlocks));
}

}  // namespace gfn
