// CPU GRU cell, linear layers and the fused classifier / actor / cascaded heads.
#pragma once

#include <cstdint>
#include <vector>

#include "gemm.h"
#include "large_pages.h"

namespace gfn::cpu {

/// A weight matrix converted once to the kernel layout (float32 or float16 storage).
class PackedMatrix {
 public:
  PackedMatrix() = default;
  /// Copies `src` (rows x cols, row-major float32); `row_order[i]` is the source row of
  /// packed row i (identity when empty).
  PackedMatrix(const float* src, int64_t rows, int64_t cols, WType type,
               const std::vector<int64_t>& row_order = {});

  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  WType type() const { return type_; }
  WeightView view() const;
  int64_t nbytes() const;
  /// Row r as float32 (test / debugging helper).
  std::vector<float> row(int64_t r) const;

 private:
  int64_t rows_ = 0, cols_ = 0;
  WType type_ = WType::kF32;
  std::vector<float, LargePageAllocator<float>> f32_;
  std::vector<uint16_t, LargePageAllocator<uint16_t>> f16_;
};

/// y = W x + b (optionally ReLU) for a batch, rows split over the thread pool.
/// `x[b]` points at batch item b (cols floats); out is nb x rows.
void linear_forward(const WeightView& w, int64_t rows, int64_t cols, const float* bias,
                    const float* const* x, int64_t nb, float* out, bool relu);

/// Softmax maximum probability and argmax (the rule of common/argmax.h) of each row of logits.
void softmax_stats(const float* logits, int64_t nb, int64_t classes, float* maxprob,
                   int32_t* argmax);

/// A PyTorch GRU cell (gate order r, z, n) with weights packed unit by unit.
class GruCell {
 public:
  GruCell() = default;
  GruCell(const float* w_ih, const float* w_hh, const float* b_ih, const float* b_hh,
          int64_t input, int64_t hidden, WType type);

  int64_t input_size() const { return input_; }
  int64_t hidden_size() const { return hidden_; }
  int64_t nbytes() const { return w_ih_.nbytes() + w_hh_.nbytes(); }
  WType type() const { return w_ih_.type(); }

  /// h_new = GRUCell(x, h) for nb rows; h may be null (zero state: W_hh h is skipped).
  void step(const float* x, const float* h, int64_t nb, float* h_new) const;

 private:
  int64_t input_ = 0, hidden_ = 0;
  PackedMatrix w_ih_, w_hh_;      // packed rows: 3 * j + gate
  std::vector<float> b_ih_, b_hh_;  // same order
};

/// A linear layer with packed weights.
class Linear {
 public:
  Linear() = default;
  Linear(const float* w, const float* b, int64_t out_features, int64_t in_features, WType type);
  int64_t in_features() const { return w_.cols(); }
  int64_t out_features() const { return w_.rows(); }
  WType type() const { return w_.type(); }
  const PackedMatrix& weight() const { return w_; }
  const float* bias() const { return b_.data(); }
  void forward(const float* const* x, int64_t nb, float* out, bool relu) const;

 private:
  PackedMatrix w_;
  std::vector<float> b_;
};

/// Cascaded classifiers: layer with in_features = k * F takes [f_0, ..., f_{k-1}].
///
/// Features live in a (T, N, F) buffer (`tnf`) or an (N, T, F) buffer; the concatenation
/// is never materialised: each F-column block of the weight multiplies its step feature.
void cascaded_forward(const Linear& layer, int64_t k, const float* features, bool tnf,
                      int64_t steps, int64_t nb, int64_t feature_dim, float* logits);

/// Pointers to the rows of a row-major (rows, cols) matrix (the batch form Linear takes).
std::vector<const float*> row_pointers(const float* base, int64_t rows, int64_t cols);

/// Classifier head after its GRU step: logits = head(h) for nb rows of hidden state h, then
/// the softmax maximum and argmax of each row.
void classifier_head(const Linear& head, const float* h, int64_t nb, float* logits, float* maxprob,
                     int32_t* argmax);

/// Actor head after its GRU step: action = sigmoid(head(h)) (nb x 2), coords = the patch
/// coordinates of the action for patches `range` = S - P positions apart (gates.h).
void actor_head(const Linear& head, const float* h, int64_t nb, int range, float* action, int32_t* coords);

}  // namespace gfn::cpu
