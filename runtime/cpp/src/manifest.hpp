// What the runtime needs from an export directory's manifest.json (docs/CONTRACTS.md). Not part of the public API.
#pragma once

#include <cstdint>
#include <filesystem>
#include <future>
#include <string>
#include <utility>
#include <vector>

namespace mamba::detail {

struct Manifest {
  std::filesystem::path dir;
  std::filesystem::path custom_op_library;  ///< dir / manifest["custom_op_library"] (may not exist); empty when null
  int64_t n_layer = 0;
  int64_t d_inner = 0;
  int64_t d_conv = 0;
  int64_t d_state = 0;
  int64_t vocab_size = 0;
  bool byte_level = false;
  std::string prefill_graph;  ///< "model_last.onnx" when the export has it (last-position logits), else "model.onnx"
  /// The weight files (weights.bin, decode_weights_f16.bin, decode_weights_i8.bin) with their sha256, when
  /// `verify`: read_manifest leaves them to check_weights, which runs while onnxruntime loads them (it only reads
  /// numbers from these files).
  std::vector<std::pair<std::filesystem::path, std::string>> unchecked_weights;
};

/// Reads and checks `dir`/manifest.json: format, sizes, every listed file present and, when `verify`, its sha256
/// (the weight files' in `unchecked_weights`, for check_weights). Throws mamba::Error naming the file and the key on
/// any problem.
Manifest read_manifest(const std::filesystem::path& dir, bool verify);

/// The sha256 check of `m.unchecked_weights` in a thread: get() throws mamba::Error if a file does not match.
std::future<void> check_weights(const Manifest& m);

}  // namespace mamba::detail
