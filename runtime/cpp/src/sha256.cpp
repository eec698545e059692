#include "sha256.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include "mamba_runtime.hpp"

namespace mamba::detail {

namespace {

alignas(16) constexpr std::array<uint32_t, 64> kRound = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

using State = std::array<uint32_t, 8>;
using BlockFunction = void (*)(State& state, const unsigned char* blocks, size_t count);

uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void blocks_portable(State& state, const unsigned char* p, size_t count) {
  for (; count > 0; --count, p += 64) {
    std::array<uint32_t, 64> w{};
    for (int i = 0; i < 16; ++i) {
      w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 | uint32_t(p[4 * i + 2]) << 8 |
             uint32_t(p[4 * i + 3]);
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    auto [a, b, c, d, e, f, g, h] = state;
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kRound[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    State add = {a, b, c, d, e, f, g, h};
    for (int i = 0; i < 8; ++i) state[i] += add[i];
  }
}

#if defined(__x86_64__)
// The same rounds with SHA-NI: sha256rnds2 does two rounds on the state held as (ABEF, CDGH); sha256msg1/msg2
// extend the message schedule four words at a time.
__attribute__((target("sha,sse4.1,ssse3"))) void blocks_sha_extensions(State& state, const unsigned char* p,
                                                                         size_t count) {
  const __m128i byteswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(&state[0])), 0xB1);  // CDAB
  __m128i cdgh = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(&state[4])), 0x1B);  // EFGH
  __m128i abef = _mm_alignr_epi8(tmp, cdgh, 8);
  cdgh = _mm_blend_epi16(cdgh, tmp, 0xF0);
  for (; count > 0; --count, p += 64) {
    __m128i abef_in = abef, cdgh_in = cdgh;
    __m128i w[4];  // the last 16 words of the schedule
    for (int i = 0; i < 16; ++i) {
      __m128i words;
      if (i < 4) {
        words = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * i)), byteswap);
      } else {
        __m128i t = _mm_sha256msg1_epu32(w[i & 3], w[(i + 1) & 3]);
        t = _mm_add_epi32(t, _mm_alignr_epi8(w[(i + 3) & 3], w[(i + 2) & 3], 4));
        words = _mm_sha256msg2_epu32(t, w[(i + 3) & 3]);
      }
      w[i & 3] = words;
      __m128i k = _mm_add_epi32(words, _mm_load_si128(reinterpret_cast<const __m128i*>(&kRound[4 * i])));
      cdgh = _mm_sha256rnds2_epu32(cdgh, abef, k);
      abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(k, 0x0E));
    }
    abef = _mm_add_epi32(abef, abef_in);
    cdgh = _mm_add_epi32(cdgh, cdgh_in);
  }
  tmp = _mm_shuffle_epi32(abef, 0x1B);   // FEBA
  cdgh = _mm_shuffle_epi32(cdgh, 0xB1);  // DCHG
  _mm_storeu_si128(reinterpret_cast<__m128i*>(&state[0]), _mm_blend_epi16(tmp, cdgh, 0xF0));  // DCBA
  _mm_storeu_si128(reinterpret_cast<__m128i*>(&state[4]), _mm_alignr_epi8(cdgh, tmp, 8));     // HGFE
}
#endif

BlockFunction block_function(Sha256Blocks blocks) {
#if defined(__x86_64__)
  if (blocks == Sha256Blocks::ShaExtensions) return blocks_sha_extensions;
#endif
  if (blocks == Sha256Blocks::ShaExtensions) throw Error("SHA-256: this CPU has no SHA extensions");
  return blocks_portable;
}

class Sha256 {
 public:
  explicit Sha256(BlockFunction blocks) : blocks_(blocks) {}

  void update(const unsigned char* data, size_t n) {
    bytes_ += n;
    if (fill_ > 0) {
      size_t take = std::min(n, buffer_.size() - fill_);
      std::memcpy(buffer_.data() + fill_, data, take);
      fill_ += take;
      data += take;
      n -= take;
      if (fill_ < buffer_.size()) return;
      blocks_(state_, buffer_.data(), 1);
      fill_ = 0;
    }
    blocks_(state_, data, n / 64);  // whole blocks straight from the input
    fill_ = n % 64;
    std::memcpy(buffer_.data(), data + n - fill_, fill_);
  }

  std::string hex_digest() {
    uint64_t bits = bytes_ * 8;
    std::array<unsigned char, 72> tail{};  // 0x80, zeros up to 56 mod 64, the length in bits (big-endian)
    tail[0] = 0x80;
    size_t pad = (fill_ < 56 ? 56 : 120) - fill_;
    for (int i = 0; i < 8; ++i) tail[pad + i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
    update(tail.data(), pad + 8);
    std::string out;
    char hex[9];
    for (uint32_t h : state_) {
      std::snprintf(hex, sizeof hex, "%08x", h);
      out += hex;
    }
    return out;
  }

 private:
  BlockFunction blocks_;
  State state_ = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::array<unsigned char, 64> buffer_{};
  size_t fill_ = 0;
  uint64_t bytes_ = 0;
};

}  // namespace

bool sha_extensions_available() {
#if defined(__x86_64__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  bool sse41_ssse3 = (c & bit_SSE4_1) && (c & bit_SSSE3);
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return sse41_ssse3 && (b & bit_SHA);
#else
  return false;
#endif
}

std::string sha256_hex(const void* data, size_t size, Sha256Blocks blocks) {
  Sha256 hash(block_function(blocks));
  hash.update(static_cast<const unsigned char*>(data), size);
  return hash.hex_digest();
}

std::string sha256_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot be read");
  Sha256 hash(block_function(sha_extensions_available() ? Sha256Blocks::ShaExtensions : Sha256Blocks::Portable));
  std::vector<char> chunk(1 << 20);
  while (in.read(chunk.data(), std::streamsize(chunk.size())) || in.gcount() > 0) {
    hash.update(reinterpret_cast<const unsigned char*>(chunk.data()), size_t(in.gcount()));
  }
  if (in.bad()) throw Error(path.string() + ": read failed");
  return hash.hex_digest();
}

}  // namespace mamba::detail
