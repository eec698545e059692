// Reading manifest.json of an export directory (docs/CONTRACTS.md, "The export directory").
#include "manifest.hpp"

#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "json.hpp"
#include "sha256.hpp"
#include "mamba_runtime.hpp"

namespace mamba::detail {

namespace {

namespace fs = std::filesystem;
constexpr int64_t kFormatVersion = 1;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot be read");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Typed access to manifest members, every error naming the file and the key.
class Reader {
 public:
  explicit Reader(fs::path path) : path_(std::move(path)) {}

  [[noreturn]] void fail(const std::string& what) const { throw Error(path_.string() + ": " + what); }

  const Json& member(const Json& object, const std::string& key, const std::string& where) const {
    const Json* value = object.find(key);
    if (!value) fail("missing key '" + where + key + "'");
    return *value;
  }

  const Json& typed(const Json& object, const std::string& key, Json::Type type, const std::string& where = "") const {
    const Json& value = member(object, key, where);
    if (!value.is(type)) {
      fail("'" + where + key + "' must be " + Json::type_name(type) + ", found " + Json::type_name(value.type()));
    }
    return value;
  }

  int64_t positive_int(const Json& object, const std::string& key, const std::string& where = "") const {
    double v = typed(object, key, Json::Type::Number, where).as_number();
    if (!(v >= 1 && v <= 9.0e15 && v == double(int64_t(v)))) {
      std::ostringstream found;  // -1, 64.5 or 1e+20, not std::to_string's -1.000000
      found << v;
      fail("'" + where + key + "' must be a positive integer, found " + found.str());
    }
    return int64_t(v);
  }

 private:
  fs::path path_;
};

Json parse_json(const fs::path& path) {
  try {
    return Json::parse(read_file(path));
  } catch (const Error& e) {
    throw Error(path.string() + ": not valid JSON (" + e.what() + ")");
  }
}

// The custom-op library: a file name inside the export directory, or empty when the export ships none (null).
fs::path library_path(const Reader& r, const Json& root, const fs::path& dir) {
  const Json& value = r.member(root, "custom_op_library", "");
  if (value.is(Json::Type::Null)) return {};
  std::string name = r.typed(root, "custom_op_library", Json::Type::String).as_string();
  if (name.empty() || fs::path(name).filename() != fs::path(name) || name == "." || name == "..") {
    r.fail("custom_op_library must be a file name inside the export directory, found '" + name + "'");
  }
  return dir / name;
}

// Byte-level vocabulary: the export carries byte_vocab.json ({"type": "bytes"}) and no tokenizer.json, which
// the runtimes would prefer (runtime/mamba_runtime/tokenizer.py).
bool byte_level_vocabulary(const Reader& r, const Json& root, const fs::path& dir) {
  const Json& tokenizer = r.typed(root, "tokenizer", Json::Type::Object);
  const Json& files = r.typed(tokenizer, "files", Json::Type::Array, "tokenizer.");
  bool bytes = false, hf = false;
  for (const Json& f : files.as_array()) {
    if (!f.is(Json::Type::String)) r.fail("'tokenizer.files' must hold file names");
    bytes |= f.as_string() == "byte_vocab.json";
    hf |= f.as_string() == "tokenizer.json";
  }
  if (!bytes || hf) return false;
  fs::path path = dir / "byte_vocab.json";
  Reader vocab(path);
  Json spec = parse_json(path);
  const Json* type = spec.find("type");
  if (!type || !type->is(Json::Type::String) || type->as_string() != "bytes") {
    vocab.fail("expected {\"type\": \"bytes\", ...}");
  }
  return true;
}

// name -> sha256 of every file of the export ("files" in manifest.json), each checked to be present.
std::map<std::string, std::string> listed_files(const Reader& r, const Json& root, const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& [name, entry] : r.typed(root, "files", Json::Type::Object).as_object()) {
    if (name.empty() || fs::path(name).filename() != fs::path(name) || name == "." || name == "..") {
      r.fail("'files' lists '" + name + "', which is not a file name inside the export directory (the manifest " +
             "was edited or is not from 'mamba-export export')");
    }
    const Json* digest = entry.find("sha256");
    if (!digest || !digest->is(Json::Type::String) || digest->as_string().size() != 64) {
      r.fail("bad entry for file '" + name + "' in 'files' (expected {\"sha256\": \"<64 hex digits>\", ...})");
    }
    if (!fs::is_regular_file(dir / name)) {
      std::string what = fs::exists(dir / name) ? "not a regular file" : "missing";
      throw Error((dir / name).string() + ": " + what + " (listed in manifest.json); the export directory is " +
                  "incomplete");
    }
    files[name] = digest->as_string();
  }
  for (const char* graph : {"model.onnx", "decode.onnx"}) {
    if (!files.count(graph)) r.fail(std::string("does not list ") + graph + ", which every ONNX export has");
  }
  return files;
}

// onnxruntime only reads numbers from these (external data), so they may be checked while the sessions load.
constexpr const char* kWeightFiles[] = {"weights.bin", "decode_weights_f16.bin", "decode_weights_i8.bin"};

bool is_weight_file(const std::string& name) {
  for (const char* w : kWeightFiles) {
    if (name == w) return true;
  }
  return false;
}

void check_digest(const fs::path& path, const std::string& digest) {
  if (sha256_file(path) != digest) {
    throw Error(path.string() + ": sha256 does not match manifest.json (file changed or corrupted); re-export it");
  }
}

}  // namespace

Manifest read_manifest(const fs::path& dir, bool verify) {
  if (!fs::exists(dir)) throw Error(dir.string() + ": export directory does not exist");
  if (!fs::is_directory(dir)) throw Error(dir.string() + ": not a directory (give the export directory)");
  fs::path path = dir / "manifest.json";
  if (!fs::is_regular_file(path)) {
    throw Error(path.string() + ": missing (is " + dir.string() +
                " an export directory written by 'mamba-export export'?)");
  }
  Reader r(path);
  Json root = parse_json(path);
  if (!root.is(Json::Type::Object)) {
    r.fail("expected a JSON object, found " + std::string(Json::type_name(root.type())));
  }
  int64_t version = r.positive_int(root, "format_version");
  if (version != kFormatVersion) {
    r.fail("format_version " + std::to_string(version) + " is not supported by this runtime (supported: " +
           std::to_string(kFormatVersion) + "); re-export with this version of mamba-export");
  }
  const Json* format = root.find("format");
  if (format && !(format->is(Json::Type::String) && format->as_string() == "onnx")) {
    r.fail("not an ONNX export (format must be \"onnx\"); export with --format onnx");
  }
  // dtype is read as the Python runtime reads it (runtime/mamba_runtime/manifest.py): absent means float32.
  const Json* dtype = root.find("dtype");
  if (dtype && !(dtype->is(Json::Type::String) &&
                 (dtype->as_string() == "float32" || dtype->as_string() == "float16" ||
                  dtype->as_string() == "bfloat16"))) {
    r.fail("'dtype' must be one of \"float32\", \"float16\", \"bfloat16\"");
  }
  const Json& config = r.typed(root, "config", Json::Type::Object);
  Manifest m;
  m.dir = fs::absolute(dir).lexically_normal();
  m.n_layer = r.positive_int(config, "n_layer", "config.");
  m.d_inner = r.positive_int(config, "d_inner", "config.");
  m.d_conv = r.positive_int(config, "d_conv", "config.");
  m.d_state = r.positive_int(config, "d_state", "config.");
  m.vocab_size = r.positive_int(config, "vocab_size", "config.");
  if (m.d_conv < 2) r.fail("'config.d_conv' must be at least 2, found " + std::to_string(m.d_conv));
  auto files = listed_files(r, root, m.dir);
  if (verify) {
    for (const auto& [name, digest] : files) {
      if (is_weight_file(name)) {
        m.unchecked_weights.emplace_back(m.dir / name, digest);
      } else {
        check_digest(m.dir / name, digest);
      }
    }
  }
  m.prefill_graph = files.count("model_last.onnx") ? "model_last.onnx" : "model.onnx";
  m.custom_op_library = library_path(r, root, m.dir);
  if (!m.custom_op_library.empty() && !files.count(m.custom_op_library.filename().string())) {
    r.fail("custom_op_library '" + m.custom_op_library.filename().string() + "' is not among the listed files");
  }
  m.byte_level = byte_level_vocabulary(r, root, m.dir);
  return m;
}

std::future<void> check_weights(const Manifest& m) {
  return std::async(std::launch::async, [files = m.unchecked_weights] {
    for (const auto& [path, digest] : files) check_digest(path, digest);
  });
}

}  // namespace mamba::detail
