// mamba_runtime: run a mamba-export export directory (docs/CONTRACTS.md) with onnxruntime from C++17.
//
//   mamba::Model model("out/");          // manifest.json, custom-op library, sessions for model.onnx and decode.onnx
//   mamba::GenerateOptions opt;
//   opt.max_new_tokens = 32;
//   mamba::Generation g = model.generate({1, 2, 3}, opt);   // g.tokens: the new token ids
//
// One Model holds one sequence's recurrent state (batch 1) and is not thread-safe; use one Model per thread. A call
// made while another thread is inside a call of the same Model throws mamba::Error instead of running.
// Several sequences at once, one copy of the weights: model.share() makes another Model on the same onnxruntime
// sessions (loaded once) with its own state. Models that share sessions may run on different threads at the same
// time, each Model still one thread at a time; share() itself may be called while another thread uses the Model.
//
//   mamba::Model worker = model.share();  // e.g. one per thread: nothing is read or loaded again
//
// Every failure a user can cause (missing directory or file, bad manifest, custom-op library that does not load,
// token id out of range, empty prompt, a graph that breaks the contract) is a mamba::Error with a one-line message.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mamba {

/// The one exception type of this library: its what() is one line saying what is wrong and where.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// How to create the onnxruntime sessions.
struct SessionOptions {
  /// Register the export directory's custom-op library (manifest `custom_op_library`). When false, onnxruntime
  /// inlines the model-local ONNX functions instead: same numbers, much slower. Never chosen silently.
  bool custom_ops = true;
  /// onnxruntime intra-op threads; 0 lets onnxruntime choose (one per physical core).
  int intra_op_threads = 0;
  /// Check every file of the export against its sha256 in manifest.json (reads every byte once).
  bool verify_checksums = true;
  /// Prompt tokens per prefill run (each run continues the state); 0: 1024 with model_last.onnx, 128 with
  /// model.onnx, whose logits hold every position of the run.
  int prefill_chunk = 0;
  /// onnxruntime session config entries (onnxruntime_session_options_config_keys.h), applied to both sessions;
  /// e.g. {"session.disable_prepacking", "1"} lets the two sessions share the memory-mapped weights.
  std::vector<std::pair<std::string, std::string>> ort_config;
};

/// What the export directory holds, read from manifest.json and the graphs' inputs and outputs.
struct ModelInfo {
  std::string export_dir;
  int64_t n_layer = 0;
  int64_t d_inner = 0;
  int64_t d_conv = 0;
  int64_t d_state = 0;
  int64_t vocab_size = 0;
  std::string logits_dtype;       ///< "float32", "float16" or "bfloat16"
  std::string prefill_graph;      ///< "model_last.onnx" when the export has it, else "model.onnx"
  std::string custom_op_library;  ///< absolute path of the registered library; empty when custom_ops is false
  /// True when token id == byte value for ids 0..255 (the export carries byte_vocab.json, {"type": "bytes"}, and
  /// no tokenizer.json): text can be encoded with encode_bytes and decoded with decode_bytes.
  bool byte_level = false;
};

/// How generate() picks tokens and when it stops.
/// Order of operations, as in the Python runtime (mamba_runtime/sampling.py): the repetition penalty on the logits
/// of every token the sequence has seen (see repetition_penalty), then greedy argmax, or temperature, top_k, top_p
/// and one draw of the seeded stream.
struct GenerateOptions {
  int max_new_tokens = 32;  ///< at least 1
  bool greedy = true;       ///< argmax; when false, sample with temperature / top_k / top_p / seed
  float temperature = 1.0f; ///< > 0; logits are divided by it before the softmax
  int top_k = 0;            ///< sample among the k most likely tokens; 0 = the whole vocabulary
  /// Sample among the smallest set of most likely tokens (after temperature and top_k) whose probability reaches
  /// top_p; in (0, 1], 1 = off. Checked also when greedy is true, which does not use it.
  float top_p = 1.0f;
  /// CTRL's rule: the logit of every token the sequence has seen is divided by it when positive, multiplied by it
  /// when negative, before greedy or sampling (> 1: repeats less likely, < 1: more likely); finite and > 0, 1 = off.
  /// Seen: every token run into this Model's sequence since it was made (or share()d), reset() or load_state():
  /// this call's prompt and the tokens it generated, and with reset = false also the prompts and tokens of the
  /// earlier generate() calls and the ids given to prefill() and step() since then: a conversation's next turn
  /// picks the tokens of a generate() of the whole history at once (the rule of the Python runtime's follow()).
  /// A State carries no tokens: after load_state() nothing counts as seen (the tokens of the loaded prefix
  /// included).
  float repetition_penalty = 1.0f;
  uint64_t seed = 0;        ///< same seed, same prompt, same model: same tokens
  std::vector<int64_t> stop_tokens;  ///< generation ends after emitting one of these (it is included in tokens)
  /// Generation ends as soon as the tokens generated in this call (not the prompt) end with one of these (each
  /// non-empty, every id in [0, vocab_size); e.g. a stop string's encode_bytes); its tokens stay in tokens.
  std::vector<std::vector<int64_t>> stop_sequences;
  /// Start from a zero state (true), or continue the current one (false; e.g. after load_state of a prefix, or
  /// after a previous generate(): the next turn of a conversation, whose state then holds every earlier token).
  bool reset = true;
  /// Fill Generation::logprobs: each new token's log-probability under the model.
  bool logprobs = false;
  /// Called with each new token as soon as it is picked, and the float32 logits it was picked from, as the model
  /// gave them (before the repetition penalty, temperature, top_k and top_p) (streaming).
  /// Its time counts in Generation::prefill_ms / decode_ms.
  std::function<void(int64_t token, const std::vector<float>& logits)> on_token;
};

/// The result of generate().
struct Generation {
  std::vector<int64_t> tokens;  ///< the new tokens, in order
  bool stopped = false;         ///< true when it ended on a stop token or a stop sequence
  /// The index in options.stop_sequences of the sequence the tokens end with; when several do, the longest (the
  /// first of equally long ones); -1 when none, and when the last token is a stop token: a stop token is no text,
  /// it ends the generation as a stop token and completes no stop sequence (as in the Python runtime).
  int stop_sequence = -1;
  /// With options.logprobs, per token of `tokens` the natural log of its probability under the model: the log
  /// softmax (in double) of the raw logits it was picked from, before the repetition penalty, temperature, top_k and
  /// top_p (token_logprob()), as the Python runtime's logprobs; empty otherwise.
  std::vector<double> logprobs;
  double prefill_ms = 0;        ///< the prompt through the prefill graph, and picking the first new token
  double decode_ms = 0;         ///< all decode.onnx steps (tokens.size() - 1 of them)
  /// Milliseconds per decoded token (decode_ms / steps); 0 when only one token was generated.
  double ms_per_token() const;
};

/// A copy of one sequence's recurrent state: per layer, conv [d_inner * (d_conv - 1)] and ssm [d_inner * d_state]
/// float32 values (row-major [d_inner, d_conv - 1] and [d_inner, d_state]), as in docs/CONTRACTS.md.
struct State {
  std::vector<std::vector<float>> conv;
  std::vector<std::vector<float>> ssm;
};

class Model {
 public:
  /// Opens `export_dir`: reads manifest.json (and checks the files' sha256), registers the custom-op library,
  /// creates the sessions for the prefill graph (model_last.onnx when present, else model.onnx; any number of
  /// tokens) and decode.onnx (one token), checks their I/O against the contract, allocates the state, and runs
  /// each graph once on token 0 (onnxruntime's first-run costs stay out of the first tokens); the state is then
  /// zeros.
  explicit Model(const std::string& export_dir, const SessionOptions& options = {});
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  /// The same object for this Model and every Model that shares its sessions (see share()).
  const ModelInfo& info() const;

  /// A new Model for another sequence, on this Model's sessions: it shares the loaded graphs and their weights, the
  /// Ort::Env, the options they were opened with and info(), and has its own state (zeros), run buffers, pending
  /// token (see generate()), seen tokens (none; see GenerateOptions::repetition_penalty) and thread check. Nothing is
  /// read, verified, loaded or warmed up again: it costs its state buffers (2 x n_layer x d_inner x (d_conv - 1 +
  /// d_state) float32), the logits, and vocab_size bits for the seen tokens (and, once generate() uses a repetition
  /// penalty, vocab_size float32 for the penalised logits). The shared part lives as
  /// long as any Model that holds it: a Model from share() stays valid after this one is destroyed or moved from,
  /// and a share() of it shares the same sessions.
  /// Threads: Models that share sessions may be used from different threads at the same time (onnxruntime's
  /// Session::Run is thread-safe, the custom-op kernels keep no state); each Model itself stays one thread at a time.
  /// share() reads only the shared part, which no call changes, so it may run while another thread is inside a call
  /// of this Model (not while this Model is being moved or destroyed).
  Model share() const;

  /// Zeroes the recurrent state: the next prefill() starts a new sequence. No token counts as seen any more (see
  /// GenerateOptions::repetition_penalty).
  void reset();
  /// A copy of the current state, e.g. after prefilling a prompt prefix that many requests share.
  /// After generate() it is the state of the prompt and every generated token (see generate()).
  State save_state() const;
  /// Continues from `state` (from save_state() of a Model of the same export); shapes are checked. A State carries
  /// no tokens: afterwards no token counts as seen (see GenerateOptions::repetition_penalty), not even those of the
  /// loaded sequence.
  void load_state(const State& state);
  /// Runs `ids` (at least one, each in [0, vocab_size)) through the prefill graph in chunks of prefill_chunk
  /// tokens, continuing from the current state. Ids are checked before anything runs; a call that fails in
  /// onnxruntime leaves the state after the last chunk that completed. The ids of the chunks that ran count as
  /// seen for generate()'s repetition penalty until reset() or load_state().
  /// Returns the float32 logits of the last position (vocab_size values), valid until the next call.
  const std::vector<float>& prefill(const std::vector<int64_t>& ids);
  /// Runs one token through decode.onnx, continuing from the current state; returns its float32 logits. The token
  /// counts as seen, as prefill()'s.
  const std::vector<float>& step(int64_t id);

  /// reset() (unless options.reset is false), prefill(prompt), then up to max_new_tokens - 1 step()s, picking
  /// each token as `options` says. Afterwards the sequence is the prompt and every generated token, a final stop
  /// token included: the last token is run through decode.onnx when the state is next used (prefill, step,
  /// save_state, or generate with reset false), so a call that does not continue costs no extra step; the prompt
  /// and every generated token count as seen (GenerateOptions::repetition_penalty).
  /// Every option is checked before anything runs (before the reset): a refused call changes nothing.
  Generation generate(const std::vector<int64_t>& prompt, const GenerateOptions& options);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  explicit Model(std::unique_ptr<Impl> impl);  // share()
  Impl& impl() const;  // throws mamba::Error on a moved-from Model
};

/// The index of the largest logit (the first one on ties).
int64_t argmax(const std::vector<float>& logits);

/// The repetition penalty (CTRL's rule), in place: logits[v] for every v with seen[v] is divided by `penalty` when
/// positive, multiplied by it when negative (zero stays zero); the others are unchanged. seen.size() must equal
/// logits.size(); penalty must be finite and > 0 (1 changes nothing). Throws mamba::Error otherwise.
void apply_repetition_penalty(std::vector<float>& logits, const std::vector<bool>& seen, float penalty);

/// log softmax(logits)[token], in double: the log-probability of `token` under the model's logits.
double token_logprob(const std::vector<float>& logits, int64_t token);

/// Seeded temperature / top-k / top-p sampling. The random stream (splitmix64) is the same on every platform,
/// unlike the standard library's distributions; each sample() takes exactly one number from it.
class Sampler {
 public:
  /// temperature > 0 (finite), top_k >= 0 (0 = the whole vocabulary); top_p = 1.
  Sampler(float temperature, int top_k, uint64_t seed);
  /// top_p in (0, 1]: after the temperature and top_k, sample among the smallest set of most likely tokens whose
  /// probability reaches top_p (1 = off: the draws are those of the constructor above).
  Sampler(float temperature, int top_k, float top_p, uint64_t seed);
  int64_t sample(const std::vector<float>& logits);

 private:
  float temperature_;
  int top_k_;
  float top_p_;
  uint64_t state_;
  std::vector<int64_t> order_;   // reused between draws
  std::vector<double> weights_;
  double uniform();  // [0, 1) from a splitmix64 stream
};

/// Byte-level vocabulary: the bytes of `text` as token ids. Throws when the model's vocabulary is not byte-level.
std::vector<int64_t> encode_bytes(const ModelInfo& info, const std::string& text);
/// Byte-level vocabulary: the ids as bytes (ids outside 0..255, padding rows of the vocabulary, become U+FFFD).
std::string decode_bytes(const ModelInfo& info, const std::vector<int64_t>& ids);

}  // namespace mamba
