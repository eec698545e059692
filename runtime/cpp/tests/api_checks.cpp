// Checks of the mamba::Model API that mamba_generate does not reach, run by tests/test_cpp_runtime.py:
//   api_checks EXPORT_DIR
// Prints one "ok: ..." line per check and exits 0, or prints "FAIL: ..." and exits 1.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <unistd.h>

#include "mamba_runtime.hpp"
#include "sha256.hpp"  // internal: both block functions are checked against each other and a known digest

namespace {

const std::vector<int64_t> kPrompt = {5, 17, 42, 7, 3, 11, 2};
constexpr size_t kSplit = 3;
constexpr double kTolerance = 1e-5;  // float32, same graphs, different chunking

[[noreturn]] void fail(const std::string& what) {
  std::cout << "FAIL: " << what << "\n";
  std::exit(1);
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) fail("logits sizes differ");
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return diff / scale;
}

void expect_close(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
  double d = max_rel_diff(got, want);
  if (!(d <= kTolerance)) fail(what + ": max relative difference " + std::to_string(d));
  std::cout << "ok: " << what << " (max relative difference " << d << ")\n";
}

template <class F>
void expect_error(const std::string& what, const std::string& fragment, F&& f) {
  try {
    f();
  } catch (const mamba::Error& e) {
    if (std::string(e.what()).find(fragment) == std::string::npos) fail(what + ": wrong message: " + e.what());
    std::cout << "ok: " << what << " -> " << e.what() << "\n";
    return;
  }
  fail(what + ": no mamba::Error");
}

std::vector<int64_t> slice(size_t from, size_t to) { return {kPrompt.begin() + from, kPrompt.begin() + to}; }

// The logits of every token generate() picks (greedy, 6 tokens), concatenated; from `state` when given.
std::vector<float> generate_logits(mamba::Model& model, const std::vector<int64_t>& prompt, bool reset,
                                   const mamba::State* state) {
  if (state) model.load_state(*state);
  mamba::GenerateOptions options;
  options.max_new_tokens = 6;
  options.reset = reset;
  std::vector<float> all;
  options.on_token = [&](int64_t, const std::vector<float>& l) { all.insert(all.end(), l.begin(), l.end()); };
  model.generate(prompt, options);
  return all;
}

// generate() of kPrompt, 12 tokens, greedy or sampled (seed 3), with these stop sequences and stop tokens.
mamba::Generation generate_stopping(mamba::Model& model, bool greedy,
                                    const std::vector<std::vector<int64_t>>& sequences,
                                    const std::vector<int64_t>& stop_tokens = {}) {
  mamba::GenerateOptions options;
  options.max_new_tokens = 12;
  options.greedy = greedy;
  options.seed = 3;
  options.stop_sequences = sequences;
  options.stop_tokens = stop_tokens;
  return model.generate(kPrompt, options);
}

void expect_generation(const std::string& what, const mamba::Generation& g, const std::vector<int64_t>& tokens,
                       bool stopped, int stop_sequence) {
  if (g.tokens != tokens || g.stopped != stopped || g.stop_sequence != stop_sequence) {
    fail(what + ": " + std::to_string(g.tokens.size()) + " tokens (expected " + std::to_string(tokens.size()) +
         "; same: " + (g.tokens == tokens ? "yes" : "no") + "), stopped " + std::to_string(g.stopped) +
         ", stop_sequence " + std::to_string(g.stop_sequence) + " (expected " + std::to_string(stopped) + ", " +
         std::to_string(stop_sequence) + ")");
  }
}

// Stop sequences against runs without them: generation ends right after the first place where the new tokens (not
// the prompt) end with one, and reports the longest of those that match (the first of equally long ones).
void check_stop_sequences(mamba::Model& model) {
  const std::vector<int64_t> greedy = generate_stopping(model, true, {}).tokens;
  const std::vector<int64_t> pair(greedy.begin() + 1, greedy.begin() + 3);
  const size_t end = size_t(std::search(greedy.begin(), greedy.end(), pair.begin(), pair.end()) - greedy.begin()) + 2;
  if (end >= greedy.size()) fail("stop sequence: its first occurrence is the last token: the check proves nothing");
  expect_generation("stop sequence", generate_stopping(model, true, {pair}),
                    std::vector<int64_t>(greedy.begin(), greedy.begin() + end), true, 0);
  std::cout << "ok: a stop sequence from the greedy continuation ends generate() after its first occurrence ("
            << end << " of " << greedy.size() << " tokens)\n";

  // A sampled run (the greedy one of the tiny model repeats two tokens): its first token k >= 2 that is new there
  // ends, at k, both a sequence of three and a sequence of one, and neither matches earlier.
  const std::vector<int64_t> sampled = generate_stopping(model, false, {}).tokens;
  size_t k = 2;
  while (k + 1 < sampled.size() && std::count(sampled.begin(), sampled.begin() + k, sampled[k]) > 0) ++k;
  if (k + 1 >= sampled.size()) fail("stop sequences: no new token in the sampled run: the check proves nothing");
  const std::vector<int64_t> upto(sampled.begin(), sampled.begin() + k + 1);
  const std::vector<int64_t> three(sampled.begin() + k - 2, sampled.begin() + k + 1), one = {sampled[k]};
  const std::vector<int64_t> too_long(13, 0);  // longer than the generation: never matches
  expect_generation("longest, shorter first", generate_stopping(model, false, {one, three}), upto, true, 1);
  expect_generation("longest, longer first", generate_stopping(model, false, {too_long, three, one}), upto, true, 1);
  expect_generation("equally long", generate_stopping(model, false, {one, one, three, three}), upto, true, 2);
  std::cout << "ok: stop sequences that end at the same token report the longest, the first of equal ones (token "
            << k << ")\n";

  expect_generation("stop token and stop sequence", generate_stopping(model, false, {three}, {sampled[k]}), upto, true,
                    -1);
  expect_generation("stop sequence alone", generate_stopping(model, false, {three}), upto, true, 0);
  std::cout << "ok: a stop token that would also end a stop sequence ends as a stop token (stop_sequence -1; 0 "
               "without the stop token)\n";

  // Sequences that the prompt and the new tokens together end with, the new tokens alone never: the prompt's last
  // token and the first new one; that token and all the new ones (13: longer than the generation).
  const std::vector<int64_t> boundary = {kPrompt.back(), greedy[0]};
  std::vector<int64_t> across = {kPrompt.back()};
  across.insert(across.end(), greedy.begin(), greedy.end());
  if (std::search(greedy.begin(), greedy.end(), boundary.begin(), boundary.end()) != greedy.end()) {
    fail("stop sequence across the prompt in the greedy tokens: the check proves nothing");
  }
  expect_generation("sequences across the prompt", generate_stopping(model, true, {boundary, across}), greedy, false,
                    -1);
  std::cout << "ok: stop sequences that only match with the prompt's tokens change nothing\n";
}

// One generate() call's tokens and the logits each was picked from (concatenated); options.on_token, when set, is
// called too.
struct Run {
  std::vector<int64_t> tokens;
  std::vector<float> logits;
};

Run generate_run(mamba::Model& model, const std::vector<int64_t>& prompt, mamba::GenerateOptions options) {
  Run run;
  auto user = options.on_token;
  options.on_token = [&](int64_t token, const std::vector<float>& l) {
    if (user) user(token, l);
    run.logits.insert(run.logits.end(), l.begin(), l.end());
  };
  run.tokens = model.generate(prompt, options).tokens;
  return run;
}

bool same_state(const mamba::State& a, const mamba::State& b) { return a.conv == b.conv && a.ssm == b.ssm; }

bool all_zero(const mamba::State& s) {
  for (const auto* kind : {&s.conv, &s.ssm}) {
    for (const std::vector<float>& layer : *kind) {
      if (std::any_of(layer.begin(), layer.end(), [](float v) { return v != 0.0f; })) return false;
    }
  }
  return true;
}

// A Model from share() runs the same sessions: the same calls give the same tokens and logits, bit for bit, as on
// the Model it comes from. Its state is its own: zeros at first whatever the original's, and neither Model's calls
// change the other's save_state().
void check_share(mamba::Model& model) {
  model.reset();
  model.prefill(kPrompt);  // the original's state is not zero when share() is called
  mamba::Model shared = model.share();
  if (!all_zero(shared.save_state())) fail("share(): the new Model's state is not zeros");
  std::cout << "ok: a Model from share() starts from a zero state\n";
  if (&shared.info() != &model.info()) fail("share(): info() is not the original's object");

  for (bool greedy : {true, false}) {
    mamba::GenerateOptions options;
    options.max_new_tokens = 12;
    options.greedy = greedy;
    options.temperature = 0.9f;
    options.seed = 3;
    const Run want = generate_run(model, kPrompt, options);
    const Run got = generate_run(shared, kPrompt, options);
    if (got.tokens != want.tokens || got.logits != want.logits) {
      fail(std::string("share(): other tokens or logits than the original's (") + (greedy ? "greedy" : "sampled") +
           ", tokens " + (got.tokens == want.tokens ? "same" : "differ") + ")");
    }
    std::cout << "ok: a Model from share() generates the original's tokens and logits exactly ("
              << (greedy ? "greedy" : "sampled, seed 3") << ", " << got.tokens.size() << " tokens)\n";
  }

  model.reset();
  model.prefill(slice(0, kSplit));
  const mamba::State original = model.save_state();
  mamba::GenerateOptions options;
  options.max_new_tokens = 8;
  shared.generate(kPrompt, options);
  shared.prefill({1, 2, 3});
  if (!same_state(model.save_state(), original)) fail("generating on a shared Model changed the original's state");
  const mamba::State other = shared.save_state();
  if (same_state(other, original)) fail("shared states: both Models hold the same state: the check proves nothing");
  model.generate(slice(kSplit, kPrompt.size()), options);
  model.step(4);
  if (!same_state(shared.save_state(), other)) fail("generating on the original changed a shared Model's state");
  std::cout << "ok: a Model and its share() keep separate states (generating on one leaves the other's save_state())"
            << "\n";
}

// Four threads, each on its own share() of `model`, generate different prompts at once for several rounds (greedy
// and sampled, every third round continuing the thread's sequence): the tokens and logits of the same calls made one
// after another on `model`. The threads call share() while the main thread is inside a generate() of `model` (so
// share() takes no thread check of its source), and all four are inside their first generate() at the same time.
void check_threads(mamba::Model& model) {
  constexpr int kThreads = 4, kRounds = 6;
  const int64_t vocab = model.info().vocab_size;
  auto prompt_of = [&](int t, int r) {
    std::vector<int64_t> prompt;
    for (int i = 0; i < 3 + (t + r) % 4; ++i) prompt.push_back((t * 31 + r * 17 + i * 7 + 1) % vocab);
    return prompt;
  };
  auto options_of = [](int t, int r) {
    mamba::GenerateOptions options;
    options.max_new_tokens = 10;
    options.greedy = (t + r) % 2 == 0;
    options.temperature = 0.9f;
    options.seed = uint64_t(100 * t + r);
    options.reset = r % 3 != 2;
    return options;
  };
  std::vector<std::vector<Run>> want(kThreads), got(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    for (int r = 0; r < kRounds; ++r) want[t].push_back(generate_run(model, prompt_of(t, r), options_of(t, r)));
  }
  for (int t = 1; t < kThreads; ++t) {
    if (want[t][0].tokens == want[0][0].tokens) fail("threads: two threads' first calls give the same tokens");
  }
  mamba::GenerateOptions hold;  // the main thread's call, inside which the threads call share()
  hold.max_new_tokens = 4;
  const Run hold_want = generate_run(model, kPrompt, hold);

  std::atomic<bool> holding{false};  // the main thread is inside its generate()
  std::atomic<int> shared{0}, inside{0};
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      while (!holding.load()) std::this_thread::yield();
      std::optional<mamba::Model> mine;
      try {
        mine.emplace(model.share());
      } catch (const std::exception& e) {
        errors[t] = std::string("share(): ") + e.what();
      }
      shared.fetch_add(1);
      if (!mine) {
        inside.fetch_add(1);  // the others must not wait for this one
        return;
      }
      try {
        for (int r = 0; r < kRounds; ++r) {
          mamba::GenerateOptions options = options_of(t, r);
          bool first = r == 0;
          options.on_token = [&](int64_t, const std::vector<float>&) {
            if (!first) return;
            first = false;
            inside.fetch_add(1);
            while (inside.load() < kThreads) std::this_thread::yield();
          };
          got[t].push_back(generate_run(*mine, prompt_of(t, r), options));
        }
      } catch (const std::exception& e) {
        errors[t] = e.what();
        if (inside.load() < kThreads) inside.fetch_add(1);  // harmless if counted already: only a fail follows
      }
    });
  }
  hold.on_token = [&](int64_t, const std::vector<float>&) {
    holding.store(true);
    while (shared.load() < kThreads) std::this_thread::yield();
  };
  Run hold_got;
  std::string hold_error;
  try {
    hold_got = generate_run(model, kPrompt, hold);
  } catch (const std::exception& e) {
    hold_error = e.what();  // after the join: a thread left joinable would terminate the program
    holding.store(true);
  }
  for (std::thread& thread : threads) thread.join();
  if (!hold_error.empty()) fail("threads: the source Model's generate(): " + hold_error);
  for (int t = 0; t < kThreads; ++t) {
    if (!errors[t].empty()) fail("thread " + std::to_string(t) + ": " + errors[t]);
  }
  if (hold_got.tokens != hold_want.tokens || hold_got.logits.size() != hold_want.logits.size() ||
      !(max_rel_diff(hold_got.logits, hold_want.logits) <= kTolerance)) {
    fail("threads: the source Model's generate() during the threads' share() gave other tokens or logits");
  }
  std::cout << "ok: share() from " << kThreads << " threads while the main thread is inside a generate() of the Model"
            << "\n";
  size_t tokens = 0;
  for (int t = 0; t < kThreads; ++t) {
    for (int r = 0; r < kRounds; ++r) {
      // Tokens exactly; logits to kTolerance (equal bit for bit on the machines tried, but concurrent runs share
      // onnxruntime's thread pool, and its partitioning of work is not this test's concern).
      const bool same_tokens = got[t][r].tokens == want[t][r].tokens;
      if (!same_tokens || got[t][r].logits.size() != want[t][r].logits.size() ||
          !(max_rel_diff(got[t][r].logits, want[t][r].logits) <= kTolerance)) {
        fail("threads: thread " + std::to_string(t) + " round " + std::to_string(r) + ": other " +
             (same_tokens ? "logits" : "tokens") + " than the same call alone");
      }
      tokens += got[t][r].tokens.size();
    }
  }
  std::cout << "ok: " << kThreads << " threads on shared Models, " << kRounds << " rounds each (" << tokens
            << " tokens), generate the tokens the same calls give one after another\n";
}

// The shared part belongs to every Model that holds it: a Model from share() runs after the one it came from is
// destroyed, or moved from; share() of a moved-from Model is refused.
void check_share_lifetime(const std::string& dir, const std::vector<float>& whole) {
  auto opened = std::make_unique<mamba::Model>(dir);
  mamba::Model first = opened->share();
  opened.reset();
  expect_close("a Model from share() runs after the original is destroyed", first.prefill(kPrompt), whole);
  mamba::Model second = first.share();
  mamba::Model moved = std::move(first);
  expect_error("share() of a moved-from Model", "was moved from", [&] { first.share(); });
  expect_close("a Model from share() runs after the original is moved from", second.prefill(kPrompt), whole);
  if (&second.info() != &moved.info()) fail("share() of a share(): info() is not the same object");
  moved.reset();
  expect_close("the moved-to Model runs beside its share()", moved.prefill(kPrompt), whole);
}

// share() reads nothing from the export directory: it still works, with the same tokens and logits, after the
// directory has been renamed away (a Model can no longer be opened at its path).
void check_share_reads_nothing(const std::string& dir, mamba::Model& reference) {
  namespace fs = std::filesystem;
  const std::string tag = std::to_string(::getpid());
  const fs::path copy = fs::temp_directory_path() / ("mamba_api_checks_share_" + tag);
  const fs::path away = fs::temp_directory_path() / ("mamba_api_checks_share_away_" + tag);
  fs::remove_all(copy);
  fs::remove_all(away);
  fs::copy(dir, copy, fs::copy_options::recursive);
  mamba::GenerateOptions options;
  options.max_new_tokens = 8;
  const Run want = generate_run(reference, kPrompt, options);
  {
    mamba::Model opened(copy.string());
    fs::rename(copy, away);
    expect_error("opening the renamed-away directory", "export directory does not exist",
                 [&] { mamba::Model gone(copy.string()); });
    mamba::Model shared = opened.share();
    const Run got = generate_run(shared, kPrompt, options);
    if (got.tokens != want.tokens || got.logits != want.logits) {
      fail("share() after the export directory was renamed: other tokens or logits");
    }
  }
  fs::remove_all(away);
  std::cout << "ok: share() reads nothing from the export directory (it runs after the directory is renamed away)\n";
}

// Draw frequencies against softmax(logits / temperature) restricted to the top k, then to the nucleus (the fewest
// most likely of those whose probability, renormalized over the top k, reaches top_p), renormalized. `kept`: how
// many tokens the nucleus must hold (a check of the case itself: the p chosen cuts where the caller meant).
void check_sampler(float temperature, int top_k, float top_p = 1.0f, size_t kept = 0) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 1.0f, 1.5f};
  std::vector<double> want(logits.size(), 0.0);
  std::vector<size_t> order = {1, 4, 3, 0, 2};  // by decreasing logit
  size_t k = top_k == 0 ? logits.size() : size_t(top_k);
  double total = 0;
  for (size_t i = 0; i < k; ++i) total += want[order[i]] = std::exp(logits[order[i]] / temperature);
  double mass = 0;
  size_t nucleus = 0;
  while (nucleus < k && mass < top_p) mass += want[order[nucleus++]] / total;
  if (kept != 0 && nucleus != kept) fail("check_sampler: top_p " + std::to_string(top_p) + " keeps " +
                                         std::to_string(nucleus) + " tokens, not the " + std::to_string(kept) + " meant");
  total = 0;
  for (size_t i = 0; i < order.size(); ++i) {
    if (i >= nucleus) want[order[i]] = 0;
    total += want[order[i]];
  }
  for (double& w : want) w /= total;
  mamba::Sampler sampler(temperature, top_k, top_p, 42);
  const int draws = 40000;
  std::vector<int> counts(logits.size(), 0);
  for (int i = 0; i < draws; ++i) ++counts[size_t(sampler.sample(logits))];
  std::vector<double> got(logits.size());
  for (size_t v = 0; v < logits.size(); ++v) {
    got[v] = double(counts[v]) / draws;
    // 5 standard deviations of a binomial frequency (plus rounding), and never a token outside the top k
    double bound = 5 * std::sqrt(want[v] * (1 - want[v]) / draws) + 1e-12;
    if (std::abs(got[v] - want[v]) > bound || (want[v] == 0 && counts[v] != 0)) {
      fail("sampler (temperature " + std::to_string(temperature) + ", top_k " + std::to_string(top_k) + ", top_p " +
           std::to_string(top_p) + "): token " + std::to_string(v) + " drawn with frequency " +
           std::to_string(got[v]) + ", expected " + std::to_string(want[v]));
    }
  }
  std::cout << "ok: sampler frequencies match the softmax (temperature " << temperature << ", top_k " << top_k
            << ", top_p " << top_p << ": " << nucleus << " tokens kept)\n";
}

// The seeded streams of the earlier versions (before top_p), pinned: the same draws from the three-argument
// constructor and from the four-argument one with top_p = 1, one number of the splitmix64 stream per token. These
// ids are what the previous Sampler gave (built from the commit before top_p, run once).
void check_sampler_stream() {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 1.0f, 1.5f};
  struct Case {
    float temperature;
    int top_k;
    uint64_t seed;
    std::vector<int64_t> ids;
  };
  const std::vector<Case> cases = {
      {1.0f, 0, 42, {3, 1, 1, 1, 1, 3, 1, 3, 1, 4, 1, 4, 4, 4, 4, 1, 1, 4, 1, 4, 0, 1, 4, 4}},
      {0.7f, 3, 7, {1, 1, 3, 4, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 1, 3, 1, 4, 4, 4, 1, 1, 1}},
  };
  for (const Case& c : cases) {
    mamba::Sampler three(c.temperature, c.top_k, c.seed), four(c.temperature, c.top_k, 1.0f, c.seed);
    for (size_t i = 0; i < c.ids.size(); ++i) {
      int64_t a = three.sample(logits), b = four.sample(logits);
      if (a != c.ids[i] || b != c.ids[i]) {
        fail("sampler stream (seed " + std::to_string(c.seed) + "), draw " + std::to_string(i) + ": " +
             std::to_string(a) + " and " + std::to_string(b) + " (top_p 1), expected " + std::to_string(c.ids[i]));
      }
    }
  }
  std::cout << "ok: seeded sampler streams are those of the earlier versions (top_p 1 changes nothing)\n";
}

// apply_repetition_penalty on a small vector against values computed by hand: seen positive logits divided, seen
// negative ones multiplied, zero and unseen ones unchanged; penalty 1 changes nothing; bad arguments refused.
void check_repetition_penalty() {
  const std::vector<float> logits = {2.0f, -1.0f, 0.5f, -3.0f, 0.0f, 4.0f, -0.25f};
  const std::vector<bool> seen = {true, true, false, true, true, false, false};
  struct Case {
    float penalty;
    std::vector<float> want;
  };
  const std::vector<Case> cases = {
      {2.0f, {1.0f, -2.0f, 0.5f, -6.0f, 0.0f, 4.0f, -0.25f}},
      {0.5f, {4.0f, -0.5f, 0.5f, -1.5f, 0.0f, 4.0f, -0.25f}},
      {1.3f, {1.5384615f, -1.3f, 0.5f, -3.9f, 0.0f, 4.0f, -0.25f}},
      {1.0f, logits},
  };
  for (const Case& c : cases) {
    std::vector<float> got = logits;
    mamba::apply_repetition_penalty(got, seen, c.penalty);
    for (size_t v = 0; v < got.size(); ++v) {
      if (!(std::abs(got[v] - c.want[v]) <= 1e-6f * std::max(1.0f, std::abs(c.want[v])))) {
        fail("apply_repetition_penalty(" + std::to_string(c.penalty) + "): logit " + std::to_string(v) + " is " +
             std::to_string(got[v]) + ", expected " + std::to_string(c.want[v]));
      }
    }
  }
  std::cout << "ok: apply_repetition_penalty gives the hand-computed values (penalties 2, 0.5, 1.3, 1)\n";
  std::vector<float> some = logits;
  expect_error("apply_repetition_penalty with a penalty of 0", "repetition_penalty must be a finite number > 0",
               [&] { mamba::apply_repetition_penalty(some, seen, 0.0f); });
  expect_error("apply_repetition_penalty with seen flags of another size", "6 seen flags for 7 logits",
               [&] { mamba::apply_repetition_penalty(some, std::vector<bool>(6, true), 2.0f); });
  if (some != logits) fail("a refused apply_repetition_penalty changed the logits");
}

// generate()'s tokens by hand, with the lower-level API: reset, prefill(context), then per token the repetition
// penalty on a copy of the logits (the seen tokens: `seen_first`, then each new token), argmax or one draw of a
// Sampler made from the same options, and step(). Only the options' max_new_tokens, greedy, temperature, top_k,
// top_p, seed and repetition_penalty are used.
std::vector<int64_t> tokens_by_hand(mamba::Model& model, const std::vector<int64_t>& context,
                                    const std::vector<int64_t>& seen_first, const mamba::GenerateOptions& o) {
  std::vector<bool> seen(size_t(model.info().vocab_size), false);
  for (int64_t t : seen_first) seen[size_t(t)] = true;
  mamba::Sampler sampler(o.temperature, o.top_k, o.top_p, o.seed);
  model.reset();
  std::vector<float> logits = model.prefill(context);
  std::vector<int64_t> tokens;
  while (true) {
    mamba::apply_repetition_penalty(logits, seen, o.repetition_penalty);
    tokens.push_back(o.greedy ? mamba::argmax(logits) : sampler.sample(logits));
    seen[size_t(tokens.back())] = true;
    if (int(tokens.size()) == o.max_new_tokens) return tokens;
    logits = model.step(tokens.back());
  }
}

std::vector<int64_t> concat(std::vector<int64_t> a, const std::vector<int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The repetition penalty in generate(): the tokens of the loop above, greedy and sampled (with top_p), the seen
// tokens being the prompt and the new tokens; with reset = false also the earlier calls' (a conversation, counted as
// the Python runtime's follow() counts its history), after load_state() none of the loaded sequence's. Each case is
// also checked to differ from what it is told apart from, so that it proves something.
void check_generate_penalty(mamba::Model& model, const std::vector<float>& whole) {
  mamba::GenerateOptions plain;
  plain.max_new_tokens = 12;
  mamba::GenerateOptions penalized = plain;
  penalized.repetition_penalty = 1.3f;
  const Run without = generate_run(model, kPrompt, plain);
  const Run with = generate_run(model, kPrompt, penalized);
  if (with.tokens == without.tokens) fail("repetition penalty: same greedy tokens with and without: proves nothing");
  if (with.tokens != tokens_by_hand(model, kPrompt, kPrompt, penalized)) {
    fail("repetition penalty, greedy: generate() differs from the penalty applied by hand");
  }
  // The first token's logits are the prompt's: penalised, the seen ones would be 1.3 times off.
  if (!(max_rel_diff(std::vector<float>(with.logits.begin(), with.logits.begin() + whole.size()), whole) <=
        kTolerance)) {
    fail("repetition penalty: on_token was not given the model's logits");
  }
  std::cout << "ok: greedy generate() with repetition_penalty 1.3 picks the argmax of the penalised logits (prompt and"
            << " new tokens seen); on_token gets the model's logits\n";

  mamba::GenerateOptions sampled = penalized;
  sampled.greedy = false;
  sampled.temperature = 0.9f;
  sampled.top_p = 0.8f;
  sampled.seed = 5;
  mamba::GenerateOptions sampled_plain = sampled;
  sampled_plain.repetition_penalty = 1.0f;
  const std::vector<int64_t> got = generate_run(model, kPrompt, sampled).tokens;
  if (got == generate_run(model, kPrompt, sampled_plain).tokens) {
    fail("repetition penalty, sampled: same tokens with and without: proves nothing");
  }
  if (got != tokens_by_hand(model, kPrompt, kPrompt, sampled)) {
    fail("repetition penalty, sampled with top_p: generate() differs from the penalty and the Sampler by hand");
  }
  std::cout << "ok: sampled generate() (temperature 0.9, top_p 0.8, seed 5) with repetition_penalty 1.3 draws what"
            << " the penalty and a Sampler by hand draw\n";

  // A conversation: the second turn (reset = false) counts the first turn's prompt and tokens as seen.
  const std::vector<int64_t> first_prompt = slice(0, kSplit), second_prompt = slice(kSplit, kPrompt.size());
  penalized.max_new_tokens = 6;
  model.reset();
  const std::vector<int64_t> first = model.generate(first_prompt, penalized).tokens;
  const mamba::State after_first = model.save_state();
  mamba::GenerateOptions next = penalized;
  next.reset = false;
  const std::vector<int64_t> continued = model.generate(second_prompt, next).tokens;
  const std::vector<int64_t> history = concat(first_prompt, first);
  const std::vector<int64_t> context = concat(history, second_prompt);
  if (continued != tokens_by_hand(model, context, context, penalized)) {
    fail("repetition penalty: generate(reset = false) does not count the earlier call's prompt and tokens");
  }
  model.load_state(after_first);
  const std::vector<int64_t> loaded = model.generate(second_prompt, next).tokens;
  if (loaded != tokens_by_hand(model, context, second_prompt, penalized)) {
    fail("repetition penalty: after load_state(), generate(reset = false) counts other tokens than its own");
  }
  if (loaded == continued) fail("repetition penalty: the history changes nothing here: the checks above prove nothing");
  std::cout << "ok: repetition penalty with reset = false counts the earlier calls' tokens; after load_state() only"
            << " the new call's\n";

  // generate()'s last token, not run when it returns, is part of the sequence: it counts in the next turn. A first
  // turn of one token (the prompt's argmax, which every turn picks first otherwise) and a penalty of 2, so that this
  // token is the one that matters.
  {
    mamba::GenerateOptions one = plain;
    one.repetition_penalty = 2.0f;
    one.max_new_tokens = 1;
    model.reset();
    const int64_t last = model.generate(first_prompt, one).tokens[0];
    mamba::GenerateOptions turn = one;
    turn.reset = false;
    turn.max_new_tokens = 6;
    const std::vector<int64_t> got = model.generate(second_prompt, turn).tokens;
    const std::vector<int64_t> with_last = concat(concat(first_prompt, {last}), second_prompt);
    if (got != tokens_by_hand(model, with_last, with_last, turn)) {
      fail("repetition penalty: the previous generate()'s last token does not count as seen in the next turn");
    }
    if (std::count(with_last.begin(), with_last.end(), last) != 1 ||
        tokens_by_hand(model, with_last, concat(first_prompt, second_prompt), turn) == got) {
      fail("repetition penalty: the previous turn's last token changes nothing here: the check proves nothing");
    }
    std::cout << "ok: the last token of a generate() counts as seen when the next turn continues it\n";
  }

  // prefill() and step() count their tokens too (here two that the penalised run picks once it stops repeating
  // itself), and reset() forgets them: then the same call gives the tokens of a fresh Model.
  const std::vector<int64_t> picked = {with.tokens[4], with.tokens[5]};
  next.max_new_tokens = 12;
  model.reset();
  model.prefill({picked[0]});
  model.step(picked[1]);
  const std::vector<int64_t> after_calls = model.generate(kPrompt, next).tokens;
  const std::vector<int64_t> picked_then_prompt = concat(picked, kPrompt);
  if (after_calls != tokens_by_hand(model, picked_then_prompt, picked_then_prompt, next)) {
    fail("repetition penalty: the tokens of prefill() and step() do not count as seen");
  }
  model.reset();
  model.prefill({picked[0]});
  model.step(picked[1]);
  model.reset();
  if (model.generate(kPrompt, next).tokens != with.tokens) {
    fail("repetition penalty: after reset(), generate(reset = false) still counts the earlier tokens");
  }
  if (tokens_by_hand(model, kPrompt, picked_then_prompt, next) == with.tokens) {
    fail("repetition penalty: seeing the two tokens first changes nothing: the reset() check proves nothing");
  }
  std::cout << "ok: prefill() and step() tokens count as seen; reset() forgets them\n";
}

// Generation::logprobs: per token the log softmax of the raw logits it was picked from (computed here afresh from
// on_token's logits, in long double), greedy and sampled with a repetition penalty (which shapes the pick, not the
// reported probability); empty without options.logprobs; token_logprob by hand.
void check_logprobs(mamba::Model& model) {
  auto reference = [](const std::vector<float>& logits, int64_t token) {
    long double sum = 0;
    for (float x : logits) sum += std::exp((long double)x);
    return double(std::log(std::exp((long double)logits[size_t(token)]) / sum));
  };
  for (bool greedy : {true, false}) {
    mamba::GenerateOptions options;
    options.max_new_tokens = 10;
    options.greedy = greedy;
    options.seed = 9;
    options.repetition_penalty = 1.5f;
    options.logprobs = true;
    std::vector<double> want;
    options.on_token = [&](int64_t token, const std::vector<float>& logits) {
      want.push_back(reference(logits, token));
    };
    mamba::Generation g = model.generate(kPrompt, options);
    if (g.logprobs.size() != g.tokens.size() || want.size() != g.tokens.size()) fail("logprobs: one per token");
    bool below_one = false;
    for (size_t i = 0; i < want.size(); ++i) {
      if (!(std::abs(g.logprobs[i] - want[i]) <= 1e-9 * std::max(1.0, std::abs(want[i])))) {
        fail("logprobs: token " + std::to_string(i) + ": " + std::to_string(g.logprobs[i]) + " against " +
             std::to_string(want[i]));
      }
      below_one = below_one || want[i] < -1e-3;
    }
    if (!below_one) fail("logprobs: every token had probability ~1: the check proves nothing");
    options.logprobs = false;
    options.on_token = nullptr;
    if (!model.generate(kPrompt, options).logprobs.empty()) fail("logprobs: filled without options.logprobs");
  }
  std::cout << "ok: Generation::logprobs is the log softmax of each token's raw logits (greedy and sampled, with a "
               "repetition penalty); empty unless asked for\n";
  const double quarter = mamba::token_logprob({0.0f, float(std::log(3.0))}, 0);
  if (!(std::abs(quarter - std::log(0.25)) < 1e-7)) fail("token_logprob by hand: " + std::to_string(quarter));
  expect_error("token_logprob with a token outside the logits", "token_logprob: token 2 is outside the 2 logits",
               [] { mamba::token_logprob({0.0f, 1.0f}, 2); });
  std::cout << "ok: token_logprob by hand (log 1/4) and refusing a token outside the logits\n";
}

void check_sha256() {
  using mamba::detail::Sha256Blocks;
  using mamba::detail::sha256_hex;
  const std::string abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";  // FIPS 180-4 "abc"
  if (sha256_hex("abc", 3, Sha256Blocks::Portable) != abc) fail("sha256 portable: wrong digest of \"abc\"");
  if (!mamba::detail::sha_extensions_available()) {
    std::cout << "ok: sha256 (portable only: this CPU has no SHA extensions)\n";
    return;
  }
  std::vector<unsigned char> data(70000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<unsigned char>(i * 2654435761u >> 13);
  for (size_t n : {size_t(0), size_t(3), size_t(55), size_t(56), size_t(63), size_t(64), size_t(65), size_t(119),
                   size_t(120), size_t(1000), data.size()}) {
    if (sha256_hex(data.data(), n, Sha256Blocks::ShaExtensions) != sha256_hex(data.data(), n, Sha256Blocks::Portable)) {
      fail("sha256: SHA extensions and portable code differ for " + std::to_string(n) + " bytes");
    }
  }
  std::cout << "ok: sha256 with SHA extensions equals the portable code\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) fail("usage: api_checks EXPORT_DIR");
  try {
    check_sha256();
    check_sampler(1.0f, 0);
    check_sampler(0.5f, 3);
    check_sampler(2.0f, 1);
    check_sampler(1.0f, 0, 0.8f, 3);   // the nucleus cuts in the middle of the sorted list
    check_sampler(1.0f, 0, 0.3f, 1);   // only the most likely token
    check_sampler(0.5f, 4, 0.9f, 3);   // temperature, then top_k, then top_p
    check_sampler(1.0f, 0, 1.0f, 5);   // top_p 1: everything
    check_sampler_stream();
    check_repetition_penalty();
    mamba::Model model(argv[1]);
    const std::vector<float> whole = model.prefill(kPrompt);

    model.reset();
    model.prefill(slice(0, kSplit));
    expect_close("prefill in two chunks equals one prefill", model.prefill(slice(kSplit, kPrompt.size())), whole);

    model.reset();
    model.prefill(slice(0, kSplit));
    std::vector<float> last;
    for (size_t i = kSplit; i < kPrompt.size(); ++i) last = model.step(kPrompt[i]);
    expect_close("prefill then single steps equals one prefill", last, whole);

    // Prompt caching: save after a prefix, run something else, load, continue.
    model.reset();
    model.prefill(slice(0, kSplit));
    mamba::State prefix = model.save_state();
    model.prefill({1, 2, 3, 4});
    model.load_state(prefix);
    expect_close("save_state / load_state continue a saved prefix", model.prefill(slice(kSplit, kPrompt.size())),
                 whole);
    const std::vector<float> whole_run = generate_logits(model, kPrompt, true, nullptr);
    expect_close("generate(reset = false) continues a loaded prefix",
                 generate_logits(model, slice(kSplit, kPrompt.size()), false, &prefix), whole_run);
    if (max_rel_diff(generate_logits(model, slice(kSplit, kPrompt.size()), true, nullptr), whole_run) < 1e-3) {
      fail("the prefix does not change the logits: the check above proves nothing");
    }

    // A conversation: generate, then generate(reset = false) with the next turn, equals generating from the whole
    // history at once; the state after generate() holds every generated token, the last one included.
    {
      mamba::GenerateOptions turn;
      turn.max_new_tokens = 5;
      model.reset();
      std::vector<int64_t> first = model.generate(slice(0, kSplit), turn).tokens;
      mamba::State after = model.save_state();
      std::vector<int64_t> history = slice(0, kSplit);
      history.insert(history.end(), first.begin(), first.end());
      const std::vector<int64_t> probe = {9, 4};
      model.reset();
      const std::vector<float> want = model.prefill([&] { auto h = history; h.insert(h.end(), probe.begin(),
                                                                                         probe.end()); return h; }());
      model.load_state(after);
      expect_close("save_state after generate() holds every generated token", model.prefill(probe), want);
      model.reset();
      model.generate(slice(0, kSplit), turn);
      std::vector<int64_t> whole_history = history;
      whole_history.insert(whole_history.end(), kPrompt.begin() + kSplit, kPrompt.end());
      const std::vector<float> continued = generate_logits(model, slice(kSplit, kPrompt.size()), false, nullptr);
      const std::vector<float> at_once = generate_logits(model, whole_history, true, nullptr);  // after: it resets
      expect_close("generate(reset = false) after generate() continues the whole sequence", continued, at_once);
    }

    // A second thread calling while the first is inside generate() is refused, not let in.
    {
      std::atomic<int> phase{0};
      std::string refused;
      mamba::GenerateOptions slow;
      slow.max_new_tokens = 2;
      slow.on_token = [&](int64_t, const std::vector<float>&) {
        if (phase.exchange(1) == 0) {
          while (phase.load() != 2) std::this_thread::yield();  // inside the call until the other thread tried
        }
      };
      std::thread other([&] {
        while (phase.load() != 1) std::this_thread::yield();
        try {
          model.step(1);
        } catch (const mamba::Error& e) {
          refused = e.what();
        }
        phase.store(2);
      });
      model.generate(kPrompt, slow);
      other.join();
      if (refused.find("in use by another thread") == std::string::npos) fail("a second thread was let in");
      std::cout << "ok: a call from a second thread during generate() -> " << refused << "\n";
      model.reset();
      expect_close("the Model runs after refusing the other thread", model.prefill(kPrompt), whole);
    }

    {
      mamba::State damaged = prefix;
      damaged.ssm.back()[1] = std::nanf("");
      expect_error("load_state with a NaN", "ssm state has a NaN or infinite value",
                   [&] { model.load_state(damaged); });
      damaged = prefix;
      damaged.conv.front()[0] = INFINITY;
      expect_error("load_state with an infinity", "conv state has a NaN", [&] { model.load_state(damaged); });
    }
    prefix.ssm.pop_back();
    expect_error("load_state with a wrong layer count", "load_state: expected", [&] { model.load_state(prefix); });

    check_stop_sequences(model);
    check_logprobs(model);
    check_generate_penalty(model, whole);
    check_share(model);
    check_threads(model);
    check_share_lifetime(argv[1], whole);
    check_share_reads_nothing(argv[1], model);

    // A rejected call leaves the sequence where it was.
    model.reset();
    model.prefill(slice(0, kPrompt.size() - 1));
    expect_error("step with an id out of range", "out of range", [&] { model.step(model.info().vocab_size); });
    expect_error("empty prefill", "empty prompt", [&] { model.prefill({}); });
    mamba::GenerateOptions fresh;  // reset = true: a refused prompt must not reset the state before it is refused
    expect_error("generate with an id out of range", "at position 1 is out of range",
                 [&] { model.generate({1, model.info().vocab_size}, fresh); });
    expect_error("generate with an empty prompt", "empty prompt", [&] { model.generate({}, fresh); });
    fresh.stop_sequences = {{1, 2}, {}};
    expect_error("generate with an empty stop sequence", "stop sequence 1 is empty",
                 [&] { model.generate(kPrompt, fresh); });
    fresh.stop_sequences = {{1, model.info().vocab_size}};
    const std::string vocab = std::to_string(model.info().vocab_size);
    expect_error("generate with a stop sequence id out of range",
                 "stop sequence 0: token id " + vocab + " at position 1 is out of range [0, " + vocab + ")",
                 [&] { model.generate(kPrompt, fresh); });
    fresh.stop_sequences.clear();
    for (float top_p : {0.0f, 1.5f, std::nanf("")}) {
      fresh.top_p = top_p;
      expect_error("generate with top_p " + std::to_string(top_p), "top_p must be in (0, 1], found ",
                   [&] { model.generate(kPrompt, fresh); });
    }
    fresh.top_p = 1.0f;
    for (float penalty : {0.0f, -1.0f, std::nanf(""), INFINITY}) {
      fresh.repetition_penalty = penalty;
      expect_error("generate with repetition_penalty " + std::to_string(penalty),
                   "repetition_penalty must be a finite number > 0 (1 = off), found ",
                   [&] { model.generate(kPrompt, fresh); });
    }
    expect_close("state intact after failed calls", model.step(kPrompt.back()), whole);

    {  // a filesystem failure (here a symlink loop) is a mamba::Error naming the path, not a filesystem_error
      namespace fs = std::filesystem;
      fs::path loop = fs::temp_directory_path() / ("mamba_api_checks_loop_" + std::to_string(::getpid()));
      fs::remove(loop);
      fs::create_symlink(loop, loop);
      expect_error("a symlink loop as the export directory", loop.string() + ": ", [&] { mamba::Model bad(loop.string()); });
      fs::remove(loop);
    }

    {
      mamba::Model other(argv[1]);  // a second Model in the process (onnxruntime's Env is shared): its own state
      other.prefill(slice(0, kSplit));
      model.reset();
      model.prefill(kPrompt);
      expect_close("two Models in one process keep separate states", other.prefill(slice(kSplit, kPrompt.size())),
                   whole);
    }

    mamba::Model moved = std::move(model);
    moved.reset();
    expect_close("a moved-to Model runs", moved.prefill(kPrompt), whole);
    expect_error("a moved-from Model", "was moved from", [&] { model.step(1); });

    mamba::GenerateOptions options;
    options.max_new_tokens = 0;
    expect_error("max_new_tokens 0", "max_new_tokens must be at least 1", [&] { moved.generate(kPrompt, options); });
    expect_error("decode_bytes without a byte vocabulary", "not byte-level",
                 [&] { mamba::decode_bytes(moved.info(), {1}); });
    expect_error("top_k < 0", "top_k must be >= 0", [] { mamba::Sampler(1.0f, -1, 0); });
  } catch (const std::exception& e) {
    fail(std::string("unexpected exception: ") + e.what());
  }
  return 0;
}
