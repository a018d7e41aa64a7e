// A small least-recently-used cache of shared values (host code, shared by CPU and CUDA).
#pragma once

#include <cstddef>
#include <list>
#include <map>
#include <memory>
#include <utility>

namespace gfn {

/// Keeps at most `capacity` values; adding one to a full cache drops the one used least
/// recently. Not synchronised: the owner holds its own lock around every call. A dropped value
/// lives on while a caller still holds its shared_ptr.
template <class Key, class Value>
class LruCache {
 public:
  explicit LruCache(std::size_t capacity) : capacity_(capacity > 0 ? capacity : 1) {}

  /// The value for `key` (now the most recently used), or null.
  std::shared_ptr<Value> get(const Key& key) {
    auto it = index_.find(key);
    if (it == index_.end()) {
      ++misses_;
      return nullptr;
    }
    ++hits_;
    order_.splice(order_.begin(), order_, it->second);
    return it->second->second;
  }

  /// Stores `value` for `key` as the most recently used, replacing an earlier value.
  void put(const Key& key, std::shared_ptr<Value> value) {
    auto it = index_.find(key);
    if (it != index_.end()) {
      it->second->second = std::move(value);
      order_.splice(order_.begin(), order_, it->second);
      return;
    }
    if (index_.size() >= capacity_) {
      index_.erase(order_.back().first);
      order_.pop_back();
    }
    order_.emplace_front(key, std::move(value));
    index_.emplace(key, order_.begin());
  }

  std::size_t size() const { return index_.size(); }
  std::size_t capacity() const { return capacity_; }
  /// Lookups that found their key / did not, since the cache was made.
  std::size_t hits() const { return hits_; }
  std::size_t misses() const { return misses_; }

 private:
  using Entry = std::pair<Key, std::shared_ptr<Value>>;
  std::size_t capacity_;
  std::size_t hits_ = 0, misses_ = 0;
  std::list<Entry> order_;  ///< most recently used first
  std::map<Key, typename std::list<Entry>::iterator> index_;
};

}  // namespace gfn
