#include "engine/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "engine/check.h"

namespace hfq {
namespace {

std::string errno_text(int err) { return std::strerror(err); }

// Writes all `size` bytes, retrying short writes and interrupted calls.
// Returns 0 or the errno of the failure.
int write_all(int fd, const std::byte* data, size_t size) {
    while (size > 0) {
        const ssize_t n = ::write(fd, data, size);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        data += n;
        size -= static_cast<size_t>(n);
    }
    return 0;
}

// Opens a new, unique temporary file next to `path` (".<name>.tmp.<pid>.<n>",
// hidden so folder listings and globs skip it). O_EXCL guarantees it is ours;
// mode 0666 lets the umask decide the final permissions, as for any new file.
int create_temp_next_to(const std::string& path, std::string& temp_path) {
    static std::atomic<unsigned> counter{0};
    const std::filesystem::path p(path);
    for (int attempt = 0;; ++attempt) {
        const std::string name = cat(".", p.filename().string(), ".tmp.", ::getpid(), ".", counter++);
        temp_path = (p.parent_path() / name).string();
        const int fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0) return fd;
        // A leftover of a killed process with the same pid: try the next name.
        if (errno != EEXIST || attempt == 100) return -1;
    }
}

// Makes the rename itself durable: the folder entry is data too.
int sync_folder_of(const std::string& path) {
    const std::filesystem::path parent = std::filesystem::path(path).parent_path();
    const std::string folder = parent.empty() ? std::string(".") : parent.string();
    const int fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return errno;
    const int err = ::fsync(fd) == 0 ? 0 : errno;
    ::close(fd);
    return err;
}

}  // namespace

void write_file_atomically(const std::string& path, std::span<const std::span<const std::byte>> pieces) {
    std::string temp;
    const int fd = create_temp_next_to(path, temp);
    const int open_error = errno;
    HFQ_CHECK(fd >= 0, "cannot write '", path, "': creating the temporary file '", temp,
              "' failed: ", errno_text(open_error));

    // Runs the steps in order; the first failure is kept for the message and
    // skips the steps after it (except close, which always runs).
    const char* failed_step = nullptr;
    int err = 0;
    auto step = [&](const char* what, int result) {
        if (result != 0 && failed_step == nullptr) {
            failed_step = what;
            err = result;
        }
    };
    for (const auto& piece : pieces)
        if (failed_step == nullptr) step("writing", write_all(fd, piece.data(), piece.size()));
    if (failed_step == nullptr) step("flushing to disk", ::fsync(fd) == 0 ? 0 : errno);
    step("closing", ::close(fd) == 0 ? 0 : errno);  // close can report a deferred write error (NFS)
    if (failed_step == nullptr)
        step("renaming over the target", std::rename(temp.c_str(), path.c_str()) == 0 ? 0 : errno);
    if (failed_step != nullptr) {
        ::unlink(temp.c_str());
        throw Error(cat("cannot write '", path, "': ", failed_step, " (temporary file '", temp,
                        "') failed: ", errno_text(err), "; the previous file, if any, is unchanged"));
    }
    err = sync_folder_of(path);
    HFQ_CHECK(err == 0, "wrote '", path, "', but flushing its folder to disk failed: ", errno_text(err));
}

void write_file_atomically(const std::string& path, std::span<const std::byte> bytes) {
    write_file_atomically(path, std::span<const std::span<const std::byte>>(&bytes, 1));
}

void write_file_atomically(const std::string& path, const std::string& text) {
    write_file_atomically(path, std::as_bytes(std::span<const char>(text)));
}

std::vector<std::byte> read_file_bytes(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    HFQ_CHECK(fd >= 0, "cannot open '", path, "': ", errno_text(errno));
    struct stat info {};
    if (::fstat(fd, &info) != 0 || S_ISDIR(info.st_mode)) {
        const int err = S_ISDIR(info.st_mode) ? EISDIR : errno;
        ::close(fd);
        throw Error(cat("cannot read '", path, "': ", errno_text(err)));
    }
    // Read until end of file rather than trusting st_size alone (a file that
    // changes meanwhile, or a pipe, still reads correctly). One byte more than
    // st_size is room to see the end without growing the buffer.
    std::vector<std::byte> bytes(static_cast<size_t>(std::max<off_t>(info.st_size, 0)) + 1);
    size_t filled = 0;
    for (;;) {
        if (filled == bytes.size()) bytes.resize(2 * bytes.size());
        const ssize_t n = ::read(fd, bytes.data() + filled, bytes.size() - filled);
        if (n == 0) break;
        if (n < 0) {
            if (errno == EINTR) continue;
            const int err = errno;
            ::close(fd);
            throw Error(cat("cannot read '", path, "': ", errno_text(err)));
        }
        filled += static_cast<size_t>(n);
    }
    bytes.resize(filled);
    ::close(fd);
    return bytes;
}

}  // namespace hfq
