// Picking the next token from float32 logits: argmax, the repetition penalty, and seeded temperature / top-k / top-p
// sampling.
#include "sampling.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>

#include "mamba_runtime.hpp"

namespace mamba {

namespace detail {

std::string number_text(float value) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", double(value));
  return text;
}

void check_repetition_penalty(float penalty) {
  if (!(penalty > 0.0f) || !std::isfinite(penalty)) {
    throw Error("repetition_penalty must be a finite number > 0 (1 = off), found " + number_text(penalty));
  }
}

void check_top_p(float top_p) {
  if (!(top_p > 0.0f && top_p <= 1.0f)) throw Error("top_p must be in (0, 1], found " + number_text(top_p));
}

}  // namespace detail

int64_t argmax(const std::vector<float>& logits) {
  if (logits.empty()) throw Error("argmax: empty logits");
  return std::max_element(logits.begin(), logits.end()) - logits.begin();
}

void apply_repetition_penalty(std::vector<float>& logits, const std::vector<bool>& seen, float penalty) {
  detail::check_repetition_penalty(penalty);
  if (seen.size() != logits.size()) {
    throw Error("apply_repetition_penalty: " + std::to_string(seen.size()) + " seen flags for " +
                std::to_string(logits.size()) + " logits");
  }
  if (penalty == 1.0f) return;
  for (size_t v = 0; v < logits.size(); ++v) {
    if (seen[v]) logits[v] = logits[v] > 0 ? logits[v] / penalty : logits[v] * penalty;
  }
}

double token_logprob(const std::vector<float>& logits, int64_t token) {
  if (token < 0 || size_t(token) >= logits.size()) {
    throw Error("token_logprob: token " + std::to_string(token) + " is outside the " + std::to_string(logits.size()) +
                " logits");
  }
  const double top = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float x : logits) sum += std::exp(double(x) - top);
  return double(logits[size_t(token)]) - top - std::log(sum);
}

Sampler::Sampler(float temperature, int top_k, uint64_t seed) : Sampler(temperature, top_k, 1.0f, seed) {}

Sampler::Sampler(float temperature, int top_k, float top_p, uint64_t seed)
    : temperature_(temperature), top_k_(top_k), top_p_(top_p), state_(seed) {
  if (!(temperature > 0.0f) || !std::isfinite(temperature)) {
    throw Error("temperature must be a positive number, found " + std::to_string(temperature));
  }
  if (top_k < 0) throw Error("top_k must be >= 0 (0 = the whole vocabulary), found " + std::to_string(top_k));
  detail::check_top_p(top_p);
}

double Sampler::uniform() {
  // splitmix64: tiny, well mixed, and unlike std::*_distribution the same on every standard library.
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return double(z >> 11) * 0x1.0p-53;
}

int64_t Sampler::sample(const std::vector<float>& logits) {
  if (logits.empty()) throw Error("sample: empty logits");
  size_t k = top_k_ == 0 ? logits.size() : std::min(size_t(top_k_), logits.size());
  std::vector<int64_t>& order = order_;
  order.resize(logits.size());
  std::iota(order.begin(), order.end(), 0);
  // Largest first; ties by the smaller id, so the candidate set does not depend on the sort's stability.
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  std::vector<double>& weights = weights_;
  weights.resize(k);
  double top = logits[order[0]];
  for (size_t i = 0; i < k; ++i) weights[i] = std::exp((double(logits[order[i]]) - top) / temperature_);
  double total = std::accumulate(weights.begin(), weights.end(), 0.0);
  if (top_p_ < 1.0f) {  // the nucleus: the first `keep` candidates (most likely first), whose mass reaches top_p
    const double reach = double(top_p_) * total;
    double mass = 0;
    size_t keep = 0;
    while (keep < k && mass < reach) mass += weights[keep++];  // reach > 0: at least the most likely one
    k = keep;
    total = mass;
  }
  double target = uniform() * total;
  for (size_t i = 0; i < k; ++i) {
    target -= weights[i];
    if (target < 0) return order[i];
  }
  return order[k - 1];  // rounding left a sliver of mass past the last weight
}

}  // namespace mamba
