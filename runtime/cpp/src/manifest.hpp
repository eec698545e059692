// What the runtime needs from an export directory's manifest.json (docs/CONTRACTS.md). Not part of the public API.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

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
};

/// Reads and checks `dir`/manifest.json: format, sizes, every listed file present and, when `verify`, its sha256.
/// Throws mamba::Error naming the file and the key on any problem.
Manifest read_manifest(const std::filesystem::path& dir, bool verify);

}  // namespace mamba::detail
