// Text for byte-level vocabularies: token id = byte value of the UTF-8 text.
#include <string>
#include <vector>

#include "mamba_runtime.hpp"

namespace mamba {

namespace {
void require_byte_level(const ModelInfo& info) {
  if (!info.byte_level) {
    throw Error(info.export_dir + ": the vocabulary is not byte-level (manifest.json tokenizer); give token ids");
  }
}
}  // namespace

std::vector<int64_t> encode_bytes(const ModelInfo& info, const std::string& text) {
  require_byte_level(info);
  std::vector<int64_t> ids;
  for (unsigned char c : text) ids.push_back(c);
  return ids;
}

std::string decode_bytes(const ModelInfo& info, const std::vector<int64_t>& ids) {
  require_byte_level(info);
  std::string text;
  for (int64_t id : ids) {
    // Ids past 255 are padding rows of the vocabulary: shown as U+FFFD, as the Python runtime does.
    text += (id >= 0 && id <= 255) ? std::string(1, char(id)) : std::string("\xEF\xBF\xBD");
  }
  return text;
}

}  // namespace mamba
