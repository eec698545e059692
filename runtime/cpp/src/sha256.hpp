// SHA-256 (FIPS 180-4), to check an export directory against the digests in its manifest.json. The block function
// uses the x86 SHA extensions where the CPU has them (about 6x faster), else portable C++; both give the same digest.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>

namespace mamba::detail {

/// The lowercase hex SHA-256 of the file's bytes, with the fastest block function. Throws mamba::Error when the
/// file cannot be read.
std::string sha256_file(const std::filesystem::path& path);

enum class Sha256Blocks { Portable, ShaExtensions };

/// Whether this CPU has the x86 SHA extensions.
bool sha_extensions_available();

/// The lowercase hex SHA-256 of a buffer with the given block function (tests compare the two).
std::string sha256_hex(const void* data, size_t size, Sha256Blocks blocks);

}  // namespace mamba::detail
