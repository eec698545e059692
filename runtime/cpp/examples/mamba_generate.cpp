// mamba_generate: generate tokens from an export directory with the C++ runtime. See --help.
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "mamba_runtime.hpp"

namespace {

const char* kUsage =
    "usage: mamba_generate EXPORT_DIR (--prompt-ids 1,2,3 | --prompt TEXT | --prompt-file PATH) [options]\n"
    "\n"
    "Runs the prompt through EXPORT_DIR/model.onnx (model_last.onnx when present), then decodes one token at a time\n"
    "with decode.onnx, and prints the new token ids (and their text, for a byte-level vocabulary), the prefill time\n"
    "and ms/token. Exit code 2 and one line on stderr on any error.\n"
    "\n"
    "  --prompt-ids IDS      comma-separated token ids\n"
    "  --prompt TEXT         its UTF-8 bytes as ids; needs a byte-level vocabulary (byte_vocab.json in the export)\n"
    "  --prompt-file PATH    as --prompt, the bytes of a file (- for standard input): prompts of any length, where\n"
    "                        a command-line argument holds at most 128 KiB on Linux\n"
    "  --max-new-tokens N    how many tokens to generate (default 32)\n"
    "  --greedy              pick the most likely token (the default)\n"
    "  --sample              sample instead, with:\n"
    "    --temperature T     divide the logits by T > 0 (default 1)\n"
    "    --top-k K           among the K most likely tokens; 0 = all (default 0)\n"
    "    --top-p P           then among the fewest most likely tokens whose probability reaches P, in (0, 1];\n"
    "                        1 = all (default 1)\n"
    "    --seed S            random seed (default 0)\n"
    "  --repetition-penalty R\n"
    "                        greedy or sampled: first, the logit of every token seen so far (the prompt and the new\n"
    "                        tokens) is divided by R when positive, multiplied by R when negative; R > 0, 1 = off\n"
    "                        (default 1)\n"
    "  --stop-ids IDS        comma-separated ids that end the generation (in tokens:, not in text:)\n"
    "  --stop TEXT           a stop string: the generation ends when its new bytes end with TEXT (in tokens:, not in\n"
    "                        text:); repeatable; needs a byte-level vocabulary (else give --stop-ids)\n"
    "  --threads N           onnxruntime intra-op threads; 0 = its default (default 0)\n"
    "  --logprobs            also print each new token's log-probability under the model (log softmax of its raw\n"
    "                        logits, before the repetition penalty and the sampling), a logprobs: line\n"
    "  --dump-logits FILE    write the float32 logits each new token was picked from (tokens x vocab, raw), as the\n"
    "                        model gave them: before the repetition penalty and the sampling\n"
    "  --prefill-chunk N     prompt tokens per prefill run; 0 = automatic (default 0)\n"
    "  --ort-config KEY=VAL  an onnxruntime session config entry, e.g. session.disable_prepacking=1 (repeatable)\n"
    "  --no-verify           skip checking the files' sha256 against manifest.json\n"
    "  --no-custom-ops       do not register the custom-op library (onnxruntime inlines the graphs' ONNX functions)\n"
    "  --help                show this text\n";

struct Args {
  std::string export_dir;
  std::vector<int64_t> prompt_ids;
  std::string prompt_text;
  std::string dump_logits;
  std::vector<std::string> stop_texts;  // --stop, in order: stop_sequences[i] is stop_texts[i]'s bytes
  int prompts = 0;  // --prompt-ids, --prompt and --prompt-file given: exactly one is right
  bool has_ids = false, has_text = false, sample = false, sampling_flag = false, greedy_flag = false;
  mamba::GenerateOptions generate;
  mamba::SessionOptions session;
};

int64_t parse_int(const std::string& flag, const std::string& text, int64_t lo = INT64_MIN, int64_t hi = INT64_MAX) {
  errno = 0;
  char* end = nullptr;
  long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE) {
    throw mamba::Error(flag + ": expected an integer, found '" + text + "'");
  }
  if (value < lo || value > hi) {
    throw mamba::Error(flag + ": " + text + " is out of range [" + std::to_string(lo) + ", " + std::to_string(hi) +
                       "]");
  }
  return value;
}

// A uint64_t in [0, 2^64 - 1] (the seed's range; strtoull alone would take "-1" as 2^64 - 1).
uint64_t parse_u64(const std::string& flag, const std::string& text) {
  errno = 0;
  char* end = nullptr;
  unsigned long long value = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || text.find_first_not_of("0123456789") != std::string::npos) {
    throw mamba::Error(flag + ": expected a non-negative integer, found '" + text + "'");
  }
  if (errno == ERANGE) throw mamba::Error(flag + ": " + text + " is out of range [0, 18446744073709551615]");
  return value;
}

std::vector<int64_t> parse_ids(const std::string& flag, const std::string& text) {
  std::vector<int64_t> ids;
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    if (comma == std::string::npos) comma = text.size();
    ids.push_back(parse_int(flag, text.substr(start, comma - start)));
    start = comma + 1;
  }
  return ids;
}

float parse_float(const std::string& flag, const std::string& text) {
  errno = 0;
  char* end = nullptr;
  float value = std::strtof(text.c_str(), &end);
  if (text.empty() || *end != '\0') throw mamba::Error(flag + ": expected a number, found '" + text + "'");
  if (errno == ERANGE) {  // e.g. 1e-50 or 1e39: a number, but none that a float holds
    throw mamba::Error(flag + ": " + text + " is outside the range of a float (about 1e-38 to 3e38 in magnitude)");
  }
  return value;
}

// The bytes of --prompt-file's file, as they are ("-": standard input).
std::string read_prompt_file(const std::string& path) {
  const std::string what = "--prompt-file: " + path + ": cannot read it";
  if (path == "-") {
    std::string data{std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>()};
    if (std::cin.bad()) throw mamba::Error(what);
    return data;
  }
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw mamba::Error(what + " (it is a directory)");
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw mamba::Error(what + (errno ? " (" + std::string(std::strerror(errno)) + ")" : std::string()));
  std::string data{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  if (in.bad()) throw mamba::Error(what);
  return data;
}

Args parse_args(const std::vector<std::string>& argv) {
  Args a;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& flag = argv[i];
    auto value = [&]() -> const std::string& {
      if (i + 1 >= argv.size()) throw mamba::Error(flag + ": needs a value");
      return argv[++i];
    };
    if (flag == "--prompt-ids") {
      a.prompt_ids = parse_ids(flag, value());
      a.has_ids = true;
      ++a.prompts;
    } else if (flag == "--prompt") {
      a.prompt_text = value();
      a.has_text = true;
      ++a.prompts;
    } else if (flag == "--prompt-file") {
      a.prompt_text = read_prompt_file(value());
      a.has_text = true;
      ++a.prompts;
    } else if (flag == "--max-new-tokens") {
      a.generate.max_new_tokens = int(parse_int(flag, value(), 1, INT32_MAX));
    } else if (flag == "--greedy") {
      a.greedy_flag = true;
    } else if (flag == "--sample") {
      a.sample = true;
    } else if (flag == "--temperature") {
      a.generate.temperature = parse_float(flag, value());
      a.sampling_flag = true;
    } else if (flag == "--top-k") {
      a.generate.top_k = int(parse_int(flag, value(), 0, INT32_MAX));
      a.sampling_flag = true;
    } else if (flag == "--top-p") {
      a.generate.top_p = parse_float(flag, value());
      a.sampling_flag = true;
    } else if (flag == "--repetition-penalty") {
      a.generate.repetition_penalty = parse_float(flag, value());
    } else if (flag == "--seed") {
      a.generate.seed = parse_u64(flag, value());
      a.sampling_flag = true;
    } else if (flag == "--stop-ids") {
      a.generate.stop_tokens = parse_ids(flag, value());
    } else if (flag == "--stop") {
      a.stop_texts.push_back(value());
      if (a.stop_texts.back().empty()) throw mamba::Error("--stop: empty stop string; give at least one character");
    } else if (flag == "--threads") {
      a.session.intra_op_threads = int(parse_int(flag, value(), 0, 1024));
    } else if (flag == "--dump-logits") {
      a.dump_logits = value();
    } else if (flag == "--logprobs") {
      a.generate.logprobs = true;
    } else if (flag == "--prefill-chunk") {
      a.session.prefill_chunk = int(parse_int(flag, value(), 0, INT32_MAX));
    } else if (flag == "--ort-config") {
      const std::string& entry = value();
      size_t eq = entry.find('=');
      if (eq == std::string::npos || eq == 0) throw mamba::Error(flag + ": expected KEY=VALUE, found '" + entry + "'");
      a.session.ort_config.emplace_back(entry.substr(0, eq), entry.substr(eq + 1));
    } else if (flag == "--no-verify") {
      a.session.verify_checksums = false;
    } else if (flag == "--no-custom-ops") {
      a.session.custom_ops = false;
    } else if (flag.rfind("--", 0) == 0) {
      throw mamba::Error("unknown option " + flag + " (see --help)");
    } else if (a.export_dir.empty()) {
      a.export_dir = flag;
    } else {
      throw mamba::Error("unexpected argument '" + flag + "' (one export directory only; see --help)");
    }
  }
  if (a.export_dir.empty()) throw mamba::Error("give the export directory (see --help)");
  if (a.prompts != 1) throw mamba::Error("give exactly one of --prompt-ids, --prompt and --prompt-file");
  if (a.sampling_flag && !a.sample) throw mamba::Error("--temperature, --top-k, --top-p and --seed need --sample");
  if (a.sample && a.greedy_flag) throw mamba::Error("--greedy and --sample exclude each other: give one");
  a.generate.greedy = !a.sample;
  return a;
}

std::string join(const std::vector<int64_t>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) out += (i ? "," : "") + std::to_string(ids[i]);
  return out;
}

// Length of the valid UTF-8 sequence that starts at text[i] (a byte >= 0x80), or 0 when there is none.
size_t utf8_length(const std::string& text, size_t i) {
  auto byte = [&](size_t k) { return static_cast<unsigned char>(text[k]); };
  unsigned char c = byte(i);
  size_t n = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
  if (n == 0 || i + n > text.size()) return 0;
  // The second byte's range excludes overlong forms, surrogates and code points past U+10FFFF.
  unsigned char lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80;
  unsigned char hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;
  if (byte(i + 1) < lo || byte(i + 1) > hi) return 0;
  for (size_t k = 2; k < n; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return 0;
  }
  return n;
}

// The text in double quotes on one line: valid UTF-8 as it is; quotes, backslashes, control characters and bytes
// that are not valid UTF-8 escaped (a byte-level model can emit any byte).
std::string quoted(const std::string& text) {
  std::string out = "\"";
  for (size_t i = 0; i < text.size();) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    size_t n = c >= 0x80 ? utf8_length(text, i) : 1;
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7F || n == 0) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      out += hex;
    } else {
      out += text.substr(i, n);
    }
    i += n == 0 ? 1 : n;
  }
  return out + "\"";
}

// "greedy", "greedy (repetition penalty 1.300000)", "sample (temperature 0.800000, top-k 40, top-p 0.900000, seed 1,
// repetition penalty 1.300000)": top-p and the penalty only when they are on.
std::string decoding_text(const mamba::GenerateOptions& o) {
  std::vector<std::string> parts;
  if (!o.greedy) {
    parts.push_back("temperature " + std::to_string(o.temperature));
    parts.push_back("top-k " + std::to_string(o.top_k));
    if (o.top_p != 1.0f) parts.push_back("top-p " + std::to_string(o.top_p));
    parts.push_back("seed " + std::to_string(o.seed));
  }
  if (o.repetition_penalty != 1.0f) parts.push_back("repetition penalty " + std::to_string(o.repetition_penalty));
  std::string text = o.greedy ? "greedy" : "sample";
  for (size_t i = 0; i < parts.size(); ++i) text += (i ? ", " : " (") + parts[i];
  return parts.empty() ? text : text + ")";
}

void print_result(const mamba::Model& model, const Args& a, const std::vector<int64_t>& prompt,
                  const mamba::Generation& g) {
  const mamba::ModelInfo& info = model.info();
  std::cout << "tokens: " << join(g.tokens) << "\n";
  if (info.byte_level) {  // without the stop string or token, as the Python runtime gives it (tokens: keeps it)
    std::vector<int64_t> shown = g.tokens;  // (a stop token completes no stop string: only it is left out)
    size_t cut = g.stop_sequence >= 0 ? a.generate.stop_sequences[size_t(g.stop_sequence)].size() : g.stopped ? 1 : 0;
    shown.resize(shown.size() - cut);  // generate() matched the sequence within the new tokens: cut <= size
    std::cout << "text: " << quoted(mamba::decode_bytes(info, shown)) << "\n";
  }
  std::cout << "stopped: " << (g.stop_sequence >= 0 ? "stop string" : g.stopped ? "stop token" : "max new tokens")
            << "\n";
  if (a.generate.logprobs) {
    std::cout << "logprobs: ";
    for (size_t i = 0; i < g.logprobs.size(); ++i) {
      char value[32];
      std::snprintf(value, sizeof value, "%.9g", g.logprobs[i]);
      std::cout << (i ? "," : "") << value;
    }
    std::cout << "\n";
  }
  std::cout << "decoding: " << decoding_text(a.generate)
            << "; custom ops: " << (info.custom_op_library.empty() ? "off" : info.custom_op_library) << "\n";
  std::cout << "prefill: " << prompt.size() << " tokens in " << g.prefill_ms << " ms (" << info.prefill_graph
            << ", logits " << info.logits_dtype << ")\n";
  if (g.tokens.size() > 1) {
    std::cout << "decode: " << g.tokens.size() - 1 << " tokens, " << g.ms_per_token() << " ms/token ("
              << 1000.0 / g.ms_per_token() << " tokens/s)\n";
  }
}

int run(const std::vector<std::string>& argv) {
  for (const auto& arg : argv) {
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      return 0;
    }
  }
  Args a = parse_args(argv);
  mamba::Model model(a.export_dir, a.session);
  std::vector<int64_t> prompt = a.has_text ? mamba::encode_bytes(model.info(), a.prompt_text) : a.prompt_ids;
  if (!a.stop_texts.empty() && !model.info().byte_level) {
    throw mamba::Error("--stop needs a byte-level vocabulary (byte_vocab.json in the export); give the stop token "
                       "ids with --stop-ids");
  }
  for (const std::string& text : a.stop_texts) {
    a.generate.stop_sequences.push_back(mamba::encode_bytes(model.info(), text));
  }
  std::ofstream dump;
  if (!a.dump_logits.empty()) {
    dump.open(a.dump_logits, std::ios::binary | std::ios::trunc);
    if (!dump) throw mamba::Error(a.dump_logits + ": cannot be written");
    a.generate.on_token = [&dump](int64_t, const std::vector<float>& logits) {
      dump.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size() * sizeof(float)));
    };
  }
  mamba::Generation g = model.generate(prompt, a.generate);
  if (dump.is_open() && !dump.flush()) throw mamba::Error(a.dump_logits + ": write failed");
  print_result(model, a, prompt, g);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const std::exception& e) {
    std::string message = e.what();
    for (char& c : message) c = (c == '\n' || c == '\r') ? ' ' : c;
    std::cerr << "mamba_generate: error: " << message << "\n";
    return 2;
  }
}
