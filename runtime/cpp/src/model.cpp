// mamba::Model: the two onnxruntime sessions of an export directory (shared with the Models its share() makes) and
// one sequence's recurrent state.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <future>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "manifest.hpp"
#include "mamba_runtime.hpp"
#include "sampling.hpp"

namespace mamba {

namespace {

namespace fs = std::filesystem;
constexpr int64_t kAny = -1;  // a dynamic dimension (batch, seq), as onnxruntime reports it

std::string one_line(std::string text) {
  std::replace(text.begin(), text.end(), '\n', ' ');
  std::replace(text.begin(), text.end(), '\r', ' ');
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

// onnxruntime's message in one line: its first line, from its innermost status on. A status rethrown by another
// function repeats "[ONNXRuntimeError] : 1 : FAIL : " after that function's whole C++ signature.
std::string ort_text(const std::string& message) {
  std::string text = one_line(message.substr(0, message.find_first_of("\r\n")));
  if (text.empty()) return one_line(message);
  const std::string marker = "[ONNXRuntimeError] : ";
  size_t at = text.rfind(marker);
  if (at != std::string::npos) {
    size_t code_end = text.find(" : ", at + marker.size());  // "1 : FAIL : rest"
    size_t name_end = code_end == std::string::npos ? code_end : text.find(" : ", code_end + 3);
    if (name_end != std::string::npos && name_end + 3 < text.size()) text = text.substr(name_end + 3);
  }
  return text;
}

// Runs f, turning an onnxruntime exception into a mamba::Error that says what was being done.
template <class F>
auto ort_call(const std::string& what, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Ort::Exception& e) {
    throw Error(what + ": " + ort_text(e.what()));
  }
}

const char* dtype_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "another type";
  }
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i ? ", " : "") + (shape[i] < 0 ? std::string("?") : std::to_string(shape[i]));
  }
  return out + "]";
}

struct TensorSpec {
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;  // kAny where any size is accepted
};

// name -> spec of a session's inputs (inputs == true) or outputs, as the graph declares them.
std::map<std::string, TensorSpec> declared_io(const Ort::Session& session, bool inputs) {
  Ort::AllocatorWithDefaultOptions alloc;
  std::map<std::string, TensorSpec> specs;
  size_t count = inputs ? session.GetInputCount() : session.GetOutputCount();
  for (size_t i = 0; i < count; ++i) {
    auto name_ptr = inputs ? session.GetInputNameAllocated(i, alloc) : session.GetOutputNameAllocated(i, alloc);
    std::string name = name_ptr.get();
    Ort::TypeInfo type = inputs ? session.GetInputTypeInfo(i) : session.GetOutputTypeInfo(i);
    if (type.GetONNXType() != ONNX_TYPE_TENSOR) {
      specs[name] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED, {}};
      continue;
    }
    auto tensor = type.GetTensorTypeAndShapeInfo();
    specs[name] = {tensor.GetElementType(), tensor.GetShape()};
  }
  return specs;
}

void check_spec(const std::string& where, const TensorSpec& found, const TensorSpec& expected) {
  bool same_type = found.type == expected.type;
  bool same_shape = found.shape.size() == expected.shape.size();
  for (size_t i = 0; same_shape && i < found.shape.size(); ++i) {
    same_shape = expected.shape[i] == kAny || found.shape[i] == expected.shape[i];
  }
  if (!same_type || !same_shape) {
    throw Error(where + " is " + dtype_name(found.type) + " " + shape_text(found.shape) + ", expected " +
                dtype_name(expected.type) + " " + shape_text(expected.shape) + " (docs/CONTRACTS.md, manifest.json)");
  }
}

// The contract's state tensors in the runtime's order: conv of every layer, then ssm of every layer.
std::vector<std::pair<std::string, TensorSpec>> state_specs(const detail::Manifest& m, const char* conv,
                                                            const char* ssm) {
  const auto f32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  std::vector<std::pair<std::string, TensorSpec>> specs;
  for (int64_t i = 0; i < m.n_layer; ++i) {
    specs.push_back({conv + std::to_string(i), {f32, {kAny, m.d_inner, m.d_conv - 1}}});
  }
  for (int64_t i = 0; i < m.n_layer; ++i) {
    specs.push_back({ssm + std::to_string(i), {f32, {kAny, m.d_inner, m.d_state}}});
  }
  return specs;
}

/// Checks a graph's inputs and outputs against the contract; returns the logits dtype.
ONNXTensorElementDataType check_graph_io(const std::string& file, const Ort::Session& session,
                                         const detail::Manifest& m) {
  auto inputs = declared_io(session, true);
  auto outputs = declared_io(session, false);
  // Counted first: a corrupt n_layer (say 10^8) must not make 2 n_layer state names before the mismatch is seen.
  const uint64_t per_kind = 1 + 2 * static_cast<uint64_t>(m.n_layer);
  if (inputs.size() != per_kind || outputs.size() != per_kind) {
    throw Error(file + ": " + std::to_string(inputs.size()) + " inputs and " + std::to_string(outputs.size()) +
                " outputs, but manifest.json's n_layer " + std::to_string(m.n_layer) + " makes " +
                std::to_string(per_kind) + " of each (docs/CONTRACTS.md, graph I/O)");
  }
  auto need = [&](std::map<std::string, TensorSpec>& io, const char* kind, const std::string& name) {
    auto it = io.find(name);
    if (it == io.end()) throw Error(file + ": no " + kind + " '" + name + "' (docs/CONTRACTS.md, graph I/O)");
    TensorSpec spec = it->second;
    io.erase(it);
    return spec;
  };
  check_spec(file + ": input 'input_ids'", need(inputs, "input", "input_ids"),
             {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, {kAny, kAny}});
  for (auto& [name, spec] : state_specs(m, "past_conv.", "past_ssm.")) {
    check_spec(file + ": input '" + name + "'", need(inputs, "input", name), spec);
  }
  if (!inputs.empty()) {
    throw Error(file + ": unexpected input '" + inputs.begin()->first + "' (manifest.json says n_layer " +
                std::to_string(m.n_layer) + ")");
  }
  TensorSpec logits = need(outputs, "output", "logits");
  if (logits.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && logits.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 &&
      logits.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) {
    throw Error(file + ": output 'logits' is " + dtype_name(logits.type) + ", expected float32, float16 or bfloat16");
  }
  check_spec(file + ": output 'logits'", logits, {logits.type, {kAny, kAny, m.vocab_size}});
  for (auto& [name, spec] : state_specs(m, "present_conv.", "present_ssm.")) {
    check_spec(file + ": output '" + name + "'", need(outputs, "output", name), spec);
  }
  return logits.type;
}

Ort::SessionOptions make_session_options(const SessionOptions& options, const detail::Manifest& m) {
  Ort::SessionOptions so;
  so.SetIntraOpNumThreads(options.intra_op_threads);
  so.SetLogSeverityLevel(ORT_LOGGING_LEVEL_FATAL);  // also where the application made the Env at a lower level
  for (const auto& [key, value] : options.ort_config) {
    ort_call("onnxruntime session config entry '" + key + "'", [&] { so.AddConfigEntry(key.c_str(), value.c_str()); });
  }
  if (options.custom_ops) {
    if (m.custom_op_library.empty()) {
      throw Error((m.dir / "manifest.json").string() +
                  ": the export ships no custom-op library (custom_op_library is null); run it without custom ops "
                  "(SessionOptions::custom_ops = false, mamba_generate --no-custom-ops) or re-export with the library");
    }
    ort_call(m.custom_op_library.string() + ": cannot register the custom-op library",
             [&] { so.RegisterCustomOpsLibrary(m.custom_op_library.c_str()); });
  }
  return so;
}

Ort::Session open_graph(const Ort::Env& env, const fs::path& path, const Ort::SessionOptions& so) {
  return ort_call(path.string() + ": cannot load", [&] { return Ort::Session(env, path.c_str(), so); });
}

size_t element_bytes(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return 2;
    default: throw Error(std::string("no zeros of ") + dtype_name(type));
  }
}

Ort::Value zeros(OrtAllocator* alloc, const std::vector<int64_t>& shape, ONNXTensorElementDataType type) {
  Ort::Value v = Ort::Value::CreateTensor(alloc, shape.data(), shape.size(), type);
  size_t bytes = v.GetTensorTypeAndShapeInfo().GetElementCount() * element_bytes(type);
  std::fill_n(static_cast<char*>(v.GetTensorMutableRawData()), bytes, 0);
  return v;
}

// Converts out.size() logits (any float dtype) from element `offset` on to float32 in `out`.
template <class T>
void row_to_float(const Ort::Value& logits, size_t offset, std::vector<float>& out) {
  const T* row = logits.GetTensorData<T>() + offset;
  for (size_t v = 0; v < out.size(); ++v) out[v] = static_cast<float>(row[v]);
}

template <>
void row_to_float<Ort::Float16_t>(const Ort::Value& logits, size_t offset, std::vector<float>& out) {
  const Ort::Float16_t* row = logits.GetTensorData<Ort::Float16_t>() + offset;
  for (size_t v = 0; v < out.size(); ++v) out[v] = row[v].ToFloat();
}

template <>
void row_to_float<Ort::BFloat16_t>(const Ort::Value& logits, size_t offset, std::vector<float>& out) {
  const Ort::BFloat16_t* row = logits.GetTensorData<Ort::BFloat16_t>() + offset;
  for (size_t v = 0; v < out.size(); ++v) out[v] = row[v].ToFloat();
}

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

double Generation::ms_per_token() const { return tokens.size() > 1 ? decode_ms / double(tokens.size() - 1) : 0.0; }

struct Model::Impl {
  // What a Model and the Models made by its share() hold in common: the manifest, the Env and the two sessions (the
  // weights, loaded once) and the run's names. Nothing changes it once built, so any number of threads read it at
  // once (onnxruntime's Session::Run is thread-safe; the custom-op library's kernels keep no state between runs). It
  // lives as long as the last Model that holds it.
  struct Shared {
    detail::Manifest manifest;
    ModelInfo info;
    // FATAL only: onnxruntime would print its multi-line, coloured ERROR log of a graph it cannot load before our
    // one-line error, which carries its message (ort_text). Its warnings were never shown.
    Ort::Env env{ORT_LOGGING_LEVEL_FATAL, "mamba_runtime"};
    Ort::Session prefill_graph{nullptr};  // model_last.onnx or model.onnx: any number of tokens
    Ort::Session decode_graph{nullptr};   // decode.onnx: one token, fused DecodeStep
    ONNXTensorElementDataType logits_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    std::vector<std::string> input_names, output_names;  // input_ids, past_*; logits, present_* (state order)
    std::vector<const char*> input_cnames, output_cnames;
    size_t prefill_chunk = 0;  // prompt tokens per prefill run

    Shared(const std::string& dir, const SessionOptions& options);  // reads, verifies and loads the export
  };

  // Never null; the same object for a Model and every Model made by share() from it or from those.
  const std::shared_ptr<const Shared> shared;
  // The rest is this Model's sequence, which no other Model sees.
  Ort::AllocatorWithDefaultOptions alloc;
  // Double-buffered state: a run reads states[current] and writes states[1 - current]; only a run that succeeds
  // flips `current`, so a failed run leaves the sequence where it was. No state copies, no per-token allocation.
  std::array<std::vector<Ort::Value>, 2> states;
  int current = 0;
  // Per value of `current`: the run's input and output pointers, slot 0 (input_ids / logits) set at each run.
  std::array<std::vector<const OrtValue*>, 2> run_inputs;
  std::array<std::vector<OrtValue*>, 2> run_outputs;
  Ort::Value step_ids{nullptr};     // [1, 1] int64, rewritten for every decode step
  Ort::Value step_logits{nullptr};  // [1, 1, vocab], preallocated decode output
  std::vector<float> logits;        // float32 logits of the last position, what prefill() / step() return
  // The tokens run into this sequence since the Model was made, reset() or load_state() (a State carries no tokens),
  // for the repetition penalty: seen[id]. Marked once a run with them succeeded, like the state; generate()'s last
  // token (`unfed`) when it is picked, as it is part of the sequence from then on.
  std::vector<bool> seen;
  std::vector<float> penalized;     // generate(): the logits after the repetition penalty (reused, allocated once)
  // generate()'s last token, not run yet: the state holds the sequence before it. The next call that uses the state
  // (prefill, step, save_state, a generate that continues) runs it first; reset and load_state drop it. So the
  // state after generate() is the whole sequence, with no decode step spent when nothing continues it.
  int64_t unfed = -1;
  // The thread inside a call of this Model (none between calls): a second thread is refused (Busy), not let in to
  // corrupt the state and the run buffers. Models that share sessions have one each, so they run at once.
  std::atomic<std::thread::id> user{};

  struct Busy {  // held by every public call; the same thread may nest (generate calls prefill and step)
    std::atomic<std::thread::id>& user;
    bool outer = false;
    explicit Busy(Impl& m) : user(m.user) {
      std::thread::id none, me = std::this_thread::get_id();
      if (user.compare_exchange_strong(none, me)) {
        outer = true;
      } else if (none != me) {
        throw Error("this Model is in use by another thread: a Model is not thread-safe; use one Model per thread "
                    "(or a lock around its calls)");
      }
    }
    ~Busy() {
      if (outer) user.store(std::thread::id{});
    }
    Busy(const Busy&) = delete;
    Busy& operator=(const Busy&) = delete;
  };

  explicit Impl(std::shared_ptr<const Shared> sessions);  // a zero state and its own run buffers; loads nothing
  void feed_unfed();  // runs `unfed` through decode.onnx, when there is one
  void run(const Ort::Session& graph, const char* file, const Ort::Value& ids, Ort::Value& logits_out);
  void take_logits(const Ort::Value& out, size_t offset);  // vocab_size values from element `offset`
  void check_token(int64_t id, const char* kind, int64_t position = -1) const;
  void check_prompt(const std::vector<int64_t>& ids) const;  // not empty, every id in the vocabulary
  void check_stop_sequences(const std::vector<std::vector<int64_t>>& sequences) const;  // each as a prompt
};

Model::Impl::Shared::Shared(const std::string& dir, const SessionOptions& options) {
  if (options.intra_op_threads < 0) {
    throw Error("intra_op_threads must be >= 0 (0: onnxruntime's choice), found " +
                std::to_string(options.intra_op_threads));
  }
  if (options.prefill_chunk < 0) {
    throw Error("prefill_chunk must be >= 0 (0: automatic), found " + std::to_string(options.prefill_chunk));
  }
  manifest = detail::read_manifest(dir, options.verify_checksums);
  // The weight files' sha256 runs while onnxruntime loads them. A mismatch is the error, also where the load failed:
  // a damaged weights.bin explains that better than onnxruntime's message.
  std::future<void> weights = detail::check_weights(manifest);
  try {
    Ort::SessionOptions so = make_session_options(options, manifest);
    prefill_graph = open_graph(env, manifest.dir / manifest.prefill_graph, so);
    decode_graph = open_graph(env, manifest.dir / "decode.onnx", so);
    logits_type = check_graph_io(manifest.prefill_graph, prefill_graph, manifest);
    if (check_graph_io("decode.onnx", decode_graph, manifest) != logits_type) {
      throw Error("decode.onnx: logits dtype differs from " + manifest.prefill_graph + "'s " +
                  dtype_name(logits_type));
    }
  } catch (...) {
    weights.get();
    throw;
  }
  weights.get();
  info.export_dir = manifest.dir.string();
  info.n_layer = manifest.n_layer;
  info.d_inner = manifest.d_inner;
  info.d_conv = manifest.d_conv;
  info.d_state = manifest.d_state;
  info.vocab_size = manifest.vocab_size;
  info.logits_dtype = dtype_name(logits_type);
  info.prefill_graph = manifest.prefill_graph;
  info.custom_op_library = options.custom_ops ? manifest.custom_op_library.string() : std::string();
  info.byte_level = manifest.byte_level;

  input_names = {"input_ids"};
  output_names = {"logits"};
  for (auto& [name, spec] : state_specs(manifest, "past_conv.", "past_ssm.")) input_names.push_back(name);
  for (auto& [name, spec] : state_specs(manifest, "present_conv.", "present_ssm.")) output_names.push_back(name);
  for (auto& n : input_names) input_cnames.push_back(n.c_str());
  for (auto& n : output_names) output_cnames.push_back(n.c_str());
  size_t automatic = manifest.prefill_graph == "model_last.onnx" ? 1024 : 128;
  prefill_chunk = options.prefill_chunk > 0 ? size_t(options.prefill_chunk) : automatic;
}

Model::Impl::Impl(std::shared_ptr<const Shared> sessions) : shared(std::move(sessions)) {
  for (auto& [name, spec] : state_specs(shared->manifest, "past_conv.", "past_ssm.")) {
    for (auto& buffers : states) buffers.push_back(zeros(alloc, {1, spec.shape[1], spec.shape[2]}, spec.type));
  }
  for (int c = 0; c < 2; ++c) {
    run_inputs[c] = {nullptr};
    run_outputs[c] = {nullptr};
    for (auto& v : states[c]) run_inputs[c].push_back(v);
    for (auto& v : states[1 - c]) run_outputs[c].push_back(v);
  }
  step_ids = zeros(alloc, {1, 1}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
  step_logits = zeros(alloc, {1, 1, shared->manifest.vocab_size}, shared->logits_type);
  logits.resize(size_t(shared->manifest.vocab_size));
  seen.assign(size_t(shared->manifest.vocab_size), false);
}

void Model::Impl::run(const Ort::Session& graph, const char* file, const Ort::Value& ids, Ort::Value& logits_out) {
  std::vector<const OrtValue*>& inputs = run_inputs[current];
  std::vector<OrtValue*>& outputs = run_outputs[current];
  inputs[0] = ids;
  outputs[0] = logits_out;  // nullptr: onnxruntime allocates it
  try {  // not ort_call: no message string is built for a run that succeeds
    Ort::ThrowOnError(Ort::GetApi().Run(graph, nullptr, shared->input_cnames.data(), inputs.data(), inputs.size(),
                                        shared->output_cnames.data(), shared->output_cnames.size(), outputs.data()));
  } catch (const Ort::Exception& e) {
    throw Error(std::string(file) + ": run failed: " + ort_text(e.what()));
  }
  if (!logits_out) logits_out = Ort::Value(outputs[0]);
  current = 1 - current;
}

void Model::Impl::feed_unfed() {
  if (unfed < 0) return;
  *step_ids.GetTensorMutableData<int64_t>() = unfed;
  // Its logits are not needed: nothing picks from them.
  run(shared->decode_graph, "decode.onnx", step_ids, step_logits);
  unfed = -1;  // only once the run succeeded: a failed one leaves the state and the token as they were
}

void Model::Impl::take_logits(const Ort::Value& out, size_t offset) {
  switch (shared->logits_type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: row_to_float<Ort::Float16_t>(out, offset, logits); break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: row_to_float<Ort::BFloat16_t>(out, offset, logits); break;
    default: row_to_float<float>(out, offset, logits); break;
  }
  if (!std::all_of(logits.begin(), logits.end(), [](float x) { return std::isfinite(x); })) {
    throw Error("the model produced non-finite logits (NaN or infinity)");
  }
}

// The message names the token: "<kind> 7 at position 2 is out of range [0, 101)" (no position when < 0).
void Model::Impl::check_token(int64_t id, const char* kind, int64_t position) const {
  if (id >= 0 && id < shared->manifest.vocab_size) return;
  std::string where = position >= 0 ? " at position " + std::to_string(position) : "";
  throw Error(kind + (" " + std::to_string(id)) + where + " is out of range [0, " +
              std::to_string(shared->manifest.vocab_size) + ")");
}

void Model::Impl::check_prompt(const std::vector<int64_t>& ids) const {
  if (ids.empty()) throw Error("empty prompt: give at least one token id");
  for (size_t i = 0; i < ids.size(); ++i) check_token(ids[i], "token id", int64_t(i));
}

// "stop sequence 1 is empty: ...", "stop sequence 0: token id 7 at position 2 is out of range [0, 101)".
void Model::Impl::check_stop_sequences(const std::vector<std::vector<int64_t>>& sequences) const {
  for (size_t i = 0; i < sequences.size(); ++i) {
    std::string name = "stop sequence " + std::to_string(i);
    if (sequences[i].empty()) throw Error(name + " is empty: give at least one token id");
    const std::string kind = name + ": token id";
    for (size_t k = 0; k < sequences[i].size(); ++k) check_token(sequences[i][k], kind.c_str(), int64_t(k));
  }
}

Model::Model(const std::string& export_dir, const SessionOptions& options)
    : impl_([&] {
        try {
          return ort_call("onnxruntime", [&] {
            return std::make_unique<Impl>(std::make_shared<const Impl::Shared>(export_dir, options));
          });
        } catch (const std::filesystem::filesystem_error& e) {  // a symlink loop, a path too long, ...: one Error
          std::string path = e.path1().empty() ? export_dir : e.path1().string();
          throw Error(path + ": " + e.code().message());
        }
      }()) {
  // onnxruntime allocates and plans on a session's first runs: pay for it here, not in the first tokens' latency.
  prefill({0});
  step(0);
  reset();
}
Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

Model::Impl& Model::impl() const {
  if (!impl_) throw Error("this mamba::Model was moved from; use the Model it was moved to");
  return *impl_;
}

const ModelInfo& Model::info() const { return impl().shared->info; }

// No Busy: it reads only `shared`, which no call changes, so another thread may be inside a call of this Model.
// The sessions ran at the opening already: nothing to warm up.
Model Model::share() const {
  std::shared_ptr<const Impl::Shared> shared = impl().shared;
  return Model(ort_call("onnxruntime", [&] { return std::make_unique<Impl>(std::move(shared)); }));
}

void Model::reset() {
  Impl& m = impl();
  Impl::Busy busy(m);
  m.unfed = -1;
  std::fill(m.seen.begin(), m.seen.end(), false);
  for (auto& v : m.states[m.current]) {
    std::fill_n(v.GetTensorMutableData<float>(), v.GetTensorTypeAndShapeInfo().GetElementCount(), 0.0f);
  }
}

State Model::save_state() const {
  Impl& m = impl();
  Impl::Busy busy(m);
  m.feed_unfed();  // the state of the whole sequence, generate()'s last token included
  State state;
  for (size_t i = 0; i < m.states[m.current].size(); ++i) {
    const Ort::Value& v = m.states[m.current][i];
    const float* data = v.GetTensorData<float>();
    auto& dst = i < size_t(m.shared->manifest.n_layer) ? state.conv : state.ssm;  // conv of every layer, then ssm
    dst.emplace_back(data, data + v.GetTensorTypeAndShapeInfo().GetElementCount());
  }
  return state;
}

void Model::load_state(const State& state) {
  Impl& m = impl();
  Impl::Busy busy(m);
  const detail::Manifest& manifest = m.shared->manifest;
  size_t layers = size_t(manifest.n_layer);
  size_t conv = size_t(manifest.d_inner * (manifest.d_conv - 1));
  size_t ssm = size_t(manifest.d_inner * manifest.d_state);
  if (state.conv.size() != layers || state.ssm.size() != layers) {
    throw Error("load_state: expected " + std::to_string(layers) + " layers of conv and ssm state, found " +
                std::to_string(state.conv.size()) + " and " + std::to_string(state.ssm.size()));
  }
  for (size_t i = 0; i < layers; ++i) {
    if (state.conv[i].size() != conv || state.ssm[i].size() != ssm) {
      throw Error("load_state: layer " + std::to_string(i) + " has " + std::to_string(state.conv[i].size()) +
                  " conv and " + std::to_string(state.ssm[i].size()) + " ssm values, expected " + std::to_string(conv) +
                  " and " + std::to_string(ssm));
    }
    for (const std::vector<float>* values : {&state.conv[i], &state.ssm[i]}) {
      if (!std::all_of(values->begin(), values->end(), [](float v) { return std::isfinite(v); })) {
        throw Error("load_state: layer " + std::to_string(i) + "'s " + (values == &state.conv[i] ? "conv" : "ssm") +
                    " state has a NaN or infinite value: a damaged state (the Python runtime refuses it too)");
      }
    }
  }
  m.unfed = -1;
  std::fill(m.seen.begin(), m.seen.end(), false);  // the State carries no tokens
  for (size_t i = 0; i < layers; ++i) {
    std::copy(state.conv[i].begin(), state.conv[i].end(), m.states[m.current][i].GetTensorMutableData<float>());
    std::copy(state.ssm[i].begin(), state.ssm[i].end(), m.states[m.current][layers + i].GetTensorMutableData<float>());
  }
}

const std::vector<float>& Model::prefill(const std::vector<int64_t>& ids) {
  Impl& m = impl();
  Impl::Busy busy(m);
  m.check_prompt(ids);
  m.feed_unfed();
  std::vector<int64_t> buffer = ids;  // onnxruntime wants a mutable pointer even for an input
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeCPU);
  // In chunks, each continuing the state: model.onnx's logits are [1, chunk, vocab], so a long prompt in one run
  // would allocate logits for every position.
  const Impl::Shared& shared = *m.shared;
  for (size_t start = 0; start < buffer.size(); start += shared.prefill_chunk) {
    size_t n = std::min(shared.prefill_chunk, buffer.size() - start);
    std::array<int64_t, 2> shape{1, int64_t(n)};
    Ort::Value input = Ort::Value::CreateTensor<int64_t>(cpu, buffer.data() + start, n, shape.data(), shape.size());
    Ort::Value out{nullptr};
    m.run(shared.prefill_graph, shared.manifest.prefill_graph.c_str(), input, out);
    for (size_t i = start; i < start + n; ++i) m.seen[size_t(buffer[i])] = true;
    if (start + n == buffer.size()) {  // logits [1, n, vocab] (model.onnx) or [1, 1, vocab] (model_last.onnx)
      int64_t positions = out.GetTensorTypeAndShapeInfo().GetShape()[1];
      m.take_logits(out, size_t(positions - 1) * m.logits.size());
    }
  }
  return m.logits;
}

const std::vector<float>& Model::step(int64_t id) {
  Impl& m = impl();
  Impl::Busy busy(m);
  m.check_token(id, "token id");
  m.feed_unfed();
  *m.step_ids.GetTensorMutableData<int64_t>() = id;
  m.run(m.shared->decode_graph, "decode.onnx", m.step_ids, m.step_logits);
  m.seen[size_t(id)] = true;
  m.take_logits(m.step_logits, 0);
  return m.logits;
}

Generation Model::generate(const std::vector<int64_t>& prompt, const GenerateOptions& options) {
  Impl& m = impl();
  Impl::Busy busy(m);
  if (options.max_new_tokens < 1) {
    throw Error("max_new_tokens must be at least 1, found " + std::to_string(options.max_new_tokens));
  }
  for (int64_t stop : options.stop_tokens) m.check_token(stop, "stop token id");
  m.check_stop_sequences(options.stop_sequences);
  // top_p is checked also for greedy decoding, which does not use it (temperature and top_k are not).
  Sampler sampler(options.greedy ? 1.0f : options.temperature, options.greedy ? 0 : options.top_k, options.top_p,
                  options.seed);
  detail::check_repetition_penalty(options.repetition_penalty);
  const bool penalize = options.repetition_penalty != 1.0f;
  // The penalty on a copy (m.penalized, reused: no allocation per token) of the model's logits, every token of the
  // sequence so far counted (m.seen: prefill() and step() mark theirs); on_token gets the model's logits.
  Generation g;
  auto pick = [&](const std::vector<float>& logits) {
    const std::vector<float>* from = &logits;
    if (penalize) {
      m.penalized = logits;
      apply_repetition_penalty(m.penalized, m.seen, options.repetition_penalty);
      from = &m.penalized;
    }
    int64_t token = options.greedy ? argmax(*from) : sampler.sample(*from);
    if (options.logprobs) g.logprobs.push_back(token_logprob(logits, token));
    if (options.on_token) options.on_token(token, logits);
    return token;
  };
  auto is_stop = [&](int64_t t) {
    return std::find(options.stop_tokens.begin(), options.stop_tokens.end(), t) != options.stop_tokens.end();
  };

  m.check_prompt(prompt);  // before reset(), so that a refused call leaves the state as it was

  // After each new token: the longest stop sequence the new tokens end with, the first of equally long ones (only
  // their tail is compared, last token first), then whether a stop sequence or a stop token ends the generation.
  // The longest, as the Python runtime cuts a text where the earliest of the matches that end together starts.
  auto ended = [&] {
    g.stop_sequence = -1;
    // A stop token is no text: it ends the generation as a stop token and completes no stop sequence (as in the
    // Python runtime, whose stop strings never see a stop token).
    if (is_stop(g.tokens.back())) return g.stopped = true;
    size_t longest = 0;
    for (size_t i = 0; i < options.stop_sequences.size(); ++i) {
      const std::vector<int64_t>& s = options.stop_sequences[i];
      if (s.size() > longest && s.size() <= g.tokens.size() && std::equal(s.rbegin(), s.rend(), g.tokens.rbegin())) {
        g.stop_sequence = int(i);
        longest = s.size();
      }
    }
    g.stopped = g.stop_sequence >= 0;
    return g.stopped;
  };
  if (options.reset) reset();
  auto start = std::chrono::steady_clock::now();
  g.tokens.push_back(pick(prefill(prompt)));
  g.prefill_ms = ms_since(start);
  start = std::chrono::steady_clock::now();
  while (!ended() && int(g.tokens.size()) < options.max_new_tokens) {
    g.tokens.push_back(pick(step(g.tokens.back())));
  }
  g.decode_ms = ms_since(start);
  m.unfed = g.tokens.back();  // part of the sequence; run when the state is next used (see Impl::unfed)
  m.seen[size_t(m.unfed)] = true;
  return g;
}

}  // namespace mamba
