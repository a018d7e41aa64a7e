#include "host_loop.h"

#include "../common/argmax.h"
#include "../common/exit_rule.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>


namespace gfn::cpu {
namespace {

// Keeps the rows whose `keep` flag is set, in order, in a row-major buffer of `cols` columns.
void compact_rows(std::vector<float>& buf, int64_t cols, const std::vector<char>& keep) {
  int64_t w = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(keep.size()); ++i) {
    if (!keep[i]) continue;
    if (w != i) std::memmove(&buf[w * cols], &buf[i * cols], static_cast<size_t>(cols) * sizeof(float));
    ++w;
  }
  buf.resize(static_cast<size_t>(w * cols));
}

}  // namespace

int64_t HostLoop::begin(const void* images, bool u8, int64_t n, const float* feature, int64_t feature_dim,
                        const float* state, int64_t state_dim, const float* logits, int64_t classes,
                        const float* thresholds) {
  const int64_t T = m_.steps;
  // The coordinates of every step and image: (T - 1) x n x 2 int32, a count that must not overflow.
  if (n < 1 || T < 1 || T - 1 > std::numeric_limits<int64_t>::max() / 4 / n) {
    throw std::invalid_argument("a batch of " + std::to_string(n) + " images over " + std::to_string(T) +
                                " steps does not fit the loop's coordinate buffer");
  }
  // The buffers below are sized from these: refuse outputs that do not fit the heads.
  const int64_t want_classes = m_.cls_head != nullptr ? m_.cls_head->out_features()
                               : T > 1                ? m_.cascaded.at(2)->out_features()
                                                      : classes;
  check_classes(want_classes);
  if (m_.cls_cell != nullptr && m_.cls_cell->input_size() != feature_dim) {
    throw std::invalid_argument("the classifier GRU takes " + std::to_string(m_.cls_cell->input_size()) +
                                " features, the graph gave " + std::to_string(feature_dim));
  }
  for (int64_t k = 2; m_.cls_cell == nullptr && k <= T; ++k) {
    if (m_.cascaded.at(k)->in_features() != k * feature_dim || m_.cascaded.at(k)->out_features() != want_classes) {
      throw std::invalid_argument("cascaded layer k=" + std::to_string(k) + " does not fit features of size " +
                                  std::to_string(feature_dim));
    }
  }
  if (m_.step0_backbone && logits != nullptr && classes != want_classes) {
    throw std::invalid_argument("the glance graph gave " + std::to_string(classes) + " logits, the heads " +
                                std::to_string(want_classes));
  }
  images_ = images;
  u8_ = u8;
  n_ = n;
  t_ = 0;
  fdim_ = feature_dim;
  sdim_ = state_dim;
  trace_ = thresholds == nullptr;
  if (thresholds != nullptr) {
    thr_.assign(thresholds, thresholds + T);
  } else {
    thr_.clear();
  }
  prediction_.assign(n, 0);
  confidence_.assign(n, 0.0f);
  exit_step_.assign(n, T - 1);
  coords_.assign(static_cast<size_t>(std::max<int64_t>(T - 1, 0) * n * 2), -1);
  active_.resize(n);
  for (int64_t i = 0; i < n; ++i) active_[i] = i;
  state_.assign(state, state + n * state_dim);
  h_pol_.clear();  // zero state: the first policy step takes none (the cell skips W_hh h)
  maxprob_.resize(n);
  argmax_.resize(n);
  classes_ = want_classes;
  part_s_.fill(-1.0);
  Clock::time_point since{};
  if (profile_) since = Clock::now();
  // The classifier's step 0 from a zero GRU state (classify() hands the cell none), or the
  // first cascaded feature.
  if (m_.cls_cell == nullptr) feats_.assign(static_cast<size_t>(n * T * feature_dim), 0.0f);
  classify(feature);
  if (m_.step0_backbone) {
    if (logits == nullptr) throw std::invalid_argument("the glance graph's logits are needed at step 0");
    classes_ = classes;
    logits_.assign(logits, logits + n * classes);
    softmax_stats(logits_.data(), n, classes_, maxprob_.data(), argmax_.data());
  } else if (m_.cls_cell == nullptr) {
    throw std::invalid_argument("a cascaded classifier takes its step-0 logits from the glance graph");
  }
  if (profile_) lap(kHeads, since);
  return finish_step(since);
}

int64_t HostLoop::next(const float* feature, const float* state) {
  // t_ was advanced by the previous finish_step: this is step t_'s focus output.
  const int64_t m = static_cast<int64_t>(active_.size());
  part_s_.fill(-1.0);
  Clock::time_point since{};
  if (profile_) since = Clock::now();
  state_.assign(state, state + m * sdim_);
  classify(feature);
  if (profile_) lap(kHeads, since);
  return finish_step(since);
}

void HostLoop::classify(const float* feature) {
  const int64_t m = static_cast<int64_t>(active_.size());
  const int64_t T = m_.steps, F = fdim_;
  logits_.resize(static_cast<size_t>(m * classes_));
  if (m_.cls_cell != nullptr) {
    scratch_.resize(static_cast<size_t>(m * m_.cls_cell->hidden_size()));
    // Step 0 starts from a zero state: the cell skips W_hh h (a third of its weight bytes;
    // W_hh 0 + b_hh == b_hh exactly, so the result is the same as with zeros).
    m_.cls_cell->step(feature, t_ == 0 ? nullptr : h_cls_.data(), m, scratch_.data());
    h_cls_.swap(scratch_);
    classifier_head(*m_.cls_head, h_cls_.data(), m, logits_.data(), maxprob_.data(), argmax_.data());
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(&feats_[(i * T + t_) * F], feature + i * F, static_cast<size_t>(F) * sizeof(float));
  }
  if (t_ == 0) return;  // step-0 logits come from the glance graph
  cascaded_forward(*m_.cascaded.at(static_cast<size_t>(t_ + 1)), t_ + 1, feats_.data(), false, T, m, F,
                   logits_.data());
  softmax_stats(logits_.data(), m, classes_, maxprob_.data(), argmax_.data());
}

int64_t HostLoop::finish_step(Clock::time_point& since) {
  const int64_t T = m_.steps, S = m_.image_size, P = m_.patch_size;
  int64_t m = static_cast<int64_t>(active_.size());
  for (int64_t i = 0; i < m; ++i) {
    prediction_[active_[i]] = argmax_[i];
    confidence_[active_[i]] = maxprob_[i];
  }
  if (t_ == T - 1) {
    if (profile_) lap(kExit, since);
    return 0;
  }
  if (!trace_) {
    std::vector<char> keep(static_cast<size_t>(m));
    int64_t kept = 0;
    for (int64_t i = 0; i < m; ++i) {
      keep[i] = !gfn::exits_at(maxprob_[i], thr_[t_]);
      if (!keep[i]) exit_step_[active_[i]] = t_;
      kept += keep[i];
    }
    if (kept != m) {
      int64_t w = 0;
      for (int64_t i = 0; i < m; ++i) {
        if (keep[i]) active_[w++] = active_[i];
      }
      active_.resize(w);
      compact_rows(state_, sdim_, keep);
      // No policy state before the first policy step (t 0).
      if (t_ > 0) compact_rows(h_pol_, m_.actor_cell->hidden_size(), keep);
      if (m_.cls_cell != nullptr) {
        compact_rows(h_cls_, m_.cls_cell->hidden_size(), keep);
      } else {
        compact_rows(feats_, T * fdim_, keep);
      }
      m = kept;
      if (m == 0) {
        if (profile_) lap(kExit, since);
        return 0;
      }
    }
  }
  if (profile_) lap(kExit, since);
  // Policy step t + 1: GRU over the last backbone's policy state, actor head -> coordinates.
  const int64_t hp = m_.actor_cell->hidden_size();
  scratch_.resize(static_cast<size_t>(m * hp));
  m_.actor_cell->step(state_.data(), t_ == 0 ? nullptr : h_pol_.data(), m, scratch_.data());
  h_pol_.swap(scratch_);
  std::vector<float> action(static_cast<size_t>(m * 2));
  step_coords_.resize(static_cast<size_t>(m * 2));
  actor_head(*m_.actor_head, h_pol_.data(), m, static_cast<int>(S - P), action.data(), step_coords_.data());
  for (int64_t i = 0; i < m; ++i) {
    coords_[(t_ * n_ + active_[i]) * 2] = step_coords_[2 * i];
    coords_[(t_ * n_ + active_[i]) * 2 + 1] = step_coords_[2 * i + 1];
  }
  if (profile_) lap(kPolicy, since);
  const size_t patch_floats = static_cast<size_t>(m * 3 * P * P);
  if (patches_->capacity() < patch_floats) {
    // A new buffer, not a reallocation: views of the old one stay valid (patch_buffer()).
    patches_ = std::make_shared<std::vector<float>>();
    patches_->reserve(patch_floats);
  }
  patches_->resize(patch_floats);
  if (u8_) {
    crop_patches_u8(static_cast<const uint8_t*>(images_), m, S, step_coords_.data(), m_.norm, patches_->data(), P,
                    active_.data());
  } else {
    crop_patches(static_cast<const float*>(images_), m, 3, S, step_coords_.data(), patches_->data(), P,
                 active_.data());
  }
  if (profile_) lap(kCrop, since);
  ++t_;
  return m;
}

}  // namespace gfn::cpu
