// A small JSON reader for manifest.json: the whole of RFC 8259 that a manifest uses (objects, arrays, strings with
// escapes, numbers, true/false/null), parsed into a tree. Not part of the public API.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace mamba::detail {

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  /// Parses a whole document. Throws mamba::Error("line L, column C: <what>") on malformed text.
  static Json parse(std::string_view text);

  Type type() const { return type_; }
  bool is(Type t) const { return type_ == t; }
  bool as_bool() const { return bool_; }
  double as_number() const { return number_; }
  const std::string& as_string() const { return string_; }
  const std::vector<Json>& as_array() const { return array_; }
  const std::map<std::string, Json>& as_object() const { return object_; }
  /// The member `key` of an object, or nullptr when absent (or when this is not an object).
  const Json* find(const std::string& key) const;

  static const char* type_name(Type t);

 private:
  friend class Parser;
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0;
  std::string string_;
  std::vector<Json> array_;
  std::map<std::string, Json> object_;
};

}  // namespace mamba::detail
