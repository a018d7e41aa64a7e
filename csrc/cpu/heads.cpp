#include "heads.h"

#include <cmath>
#include <stdexcept>

#include "../common/argmax.h"
#include "../common/gates.h"
#include "../common/half.h"
#include "threadpool.h"

namespace gfn::cpu {

PackedMatrix::PackedMatrix(const float* src, int64_t rows, int64_t cols, WType type,
                           const std::vector<int64_t>& row_order)
    : rows_(rows), cols_(cols), type_(type) {
  const size_t n = static_cast<size_t>(rows * cols);
  if (type == WType::kF32) {
    f32_.resize(n);
  } else {
    f16_.resize(n);
  }
  parallel_for(rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t sr = row_order.empty() ? r : row_order[r];
      const float* s = src + sr * cols;
      if (type == WType::kF32) {
        float* d = f32_.data() + r * cols;
        for (int64_t c = 0; c < cols; ++c) d[c] = s[c];
      } else {
        uint16_t* d = f16_.data() + r * cols;
        for (int64_t c = 0; c < cols; ++c) d[c] = float_to_half(s[c]);
      }
    }
  });
}

WeightView PackedMatrix::view() const {
  WeightView v;
  v.type = type_;
  v.ld = cols_;
  v.data = type_ == WType::kF32 ? static_cast<const void*>(f32_.data())
                                : static_cast<const void*>(f16_.data());
  return v;
}

int64_t PackedMatrix::nbytes() const {
  return rows_ * cols_ * (type_ == WType::kF32 ? 4 : 2);
}

std::vector<float> PackedMatrix::row(int64_t r) const {
  std::vector<float> out(static_cast<size_t>(cols_));
  for (int64_t c = 0; c < cols_; ++c) {
    out[c] = type_ == WType::kF32 ? f32_[r * cols_ + c] : half_to_float(f16_[r * cols_ + c]);
  }
  return out;
}

void linear_forward(const WeightView& w, int64_t rows, int64_t cols, const float* bias,
                    const float* const* x, int64_t nb, float* out, bool relu) {
  // Small outputs (actor heads) are not worth a dispatch to the pool.
  const int64_t grain = rows * cols < (1 << 16) ? rows : 16;
  parallel_for(rows, grain, [&](int64_t b, int64_t e) {
    gemm_rows(w, 0, cols, b, e, x, nb, out, rows, false);
    for (int64_t i = 0; i < nb; ++i) {
      float* o = out + i * rows;
      for (int64_t r = b; r < e; ++r) {
        float v = o[r] + (bias ? bias[r] : 0.0f);
        o[r] = relu ? gfn::relu(v) : v;
      }
    }
  });
}

void softmax_stats(const float* logits, int64_t nb, int64_t classes, float* maxprob,
                   int32_t* argmax) {
  check_classes(classes);
  for (int64_t i = 0; i < nb; ++i) {
    const float* l = logits + i * classes;
    float m = l[0];
    int32_t am = 0;
    for (int64_t c = 1; c < classes; ++c) {
      if (argmax_takes(l[c], c, m, am)) {
        m = l[c];
        am = static_cast<int32_t>(c);
      }
    }
    float s = 0.0f;
    for (int64_t c = 0; c < classes; ++c) s += std::exp(l[c] - m);
    maxprob[i] = 1.0f / s;
    argmax[i] = am;
  }
}

namespace {

// Packed row 3 * j + g holds PyTorch row g * H + j (gates r, z, n of unit j together).
std::vector<int64_t> unit_major_order(int64_t hidden) {
  std::vector<int64_t> order(static_cast<size_t>(3 * hidden));
  for (int64_t j = 0; j < hidden; ++j) {
    for (int64_t g = 0; g < 3; ++g) order[3 * j + g] = g * hidden + j;
  }
  return order;
}

std::vector<float> reorder(const float* v, const std::vector<int64_t>& order) {
  std::vector<float> out(order.size(), 0.0f);
  if (v) {
    for (size_t i = 0; i < order.size(); ++i) out[i] = v[order[i]];
  }
  return out;
}

}  // namespace

GruCell::GruCell(const float* w_ih, const float* w_hh, const float* b_ih, const float* b_hh,
                 int64_t input, int64_t hidden, WType type)
    : input_(input), hidden_(hidden) {
  const auto order = unit_major_order(hidden);
  w_ih_ = PackedMatrix(w_ih, 3 * hidden, input, type, order);
  w_hh_ = PackedMatrix(w_hh, 3 * hidden, hidden, type, order);
  b_ih_ = reorder(b_ih, order);
  b_hh_ = reorder(b_hh, order);
}

void GruCell::step(const float* x, const float* h, int64_t nb, float* h_new) const {
  const int64_t H = hidden_;
  std::vector<float> gi(static_cast<size_t>(nb * 3 * H));
  std::vector<float> gh(h ? static_cast<size_t>(nb * 3 * H) : 0);
  std::vector<const float*> xs(static_cast<size_t>(nb)), hs(static_cast<size_t>(nb));
  for (int64_t b = 0; b < nb; ++b) {
    xs[b] = x + b * input_;
    hs[b] = h ? h + b * H : nullptr;
  }
  const WeightView wi = w_ih_.view(), wh = w_hh_.view();
  // Each task owns a range of hidden units: it streams their W_ih and W_hh rows once for
  // the whole batch and finishes the units right away (no barrier between the products).
  parallel_for(H, 16, [&](int64_t j0, int64_t j1) {
    gemm_rows(wi, 0, input_, 3 * j0, 3 * j1, xs.data(), nb, gi.data(), 3 * H, false);
    if (h) gemm_rows(wh, 0, H, 3 * j0, 3 * j1, hs.data(), nb, gh.data(), 3 * H, false);
    for (int64_t b = 0; b < nb; ++b) {
      const float* gib = gi.data() + b * 3 * H;
      const float* ghb = h ? gh.data() + b * 3 * H : nullptr;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t r = 3 * j;
        const float hr = ghb ? ghb[r] + b_hh_[r] : b_hh_[r];
        const float hz = ghb ? ghb[r + 1] + b_hh_[r + 1] : b_hh_[r + 1];
        const float hn = ghb ? ghb[r + 2] + b_hh_[r + 2] : b_hh_[r + 2];
        const float hprev = h ? h[b * H + j] : 0.0f;
        h_new[b * H + j] = gru_unit(gib[r] + b_ih_[r], gib[r + 1] + b_ih_[r + 1],
                                    gib[r + 2] + b_ih_[r + 2], hr, hz, hn, hprev);
      }
    }
  });
}

Linear::Linear(const float* w, const float* b, int64_t out_features, int64_t in_features,
               WType type)
    : w_(w, out_features, in_features, type),
      b_(b ? std::vector<float>(b, b + out_features)
           : std::vector<float>(static_cast<size_t>(out_features), 0.0f)) {}

void Linear::forward(const float* const* x, int64_t nb, float* out, bool relu) const {
  linear_forward(w_.view(), w_.rows(), w_.cols(), b_.data(), x, nb, out, relu);
}

std::vector<const float*> row_pointers(const float* base, int64_t rows, int64_t cols) {
  std::vector<const float*> p(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i) p[i] = base + i * cols;
  return p;
}

void classifier_head(const Linear& head, const float* h, int64_t nb, float* logits, float* maxprob,
                     int32_t* argmax) {
  const auto hs = row_pointers(h, nb, head.in_features());
  head.forward(hs.data(), nb, logits, false);
  softmax_stats(logits, nb, head.out_features(), maxprob, argmax);
}

void actor_head(const Linear& head, const float* h, int64_t nb, int range, float* action, int32_t* coords) {
  const auto hs = row_pointers(h, nb, head.in_features());
  head.forward(hs.data(), nb, action, false);
  for (int64_t i = 0; i < 2 * nb; ++i) {
    action[i] = sigmoid(action[i]);
    coords[i] = patch_coord(action[i], range);
  }
}

void cascaded_forward(const Linear& layer, int64_t k, const float* features, bool tnf,
                      int64_t steps, int64_t nb, int64_t feature_dim, float* logits) {
  const int64_t rows = layer.out_features();
  const WeightView w = layer.weight().view();
  const float* bias = layer.bias();
  std::vector<const float*> xs(static_cast<size_t>(k * nb));
  for (int64_t t = 0; t < k; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      xs[t * nb + b] = features + (tnf ? (t * nb + b) : (b * steps + t)) * feature_dim;
    }
  }
  const int64_t grain = rows * k * feature_dim < (1 << 16) ? rows : 16;
  parallel_for(rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t t = 0; t < k; ++t) {
      gemm_rows(w, t * feature_dim, feature_dim, r0, r1, xs.data() + t * nb, nb, logits, rows,
                t > 0);
    }
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t r = r0; r < r1; ++r) logits[b * rows + r] += bias[r];
    }
  });
}

}  // namespace gfn::cpu
