// SHA-256 of a file (FIPS 180-4), to check an export directory against the digests in its manifest.json.
#pragma once

#include <filesystem>
#include <string>

namespace mamba::detail {

/// The lowercase hex SHA-256 of the file's bytes. Throws mamba::Error when it cannot be read.
std::string sha256_file(const std::filesystem::path& path);

}  // namespace mamba::detail
