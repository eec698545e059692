// Reading manifest.json of an export directory (docs/CONTRACTS.md, "The export directory").
#include "manifest.hpp"

#include <fstream>
#include <sstream>
#include <string>

#include "json.hpp"
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
      fail("'" + where + key + "' must be a positive integer, found " + std::to_string(v));
    }
    return int64_t(v);
  }

 private:
  fs::path path_;
};

Json parse_manifest(const fs::path& path) {
  try {
    return Json::parse(read_file(path));
  } catch (const Error& e) {
    throw Error(path.string() + ": not valid JSON (" + e.what() + ")");
  }
}

// The custom-op library: a file name inside the export directory, listed among its files.
fs::path library_path(const Reader& r, const Json& root, const fs::path& dir) {
  std::string name = r.typed(root, "custom_op_library", Json::Type::String).as_string();
  if (name.empty() || fs::path(name).filename() != fs::path(name) || name == "." || name == "..") {
    r.fail("custom_op_library must be a file name inside the export directory, found '" + name + "'");
  }
  return dir / name;
}

bool byte_level_vocabulary(const Reader& r, const Json& root) {
  const Json* tokenizer = root.find("tokenizer");
  if (!tokenizer || tokenizer->is(Json::Type::Null)) return false;
  if (!tokenizer->is(Json::Type::Object)) r.fail("'tokenizer' must be an object or null");
  return r.typed(*tokenizer, "type", Json::Type::String, "tokenizer.").as_string() == "bytes";
}

}  // namespace

Manifest read_manifest(const fs::path& dir) {
  if (!fs::exists(dir)) throw Error(dir.string() + ": export directory does not exist");
  if (!fs::is_directory(dir)) throw Error(dir.string() + ": not a directory (give the export directory)");
  fs::path path = dir / "manifest.json";
  if (!fs::is_regular_file(path)) {
    throw Error(path.string() + ": missing (is " + dir.string() + " an export directory written by 'mamba-export export'?)");
  }
  Reader r(path);
  Json root = parse_manifest(path);
  if (!root.is(Json::Type::Object)) r.fail("expected a JSON object, found " + std::string(Json::type_name(root.type())));
  int64_t version = r.positive_int(root, "format_version");
  if (version != kFormatVersion) {
    r.fail("format_version " + std::to_string(version) + " is not supported by this runtime (supported: " +
           std::to_string(kFormatVersion) + "); re-export with this version of mamba-export");
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
  m.custom_op_library = library_path(r, root, m.dir);
  m.byte_level = byte_level_vocabulary(r, root);
  return m;
}

}  // namespace mamba::detail
