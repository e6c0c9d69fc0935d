// Whole-file input and output: read a file into memory, or replace a file
// atomically.
//
// An atomic write goes to a temporary file in the same folder (same file
// system, so the rename cannot turn into a copy), is flushed to disk with
// fsync, and only then renamed over `path`. A reader therefore sees either
// the complete old file or the complete new one, and a failed or interrupted
// save (full disk, killed process, power loss) never destroys the previous
// checkpoint. On failure the temporary file is removed and hfq::Error names
// the path and the system's reason (errno text). POSIX only.
#pragma once
#include <cstddef>
#include <span>
#include <string>
#include <vector>

namespace hfq {

// Writes the pieces, one after the other, as the new content of `path`.
// Taking pieces lets a caller write a header and tensor buffers without first
// copying them into one block.
void write_file_atomically(const std::string& path, std::span<const std::span<const std::byte>> pieces);
void write_file_atomically(const std::string& path, std::span<const std::byte> bytes);
void write_file_atomically(const std::string& path, const std::string& text);

// The whole content of `path`; throws naming the path when it is missing, a
// folder, or unreadable.
std::vector<std::byte> read_file_bytes(const std::string& path);

}  // namespace hfq
