#include "json.hpp"

#include <cerrno>
#include <cstdlib>
#include <string>

#include "mamba_runtime.hpp"

namespace mamba::detail {

namespace {
constexpr int kMaxDepth = 128;  // deeper nesting is refused instead of exhausting the stack
}

class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  Json document() {
    Json value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("unexpected text after the JSON value");
    return value;
  }

 private:
  std::string_view text_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    size_t line = 1, column = 1;
    for (size_t i = 0; i < pos_ && i < text_.size(); ++i) {
      if (text_[i] == '\n') {
        ++line;
        column = 1;
      } else {
        ++column;
      }
    }
    throw Error("line " + std::to_string(line) + ", column " + std::to_string(column) + ": " + what);
  }

  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' ||
                                   text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  char peek() {
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end of text");
    return text_[pos_];
  }

  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }

  bool consume_word(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  Json parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth));
    Json v;
    char c = peek();
    if (c == '{') {
      v.type_ = Json::Type::Object;
      parse_object(v, depth);
    } else if (c == '[') {
      v.type_ = Json::Type::Array;
      parse_array(v, depth);
    } else if (c == '"') {
      v.type_ = Json::Type::String;
      v.string_ = parse_string();
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      v.type_ = Json::Type::Number;
      v.number_ = parse_number();
    } else if (consume_word("true")) {
      v.type_ = Json::Type::Bool;
      v.bool_ = true;
    } else if (consume_word("false")) {
      v.type_ = Json::Type::Bool;
    } else if (consume_word("null")) {
      v.type_ = Json::Type::Null;
    } else {
      fail("expected a JSON value");
    }
    return v;
  }

  void parse_object(Json& v, int depth) {
    expect('{');
    if (peek() == '}') {
      ++pos_;
      return;
    }
    while (true) {
      if (peek() != '"') fail("expected a string key");
      std::string key = parse_string();
      expect(':');
      v.object_[key] = parse_value(depth + 1);
      if (peek() == '}') {
        ++pos_;
        return;
      }
      expect(',');
    }
  }

  void parse_array(Json& v, int depth) {
    expect('[');
    if (peek() == ']') {
      ++pos_;
      return;
    }
    while (true) {
      v.array_.push_back(parse_value(depth + 1));
      if (peek() == ']') {
        ++pos_;
        return;
      }
      expect(',');
    }
  }

  double parse_number() {
    size_t start = pos_;
    auto digits = [&] {
      size_t from = pos_;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
      if (pos_ == from) fail("expected a digit");
    };
    if (text_[pos_] == '-') ++pos_;
    digits();
    if (pos_ < text_.size() && text_[pos_] == '.') {
      ++pos_;
      digits();
    }
    if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      digits();
    }
    std::string literal(text_.substr(start, pos_ - start));
    errno = 0;
    double value = std::strtod(literal.c_str(), nullptr);
    if (errno == ERANGE) fail("number out of range: " + literal);
    return value;
  }

  unsigned parse_hex4() {
    if (pos_ + 4 > text_.size()) fail("incomplete \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      char h = text_[pos_++];
      code <<= 4;
      if (h >= '0' && h <= '9') code |= unsigned(h - '0');
      else if (h >= 'a' && h <= 'f') code |= unsigned(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') code |= unsigned(h - 'A' + 10);
      else fail("bad hex digit in \\u escape");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  // The rest of a raw (unescaped) character of a string whose first byte `lead` >= 0x80 was just read: one
  // well-formed UTF-8 sequence (RFC 3629: no overlong forms, no surrogates, at most U+10FFFF), copied to `out`.
  // Python's json reader requires the same, and the two runtimes read the same manifests.
  void copy_utf8(std::string& out, unsigned char lead) {
    const size_t start = pos_ - 1;
    int more;
    unsigned cp;
    if (lead >= 0xC2 && lead <= 0xDF) {
      more = 1, cp = lead & 0x1Fu;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      more = 2, cp = lead & 0x0Fu;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      more = 3, cp = lead & 0x07u;
    } else {
      pos_ = start;
      fail("invalid UTF-8 in string");
    }
    for (int i = 0; i < more; ++i) {
      if (pos_ >= text_.size() || (static_cast<unsigned char>(text_[pos_]) & 0xC0) != 0x80) {
        pos_ = start;
        fail("invalid UTF-8 in string");
      }
      cp = cp << 6 | (static_cast<unsigned char>(text_[pos_++]) & 0x3Fu);
    }
    const bool overlong = (more == 2 && cp < 0x800) || (more == 3 && cp < 0x10000);
    if (overlong || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) {
      pos_ = start;
      fail("invalid UTF-8 in string");
    }
    out.append(text_.substr(start, pos_ - start));
  }

  unsigned parse_code_point() {
    unsigned cp = parse_hex4();
    if (cp >= 0xD800 && cp <= 0xDBFF) {  // a UTF-16 surrogate pair
      if (!consume_word("\\u")) fail("unpaired surrogate in \\u escape");
      unsigned low = parse_hex4();
      if (low < 0xDC00 || low > 0xDFFF) fail("bad low surrogate in \\u escape");
      cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
      fail("unpaired surrogate in \\u escape");
    }
    return cp;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) fail("unterminated string");
      char c = text_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (static_cast<unsigned char>(c) >= 0x80) {
        copy_utf8(out, static_cast<unsigned char>(c));
        continue;
      }
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= text_.size()) fail("unterminated string");
      char e = text_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': append_utf8(out, parse_code_point()); break;
        default: fail(std::string("bad escape \\") + e);
      }
    }
  }
};

Json Json::parse(std::string_view text) { return Parser(text).document(); }

const Json* Json::find(const std::string& key) const {
  if (type_ != Type::Object) return nullptr;
  auto it = object_.find(key);
  return it == object_.end() ? nullptr : &it->second;
}

const char* Json::type_name(Type t) {
  switch (t) {
    case Type::Null: return "null";
    case Type::Bool: return "a boolean";
    case Type::Number: return "a number";
    case Type::String: return "a string";
    case Type::Array: return "an array";
    case Type::Object: return "an object";
  }
  return "?";
}

}  // namespace mamba::detail
